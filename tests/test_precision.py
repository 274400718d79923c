"""Precision policies: parsing, what the model computes in which dtype, bf16 against fp32, and fp16 underflow."""

from __future__ import annotations

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jfast.cpu import MixedDense, mixed_dot_general, mixed_matmul, mixed_matmul_nt
from jfast.data import BatchingConfig, batch_from_rows
from jfast.models import BertConfig, BertForSequenceClassification, BertModel, load_hf_bert
from jfast.precision import PRESETS, DynamicLossScale, NoOpLossScale, Policy, get_policy
from jfast.training import LoopConfig, classification_loss, create_train_state, fit, make_train_step

F32, BF16, F16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16)
TINY = BertConfig(
  vocab_size=500,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=64,
  max_position_embeddings=64,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


def test_presets_and_strings():
  assert get_policy("fp32") == Policy() == get_policy(None) == get_policy("float32")
  bf16 = get_policy("bf16")
  assert (bf16.param_dtype, bf16.compute_dtype, bf16.output_dtype) == (F32, BF16, F32)
  assert bf16 == get_policy("params=float32,compute=bfloat16,output=float32") == get_policy("p=f32, c=bf16")
  assert get_policy("BFLOAT16") == bf16  # a bare dtype names the preset that computes in it
  assert get_policy("fp16") == get_policy("c=f16") and get_policy("fp16").needs_loss_scale
  assert get_policy("pure-bf16") == get_policy("p=bf16,c=bf16,o=f32") and not get_policy("pure-bf16").needs_loss_scale
  for name in PRESETS:
    policy = get_policy(name)
    assert get_policy(str(policy)) == policy and get_policy(policy) is policy
  assert len({get_policy("bf16"), Policy("float32", jnp.bfloat16, "f32")}) == 1  # hashable, spelling-independent


@pytest.mark.parametrize(
  ("spec", "match"),
  [
    ("fp8", "unknown precision policy 'fp8': expected a preset"),
    ("params=float64", r"unknown dtype 'float64' for 'params'"),
    ("c=int8", r"unknown dtype 'int8'"),
    ("p=f32,,c=bf16", "malformed pair ''"),
    ("p=f32,c", "malformed pair 'c'"),
    ("p=", "malformed pair 'p='"),
    ("weights=f32", "unknown key 'weights'"),
    ("p=f32,params=bf16", "given twice"),
  ],
)
def test_bad_policy_strings_are_named(spec, match):
  with pytest.raises(ValueError, match=match):
    get_policy(spec)


def test_bad_policy_values():
  with pytest.raises(ValueError, match="must be float32, bfloat16 or float16, got int32"):
    Policy(param_dtype=jnp.int32)
  with pytest.raises(TypeError, match="a string or a Policy"):
    get_policy(16)


def test_casts_touch_only_floating_leaves():
  tree = {"w": jnp.ones(2, jnp.float32), "ids": np.arange(3, dtype=np.int32), "mask": np.ones(2, bool)}
  cast = get_policy("pure-bf16").cast_to_compute(tree)
  assert (cast["w"].dtype, cast["ids"].dtype, cast["mask"].dtype) == (BF16, np.int32, np.bool_)
  assert get_policy("bf16").cast_to_output(cast)["w"].dtype == F32
  assert get_policy("bf16").cast_to_param(cast)["w"].dtype == F32


def _tiny_state(policy, **kwargs):
  policy = get_policy(policy)
  model = BertForSequenceClassification(policy.configure(TINY), num_labels=2)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.ones((1, 8), np.int32))["params"]
  return model, create_train_state(model, params, optax.adamw(1e-3), policy=policy, **kwargs)


def test_master_weights_and_adam_moments_follow_the_param_dtype():
  for name, dtype in (("bf16", F32), ("pure-bf16", BF16)):
    _, state = _tiny_state(name)
    mu, nu = state.opt_state[0].mu, state.opt_state[0].nu
    assert {x.dtype for x in jax.tree.leaves((state.params, mu, nu))} == {dtype}, name
  assert isinstance(_tiny_state("fp16")[1].loss_scale, DynamicLossScale)
  assert isinstance(_tiny_state("bf16")[1].loss_scale, NoOpLossScale)


def _primitive_dtypes(jaxpr, found):
  for eqn in jaxpr.eqns:
    found.setdefault(eqn.primitive.name, set()).update(
      (tuple(v.aval.dtype.name for v in eqn.invars if hasattr(v.aval, "dtype")),)
    )
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _primitive_dtypes(sub.jaxpr, found)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _primitive_dtypes(sub, found)
  return found


@pytest.mark.slow
def test_model_runs_matmuls_in_compute_dtype_and_statistics_in_float32():
  model, state = _tiny_state("bf16")
  ids = np.random.default_rng(0).integers(1, TINY.vocab_size, size=(2, 16)).astype(np.int32)
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, ids))(state.params)
  found = _primitive_dtypes(jaxpr.jaxpr, {})
  # Every matmul (the Dense layers through mixed_dot_general, and attention) multiplies bf16 by bf16 ...
  assert found["dot_general"] == {("bfloat16", "bfloat16")}
  # ... while the softmax's exp, the norms' rsqrt and the reductions under them run in float32.
  assert found["exp"] == {("float32",)}
  assert found["rsqrt"] == {("float32",)}
  assert jaxpr.out_avals[0].dtype == F32  # logits
  _, inter = model.apply({"params": state.params}, ids, capture_intermediates=True, mutable=["intermediates"])
  layer = inter["intermediates"]["bert"]["encoder_layer_1"]  # the last layer, outside the scan
  assert layer["output_norm"]["__call__"][0].dtype == BF16  # the residual stream shrinks with the policy
  assert layer["intermediate"]["__call__"][0].dtype == BF16


def test_step_checks_the_state_against_its_policy():
  model, state = _tiny_state("bf16")
  batch = _tiny_batch()
  with pytest.raises(ValueError, match=r"parameters are \['float32'\] but precision policy .* bfloat16"):
    make_train_step(classification_loss(model), policy="pure-bf16")(state, batch)
  with pytest.warns(UserWarning, match="without loss scaling"):
    _, unscaled = _tiny_state("fp16", loss_scale="none")
  with pytest.warns(UserWarning, match="trains without loss scaling"):
    make_train_step(classification_loss(model), policy="fp16")(unscaled, batch)


def _tiny_batch():
  from jfast.data import batch_from_rows

  rng = np.random.default_rng(1)
  rows = [rng.integers(1, TINY.vocab_size, size=n).astype(np.int32) for n in (12, 7, 16, 3)]
  return batch_from_rows(rows, np.array([0, 1, 1, 0]), 16, pad_id=0)


def test_bf16_forward_matches_fp32_on_real_sized_inputs(minilm_path):
  # Tolerances stated in docs/precision.md: bf16 keeps 8 mantissa bits (relative step 2**-8), so six layers end
  # about 1% away from float32 in relative norm; the measured figures are bf16 1.1%, pure-bf16 1.4%, fp16 0.17%.
  config, params = load_hf_bert(minilm_path)
  ids = np.random.default_rng(0).integers(1000, config.vocab_size, size=(8, 128)).astype(np.int32)
  ref_hidden, ref_pooled = jax.jit(BertModel(config).apply)({"params": params}, ids)
  ref_hidden = np.asarray(ref_hidden)
  for name, rel_tol in (("bf16", 0.03), ("pure-bf16", 0.03), ("fp16", 0.005)):
    policy = get_policy(name)
    hidden, pooled = jax.jit(BertModel(policy.configure(config)).apply)({"params": policy.cast_to_param(params)}, ids)
    hidden = np.asarray(hidden, np.float32)
    rel = np.linalg.norm(hidden - ref_hidden) / np.linalg.norm(ref_hidden)
    cosine = (hidden * ref_hidden).sum(-1) / np.linalg.norm(hidden, axis=-1) / np.linalg.norm(ref_hidden, axis=-1)
    assert rel < rel_tol, (name, rel)
    assert cosine.min() > 0.999, (name, cosine.min())
    assert np.abs(np.asarray(pooled) - np.asarray(ref_pooled)).max() < 0.01, name


class _HalfMLP(nn.Module):
  @nn.compact
  def __call__(self, x_BxF):
    h_BxH = jnp.tanh(nn.Dense(32, dtype=jnp.float16)(x_BxF))
    return nn.Dense(1, dtype=jnp.float16)(h_BxH)[:, 0]


def test_fp16_gradients_underflow_without_scaling_and_train_with_it():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1024, 8)).astype(np.float32)
  batch = {"x": x, "y": np.tanh(x @ rng.normal(size=8)).astype(np.float32)}
  model = _HalfMLP()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])["params"]

  def loss_fn(p, b, rng, deterministic):
    pred = model.apply({"params": p}, b["x"]).astype(jnp.float32)
    # A small loss weight (an auxiliary term, say): d loss / d pred ~ 1e-9, below float16's smallest subnormal.
    loss = 1e-6 * jnp.mean((pred - b["y"]) ** 2)
    return loss, {"loss_sum": loss, "correct": jnp.float32(0), "examples": jnp.float32(1)}

  results = {}
  for loss_scale in ("none", None):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # fp16 without scaling warns, which is the point here
      state = create_train_state(model, params, optax.adam(1e-2), policy="fp16", loss_scale=loss_scale)
      step = make_train_step(loss_fn, policy="fp16")
      start = jax.device_get(state.params)
      losses, norms = [], []
      for _ in range(60):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    results[loss_scale] = losses, norms, start, jax.device_get(state.params)

  losses, norms, start, end = results["none"]
  assert max(norms) == 0.0  # every gradient underflowed to exactly zero ...
  jax.tree.map(np.testing.assert_array_equal, start, end)  # ... so nothing moved
  losses, norms, _, _ = results[None]
  assert min(norms) > 0.0
  assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def _dot_operand_types(hlo: str, op_filter: str = "") -> list[tuple[str, ...]]:
  """The operand dtypes of every dot in optimised HLO text (operands are fusion parameters or local values).

  With ``op_filter``, only the dots whose source op name contains it (e.g. ``encoder_layer``).
  """
  found = []
  for comp in re.split(r"\n(?=%?[\w.-]+ \(.*\) -> .* \{)", hlo):
    head = comp.split("\n", 1)[0]
    for line in comp.split("\n"):
      operands = re.search(r" dot\(%([\w.-]+), %([\w.-]+)\)", line)
      if not operands or op_filter not in line:
        continue
      types = []
      for name in operands.groups():
        m = re.search(rf"\b{re.escape(name)}: (\w+)\[", head) or re.search(rf"%{re.escape(name)} = (\w+)\[", comp)
        types.append(m.group(1) if m else "?")
      found.append(tuple(types))
  return found


def test_mixed_dot_general_gradients_and_cpu_kernels():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 24, 64)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(64, 96)) * 0.1, jnp.bfloat16)
  dims = (((2,), (0,)), ((), ()))

  def loss(dot, x, w):
    return jnp.sum(jnp.tanh(dot(x, w, dims).astype(jnp.float32)))

  def autodiff_dot(a, b, dims):  # the same forward, differentiated by JAX (float32 gradient dots)
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(a.dtype)

  plain = jax.jit(jax.grad(lambda x, w: loss(autodiff_dot, x, w), (0, 1)))
  mixed = jax.jit(jax.grad(lambda x, w: loss(mixed_dot_general, x, w), (0, 1)))
  for got, want in zip(mixed(x, w), plain(x, w), strict=True):
    assert got.dtype == want.dtype == BF16
    want = np.asarray(want, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.02, atol=0.01 * np.abs(want).max())
  if jax.default_backend() != "cpu":
    return
  # docs/precision.md: XLA:CPU upcasts any bf16 dot its bf16 library kernel does not take to float32. When this XLA
  # has that kernel (the forward dot stays bf16), the gradient dots must stay bf16 as well.
  operand_types = _dot_operand_types(mixed.lower(x, w).compile().as_text())
  if ("bf16", "bf16") not in operand_types:
    pytest.skip("this XLA:CPU has no bf16 dot kernel; every bf16 dot runs in float32")
  assert set(operand_types) == {("bf16", "bf16")}, operand_types


def _check_bf16_product_against_float64(product, a, b, g, wants):
  """``product``'s bf16 output and gradients (cotangent ``g``) against ``wants(a64, b64, g64) -> (y, da, db)``,
  float64 on the bf16-rounded inputs."""
  a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)

  def loss(a, b):
    return jnp.sum(product(a, b).astype(jnp.float32) * g)

  y = product(a16, b16)
  da, db = jax.jit(jax.grad(loss, (0, 1)))(a16, b16)
  assert y.dtype == da.dtype == db.dtype == BF16
  a64, b64 = np.asarray(a16, np.float64), np.asarray(b16, np.float64)
  g64 = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64)  # the cotangent reaches the dots rounded to bf16
  for got, want in zip((y, da, db), wants(a64, b64, g64), strict=True):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0.02, atol=0.01 * np.abs(want).max())


@pytest.mark.slow
def test_mixed_matmul_gradients_against_float64_and_every_train_step_dot_is_bf16():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(3, 4, 24, 32))
  b = rng.normal(size=(3, 4, 32, 40))
  g = rng.normal(size=(3, 4, 24, 40))
  t = functools.partial(np.swapaxes, axis1=-1, axis2=-2)
  _check_bf16_product_against_float64(mixed_matmul, a, b, g, lambda a, b, g: (a @ b, g @ t(b), t(a) @ g))
  np.testing.assert_array_equal(mixed_matmul(jnp.asarray(a), jnp.asarray(b)), jnp.matmul(a, b))  # float32: plain
  if jax.default_backend() != "cpu":
    return
  # The whole bf16 train step: Dense layers and both attention products, forward and backward, run bf16 dots
  # (nn.Dense's autodiff or an einsum's would leave some to XLA:CPU's float32 fallback).
  # Head width 32 and rows of 64: at TINY's sizes XLA:CPU hands some dots to float32 for their size alone (as it
  # does the classifier's input gradient, a contraction over 2 labels, whatever the sizes: not counted).
  policy = get_policy("bf16")
  rows = [rng.integers(1, TINY.vocab_size, size=n) for n in (60, 41, 64, 33, 50, 64, 20, 64)]
  batch = batch_from_rows(rows, rng.integers(0, 2, size=8), 64, pad_id=0)
  for pooled_only, fuse_qkv in ((False, False), (True, False), (False, True)):
    model = BertForSequenceClassification(
      policy.configure(TINY.replace(hidden_size=128, intermediate_size=256, fuse_qkv=fuse_qkv)),
      num_labels=2,
      last_layer_pooled_only=pooled_only,
    )
    params = jax.jit(model.init)(jax.random.PRNGKey(0), np.ones((1, 8), np.int32))["params"]
    state = create_train_state(model, params, optax.adamw(1e-3), policy=policy)
    step = make_train_step(classification_loss(model), policy=policy)
    operand_types = _dot_operand_types(step.lower(state, batch).compile().as_text(), "encoder_layer")
    if ("bf16", "bf16") not in operand_types:
      pytest.skip("this XLA:CPU has no bf16 dot kernel; every bf16 dot runs in float32")
    if not pooled_only:  # 6 Dense + 2 attention products, 3 dots each (one [CLS] query makes some of these scalar)
      dense = 4 if fuse_qkv else 6  # fused: query, key and value are one product
      assert len(operand_types) == 2 * (dense * 3 + 2 * 3), operand_types
    assert set(operand_types) == {("bf16", "bf16")}, (pooled_only, operand_types)


def test_mixed_matmul_nt_gradients_against_float64_and_no_copy_of_b():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(3, 4, 24, 32))
  b = rng.normal(size=(3, 4, 40, 32))
  g = rng.normal(size=(3, 4, 24, 40))
  t = functools.partial(np.swapaxes, axis1=-1, axis2=-2)
  _check_bf16_product_against_float64(mixed_matmul_nt, a, b, g, lambda a, b, g: (a @ t(b), g @ b, t(g) @ a))
  a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
  f32 = mixed_matmul_nt(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  want32 = a @ np.swapaxes(b, -1, -2)
  np.testing.assert_allclose(f32, want32, rtol=1e-5, atol=1e-5 * np.abs(want32).max())
  if jax.default_backend() != "cpu":
    return
  # The forward product reads b as it is: one bf16 dot and no transposing copy of b.
  hlo = jax.jit(mixed_matmul_nt).lower(a16, b16).compile().as_text()
  assert _dot_operand_types(hlo, "") == [("bf16", "bf16")], hlo
  assert "transpose" not in hlo, hlo


def test_mixed_dense_casts_the_master_kernel_inside_and_keeps_no_half_copy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 24, 64)).astype(np.float32)
  layer = MixedDense(80, jnp.bfloat16, nn.initializers.normal(0.1))
  params = layer.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.bfloat16))
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape) * 0.05, jnp.float32), params)
  assert {p.dtype for p in jax.tree.leaves(params)} == {F32}
  cotangent = rng.normal(size=(4, 24, 80))

  def loss(params, x):
    return jnp.sum(layer.apply(params, x).astype(jnp.float32) * cotangent)

  x_bf16 = jnp.asarray(x, jnp.bfloat16)
  grads = jax.jit(jax.grad(loss))(params, x_bf16)
  # The kernel's gradient stays float32 (the half-precision copy's gradient is not rounded to bf16 on the way).
  assert grads["params"]["kernel"].dtype == F32
  # Reference: the same layer in float64 numpy on the bf16-rounded operands.
  x64 = np.asarray(x_bf16, np.float64).reshape(-1, 64)
  g64 = cotangent.reshape(-1, 80)
  want_dw = x64.T @ g64
  got_dw = np.asarray(grads["params"]["kernel"], np.float64)
  np.testing.assert_allclose(got_dw, want_dw, rtol=0.02, atol=0.01 * np.abs(want_dw).max())
  # The bias gradient sums the bf16 cotangent over the 96 tokens in float32 (precision.add_bias: one ones @ g dot),
  # where nn.Dense's would be a bf16 sum, good to 8 bits only.
  assert grads["params"]["bias"].dtype == F32
  want_db = np.asarray(jnp.asarray(cotangent, jnp.bfloat16), np.float64).reshape(-1, 80).sum(0)
  np.testing.assert_allclose(np.asarray(grads["params"]["bias"], np.float64), want_db, rtol=1e-5, atol=1e-5)
  kernel64 = np.asarray(jnp.asarray(params["params"]["kernel"], jnp.bfloat16), np.float64)
  want_y = x64 @ kernel64 + np.asarray(jnp.asarray(params["params"]["bias"], jnp.bfloat16), np.float64)
  got_y = np.asarray(layer.apply(params, x_bf16), np.float64).reshape(-1, 80)
  np.testing.assert_allclose(got_y, want_y, rtol=0.02, atol=0.01 * np.abs(want_y).max())
  # What autodiff keeps for the backward pass: x (transposed, bf16) and the float32 kernel itself (an argument),
  # never a bf16 copy of the kernel, which nn.Dense(dtype=bf16) would keep.
  from jax._src.ad_checkpoint import saved_residuals

  residuals = saved_residuals(lambda p: loss(p, x_bf16), params)
  kept = [(a.dtype, a.shape) for a, source in residuals if "argument" not in source]
  assert (BF16, (64, 80)) not in kept and (BF16, (64, 4 * 24)) in kept, kept
  dense = nn.Dense(80, dtype=jnp.bfloat16, dot_general=mixed_dot_general)
  residuals = saved_residuals(lambda p: jnp.sum(dense.apply(p, x_bf16).astype(jnp.float32)), params)
  assert (BF16, (64, 80)) in [(a.dtype, a.shape) for a, source in residuals if "argument" not in source]


def test_fit_takes_a_policy():
  rng = np.random.default_rng(0)
  seqs = [rng.integers(1, TINY.vocab_size, size=n).astype(np.int32) for n in rng.integers(4, 30, size=64)]
  labels = rng.integers(0, 2, size=64)
  model = BertForSequenceClassification(TINY, num_labels=2)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.ones((1, 8), np.int32))["params"]
  batching = BatchingConfig(strategy="packed", batch_size=4, row_length=32)
  result = fit(
    model,
    params,
    lambda n: optax.adamw(1e-3),
    (seqs, labels),
    (seqs[:16], labels[:16]),
    batching=batching,
    eval_batching=batching,
    loop=LoopConfig(progress=False, log_every=2),
    pad_id=0,
    policy="fp16",
  )
  assert result.state.params["classifier"]["kernel"].dtype == F32
  assert isinstance(result.state.loss_scale, DynamicLossScale)
  assert result.stats["skipped_steps"] == sum(h["skipped"] for h in result.history)
  assert result.stats["final_loss_scale"] == float(result.state.loss_scale.loss_scale) > 0
  assert np.isfinite(result.evals[-1]["loss"])
  assert result.stats["train_compiles"] == 1


def test_finetune_precision_flag():
  from jfast.app.finetune import default_precision, parse_args

  assert parse_args([]).precision == "auto" and get_policy(default_precision("cpu")) == get_policy("fp32")
  assert get_policy(parse_args(["--precision", "p=bf16,c=bf16"]).precision) == get_policy("pure-bf16")
  with pytest.raises(SystemExit):
    parse_args(["--dtype", "bfloat16"])  # one flag for precision: --precision


@pytest.mark.slow
def test_bf16_training_tracks_fp32_over_twenty_steps_on_real_batches(data_dir, tokenizer):
  from jfast.data import load_text_classification, make_batches, tokenize

  train = load_text_classification(data_dir / "sst2", "train")
  ids, _ = tokenize(tokenizer, train.texts[:128], max_length=512)
  batches = make_batches(
    ids, train.labels[:128], BatchingConfig(strategy="packed", batch_size=8, row_length=64, shuffle=False), pad_id=0
  ).batches
  assert len(batches) == 4  # cycled 5 times: the loss falls as the model fits them
  # Unrolled layers: the initialisation these figures were measured from (a scan draws each layer's init anew).
  config = TINY.replace(vocab_size=30522, hidden_size=64, intermediate_size=128, scan_layers=False)
  params = jax.jit(BertForSequenceClassification(config).init)(jax.random.key(0), np.ones((1, 8), np.int32))["params"]
  losses, finals = {}, {}
  for name in ("fp32", "bf16"):
    policy = get_policy(name)
    model = BertForSequenceClassification(policy.configure(config))
    # Adam's eps above the default: updates of near-zero gradients (rounding noise in bf16) stay small.
    state = create_train_state(model, params, optax.adam(3e-3, eps=1e-6), policy=policy)
    step = make_train_step(classification_loss(model), policy=policy, donate=False)
    history = []
    for i in range(20):
      state, metrics = step(state, batches[i % len(batches)])
      history.append(float(metrics["loss"]))
    losses[name], finals[name] = np.array(history), jax.device_get(state.params)
  f32, bf16 = losses["fp32"], losses["bf16"]
  assert np.all(np.isfinite(bf16)) and not np.array_equal(f32, bf16)  # bf16 really ran, and differently
  # Measured: at most 0.5% apart at any step.
  assert np.all(np.abs(bf16 - f32) <= 0.03 * f32), np.abs(bf16 - f32) / f32
  for run in (f32, bf16):  # the last pass over the 4 batches well below the first
    assert run[-4:].mean() < run[:4].mean() - 0.1, run
  # The final parameters: bf16 ends near fp32, relative to how far training moved them (measured: 0.12).
  distance = lambda a, b: float(optax.tree.norm(jax.tree.map(lambda x, y: np.asarray(x) - y, a, b)))  # noqa: E731
  assert distance(finals["bf16"], finals["fp32"]) < 0.3 * distance(finals["fp32"], params)
  assert finals["bf16"]["classifier"]["kernel"].dtype == F32  # master weights stay float32
