"""Every jfast technique on the Llama-family decoder: packing isolation through gradients, causal and sliding-window
reach, remat policies, bf16 and fp16 with loss scaling, accumulation, freezing, 8-bit AdamW, int8 PTQ, FSDP and
tensor parallelism on 8 simulated devices, distillation from a larger to a smaller Llama, and the accelerator
lowering of the bf16 train step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from test_gpt import _input_grads

from jfast.compress import DistillConfig, causal_lm_distillation_loss, make_distill_step, quantize
from jfast.data import lm_batches, pack_documents
from jfast.models import PROJECTIONS, Llama, LlamaConfig, init_llama
from jfast.nn import unstack_layers
from jfast.optim import OptimizerConfig, adamw_8bit, freeze, freeze_mask, make_optimizer, state_bytes
from jfast.precision import get_policy
from jfast.training import causal_lm_loss, create_train_state, make_train_step

CONFIG = LlamaConfig(
  vocab_size=512,
  hidden_size=128,
  intermediate_size=344,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=256,
  rms_norm_eps=1e-5,
)


def _params(config=CONFIG, seed=0, std=0.05):
  """Random parameters of real size away from the init (norm scales around 1, matrices std 0.05)."""
  _, params = init_llama(config, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.device_get(params))
  flat = {
    k: (1 + rng.normal(0, 0.1, v.shape) if k[-1] == "scale" else rng.normal(0, std, v.shape)).astype(np.float32)
    for k, v in flat.items()
  }
  return traverse_util.unflatten_dict(flat)


def _batch(config=CONFIG, rows=4, length=64, seed=0):
  rng = np.random.default_rng(seed)
  docs = [rng.integers(0, config.vocab_size, size=n) for n in rng.integers(5, 70, size=24)]
  return lm_batches(pack_documents(docs, length), rows, seed=seed)[0]


def test_packing_isolates_documents_through_gradients():
  model = Llama(CONFIG)
  params = _params(seed=1)
  rng = np.random.default_rng(2)
  docs = [rng.integers(0, 512, size=n) for n in (7, 13, 6)]
  rows = pack_documents(docs, 25)
  apply = jax.jit(
    lambda ids, seg=None, pos=None: model.apply({"params": params}, ids, segment_ids=seg, position_ids=pos)
  )
  packed = np.asarray(apply(rows.input_ids, rows.segment_ids, rows.position_ids))
  start = 0
  for doc in docs:
    n = min(doc.size, 25 - start)
    np.testing.assert_allclose(packed[0, start : start + n], np.asarray(apply(doc[None, :n]))[0], atol=2e-5)
    start += n
  g_TxJ = _input_grads(model, params, rows.input_ids, rows.segment_ids, rows.position_ids)
  seg = rows.segment_ids[0]
  same = seg[:, None] == seg[None, :]
  causal = np.tril(np.ones_like(same))
  assert (g_TxJ[~same] == 0).all(), "gradient crossed a document boundary"
  assert (g_TxJ[same & (causal > 0)] > 1e-7).all()


def test_sliding_window_reach_through_gradients():
  config = CONFIG.replace(model_type="mistral", sliding_window=4)  # a token sees itself and 3 before it
  model = Llama(config)
  params = _params(config, seed=3)
  ids = jnp.asarray(np.random.default_rng(4).integers(0, 512, size=(1, 16)))
  g_TxJ = _input_grads(model, params, ids)
  offset = np.arange(16)[:, None] - np.arange(16)[None, :]
  reach = (offset >= 0) & (offset <= 3 * config.num_hidden_layers)
  assert (g_TxJ[~reach] == 0).all()
  assert (g_TxJ[reach] > 1e-7).all()


def _loss_and_grads(config, params, batch):
  loss_fn = causal_lm_loss(Llama(config))
  return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None, True)[0]))(params)


@pytest.mark.parametrize("policy", ["full", "save_qkv", "dots", "save_layer_out"])
def test_remat_policies_give_the_same_gradients(policy):
  params, batch = _params(seed=5), _batch(seed=5)
  ref_loss, ref_grads = _loss_and_grads(CONFIG, params, batch)
  loss, grads = _loss_and_grads(CONFIG.replace(remat_policy=policy), params, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()) + 1e-8)


def _train(config, params, tx, batches, **step_kwargs):
  policy = step_kwargs.get("policy")
  model = Llama(policy.configure(config) if policy is not None else config)
  state = create_train_state(model, params, tx, policy=policy)
  step = make_train_step(causal_lm_loss(model), **step_kwargs)
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, state, metrics


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_tracks_float32(precision):
  params = _params(seed=6, std=0.03)
  batches = [_batch(seed=6)] * 6  # random tokens: only a batch seen again can be learnt
  ref, _, _ = _train(CONFIG, params, optax.adamw(3e-3), batches)
  policy = get_policy(precision)
  losses, state, metrics = _train(CONFIG, params, optax.adamw(3e-3), batches, policy=policy)
  assert losses[-1] < losses[0] - 0.3, losses
  np.testing.assert_allclose(losses, ref, rtol=0.02)
  if precision == "fp16":  # dynamic loss scaling in the step: finite updates, nothing skipped
    assert float(metrics["loss_scale"]) > 1.0
    assert float(metrics["skipped"]) == 0.0
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))  # float32 master weights


def test_accumulation_equals_the_whole_batch():
  params, batch = _params(seed=7), _batch(rows=8, seed=7)
  one, s1, _ = _train(CONFIG, params, optax.sgd(0.5), [batch])
  two, s2, _ = _train(CONFIG, params, optax.sgd(0.5), [batch], micro_batches=4)
  np.testing.assert_allclose(two, one, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params), strict=True):
    np.testing.assert_allclose(a, b, atol=2e-6)


def test_freezing_embeddings_and_bottom_layers():
  config = CONFIG.replace(scan_layers=False)
  params = unstack_layers(_params(seed=8))
  mask = freeze_mask(params, ["embed_tokens", "layers_0"])
  assert jax.tree.leaves(freeze_mask(params, bottom_layers=1)) == jax.tree.leaves(mask)  # Llama's names
  losses, state, _ = _train(config, params, freeze(optax.adam(1e-2), mask), [_batch(seed=8)] * 4, freeze_mask=mask)
  assert losses[-1] < losses[0] - 0.3, losses
  after = jax.device_get(state.params)
  for name in ("embed_tokens", "layers_0"):
    for a, b in zip(jax.tree.leaves(after[name]), jax.tree.leaves(params[name]), strict=True):
      np.testing.assert_array_equal(a, b)
  assert not np.allclose(after["layers_1"]["mlp"]["up_proj"]["kernel"], params["layers_1"]["mlp"]["up_proj"]["kernel"])
  with pytest.raises(ValueError, match="selects layers stacked under 'layers'"):
    freeze_mask(_params(seed=8), ["layers_0"])


def test_adamw_8bit_tracks_adamw():
  params = _params(seed=9, std=0.03)
  batches = [_batch(seed=9)] * 6
  ref, ref_state, _ = _train(CONFIG, params, optax.adamw(3e-3), batches)
  losses, state, _ = _train(CONFIG, params, adamw_8bit(3e-3, min_8bit_size=1024), batches)
  assert losses[-1] < losses[0] - 0.3
  np.testing.assert_allclose(losses, ref, rtol=0.02)
  assert state_bytes(state.opt_state) < 0.35 * state_bytes(ref_state.opt_state)


def test_int8_post_training_quantization():
  params = _params(seed=10)
  ids = jnp.asarray(np.random.default_rng(10).integers(0, 512, size=(4, 48)))
  ref = np.asarray(Llama(CONFIG).apply({"params": params}, ids))
  qparams = quantize(params, layers=PROJECTIONS)
  flat = traverse_util.flatten_dict(qparams)
  assert all(flat[(f"layers_{i}", *p, "kernel")].dtype == np.int8 for i in range(2) for p in [("mlp", "up_proj")])
  assert flat[("embed_tokens", "embedding")].dtype == np.float32  # embeddings, norms and the head stay float
  got = np.asarray(Llama(CONFIG.replace(quantization="int8")).apply({"params": qparams}, ids))
  err = np.abs(got - ref).mean() / np.abs(ref).mean()
  assert err < 0.03, err
  assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
  int8_bytes = sum(v.nbytes for k, v in flat.items() if k[-2] in PROJECTIONS)
  float_bytes = sum(
    v.nbytes for k, v in traverse_util.flatten_dict(unstack_layers(params)).items() if k[-2] in PROJECTIONS
  )
  assert int8_bytes < 0.27 * float_bytes


@pytest.mark.slow
def test_fsdp_and_tensor_parallel_equal_one_device(tmp_path):
  worker = Path(__file__).resolve().parent / "llama_sharding_worker.py"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["devices"] == 8
  for kind in ("full", "lora"):
    runs = result["runs"][kind]
    ref = runs.pop("reference_losses")
    assert len(set(ref)) == len(ref)  # it trains
    for name, run in runs.items():
      assert run["loss_diff"] <= 1e-5 and run["param_diff"] <= 2e-5, (kind, name, run)
      if "tensor" in name:  # Megatron layout of the stacked layers, the layer axis whole
        assert run["q_spec"] == run["k_spec"] == "P(None, 'fsdp', 'tensor')"
        assert run["down_spec"] == "P(None, 'tensor', 'fsdp')"


def test_distillation_from_a_larger_to_a_smaller_llama():
  teacher_config = CONFIG.replace(hidden_size=192, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3)
  student_config = CONFIG.replace(hidden_size=64, intermediate_size=172, num_attention_heads=2, num_key_value_heads=1)
  teacher, student = Llama(teacher_config), Llama(student_config)
  t_params, s_params = _params(teacher_config, seed=11), _params(student_config, seed=12, std=0.03)
  distill = DistillConfig(temperature=2.0, alpha=0.7)
  batch = _batch(seed=11)
  loss, aux = causal_lm_distillation_loss(student, teacher, distill)(s_params, batch, None, True, t_params)
  # Independent float64 reference from the two models' logits.
  s = np.asarray(
    student.apply(
      {"params": s_params}, batch.input_ids, segment_ids=batch.segment_ids, position_ids=batch.position_ids
    ),
    np.float64,
  )
  t = np.asarray(
    teacher.apply(
      {"params": t_params}, batch.input_ids, segment_ids=batch.segment_ids, position_ids=batch.position_ids
    ),
    np.float64,
  )

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  T, mask = 2.0, np.asarray(batch.example_mask, bool)
  logp, logq = log_softmax(t / T), log_softmax(s / T)
  kd = T**2 * (np.exp(logp) * (logp - logq)).sum(-1)
  ce = -np.take_along_axis(log_softmax(s), np.asarray(batch.labels)[..., None], -1)[..., 0]
  want = (0.7 * kd + 0.3 * ce)[mask].mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(aux["examples"]) == mask.sum()
  state = create_train_state(student, s_params, optax.adam(3e-3))
  step = make_distill_step(student, teacher, DistillConfig(temperature=2.0, alpha=1.0))  # soft targets alone
  kds = []
  for _ in range(10):
    state, metrics = step(state, t_params, batch)
    kds.append(float(metrics["kd_sum"]) / float(metrics["examples"]))
  assert kds[-1] < 0.8 * kds[0], kds
  with pytest.raises(ValueError, match="give teacher_model"):
    make_distill_step(student, None, distill)
  with pytest.raises(ValueError, match="implemented for BERT"):
    causal_lm_distillation_loss(student, teacher, DistillConfig(hidden_weight=1.0))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_bf16_train_step_lowers_for_accelerators_with_the_fused_kernel_and_one_loop(platform):
  """The accelerator path: flash attention forward and backward (grouped-query heads repeated for the kernel; Triton
  on GPU, Mosaic on TPU), no host callbacks, no branches, and the layers in one loop whatever the depth."""
  texts = {}
  for layers in (2, 4):
    config = CONFIG.replace(num_hidden_layers=layers, dtype="bfloat16")
    model = Llama(config)
    params = jax.jit(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])()
    state = create_train_state(model, params, make_optimizer(OptimizerConfig(), 10), policy="bf16")
    step = make_train_step(causal_lm_loss(model), policy="bf16", platform=platform, donate=False)
    texts[layers] = step.lower(state, _batch()).as_text()
  calls = {
    n: re.findall(r"custom_call @([\w$.]+)", t) + re.findall(r'call_target_name = "([^"]+)"', t)
    for n, t in texts.items()
  }
  for layers, text in texts.items():
    assert not [c for c in calls[layers] if "callback" in c.lower()]
    assert len(re.findall(r"\bstablehlo\.case\b", text)) == 0
    assert len(re.findall(r"\bstablehlo\.while\b", text)) == 2  # the scanned layers, forward and backward
  kernel = "triton" if platform == "cuda" else "tpu_custom_call"
  fused = {n: [c for c in cs if kernel in c] for n, cs in calls.items()}
  assert len(fused[2]) == len(fused[4]) >= 2  # forward and backward kernels, once each in the loop bodies
