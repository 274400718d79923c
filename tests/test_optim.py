"""8-bit AdamW: the quantiser against a float64 nearest-code reference, the update against optax.adamw and float64
numpy, state layout and bytes, jit and checkpoint round trips, composition with the train step, bad input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jfast.data import batch_from_rows, tokenize
from jfast.models import BertConfig, BertForSequenceClassification
from jfast.optim import (
  CODE_MAPS,
  CodeBook,
  OptimizerConfig,
  adamw_8bit,
  codebooks,
  dequantize_blockwise,
  freezing,
  make_optimizer,
  quantize_blockwise,
  state_bytes,
)
from jfast.optim.adamw8bit import block_layout, dynamic_map
from jfast.training import Checkpointer, classification_loss, create_train_state, make_train_step

TINY = BertConfig(
  vocab_size=30522,
  hidden_size=64,
  num_hidden_layers=1,
  num_attention_heads=4,
  intermediate_size=128,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


def _reference_quantize(x: np.ndarray, values: np.ndarray, signed: bool, block_size: int):
  """float64 numpy: per-block scale, nearest code by midpoints (searchsorted), dequantised values."""
  lead, row, blocks, length = block_layout(x.shape, block_size)
  xb = np.pad(x.reshape(*lead, row).astype(np.float64), [(0, 0)] * len(lead) + [(0, blocks * length - row)])
  xb = xb.reshape(*lead, blocks, length)
  hi, lo = xb.max(-1), xb.min(-1)
  scale = np.where(hi >= -lo, hi, lo) if signed else np.maximum(hi, -lo)
  y = xb / np.where(scale == 0, 1.0, scale)[..., None]
  v64 = values.astype(np.float64)
  mids = (v64[1:] + v64[:-1]) / 2
  codes = np.searchsorted(mids, y, side="left")
  deq = (v64[codes] * scale[..., None]).reshape(*lead, blocks * length)[..., :row].reshape(x.shape)
  return y, scale, deq


def _heavy(rng, shape, kind):
  if kind == "normal":
    return rng.standard_normal(shape)
  if kind == "cauchy":
    return rng.standard_cauchy(shape)
  if kind == "lognormal_sq":  # second-moment-like: non-negative, spans many decades
    return rng.lognormal(-12.0, 3.0, shape)
  raise ValueError(kind)


@pytest.mark.parametrize(
  "shape,kind,signed",
  [
    ((768, 384), "normal", True),
    ((1536, 384), "cauchy", True),
    ((384, 1536), "lognormal_sq", False),
    ((4099,), "cauchy", True),
  ],
)
def test_quantize_is_nearest_code_and_error_is_bounded_per_block(shape, kind, signed):
  rng = np.random.default_rng(sum(shape))
  x = _heavy(rng, shape, kind).astype(np.float32)
  book = codebooks("dynamic")[0 if signed else 1]
  codes, scales = jax.jit(quantize_blockwise, static_argnums=(1, 2))(jnp.asarray(x), book, 256)
  y, ref_scale, ref_deq = _reference_quantize(x, book.values, signed, 256)
  np.testing.assert_array_equal(np.asarray(scales), ref_scale.astype(np.float32))
  # Nearest code: y lies between the midpoints around its chosen code, up to float32 rounding of y (so a value
  # within an ulp of a midpoint may round to either neighbour).
  lead, row, blocks, length = block_layout(shape, 256)
  cb = np.pad(
    np.asarray(codes).reshape(*lead, row),
    [(0, 0)] * len(lead) + [(0, blocks * length - row)],
    constant_values=book.zero_code,
  )
  cb = cb.reshape(y.shape).astype(np.int64)
  v64 = book.values.astype(np.float64)
  mids = np.concatenate([[-np.inf], (v64[1:] + v64[:-1]) / 2, [np.inf]])
  slack = 1e-6 * np.abs(y) + 1e-30
  assert np.all(mids[cb] <= y + slack) and np.all(y - slack <= mids[cb + 1])
  deq = np.asarray(dequantize_blockwise(codes, scales, book, 256))
  assert np.mean(deq == ref_deq.astype(np.float32)) > 0.9999
  # The stated bound: |x - x̂| <= book.max_error * |block scale| (0.0070 signed, 0.0035 unsigned), per element.
  bound = book.max_error * np.abs(ref_scale)[..., None] * (1 + 1e-6)
  err = np.abs(deq.astype(np.float64) - x)
  err_b = np.pad(err.reshape(*lead, row), [(0, 0)] * len(lead) + [(0, blocks * length - row)]).reshape(y.shape)
  assert np.all(err_b <= bound), float(np.max(err_b / bound))
  assert book.max_error < (0.0071 if signed else 0.0036)


def test_zero_and_constant_blocks_are_exact():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((8, 512)).astype(np.float32)
  x[0] = 0.0
  x[1] = -3.25
  x[2] = 7.5e-9
  x[3, :256] = 1e30
  for name in CODE_MAPS:
    m_book, v_book = codebooks(name)
    for book, data in ((m_book, x), (v_book, np.abs(x))):
      out = np.asarray(dequantize_blockwise(*quantize_blockwise(jnp.asarray(data), book), book))
      np.testing.assert_array_equal(out[:3], data[:3])
      np.testing.assert_array_equal(out[3, :256], data[3, :256])


def test_dynamic_map_is_bitsandbytes_map():
  bnb_functional = pytest.importorskip("bitsandbytes.functional")
  for signed in (True, False):
    ref = bnb_functional.create_dynamic_map(signed=signed).numpy()
    # bitsandbytes builds its linspace in torch float32; numpy's rounds a few entries one ulp differently.
    np.testing.assert_allclose(dynamic_map(signed), ref, rtol=2e-7, atol=0)


@pytest.mark.slow
def test_block_layout_and_bad_block_sizes():
  assert block_layout((30522, 384), 256) == ((30522,), 384, 2, 192)  # two blocks of 192, no padding
  assert block_layout((384, 1536), 256) == ((384,), 1536, 6, 256)
  assert block_layout((3, 3, 64, 8), 256) == ((3, 3), 512, 2, 256)  # short rows merge trailing axes
  assert block_layout((1000,), 300) == ((), 1000, 4, 250)
  assert block_layout((1001,), 300) == ((), 1001, 4, 251)  # padded to 4 x 251 = 1004, which 251 divides
  book = codebooks("dynamic")[0]
  x = jnp.asarray(np.random.default_rng(2).standard_normal((7, 1001)), jnp.float32)
  for block in (1, 7, 100, 300, 5000):
    codes, scales = quantize_blockwise(x, book, block)
    lead, _, blocks, _ = block_layout(x.shape, block)
    assert codes.shape == x.shape and scales.shape == (*lead, blocks)
    err = np.abs(np.asarray(dequantize_blockwise(codes, scales, book, block)) - np.asarray(x))
    assert err.max() <= book.max_error * np.abs(np.asarray(x)).max()
  for bad in (0, -256):
    with pytest.raises(ValueError, match="block_size must be positive"):
      adamw_8bit(1e-3, block_size=bad)
  for bad in (2.5, True, "256"):
    with pytest.raises(TypeError, match="block_size must be an integer"):
      adamw_8bit(1e-3, block_size=bad)
  with pytest.raises(ValueError, match="unknown code_map"):
    adamw_8bit(1e-3, code_map="nf4")
  with pytest.raises(ValueError, match="min_8bit_size"):
    adamw_8bit(1e-3, min_8bit_size=-1)
  with pytest.raises(ValueError, match="256 finite sorted"):
    CodeBook(np.linspace(1, 0, 256), signed=True)
  with pytest.raises(TypeError, match="floating-point"):
    adamw_8bit(1e-3).init({"ids": jnp.zeros((64, 128), jnp.int32)})


def _params(rng, dtype=jnp.float32):
  return {
    "kernel": jnp.asarray(0.05 * rng.standard_normal((384, 1536)), dtype),
    "embedding": jnp.asarray(0.05 * rng.standard_normal((1000, 384)), dtype),
    "bias": jnp.asarray(0.01 * rng.standard_normal(1536), dtype),
  }


def _grads(rng, params, i):
  # A persistent direction plus noise, with row scales spanning 3 decades, like real gradients.
  rows = {k: np.logspace(-4, -1, p.shape[0]).reshape(-1, *([1] * (p.ndim - 1))) for k, p in params.items()}
  return {
    k: jnp.asarray(rows[k] * (np.sin(np.arange(p.size)).reshape(p.shape) + rng.standard_normal(p.shape)), p.dtype)
    for k, p in params.items()
  }


def test_float32_leaves_are_optax_adamw_bit_for_bit():
  rng = np.random.default_rng(3)
  params = _params(rng)
  tx8 = adamw_8bit(1e-3, weight_decay=0.01, min_8bit_size=10**9)
  tx = optax.adamw(1e-3, weight_decay=0.01)
  s8, s = tx8.init(params), tx.init(params)
  for i in range(3):
    g = _grads(rng, params, i)
    u8, s8 = jax.jit(tx8.update)(g, s8, params)
    u, s = jax.jit(tx.update)(g, s, params)
    for k in params:
      np.testing.assert_array_equal(np.asarray(u8[k]), np.asarray(u[k]))
  np.testing.assert_array_equal(np.asarray(s8[0].nu["kernel"]), np.asarray(s[0].nu["kernel"]))


def test_update_matches_float64_adamw_on_dequantised_state_and_requantises_to_nearest():
  rng = np.random.default_rng(4)
  params = _params(rng)
  b1, b2, eps, lr, wd = 0.9, 0.999, 1e-8, 1e-3, 0.01
  tx = adamw_8bit(lr, b1, b2, eps, weight_decay=wd)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(5):
    _, state = update(_grads(rng, params, i), state, params)
  g = _grads(rng, params, 5)
  u, new = update(g, state, params)
  adam, new_adam = state[0], new[0]
  m_book, v_book = codebooks("dynamic")
  t = int(new_adam.count)
  for k in ("kernel", "embedding"):
    m = np.asarray(dequantize_blockwise(adam.mu[k], adam.mu_scale[k], m_book)).astype(np.float64)
    v = np.asarray(dequantize_blockwise(adam.nu[k], adam.nu_scale[k], v_book)).astype(np.float64)
    g64, p64 = np.asarray(g[k], np.float64), np.asarray(params[k], np.float64)
    m = b1 * m + (1 - b1) * g64
    v = b2 * v + (1 - b2) * g64**2
    ref = -lr * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * p64)
    # float32 vs float64: relative 2e-5, or 1e-6 of the largest update where sqrt(v) is tiny and eps matters.
    np.testing.assert_allclose(np.asarray(u[k]), ref, rtol=2e-5, atol=1e-6 * np.abs(ref).max())
    # Stored: the nearest codes of the new float moments (float32 rounding may flip an exact tie).
    _, _, m_ref = _reference_quantize(m.astype(np.float32), m_book.values, True, 256)
    m_got = np.asarray(dequantize_blockwise(new_adam.mu[k], new_adam.mu_scale[k], m_book))
    assert np.mean(np.isclose(m_got, m_ref, rtol=1e-5, atol=0)) > 0.9999


def test_update_close_to_float32_adamw():
  """Ten steps with the same gradients, then the 11th update: relative L2 error below 3% per tensor (measured:
  ~1-2%), and the update direction's cosine with float32 AdamW's above 0.999."""
  rng = np.random.default_rng(5)
  params = _params(rng)
  tx8, tx = adamw_8bit(1e-3, weight_decay=0.0), optax.adamw(1e-3, weight_decay=0.0)
  s8, s = tx8.init(params), tx.init(params)
  up8, up = jax.jit(tx8.update), jax.jit(tx.update)
  for i in range(11):
    g = _grads(rng, params, i)
    u8, s8 = up8(g, s8, params)
    u, s = up(g, s, params)
  for k in ("kernel", "embedding"):
    a, b = np.asarray(u8[k], np.float64).ravel(), np.asarray(u[k], np.float64).ravel()
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 0.03, (k, rel)
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.999
  np.testing.assert_array_equal(np.asarray(u8["bias"]), np.asarray(u["bias"]))  # small: float32, exact


def test_state_holds_no_float32_moment_for_large_tensors_and_minilm_bytes(minilm_path):
  from jfast.models import init_classifier, load_hf_bert

  params = _params(np.random.default_rng(6))
  adam = adamw_8bit(1e-3).init(params)[0]
  for tree in (adam.mu, adam.nu):
    assert tree["kernel"].dtype == jnp.uint8 and tree["kernel"].shape == (384, 1536)
    assert tree["embedding"].dtype == jnp.uint8
    assert tree["bias"].dtype == jnp.float32  # 1536 < min_8bit_size
  assert adam.mu_scale["kernel"].shape == (384, 6) and adam.mu_scale["bias"].shape == ()
  large = sum(p.size for p in jax.tree.leaves(params) if p.size >= 4096)
  float32_in_moments = sum(x.size for x in jax.tree.leaves((adam.mu, adam.nu)) if x.dtype == jnp.float32)
  assert float32_in_moments == 2 * 1536 and large == 384 * 1536 + 1000 * 384
  # Real MiniLM + classifier: the whole optimizer chain's state, abstractly (no arrays allocated).
  config, encoder = load_hf_bert(minilm_path)
  _, full = init_classifier(config, encoder, 2, jax.random.PRNGKey(0))
  shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), full)
  fp32 = state_bytes(jax.eval_shape(make_optimizer(OptimizerConfig(), 100).init, shapes))
  int8 = state_bytes(jax.eval_shape(make_optimizer(OptimizerConfig(name="adamw_8bit"), 100).init, shapes))
  assert fp32 == 8 * sum(p.size for p in jax.tree.leaves(full)) + 8  # two moments + counts
  assert int8 / fp32 <= 0.26, int8 / fp32


def test_state_bytes_counts_any_pytree():
  assert state_bytes(optax.adam(1e-3).init({"w": jnp.zeros((1000,))})) == 4 + 8000
  assert state_bytes({"a": jax.ShapeDtypeStruct((3, 5), jnp.uint8), "b": 1.0, "c": None}) == 15
  assert state_bytes(()) == 0


def _tiny_setup(tokenizer, sentences, tx, rows=16, **state_kwargs):
  ids, _ = tokenize(tokenizer, sentences[:rows], max_length=512)
  labels = np.asarray([len(s) % 2 for s in sentences[:rows]])
  batch = batch_from_rows(ids, labels, max(len(r) for r in ids), pad_id=0)
  model = BertForSequenceClassification(TINY, num_labels=2)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch.input_ids[:1])["params"]
  return model, create_train_state(model, params, tx, **state_kwargs), batch


def _same(a, b) -> bool:
  return all(
    x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


@pytest.mark.slow
def test_jit_and_checkpoint_round_trip_the_state_exactly(tokenizer, sst2_dev_sentences, tmp_path):
  model, state, batch = _tiny_setup(tokenizer, sst2_dev_sentences, adamw_8bit(1e-3, weight_decay=0.01))
  step = make_train_step(classification_loss(model), donate=False)
  for _ in range(2):
    state, _ = step(state, batch)
  assert _same(jax.jit(lambda s: s)(state.opt_state), state.opt_state)
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(2, state, {"epoch": 0, "batch": 2})
  ckpt.close()
  _, fresh, _ = _tiny_setup(tokenizer, sst2_dev_sentences, adamw_8bit(1e-3, weight_decay=0.01))
  restored, position = Checkpointer(tmp_path / "ckpt").restore_latest(fresh)
  assert position == {"epoch": 0, "batch": 2}
  assert _same(restored.opt_state, state.opt_state) and _same(restored.params, state.params)
  # The restored state continues exactly as the original.
  a, _ = step(state, batch)
  b, _ = step(restored, batch)
  assert _same(a.opt_state, b.opt_state)


@pytest.mark.slow
def test_composes_with_freezing_accumulation_and_multisteps(tokenizer, sst2_dev_sentences):
  tx = optax.chain(optax.clip_by_global_norm(1.0), adamw_8bit(1e-3, weight_decay=0.01))
  model, state, batch = _tiny_setup(tokenizer, sst2_dev_sentences, tx)
  loss_fn = classification_loss(model)
  # Accumulation: 4 micro-batches give the full batch's gradient, so the same 8-bit state.
  one, _ = make_train_step(loss_fn, donate=False)(state, batch)
  four, _ = make_train_step(loss_fn, micro_batches=4, donate=False)(state, batch)
  for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6)
  # Freezing: frozen leaves keep no 8-bit state and do not move; the rest train.
  mask = freezing.freeze_mask(state.params, ["embeddings"])
  _, fstate, _ = _tiny_setup(tokenizer, sst2_dev_sentences, freezing.freeze(tx, mask))
  fstep = make_train_step(loss_fn, freeze_mask=mask, donate=False)
  new, _ = fstep(fstate, batch)
  word = ("bert", "embeddings", "word_embeddings", "embedding")
  get = lambda tree: tree[word[0]][word[1]][word[2]][word[3]]  # noqa: E731
  np.testing.assert_array_equal(np.asarray(get(new.params)), np.asarray(get(fstate.params)))
  assert state_bytes(fstate.opt_state) < state_bytes(state.opt_state) / 4  # the 2M-entry table has no state
  assert not np.array_equal(
    np.asarray(new.params["classifier"]["kernel"]), np.asarray(fstate.params["classifier"]["kernel"])
  )
  # optax.MultiSteps: k gradients accumulate into one 8-bit update.
  params = _params(np.random.default_rng(9))
  multi = optax.MultiSteps(adamw_8bit(1e-3), every_k_schedule=2)
  ms = multi.init(params)
  g = _grads(np.random.default_rng(10), params, 0)
  u1, ms = jax.jit(multi.update)(g, ms, params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u1)) and int(ms.inner_opt_state[0].count) == 0
  u2, ms = jax.jit(multi.update)(g, ms, params)
  ref, _ = adamw_8bit(1e-3).update(g, adamw_8bit(1e-3).init(params), params)
  assert int(ms.inner_opt_state[0].count) == 1
  for k in params:
    np.testing.assert_allclose(np.asarray(u2[k]), np.asarray(ref[k]), rtol=1e-5, atol=1e-9)


def test_nonfinite_gradients_leave_the_state_untouched(tokenizer, sst2_dev_sentences):
  tx = adamw_8bit(1e-3, weight_decay=0.01)
  model, state, batch = _tiny_setup(tokenizer, sst2_dev_sentences, tx, loss_scale="dynamic")
  base = classification_loss(model)

  def nan_loss(params, batch, rng, deterministic):  # every gradient becomes NaN
    loss, aux = base(params, batch, rng, deterministic)
    return loss * jnp.float32(jnp.nan), aux

  new, metrics = make_train_step(nan_loss, donate=False)(state, batch)
  assert float(metrics["skipped"]) == 1.0
  assert _same(new.opt_state, state.opt_state) and _same(new.params, state.params)
  # Without loss scaling, optax.apply_if_finite gives the same protection around the optimizer itself.
  params = _params(np.random.default_rng(7))
  safe = optax.apply_if_finite(tx, max_consecutive_errors=5)
  s = safe.init(params)
  g = jax.tree.map(lambda p: p.at[0].set(jnp.nan), params)
  u, s2 = jax.jit(safe.update)(g, s, params)
  assert _same(s2.inner_state, s.inner_state)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_parameters(dtype):
  rng = np.random.default_rng(8)
  params = _params(rng, dtype)
  tx8, tx = adamw_8bit(1e-3, weight_decay=0.01), optax.adamw(1e-3, weight_decay=0.01)
  p32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  s8, s = tx8.init(params), tx.init(p32)
  assert s8[0].mu["kernel"].dtype == jnp.uint8 and s8[0].mu["bias"].dtype == jnp.float32
  for i in range(4):
    g = _grads(rng, params, i)
    u8, s8 = jax.jit(tx8.update)(g, s8, params)
    u, s = jax.jit(tx.update)(jax.tree.map(lambda x: x.astype(jnp.float32), g), s, p32)
  for k in params:
    assert u8[k].dtype == dtype and bool(jnp.all(jnp.isfinite(u8[k])))
    a, b = np.asarray(u8[k], np.float64), np.asarray(u[k], np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.03


def test_tiny_bert_trains_like_float32_adamw(tokenizer, sst2_dev_sentences, data_dir):
  import csv

  with (data_dir / "sst2" / "dev.tsv").open(newline="", encoding="utf-8") as f:
    labels = np.asarray([int(r[1]) for r in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]])
  ids, _ = tokenize(tokenizer, sst2_dev_sentences[:32], max_length=512)
  batch = batch_from_rows(ids, labels[:32], max(len(r) for r in ids), pad_id=0)
  model = BertForSequenceClassification(TINY, num_labels=2)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), batch.input_ids[:1])["params"]
  curves = {}
  for name in ("adamw", "adamw_8bit"):
    opt = OptimizerConfig(learning_rate=3e-3, warmup_ratio=0.0, name=name)
    state = create_train_state(model, params, make_optimizer(opt, 20))
    step = make_train_step(classification_loss(model))
    losses = []
    for _ in range(20):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    curves[name] = np.asarray(losses)
  assert curves["adamw"][-5:].mean() < 0.5 * curves["adamw"][0]  # it does learn (memorises 32 sentences)
  np.testing.assert_allclose(curves["adamw_8bit"], curves["adamw"], atol=0.08)


def test_optimizer_config_selects_8bit():
  with pytest.raises(ValueError, match="unknown optimizer"):
    OptimizerConfig(name="adam8")
  cfg = dataclasses.replace(OptimizerConfig(), name="adamw_8bit", block_size=128)
  state = make_optimizer(cfg, 10).init({"w": jnp.zeros((64, 384))})
  adam = state[1][0]
  assert adam.mu["w"].dtype == jnp.uint8 and adam.mu_scale["w"].shape == (64, 3)


SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jfast.optim import adamw_8bit

mesh = Mesh(np.array(jax.devices()).reshape(4), ("fsdp",))
rng = np.random.default_rng(0)
params = {"kernel": jnp.asarray(rng.standard_normal((384, 1536)), jnp.float32), "bias": jnp.zeros(1536)}
grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params) for _ in range(3)]
tx = adamw_8bit(1e-3, weight_decay=0.01)


def like_param(x):  # codes and [rows, blocks] scales: the parameter's spec on the leading (row) axis
  return NamedSharding(mesh, P("fsdp", *([None] * (x.ndim - 1))) if x.ndim and x.shape[0] % 4 == 0 else P())


state_sharding = jax.tree.map(like_param, jax.eval_shape(tx.init, params))
param_sharding = jax.tree.map(like_param, params)
update = jax.jit(tx.update, in_shardings=(param_sharding, state_sharding, param_sharding),
                 out_shardings=(param_sharding, state_sharding))
sharded = jax.jit(tx.init, out_shardings=state_sharding)(params)
plain = tx.init(params)
for g in grads:
  u_s, sharded = update(g, sharded, params)
  u_p, plain = jax.jit(tx.update)(g, plain, params)
mu = sharded[0].mu["kernel"]
assert mu.dtype == jnp.uint8 and mu.sharding.spec == P("fsdp", None)
assert {s.data.shape for s in mu.addressable_shards} == {(96, 1536)}
assert sharded[0].mu_scale["kernel"].sharding.spec == P("fsdp", None)
for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
np.testing.assert_array_equal(np.asarray(u_s["kernel"]), np.asarray(u_p["kernel"]))
print("OK")
"""


def test_state_shards_like_the_parameters(tmp_path):
  """On 4 host devices: codes and scales take the parameter's row sharding, and the result equals one device's."""
  import os
  import subprocess
  import sys

  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
