"""The chunked sparse-attention kernel under `sliding_window_attention` and `blockwise_attention` (pure JAX).

Queries are cut into chunks of ``C`` positions; each chunk scores only the few key chunks its window (or block) can
reach, so time and memory are ``O(L * (w + C))`` and no ``L x L`` array is ever built. Global tokens (the first
``g`` tokens of every segment) add ``O(L * g)``: every token scores its segment's global keys by a gather, and each
global query's softmax over its whole segment is a segment sum over keys. Each part returns unnormalised
(numerator, denominator, running max), so the parts merge exactly by the log-sum-exp rule.

Kept apart from `jfast.nn.attention` (configuration, dense kernel, backend choice, the Flax module) because it is the
one piece with its own algorithm; the public entry points live there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jfast.nn.dropout import keep_mask

# Finite stand-in for -inf: exp() of it underflows to 0 without inf - inf = NaN in masked rows or their gradients.
_NEG = -1e30
# Queries the local kernel scores per step of its loop (rounded down to whole chunks): big enough for efficient
# matmuls, small enough that one step's scores (steps x (2w + C) x heads floats) stay far below the dense L x L.
_QUERIES_PER_STEP = 1024


def segment_starts(seg_BxL):
  """Position of the first token of each token's segment (segments are contiguous runs, as packing makes them)."""
  length = seg_BxL.shape[1]
  prev_BxL = jnp.pad(seg_BxL[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  is_start_BxL = (seg_BxL > 0) & (seg_BxL != prev_BxL)
  return jax.lax.cummax(jnp.where(is_start_BxL, jnp.arange(length)[None], 0), axis=1)


def _structural(i, j, window, causal):
  """Which (query i, key j) absolute positions the kind allows before segment masking."""
  ok = jnp.ones(jnp.broadcast_shapes(i.shape, j.shape), bool)
  if window is not None:
    ok &= jnp.abs(i - j) <= window
  if causal:
    ok &= j <= i
  return ok


def _softmax_parts(logits, mask, keep):
  """exp-weights with a stop-gradient max: the max only stabilises, it cancels out of num / den exactly."""
  logits = jnp.where(mask, logits, _NEG)
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  e = jnp.where(mask, jnp.exp(logits - m[..., None]), 0.0)
  e_num = e if keep is None else jnp.where(keep, e, 0.0)
  return e, e_num, m


def _dropout_keep(rng, rate, shape):
  if rng is None or rate == 0.0:
    return None
  return keep_mask(rng, rate, shape)


def _local_part(q, k, v, seg, *, chunk, reach, window, causal, scale, keep_rng, rate):
  """Window/block part: query chunk c scores key chunks c - reach .. c + reach (.. c when causal).

  A `lax.map` walks the row ``_QUERIES_PER_STEP`` queries at a time under `jax.checkpoint`: the backward pass
  recomputes one step's scores instead of keeping every step's, so the scores never exist for the whole row at
  once (memory ``O(L * D)`` plus one step's ``O(step * (w + C))``), at the price of recomputing the forward scores.
  """
  batch, length = q.shape[:2]
  n = -(-length // chunk)
  group = min(n, max(1, _QUERIES_PER_STEP // chunk))
  steps = -(-n // group)
  before, after = reach, (0 if causal else reach)
  offsets = range(-before, after + 1)
  tail = steps * group * chunk - length

  def pad(x, pad_before, pad_after):
    widths = [(0, 0), (pad_before * chunk, pad_after * chunk + tail)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths)

  q_pad, segq_pad = pad(q, 0, 0), pad(seg, 0, 0)
  k_pad, v_pad, segk_pad = pad(k, before, after), pad(v, before, after), pad(seg, before, after)
  span = (group + before + after) * chunk

  def windows(x_span):
    # Key chunk c + o for every query chunk c of the step, stacked along the key axis: [B, G, O * C, ...].
    x_chunks = x_span.reshape(batch, group + before + after, chunk, *x_span.shape[2:])
    return jnp.concatenate([x_chunks[:, before + o : before + o + group] for o in offsets], axis=2)

  def step(index):
    start = index * group * chunk
    q_BxGxCxHxD = jax.lax.dynamic_slice_in_dim(q_pad, start, group * chunk, 1).reshape(
      batch, group, chunk, *q.shape[2:]
    )
    segq_BxGxC = jax.lax.dynamic_slice_in_dim(segq_pad, start, group * chunk, 1).reshape(batch, group, chunk)
    # k_pad is shifted right by `before` chunks, so slicing at `start` begins `before` chunks ahead of the queries.
    k_BxGxKxHxD = windows(jax.lax.dynamic_slice_in_dim(k_pad, start, span, 1))
    v_BxGxKxHxD = windows(jax.lax.dynamic_slice_in_dim(v_pad, start, span, 1))
    segk_BxGxK = windows(jax.lax.dynamic_slice_in_dim(segk_pad, start, span, 1))
    qpos_GxC = start + jnp.arange(group * chunk).reshape(group, chunk)
    kpos_GxK = jnp.concatenate([qpos_GxC + o * chunk for o in offsets], axis=1)

    logits = jnp.einsum("bgqhd,bgkhd->bghqk", q_BxGxCxHxD, k_BxGxKxHxD, preferred_element_type=jnp.float32)
    allowed_GxCxK = _structural(qpos_GxC[:, :, None], kpos_GxK[:, None, :], window, causal)
    allowed_GxCxK &= ((kpos_GxK >= 0) & (kpos_GxK < length))[:, None, :]
    segq, segk = segq_BxGxC[:, :, :, None], segk_BxGxK[:, :, None, :]
    mask_BxGx1xCxK = (allowed_GxCxK[None] & (segk > 0) & ((segq == segk) | (segq == 0)))[:, :, None]
    step_rng = None if keep_rng is None else jax.random.fold_in(keep_rng, index)
    e, e_num, m = _softmax_parts(logits * scale, mask_BxGx1xCxK, _dropout_keep(step_rng, rate, logits.shape))
    num = jnp.einsum("bghqk,bgkhd->bgqhd", e_num.astype(v.dtype), v_BxGxKxHxD, preferred_element_type=jnp.float32)
    den_BxGxCxH, m_BxGxCxH = jnp.swapaxes(jnp.sum(e, axis=-1), 2, 3), jnp.swapaxes(m, 2, 3)
    return tuple(x.reshape(batch, group * chunk, *x.shape[3:]) for x in (num, den_BxGxCxH, m_BxGxCxH))

  parts = jax.lax.map(jax.checkpoint(step), jnp.arange(steps))
  # [steps, B, G * C, ...] -> [B, L, ...]
  return tuple(jnp.moveaxis(x, 0, 1).reshape(batch, steps * group * chunk, *x.shape[3:])[:, :length] for x in parts)


def _gather(x_BxLx, idx_BxLxG):
  """x[b, idx[b, l, g]] -> [B, L, G, ...]."""
  return jax.vmap(lambda x, idx: x[idx])(x_BxLx, idx_BxLxG)


def _global_keys_part(q, k, v, seg, starts, reached, *, g, causal, scale, keep_rng, rate):
  """Each real query scores the global keys of its segment that the local part does not already reach."""
  length = q.shape[1]
  pos_L = jnp.arange(length)
  idx_BxLxG = starts[:, :, None] + jnp.arange(g)[None, None]
  safe = jnp.minimum(idx_BxLxG, length - 1)
  mask = (idx_BxLxG < length) & (_gather(seg, safe) == seg[:, :, None]) & (seg[:, :, None] > 0) & ~reached
  if causal:
    mask &= idx_BxLxG <= pos_L[None, :, None]
  logits = jnp.einsum("blhd,blghd->blhg", q, _gather(k, safe), preferred_element_type=jnp.float32) * scale
  keep = _dropout_keep(keep_rng, rate, logits.shape)
  e, e_num, m = _softmax_parts(logits, mask[:, :, None, :], keep)
  num = jnp.einsum("blhg,blghd->blhd", e_num.astype(v.dtype), _gather(v, safe), preferred_element_type=jnp.float32)
  return num, jnp.sum(e, axis=-1), m


def _global_queries_part(q, k, v, seg, starts, *, g, causal, scale, keep_rng, rate):
  """Softmax of each global query over its whole segment, as segment reductions over keys: O(L * g)."""
  length = q.shape[1]
  pos_L = jnp.arange(length)
  # Key j meets the global queries starts[j] + t of its own segment.
  idx_BxLxG = starts[:, :, None] + jnp.arange(g)[None, None]
  safe = jnp.minimum(idx_BxLxG, length - 1)
  mask_BxLxG = (idx_BxLxG < length) & (_gather(seg, safe) == seg[:, :, None]) & (seg[:, :, None] > 0)
  if causal:
    mask_BxLxG &= pos_L[None, :, None] <= idx_BxLxG
  logits = jnp.einsum("blghd,blhd->blgh", _gather(q, safe), k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask_BxLxG[..., None], logits, _NEG)
  segment_max = jax.vmap(functools.partial(jax.ops.segment_max, num_segments=length))
  segment_sum = jax.vmap(functools.partial(jax.ops.segment_sum, num_segments=length))
  m_BxSxGxH = jax.lax.stop_gradient(segment_max(logits, starts))
  e = jnp.where(mask_BxLxG[..., None], jnp.exp(logits - _gather(m_BxSxGxH, starts)), 0.0)
  keep = _dropout_keep(keep_rng, rate, e.shape)
  e_num = e if keep is None else jnp.where(keep, e, 0.0)
  den_BxSxGxH = segment_sum(e, starts)
  num_BxSxGxHxD = segment_sum(e_num[..., None] * v[:, :, None].astype(jnp.float32), starts)
  # Query i (a global token) reads its row (segment start, rank t = i - start).
  flat = starts * g + jnp.minimum(pos_L[None] - starts, g - 1)
  num = _gather(num_BxSxGxHxD.reshape(num_BxSxGxHxD.shape[0], -1, *num_BxSxGxHxD.shape[3:]), flat)
  den = _gather(den_BxSxGxH.reshape(den_BxSxGxH.shape[0], -1, den_BxSxGxH.shape[-1]), flat)
  is_global_BxL = (seg > 0) & (pos_L[None] - starts < g)
  return num, den, is_global_BxL


def _merge(a, b):
  (num_a, den_a, m_a), (num_b, den_b, m_b) = a, b
  m = jnp.maximum(m_a, m_b)
  sa, sb = jnp.exp(m_a - m), jnp.exp(m_b - m)
  return num_a * sa[..., None] + num_b * sb[..., None], den_a * sa + den_b * sb, m


def _normalise(num, den):
  # Rows with no allowed key (padding queries far from any real token) come out as zeros, not NaN.
  return num / jnp.where(den > 0, den, 1.0)[..., None]


def check_qkv(q, k, v):
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"q, k, v must share one [B, L, H, D] shape; got {q.shape}, {k.shape}, {v.shape}")


def sparse_attention(
  q_BxLxHxD: jax.Array,
  k_BxLxHxD: jax.Array,
  v_BxLxHxD: jax.Array,
  segment_ids_BxL: jax.Array,
  *,
  chunk: int,
  reach: int,
  window: int | None,
  causal: bool = False,
  global_tokens: int = 0,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """The chunked kernel under `sliding_window_attention` and `blockwise_attention` (pure JAX, any backend).

  Query chunk c of ``chunk`` positions scores key chunks ``c - reach .. c + reach`` (``.. c`` when causal) and keeps
  pairs with ``|i - j| <= window`` (``window=None``: the whole chunk, i.e. blocks). Output dtype is v's.
  """
  check_qkv(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
  scale = 1.0 / math.sqrt(q_BxLxHxD.shape[-1])
  rngs = [None] * 3 if dropout_rng is None or dropout_rate == 0.0 else list(jax.random.split(dropout_rng, 3))
  common = dict(causal=causal, scale=scale, rate=dropout_rate)
  seg = segment_ids_BxL.astype(jnp.int32)
  local = _local_part(
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, seg, chunk=chunk, reach=reach, window=window, keep_rng=rngs[0], **common
  )
  if not global_tokens:
    return _normalise(local[0], local[1]).astype(v_BxLxHxD.dtype)
  starts = segment_starts(seg)
  pos_L = jnp.arange(q_BxLxHxD.shape[1])
  idx_BxLxG = starts[:, :, None] + jnp.arange(global_tokens)[None, None]
  # Global keys the local part already scores (same block, or within the window) must not count twice.
  if window is None:
    reached = idx_BxLxG // chunk == (pos_L // chunk)[None, :, None]
  else:
    reached = jnp.abs(idx_BxLxG - pos_L[None, :, None]) <= window
  qkv = (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, seg, starts)
  keys = _global_keys_part(*qkv, reached, g=global_tokens, keep_rng=rngs[1], **common)
  num, den, _ = _merge(local, keys)
  gnum, gden, is_global = _global_queries_part(*qkv, g=global_tokens, keep_rng=rngs[2], **common)
  num = jnp.where(is_global[..., None, None], gnum, num)
  den = jnp.where(is_global[..., None], gden, den)
  return _normalise(num, den).astype(v_BxLxHxD.dtype)
