"""Attention kernels behind one entry point: dense, sliding window, blockwise, and Longformer-style global tokens.

Every kernel takes ``segment_ids`` instead of a boolean mask: padding is segment 0, and packed rows number their
examples 1..S. That one integer array expresses padding, packing and (for decoders, with ``causal``) causality
without a second mask representation travelling through the model.

The sparse kinds never build an ``L x L`` array. Queries are cut into chunks of ``C`` positions; each chunk
scores only the few key chunks its window (or block) can reach, so time and memory are ``O(L * (w + C))``. Global
tokens (the first ``g`` tokens of every segment, [CLS] for ``g = 1``) add ``O(L * g)``: every token scores its
segment's global keys by a gather, and each global query's softmax over its whole segment is a segment sum over
keys. The parts are merged with the log-sum-exp rule, so the result equals dense attention under the equivalent
mask (`explicit_mask`), up to float rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from jfast.dropout import dropout, keep_mask
from jfast.precision import mixed_matmul, row_major

ATTENTION_KINDS = ("dense", "sliding_window", "blockwise")
ATTENTION_BACKENDS = ("auto", "xla", "cudnn")
# Finite stand-in for -inf: exp() of it underflows to 0 without inf - inf = NaN in masked rows or their gradients.
_NEG = -1e30
# Queries the local kernel scores per step of its loop (rounded down to whole chunks): big enough for efficient
# matmuls, small enough that one step's scores (steps x (2w + C) x heads floats) stay far below the dense L x L.
_QUERIES_PER_STEP = 1024


def _check_positive(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
  if value <= 0:
    raise ValueError(f"{name} must be positive, got {value}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Which attention kernel the model runs.

  Attributes:
    kind: ``dense`` scores every query-key pair; ``sliding_window`` lets token i see keys j with ``|i - j| <=
      window`` (``0 <= i - j <= window`` when causal); ``blockwise`` cuts the row into blocks of ``block_size``
      positions and attends within a block only.
    window: the sliding-window reach (tokens on each side); required for ``sliding_window`` only.
    block_size: the block length; required for ``blockwise`` only.
    global_tokens: the first ``global_tokens`` positions of every segment (``1`` = each example's [CLS]) attend to
      their whole segment and are attended by all of it (Longformer); sparse kinds only.
    chunk_size: query chunk of the sliding-window kernel (default ``min(window, 128)``): smaller chunks waste
      fewer scores at the window's edge (a chunk scores ``C * (C * (2 * ceil(w / C) + 1))`` pairs for ``C * (2w+1)``
      useful ones), larger ones run fewer, bigger matmuls.
    backend: ``auto`` runs cuDNN's fused sliding-window kernel (``jax.nn.dot_product_attention(...,
      implementation="cudnn", local_window_size=...)``) where it applies (GPU, causal sliding window, bf16/fp16,
      no dropout, no global tokens) and the chunked pure-JAX kernel elsewhere; ``xla`` forces the chunked kernel;
      ``cudnn`` forces cuDNN and raises where it does not apply.

  Example:
    >>> AttentionConfig.sliding_window(256, global_tokens=1)
    AttentionConfig(kind='sliding_window', window=256, block_size=None, global_tokens=1, chunk_size=None, backend='auto')
  """

  kind: str = "dense"
  window: int | None = None
  block_size: int | None = None
  global_tokens: int = 0
  chunk_size: int | None = None
  backend: str = "auto"

  def __post_init__(self):
    if self.kind not in ATTENTION_KINDS:
      raise ValueError(f"unknown attention kind {self.kind!r}; expected one of {ATTENTION_KINDS}")
    if self.backend not in ATTENTION_BACKENDS:
      raise ValueError(f"unknown attention backend {self.backend!r}; expected one of {ATTENTION_BACKENDS}")
    needs = {"sliding_window": "window", "blockwise": "block_size"}
    for field in ("window", "block_size"):
      value = getattr(self, field)
      if needs.get(self.kind) == field:
        if value is None:
          raise ValueError(f"attention kind {self.kind!r} needs {field}")
        _check_positive(field, value)
      elif value is not None:
        raise ValueError(f"{field}={value} does not apply to attention kind {self.kind!r}")
    if isinstance(self.global_tokens, bool) or not isinstance(self.global_tokens, int) or self.global_tokens < 0:
      raise ValueError(f"global_tokens must be a non-negative int, got {self.global_tokens!r}")
    if self.global_tokens and self.kind == "dense":
      raise ValueError("global_tokens applies to sparse kinds only; dense attention already sees every token")
    if self.chunk_size is not None:
      if self.kind != "sliding_window":
        raise ValueError(f"chunk_size applies to sliding_window only, not {self.kind!r}")
      _check_positive("chunk_size", self.chunk_size)

  @classmethod
  def dense(cls, **kwargs) -> AttentionConfig:
    return cls(kind="dense", **kwargs)

  @classmethod
  def sliding_window(cls, window: int, **kwargs) -> AttentionConfig:
    return cls(kind="sliding_window", window=window, **kwargs)

  @classmethod
  def blockwise(cls, block_size: int, **kwargs) -> AttentionConfig:
    return cls(kind="blockwise", block_size=block_size, **kwargs)


def segment_mask(segment_ids_BxL: jax.Array, *, causal: bool = False) -> jax.Array:
  """Boolean ``[B, 1, L, L]`` mask: query i may attend key j.

  Keys must be real tokens of the query's own segment. Padding queries (segment 0) attend to every real key, as
  Hugging Face BERT does, so their (ignored) outputs stay finite and match PyTorch position for position.
  """
  q_BxLx1 = segment_ids_BxL[:, :, None]
  k_Bx1xL = segment_ids_BxL[:, None, :]
  mask_BxLxL = (k_Bx1xL > 0) & ((q_BxLx1 == k_Bx1xL) | (q_BxLx1 == 0))
  if causal:
    length = segment_ids_BxL.shape[1]
    mask_BxLxL &= jnp.tril(jnp.ones((length, length), dtype=bool))[None]
  return mask_BxLxL[:, None]


def dense_attention(
  q_BxLxHxD: jax.Array,
  k_BxLxHxD: jax.Array,
  v_BxLxHxD: jax.Array,
  segment_ids_BxL: jax.Array,
  *,
  causal: bool = False,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """Masked softmax attention over all pairs; softmax in float32 whatever the compute dtype.

  The same computation as ``jax.nn.dot_product_attention(q, k, v, mask=segment_mask(...))`` (tested), written out
  because that function has no attention dropout.
  """
  depth = q_BxLxHxD.shape[-1]
  half = q_BxLxHxD.dtype in (jnp.bfloat16, jnp.float16)
  if half:
    # Head-major row-major operands, so that both products and their gradients stay half precision on XLA:CPU.
    q_BxHxLxD = row_major(jnp.transpose(q_BxLxHxD, (0, 2, 1, 3)))
    k_BxHxDxL = row_major(jnp.transpose(k_BxLxHxD, (0, 2, 3, 1)))
    logits_BxHxLxL = mixed_matmul(q_BxHxLxD, k_BxHxDxL) / jnp.sqrt(depth).astype(q_BxLxHxD.dtype)
  else:
    logits_BxHxLxL = jnp.einsum("bqhd,bkhd->bhqk", q_BxLxHxD, k_BxLxHxD) / jnp.sqrt(depth).astype(q_BxLxHxD.dtype)
  logits_BxHxLxL = logits_BxHxLxL.astype(jnp.float32)
  mask = segment_mask(segment_ids_BxL, causal=causal)
  # A finite floor instead of -inf keeps fully masked rows (all-padding rows) NaN-free.
  logits_BxHxLxL = jnp.where(mask, logits_BxHxLxL, jnp.finfo(jnp.float32).min)
  probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1).astype(v_BxLxHxD.dtype)
  if dropout_rate > 0.0 and dropout_rng is not None:
    probs_BxHxLxL = dropout(probs_BxHxLxL, dropout_rate, dropout_rng).astype(v_BxLxHxD.dtype)
  if half:
    v_BxHxLxD = row_major(jnp.transpose(v_BxLxHxD, (0, 2, 1, 3)))
    return jnp.swapaxes(mixed_matmul(probs_BxHxLxL, v_BxHxLxD), 1, 2)
  return jnp.einsum("bhqk,bkhd->bqhd", probs_BxHxLxL, v_BxLxHxD)


# ---------------------------------------------------------------------------------------------------------------
# Chunked sparse kernel. Each part returns unnormalised (numerator, denominator, running max) so parts merge exactly.


def _segment_starts(seg_BxL):
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


def _as_segment_ids(mask, q):
  if mask is None:
    return jnp.ones(q.shape[:2], jnp.int32)
  mask = jnp.asarray(mask)
  if mask.shape != q.shape[:2]:
    raise ValueError(f"mask/segment_ids must have shape [B, L] = {q.shape[:2]}, got {mask.shape}")
  return mask.astype(jnp.int32)


def _check_qkv(q, k, v):
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
  _check_qkv(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
  scale = 1.0 / math.sqrt(q_BxLxHxD.shape[-1])
  rngs = [None] * 3 if dropout_rng is None or dropout_rate == 0.0 else list(jax.random.split(dropout_rng, 3))
  common = dict(causal=causal, scale=scale, rate=dropout_rate)
  seg = segment_ids_BxL.astype(jnp.int32)
  local = _local_part(
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, seg, chunk=chunk, reach=reach, window=window, keep_rng=rngs[0], **common
  )
  if not global_tokens:
    return _normalise(local[0], local[1]).astype(v_BxLxHxD.dtype)
  starts = _segment_starts(seg)
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


def _cudnn_unsupported(q, *, causal, global_tokens, dropout_rate) -> str | None:
  """Why cuDNN's fused sliding-window kernel cannot run this call, or None when it can."""
  if not causal:
    return "cuDNN's sliding window is causal only (it has no right-hand window)"
  if global_tokens:
    return "cuDNN has no global tokens"
  if dropout_rate > 0.0:
    return "jax.nn.dot_product_attention has no attention dropout"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN flash attention needs bf16/fp16 inputs, got {q.dtype}"
  if q.shape[-1] % 8 or q.shape[-1] > 128:
    return f"cuDNN flash attention needs head_dim a multiple of 8 up to 128, got {q.shape[-1]}"
  if jax.default_backend() != "gpu":
    return f"cuDNN needs a GPU; the default backend is {jax.default_backend()}"
  return None


def _cudnn_or_chunked(q, k, v, seg, window, chunked):
  """cuDNN when every row is one right-padded example (lengths say it all); packed rows take the chunked kernel.

  The test runs on device (`lax.cond`), so one compiled step serves both kinds of batch. Padding queries come out
  as zeros from cuDNN, where the chunked kernel lets them see the real keys in their window.
  """
  length = q.shape[1]
  lengths_B = jnp.sum(seg > 0, axis=1).astype(jnp.int32)
  simple = jnp.all(seg == (jnp.arange(length)[None] < lengths_B[:, None]))

  def fused(q, k, v):
    return jax.nn.dot_product_attention(
      q,
      k,
      v,
      is_causal=True,
      local_window_size=(window, 0),
      query_seq_lengths=lengths_B,
      key_value_seq_lengths=lengths_B,
      implementation="cudnn",
    )

  return jax.lax.cond(simple, fused, chunked, q, k, v)


def sliding_window_attention(
  q_BxLxHxD: jax.Array,
  k_BxLxHxD: jax.Array,
  v_BxLxHxD: jax.Array,
  window: int,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  global_tokens: int = 0,
  chunk_size: int | None = None,
  backend: str = "auto",
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """Local attention: token i sees keys j of its segment with ``|i - j| <= window`` (``0 <= i - j <= window`` causal).

  Time and memory are ``O(L * (window + chunk))``: no ``L x L`` array is built. Lengths that are not a multiple of the
  chunk are padded inside the kernel.

  Args:
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD: queries, keys, values of one shape.
    window: reach on each side, a positive int; ``window >= L`` is dense attention.
    mask: ``[B, L]`` segment ids (0 = padding, packed examples 1..S) or a boolean padding mask (True = real);
      None means every token is real. Tokens attend within their own segment; padding queries see the real keys
      in their window (a padding query with none outputs zeros).
    causal: decoder masking.
    global_tokens: the first ``global_tokens`` tokens of each segment attend to and are attended by the whole
      segment (Longformer's global attention; 1 = [CLS]).
    chunk_size: query chunk, default ``min(window, 128)``.
    backend: ``auto``, ``xla`` (the chunked kernel) or ``cudnn`` (see `AttentionConfig`).
    dropout_rate, dropout_rng: attention-probability dropout; no dropout when the rng is None.

  Returns:
    ``[B, L, H, D]`` in v's dtype.

  Example:
    >>> out = sliding_window_attention(q, k, v, 256, mask=attention_mask)  # doctest: +SKIP
  """
  _check_positive("window", window)
  if chunk_size is not None:
    _check_positive("chunk_size", chunk_size)
  if backend not in ATTENTION_BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
  _check_qkv(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
  seg = _as_segment_ids(mask, q_BxLxHxD)
  length = q_BxLxHxD.shape[1]
  chunk = min(chunk_size or min(window, 128), length)
  reach = -(-min(window, length) // chunk)
  chunked = functools.partial(
    sparse_attention,
    segment_ids_BxL=seg,
    chunk=chunk,
    reach=reach,
    window=window,
    causal=causal,
    global_tokens=global_tokens,
    dropout_rate=dropout_rate,
    dropout_rng=dropout_rng,
  )
  if backend == "xla":
    return chunked(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
  active_dropout = dropout_rate if dropout_rng is not None else 0.0
  reason = _cudnn_unsupported(q_BxLxHxD, causal=causal, global_tokens=global_tokens, dropout_rate=active_dropout)
  if reason is not None:
    if backend == "cudnn":
      raise ValueError(f"backend='cudnn' does not apply: {reason}")
    return chunked(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
  try:
    return _cudnn_or_chunked(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, seg, window, chunked)
  except (ValueError, NotImplementedError, RuntimeError) as e:
    if backend == "cudnn":
      raise ValueError(f"backend='cudnn' does not apply: {e}") from e
    return chunked(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)


def blockwise_attention(
  q_BxLxHxD: jax.Array,
  k_BxLxHxD: jax.Array,
  v_BxLxHxD: jax.Array,
  block_size: int,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  global_tokens: int = 0,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """Attention within fixed blocks ``[k * block_size, (k + 1) * block_size)`` of the row only: ``O(L * block_size)``.

  Arguments as `sliding_window_attention`; the last block is padded inside the kernel.

  Example:
    >>> out = blockwise_attention(q, k, v, 512, mask=segment_ids, global_tokens=1)  # doctest: +SKIP
  """
  _check_positive("block_size", block_size)
  _check_qkv(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
  return sparse_attention(
    q_BxLxHxD,
    k_BxLxHxD,
    v_BxLxHxD,
    _as_segment_ids(mask, q_BxLxHxD),
    chunk=block_size,
    reach=0,
    window=None,
    causal=causal,
    global_tokens=global_tokens,
    dropout_rate=dropout_rate,
    dropout_rng=dropout_rng,
  )


def explicit_mask(segment_ids_BxL: jax.Array, config: AttentionConfig, *, causal: bool = False) -> jax.Array:
  """The ``[B, 1, L, L]`` boolean mask a kind is equivalent to: the O(L^2) reference the kernels are tested against.

  For ``dense`` this is `segment_mask`. For sparse kinds a pair (i, j) is allowed when j is a real key of i's
  segment (any real key for a padding query i), causal-ok, and either structurally close (same block, or
  ``|i - j| <= window``) or, for a real query, one of i and j is among the first ``global_tokens`` of the segment.
  """
  seg = jnp.asarray(segment_ids_BxL).astype(jnp.int32)
  if config.kind == "dense":
    return segment_mask(seg, causal=causal)
  length = seg.shape[1]
  pos = jnp.arange(length)
  qseg, kseg = seg[:, :, None], seg[:, None, :]
  base = (kseg > 0) & ((qseg == kseg) | (qseg == 0))
  if causal:
    base &= pos[None, None, :] <= pos[None, :, None]
  if config.kind == "blockwise":
    near = (pos[:, None] // config.block_size) == (pos[None, :] // config.block_size)
  else:
    near = jnp.abs(pos[:, None] - pos[None, :]) <= config.window
  allowed = near[None]
  if config.global_tokens:
    is_global = (seg > 0) & (pos[None] - _segment_starts(seg) < config.global_tokens)
    allowed |= (is_global[:, :, None] | is_global[:, None, :]) & (qseg == kseg) & (qseg > 0)
  return (base & allowed)[:, None]


class Attention(nn.Module):
  """Dispatches to the kernel named by ``config.kind``; projections live in the caller.

  ``Attention(config, dropout_rate=0.1, causal=False)(q, k, v, segment_ids_BxL, deterministic=True)``; every kind
  reads padding and packing from ``segment_ids`` (0 = padding, 1..S = packed examples).
  """

  config: AttentionConfig
  dropout_rate: float = 0.0
  causal: bool = False

  @nn.compact
  def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, *, deterministic: bool = True):
    cfg = self.config
    rng = None if deterministic or self.dropout_rate == 0.0 else self.make_rng("dropout")
    rate = 0.0 if deterministic else self.dropout_rate
    dropout = dict(dropout_rate=rate, dropout_rng=rng)
    if cfg.kind == "dense":
      return dense_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, causal=self.causal, **dropout)
    sparse = dict(mask=segment_ids_BxL, causal=self.causal, global_tokens=cfg.global_tokens, **dropout)
    if cfg.kind == "sliding_window":
      return sliding_window_attention(
        q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, cfg.window, chunk_size=cfg.chunk_size, backend=cfg.backend, **sparse
      )
    return blockwise_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, cfg.block_size, **sparse)
