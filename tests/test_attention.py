"""Sparse attention kinds against an independent float64 reference, reach through gradients, memory, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfast.nn.attention as attention_module
import jfast.nn.sparse_attention as sparse_attention_module
from jfast.models import BertConfig, BertModel, extend_position_embeddings
from jfast.nn import (
  Attention,
  AttentionConfig,
  blockwise_attention,
  dense_attention,
  explicit_mask,
  sliding_window_attention,
)

B, L, H, D = 2, 53, 3, 16


def _segments() -> np.ndarray:
  """Row 0: one example and right padding; row 1: three packed examples, then padding (odd lengths)."""
  seg = np.zeros((B, L), np.int32)
  seg[0, :41] = 1
  seg[1, :13], seg[1, 13:32], seg[1, 32:49] = 1, 2, 3
  return seg


def _qkv(seed=0, length=L):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(B, length, H, D)), jnp.float32) for _ in range(3)]


def _reference_mask(seg, *, kind, window=None, block=None, global_tokens=0, causal=False) -> np.ndarray:
  """The definition, pair by pair in Python: [B, L, L] booleans."""
  batch, length = seg.shape
  mask = np.zeros((batch, length, length), bool)
  for b in range(batch):
    rank = np.zeros(length, int)  # position of each token inside its segment
    for i in range(1, length):
      rank[i] = rank[i - 1] + 1 if seg[b, i] == seg[b, i - 1] else 0
    is_global = (seg[b] > 0) & (rank < global_tokens)
    for i in range(length):
      for j in range(length):
        if seg[b, j] == 0 or (seg[b, i] not in (0, seg[b, j])) or (causal and j > i):
          continue
        if kind == "dense":
          near = True
        elif kind == "blockwise":
          near = i // block == j // block
        else:
          near = abs(i - j) <= window
        shared = seg[b, i] == seg[b, j]
        mask[b, i, j] = near or (shared and (is_global[i] or is_global[j]))
  return mask


def _reference_attention(q, k, v, mask_BxLxL) -> np.ndarray:
  """float64 softmax attention under an explicit mask; a row with no allowed key gives zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask_BxLxL[:, None], logits, -np.inf)
  top = np.max(logits, axis=-1, keepdims=True)
  weights = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
  total = weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights / np.where(total > 0, total, 1.0), v)


def _masked_dense_jax(q, k, v, mask_BxLxL):
  """The dense computation in JAX under an explicit mask (for gradients)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask_BxLxL[:, None], logits, -1e30)
  weights = jnp.where(mask_BxLxL[:, None], jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True))), 0)
  total = weights.sum(-1, keepdims=True)
  return jnp.einsum("bhqk,bkhd->bqhd", weights / jnp.where(total > 0, total, 1.0), v)


CASES = {
  "window5": (AttentionConfig.sliding_window(5), dict(kind="sliding_window", window=5)),
  "window9_chunk4": (AttentionConfig.sliding_window(9, chunk_size=4), dict(kind="sliding_window", window=9)),
  "window7_global1": (AttentionConfig.sliding_window(7, global_tokens=1), dict(kind="sliding_window", window=7)),
  "window3_global2": (AttentionConfig.sliding_window(3, global_tokens=2), dict(kind="sliding_window", window=3)),
  "block8": (AttentionConfig.blockwise(8), dict(kind="blockwise", block=8)),
  "block6_global2": (AttentionConfig.blockwise(6, global_tokens=2), dict(kind="blockwise", block=6)),
}


@pytest.fixture
def small_steps(monkeypatch):
  # Several steps of the kernel's loop even at these short lengths, so the step boundaries are tested too.
  monkeypatch.setattr(sparse_attention_module, "_QUERIES_PER_STEP", 8)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", list(CASES))
def test_kind_equals_dense_under_explicit_mask(name, causal, small_steps):
  config, ref_kw = CASES[name]
  q, k, v = _qkv()
  seg = _segments()
  mask = _reference_mask(seg, global_tokens=config.global_tokens, causal=causal, **ref_kw)
  np.testing.assert_array_equal(np.asarray(explicit_mask(seg, config, causal=causal))[:, 0], mask)
  probe = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

  @jax.jit
  def kernel_and_grads(q, k, v):
    out, pullback = jax.vjp(lambda *x: Attention(config, causal=causal).apply({}, *x, jnp.asarray(seg)), q, k, v)
    return out, pullback(probe)

  out, grads = kernel_and_grads(q, k, v)
  np.testing.assert_allclose(np.asarray(out), _reference_attention(q, k, v, mask), atol=1e-5, rtol=0)
  # Gradients of a random projection of the output, against the dense computation under the same mask.
  want = jax.jit(jax.grad(lambda *x: jnp.sum(_masked_dense_jax(*x, jnp.asarray(mask)) * probe), (0, 1, 2)))(q, k, v)
  for got, ref in zip(grads, want, strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_window_at_least_length_is_dense(causal):
  q, k, v = _qkv(2)
  seg = jnp.asarray(_segments())

  def loss(fn, *x):
    return jnp.sum(jnp.sin(fn(*x)))

  @jax.jit
  def window(*x):
    return sliding_window_attention(*x, L, mask=seg, causal=causal, chunk_size=7)

  def dense(*x):
    return dense_attention(*x, seg, causal=causal)

  # Every position, padding queries included: both let a padding query see every real key of its row.
  np.testing.assert_allclose(np.asarray(window(q, k, v)), np.asarray(dense(q, k, v)), atol=1e-5, rtol=0)
  got = jax.jit(jax.grad(lambda *x: loss(window, *x), (0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(lambda *x: loss(dense, *x), (0, 1, 2)))(q, k, v)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


def test_dense_equals_jax_dot_product_attention():
  q, k, v = _qkv(3)
  seg = jnp.asarray(_segments())
  want = jax.nn.dot_product_attention(q, k, v, mask=attention_module.segment_mask(seg, causal=True))
  np.testing.assert_allclose(np.asarray(dense_attention(q, k, v, seg, causal=True)), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_no_gradient_from_beyond_the_window(causal, small_steps):
  window, query = 6, 30
  q, k, v = _qkv(4)
  seg = jnp.ones((B, L), jnp.int32)

  def out_at_query(k, v):
    return jnp.sum(sliding_window_attention(q, k, v, window, mask=seg, causal=causal)[:, query])

  dk, dv = (np.abs(np.asarray(g)).sum(axis=(0, 2, 3)) for g in jax.jit(jax.grad(out_at_query, (0, 1)))(k, v))
  reach = np.abs(np.arange(L) - query) <= window
  if causal:
    reach &= np.arange(L) <= query
  assert np.all(dk[~reach] == 0) and np.all(dv[~reach] == 0)
  assert np.all(dk[reach & (np.arange(L) != query)] > 0) and np.all(dv[reach] > 0)


def test_global_tokens_see_everything_and_are_seen(small_steps):
  q, k, v = _qkv(5)
  seg = _segments()
  members = np.flatnonzero(seg[1] == 2)  # the middle packed example of row 1: positions 13..31
  first, far = members[0], members[-1]

  def grads_of(position):
    def f(v):
      return jnp.sum(blockwise_attention(q, k, v, 4, mask=jnp.asarray(seg), global_tokens=1)[1, position])

    return np.abs(np.asarray(jax.jit(jax.grad(f))(v)[1])).sum(axis=(1, 2))

  from_cls = grads_of(first)  # the global token reads every token of its example, and nothing else
  assert np.all(from_cls[members] > 0) and np.all(from_cls[seg[1] != 2] == 0)
  from_far = grads_of(far)  # a token blocks away still reads the global token
  assert from_far[first] > 0 and np.all(from_far[members[1:-4]] == 0)


def test_dropout_keeps_the_window_and_is_reproducible():
  q, k, v = _qkv(6)
  seg = jnp.asarray(_segments())
  module = Attention(AttentionConfig.sliding_window(4), dropout_rate=0.3)

  @jax.jit
  def run(v, key):
    return module.apply({}, q, k, v, seg, deterministic=False, rngs={"dropout": key})

  keys = jax.random.split(jax.random.key(0, impl="rbg"))  # the PRNG jfast.training uses for dropout
  a, b, c = run(v, keys[0]), run(v, keys[0]), run(v, keys[1])
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
  dv = np.abs(np.asarray(jax.grad(lambda v: jnp.sum(run(v, keys[0])[0, 30]))(v)[0])).sum(axis=(1, 2))
  assert np.all(dv[np.abs(np.arange(L) - 30) > 4] == 0) and dv[30] > 0


def test_cudnn_call_matches_chunked_and_packed_rows_fall_back(monkeypatch):
  # No GPU here: run the exact cuDNN call through XLA's implementation, which shares its window convention.
  original = jax.nn.dot_product_attention
  calls = []

  def xla_instead(*args, implementation=None, **kwargs):
    calls.append(implementation)
    return original(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)
  q, k, v = _qkv(7)
  window = 5

  def chunked(q, k, v):
    return sliding_window_attention(q, k, v, window, mask=seg, causal=True, backend="xla")

  seg = jnp.asarray((np.arange(L)[None] < np.array([[41], [29]])).astype(np.int32))
  fused = attention_module._cudnn_or_chunked(q, k, v, seg, window, chunked)
  assert calls == ["cudnn"]
  real = np.asarray(seg, bool)
  np.testing.assert_allclose(np.asarray(fused)[real], np.asarray(chunked(q, k, v))[real], atol=1e-5, rtol=0)
  packed = jnp.asarray(_segments())  # the device-side test picks the chunked kernel

  def chunked_packed(q, k, v):  # a new function: lax.cond caches branches by function identity
    return sliding_window_attention(q, k, v, window, mask=packed, causal=True, backend="xla")

  got = attention_module._cudnn_or_chunked(q, k, v, packed, window, chunked_packed)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(chunked_packed(q, k, v)))


def _compiled_temp_bytes(fn, length, heads=1, depth=8):
  spec = jax.ShapeDtypeStruct((1, length, heads, depth), jnp.float32)
  seg = jax.ShapeDtypeStruct((1, length), jnp.int32)
  step = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s)), (0, 1, 2)))
  return step.lower(spec, spec, spec, seg).compile().memory_analysis().temp_size_in_bytes


def test_compiled_memory_is_linear_and_never_length_squared():
  def window(q, k, v, s):
    return sliding_window_attention(q, k, v, 32, mask=s, global_tokens=1)

  small, large = (_compiled_temp_bytes(window, n) for n in (2048, 4096))
  assert large < 4096**2 * 4 / 8  # a single fp32 n x n array would be 8x this
  assert large / small <= 2.2
  dense = _compiled_temp_bytes(lambda q, k, v, s: dense_attention(q, k, v, s), 4096)
  assert dense > 4096**2 * 4 > 8 * large  # the dense step does hold n x n arrays


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match="window must be positive"):
    AttentionConfig.sliding_window(0)
  with pytest.raises(ValueError, match="window must be positive"):
    sliding_window_attention(*_qkv(), -3)
  with pytest.raises(TypeError, match="window must be an int"):
    AttentionConfig.sliding_window(2.5)
  with pytest.raises(ValueError, match="block_size must be positive"):
    AttentionConfig.blockwise(0)
  with pytest.raises(ValueError, match="block_size must be positive"):
    blockwise_attention(*_qkv(), 0)
  with pytest.raises(ValueError, match="needs window"):
    AttentionConfig(kind="sliding_window")
  with pytest.raises(ValueError, match="does not apply"):
    AttentionConfig(kind="dense", window=8)
  with pytest.raises(ValueError, match="global_tokens applies to sparse kinds"):
    AttentionConfig(global_tokens=1)
  with pytest.raises(ValueError, match="unknown attention backend"):
    AttentionConfig.sliding_window(8, backend="flash")
  with pytest.raises(ValueError, match="backend='cudnn' does not apply"):
    sliding_window_attention(*_qkv(), 8, causal=True, backend="cudnn")
  with pytest.raises(ValueError, match=r"shape \[B, L\]"):
    sliding_window_attention(*_qkv(), 8, mask=jnp.ones((B, L + 1), jnp.int32))


def test_positions_beyond_the_table_need_an_extension():
  config = BertConfig(
    vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=16,
  )  # fmt: skip
  model = BertModel(config)
  ids = jnp.asarray(np.random.default_rng(8).integers(1, 50, size=(2, 16)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
  long_ids = jnp.concatenate([ids, ids[:, :9]], axis=1)
  with pytest.raises(ValueError, match=r"exceeds the position table.*extend_position_embeddings"):
    jax.jit(model.apply)({"params": params}, long_ids)
  with pytest.raises(ValueError, match="must exceed"):
    extend_position_embeddings(config, params, 16)
  new_config, new_params = extend_position_embeddings(config, params, 40)
  table = np.asarray(new_params["embeddings"]["position_embeddings"]["embedding"])
  old = np.asarray(params["embeddings"]["position_embeddings"]["embedding"])
  np.testing.assert_array_equal(table[np.arange(40)], old[np.arange(40) % 16])  # Longformer-style copies
  new_model = jax.jit(BertModel(new_config).apply)
  hidden, _ = new_model({"params": new_params}, long_ids)
  assert hidden.shape == (2, 25, 32) and np.isfinite(np.asarray(hidden)).all()
  # Inside the old range nothing changes.
  before, _ = jax.jit(model.apply)({"params": params}, ids)
  after, _ = new_model({"params": new_params}, ids)
  np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=1e-6, rtol=0)


def test_real_minilm_sparse_kinds_and_long_inputs(minilm_path, sst2_dev_sentences, tokenizer):
  from jfast.data import tokenize
  from jfast.models import load_hf_bert
  from tests.conftest import padded

  config, params = load_hf_bert(minilm_path)
  ids, mask = padded(tokenize(tokenizer, sst2_dev_sentences[:6], max_length=config.max_position_embeddings)[0])
  dense, _ = jax.jit(BertModel(config).apply)({"params": params}, ids, mask)
  real = mask.astype(bool)
  # A block that holds the whole row is exactly dense on real tokens.
  covering = config.replace(attention=AttentionConfig.blockwise(ids.shape[1], global_tokens=1))
  hidden, _ = jax.jit(BertModel(covering).apply)({"params": params}, ids, mask)
  np.testing.assert_allclose(np.asarray(hidden)[real], np.asarray(dense)[real], atol=1e-5, rtol=0)
  # 600 tokens, beyond the pretrained 512 positions: sliding window with a global [CLS].
  narrow = config.replace(attention=AttentionConfig.sliding_window(4, global_tokens=1))
  long_config, long_params = extend_position_embeddings(narrow, params, 600)
  long_ids = np.tile(ids[:1, : real[0].sum()], (1, 600 // int(real[0].sum()) + 1))[:, :600]
  hidden, pooled = jax.jit(BertModel(long_config).apply)({"params": long_params}, long_ids)
  assert hidden.shape == (1, 600, config.hidden_size) and np.isfinite(np.asarray(pooled)).all()
