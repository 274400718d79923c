"""The fused dense-attention kernels: numerics of the GPU kernel (Pallas interpreter, on this CPU) against a float64
reference on padded and packed rows, forward and backward; which kernel each platform's trace takes; and what a
``cuda`` train step lowers to."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfast.cpu import target
from jfast.data import batch_from_rows
from jfast.models import BertConfig, BertForSequenceClassification
from jfast.nn import AttentionConfig
from jfast.nn.attention import Attention
from jfast.nn.fused_attention import _gpu_lengths, flash_attention, has_fused_kernel
from jfast.optim import OptimizerConfig, make_optimizer
from jfast.training import classification_loss, create_train_state, make_train_step


def _segments(kind: str, batch: int, length: int) -> np.ndarray:
  seg = np.zeros((batch, length), np.int32)
  if kind == "padded":  # one example per row, right padding
    for b, n in enumerate([length, length - 23, 9][:batch]):
      seg[b, :n] = 1
  else:  # packed: several examples per row, then padding
    seg[0, :20], seg[0, 20:51], seg[0, 51:70] = 1, 2, 3
    seg[1, :33], seg[1, 33:41] = 1, 2
    if batch > 2:
      seg[2, :length] = 1
  return seg


def _reference(q, k, v, seg, causal):
  """float64 softmax attention of every real query over the real keys of its own segment."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
  if causal:
    allowed &= np.tril(np.ones((seg.shape[1],) * 2, bool))[None]
  logits = np.where(allowed[:, None], logits, -np.inf)
  logits -= np.where(np.isfinite(logits.max(-1, keepdims=True)), logits.max(-1, keepdims=True), 0)
  probs = np.exp(logits)
  probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize(("kind", "causal"), [("padded", False), ("packed", False), ("packed", True)])
def test_gpu_kernel_matches_float64_forward_and_backward(kind, causal):
  rng = np.random.default_rng(3)
  batch, length, heads, depth = 3, 80, 2, 32  # 80: the wrapper pads rows to the kernel's 128
  q, k, v = (jnp.asarray(rng.standard_normal((batch, length, heads, depth)), jnp.float32) for _ in range(3))
  seg = _segments(kind, batch, length)
  real = seg > 0
  out = flash_attention(q, k, v, jnp.asarray(seg), causal=causal, platform="gpu", interpret=True)
  ref = _reference(q, k, v, seg, causal)
  assert np.abs(np.asarray(out) - ref)[real].max() < 2e-6

  weights = jnp.asarray(rng.standard_normal((batch, length, heads, depth)) * real[..., None, None], jnp.float32)

  def loss(q, k, v):  # real positions only: padding outputs reach no loss
    return jnp.sum(flash_attention(q, k, v, jnp.asarray(seg), causal=causal, platform="gpu", interpret=True) * weights)

  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  # float64 reference gradients by central differences would be slow; jax.grad of the float64 dense form is exact.
  with jax.enable_x64():
    ref_grads = jax.grad(
      lambda q, k, v: jnp.sum(_jax_reference(q, k, v, jnp.asarray(seg), causal) * weights.astype(jnp.float64)),
      argnums=(0, 1, 2),
    )(*(jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v)))
  for got, want in zip(grads, ref_grads, strict=True):
    assert np.abs(np.asarray(got, np.float64) - np.asarray(want))[real].max() < 5e-6
    assert np.all(np.asarray(got)[~real] == 0)  # padding keys and queries take no gradient


def _jax_reference(q, k, v, seg, causal):
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
  allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
  if causal:
    allowed &= jnp.tril(jnp.ones((seg.shape[1],) * 2, bool))[None]
  logits = jnp.where(allowed[:, None], logits, -1e300)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def test_kernel_lengths_divide_into_power_of_two_blocks():
  for length in (5, 17, 64, 66, 80, 128, 130, 512):
    padded, forward, backward = _gpu_lengths(length)
    assert padded >= length and padded % forward == 0 and padded % backward == 0
    assert forward & (forward - 1) == 0 and backward & (backward - 1) == 0 and forward >= 16


def _attention_text(platform, *, rate, deterministic, backend="auto"):
  module = Attention(AttentionConfig(backend=backend), dropout_rate=rate)
  x = jnp.ones((2, 24, 2, 32), jnp.bfloat16)
  seg = jnp.asarray(_segments("packed", 2, 24).clip(0, 1))
  rngs = {"dropout": jax.random.key(0)}

  def f(x):
    return jnp.sum(module.apply({}, x, x, x, seg, deterministic=deterministic, rngs=rngs).astype(jnp.float32))

  with target(platform):
    traced = jax.jit(jax.grad(f)).trace(x)
  return traced.lower(lowering_platforms=(platform,)).as_text()


def test_the_kernel_is_chosen_by_the_platform_traced_for():
  for platform, fused in (("cpu", False), ("cuda", True), ("tpu", True)):
    with target(platform):
      assert has_fused_kernel() == fused
  assert "custom_call" not in _attention_text("cpu", rate=0.0, deterministic=True)
  assert "__gpu$xla.gpu.triton" in _attention_text("cuda", rate=0.0, deterministic=True)
  assert "tpu_custom_call" in _attention_text("tpu", rate=0.0, deterministic=True)
  # Attention dropout, or backend="xla", keeps XLA's dense form: the kernels cannot drop probabilities.
  assert "triton" not in _attention_text("cuda", rate=0.1, deterministic=False)
  assert "triton" not in _attention_text("cuda", rate=0.0, deterministic=True, backend="xla")
  assert "__gpu$xla.gpu.triton" in _attention_text("cuda", rate=0.1, deterministic=True)  # evaluation


def _cuda_step_text(layers: int, scan: bool) -> str:
  config = BertConfig(
    vocab_size=1000,
    hidden_size=128,
    num_hidden_layers=layers,
    scan_layers=scan,
    num_attention_heads=4,
    intermediate_size=256,
    attention_probs_dropout_prob=0.0,  # the accelerator default: the fused kernel has no attention dropout
    dtype="bfloat16",
  )
  model = BertForSequenceClassification(config, num_labels=2, last_layer_pooled_only=False)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])()
  state = create_train_state(model, params, make_optimizer(OptimizerConfig(), 10), policy="bf16")
  rng = np.random.default_rng(0)
  packed = batch_from_rows([rng.integers(1, 1000, size=30) for _ in range(4)], np.zeros(4, np.int32), 40, pad_id=0)
  seg = np.asarray(packed.segment_ids).copy()
  seg[:, 15:30] *= 2  # two examples in each row
  packed = packed._replace(segment_ids=seg)
  step = make_train_step(classification_loss(model), policy="bf16", platform="cuda", donate=False)
  return step.lower(state, packed).as_text()


def _calls(text: str) -> list[str]:
  return re.findall(r"custom_call @([\w$.]+)", text) + re.findall(r'call_target_name = "([^"]+)"', text)


def test_cuda_train_step_on_packed_rows_runs_the_kernel_forward_and_backward():
  """The bf16 train step on packed rows, lowered for a GPU: the fused kernel forward and backward, no host
  callbacks, no branches, and the layers inside one loop (the program does not grow with depth)."""
  texts = {layers: _cuda_step_text(layers, scan=True) for layers in (2, 4)}
  for text in texts.values():
    calls = _calls(text)
    assert not [c for c in calls if "callback" in c.lower()]  # no host callback
    assert len(re.findall(r"\bstablehlo\.case\b", text)) == 0
    assert len(re.findall(r"\bstablehlo\.while\b", text)) == 2  # the scanned layers, forward and backward
  triton = {layers: [c for c in _calls(text) if "triton" in c] for layers, text in texts.items()}
  # Forward and backward (preprocessing and gradient kernels) once in the loop body and once for the last layer,
  # which runs outside the scan: 2 * (1 + 2), whatever the depth.
  assert len(triton[2]) == len(triton[4]) == 2 * (1 + 2)
  # Unrolled, every layer's backward is in the program.
  unrolled = [c for c in _calls(_cuda_step_text(4, scan=False)) if "triton" in c]
  assert len(unrolled) == 1 + 2 * 4
