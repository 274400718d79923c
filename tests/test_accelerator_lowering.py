"""What a GPU or TPU gets: the train step lowered for ``cuda`` and ``tpu`` on this CPU holds stock XLA only.

The CPU layer (`jfast.cpu`) writes bf16 products in the forms XLA:CPU's kernel takes, with their own gradient
products. Those forms must never reach an accelerator: lowered for ``cuda`` or ``tpu``, the bf16 classifier's gradient
has exactly the matrix products of the float32 one and no platform switch (``case``), while lowered for the CPU it
keeps its CPU forms (so the test can tell the two apart).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfast.cpu import target
from jfast.data import batch_from_rows
from jfast.models import BertConfig, BertForSequenceClassification, GPTConfig
from jfast.optim import OptimizerConfig, make_optimizer
from jfast.training import causal_lm_loss, classification_loss, create_train_state, make_train_step

# MiniLM's shape (6 layers, width 384, 12 heads), a small vocabulary: the lowering does not depend on table size.
MINILM = BertConfig(
  vocab_size=1000, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
)


def _batch(rows=4, length=24):
  rng = np.random.default_rng(0)
  seqs = [rng.integers(1, 1000, size=int(n)) for n in rng.integers(4, length, size=rows)]
  return batch_from_rows(seqs, rng.integers(0, 2, size=rows), length, pad_id=0)


def _grad_text(dtype: str, platform: str, scan: bool = True) -> str:
  model = BertForSequenceClassification(MINILM.replace(dtype=dtype, scan_layers=scan), num_labels=2)
  batch = _batch()
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  loss = classification_loss(model)
  with target(platform):
    traced = jax.jit(jax.grad(lambda p, b: loss(p, b, jax.random.key(1), False)[0])).trace(params, batch)
  return traced.lower(lowering_platforms=(platform,)).as_text()


def _count(text: str, op: str) -> int:
  return len(re.findall(rf"\bstablehlo\.{op}\b", text))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_bf16_gradient_lowers_to_the_fp32_products_for_accelerators(platform, scan):
  fp32, bf16 = _grad_text("float32", platform, scan), _grad_text("bfloat16", platform, scan)
  if scan:  # layers 0-4 are one loop body, forward and backward; the last layer runs apart
    assert _count(fp32, "while") == 2 and 40 < _count(fp32, "dot_general") < 100
  else:  # every layer's forward and backward products are there
    assert _count(fp32, "while") == 0 and _count(fp32, "dot_general") > 100
  assert _count(bf16, "dot_general") == _count(fp32, "dot_general")
  assert _count(bf16, "case") == 0 and _count(fp32, "case") == 0
  assert "custom_call" not in bf16  # no host callback, no CPU-only kernel


def test_cpu_lowering_keeps_the_cpu_forms():
  # The same bf16 gradient traced for the CPU takes the CPU layer: more products (the bias-gradient GEMVs) than the
  # float32 one. Without this the accelerator test above could pass because the layer never runs at all.
  fp32, bf16 = _grad_text("float32", "cpu"), _grad_text("bfloat16", "cpu")
  assert _count(bf16, "dot_general") > _count(fp32, "dot_general")
  assert _count(bf16, "case") == 0


def test_train_step_lowers_for_an_accelerator_through_its_platform():
  """`make_train_step(..., platform=)` traces and lowers the whole step (optimizer included) for that platform."""
  model = BertForSequenceClassification(MINILM.replace(dtype="bfloat16", num_hidden_layers=2), num_labels=2)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])()
  state = create_train_state(model, params, make_optimizer(OptimizerConfig(), 10), policy="bf16")
  batch = _batch()
  counts = {}
  for platform in ("cuda", "cpu"):
    step = make_train_step(classification_loss(model), policy="bf16", platform=platform, donate=False)
    text = step.lower(state, batch).as_text()
    counts[platform] = _count(text, "dot_general")
    assert _count(text, "case") == 0  # bf16 trains without loss scaling: no skip branch either
  assert counts["cuda"] < counts["cpu"]


def test_gpt_bf16_gradient_lowers_to_the_fp32_products_for_a_gpu():
  from jfast.models import GPT

  config = GPTConfig(vocab_size=512, n_positions=64, n_embd=128, n_layer=2, n_head=4)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 512, size=(2, 32)).astype(np.int32)
  from jfast.data import pack_documents

  rows = pack_documents([ids[0], ids[1]], 32)
  texts = {}
  for dtype in ("float32", "bfloat16"):
    model = GPT(config.replace(dtype=dtype))
    params = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    loss = causal_lm_loss(model)
    with target("cuda"):
      traced = jax.jit(jax.grad(lambda p, b, f=loss: f(p, b, None, True)[0])).trace(params, rows)
    texts[dtype] = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert _count(texts["bfloat16"], "dot_general") == _count(texts["float32"], "dot_general")
  assert _count(texts["bfloat16"], "case") == 0


def test_cpu_layer_is_on_by_default_only_for_cpus_with_bf16_instructions(tmp_path, monkeypatch):
  from jfast.cpu import platform

  avx2, bf16 = tmp_path / "avx2", tmp_path / "bf16"
  avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
  bf16.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
  assert platform.cpu_has_bf16(str(avx2)) is False and platform.cpu_has_bf16(str(bf16)) is True
  monkeypatch.setenv("JFAST_CPU_LAYER", "auto")
  for has_bf16 in (False, True):
    monkeypatch.setattr(platform, "cpu_has_bf16", lambda h=has_bf16: h)
    with target("cpu"):
      assert platform.active(jnp.bfloat16) is has_bf16
      assert platform.active(jnp.float32) is False
      with platform.use_layer(not has_bf16):  # the explicit setting wins
        assert platform.active(jnp.bfloat16) is (not has_bf16)
    with target("cuda"):
      assert platform.active(jnp.bfloat16) is False
  monkeypatch.setenv("JFAST_CPU_LAYER", "off")
  with target("cpu"):
    assert platform.active(jnp.bfloat16) is False
  monkeypatch.setenv("JFAST_CPU_LAYER", "sometimes")
  with pytest.raises(ValueError, match="JFAST_CPU_LAYER"), target("cpu"):
    platform.active(jnp.bfloat16)
