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

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from jfast.cpu.dots import mixed_matmul, mixed_matmul_nt, row_major
from jfast.cpu.platform import active as cpu_active
from jfast.cpu.platform import current_platform
from jfast.nn.attention_config import ATTENTION_BACKENDS, AttentionConfig, check_positive
from jfast.nn.dropout import dropout
from jfast.nn.fused_attention import flash_attention, has_fused_kernel
from jfast.nn.sparse_attention import check_qkv, segment_starts, sparse_attention


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
  mask = segment_mask(segment_ids_BxL, causal=causal)
  return masked_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def masked_attention(
  q_BxSxHxD: jax.Array,
  k_BxLxHxD: jax.Array,
  v_BxLxHxD: jax.Array,
  mask_Bx1xSxL: jax.Array,
  *,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """Softmax attention of ``S`` queries over ``L`` keys under a boolean mask (True = may attend), softmax in float32.

  `dense_attention` is this with `segment_mask`; ``S < L`` serves a subset of queries (the [CLS] rows of a
  classifier's last layer, with `explicit_mask`'s ``query_positions``).

  Returns:
    ``[B, S, H, D]`` in v's dtype.
  """
  depth = q_BxSxHxD.shape[-1]
  cpu_half = cpu_active(q_BxSxHxD.dtype)
  scale = jnp.sqrt(depth).astype(q_BxSxHxD.dtype)
  if cpu_half:
    # Head-major row-major operands, so that both products and their gradients stay half precision on XLA:CPU.
    q_BxHxSxD = row_major(jnp.transpose(q_BxSxHxD, (0, 2, 1, 3)))
    k_BxHxLxD = row_major(jnp.transpose(k_BxLxHxD, (0, 2, 1, 3)))
    logits_BxHxSxL = mixed_matmul_nt(q_BxHxSxD, k_BxHxLxD) / scale
  else:
    logits_BxHxSxL = jnp.einsum("bqhd,bkhd->bhqk", q_BxSxHxD, k_BxLxHxD) / scale
  logits_BxHxSxL = logits_BxHxSxL.astype(jnp.float32)
  # A finite floor instead of -inf keeps fully masked rows (all-padding rows) NaN-free.
  logits_BxHxSxL = jnp.where(mask_Bx1xSxL, logits_BxHxSxL, jnp.finfo(jnp.float32).min)
  probs_BxHxSxL = jax.nn.softmax(logits_BxHxSxL, axis=-1).astype(v_BxLxHxD.dtype)
  if dropout_rate > 0.0 and dropout_rng is not None:
    probs_BxHxSxL = dropout(probs_BxHxSxL, dropout_rate, dropout_rng).astype(v_BxLxHxD.dtype)
  if cpu_half:
    v_BxHxLxD = row_major(jnp.transpose(v_BxLxHxD, (0, 2, 1, 3)))
    return jnp.swapaxes(mixed_matmul(probs_BxHxSxL, v_BxHxLxD), 1, 2)
  return jnp.einsum("bhqk,bkhd->bqhd", probs_BxHxSxL, v_BxLxHxD)


def _as_segment_ids(mask, q):
  if mask is None:
    return jnp.ones(q.shape[:2], jnp.int32)
  mask = jnp.asarray(mask)
  if mask.shape != q.shape[:2]:
    raise ValueError(f"mask/segment_ids must have shape [B, L] = {q.shape[:2]}, got {mask.shape}")
  return mask.astype(jnp.int32)


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
  if current_platform() != "gpu":
    return f"cuDNN needs a GPU; the trace is for {current_platform()}"
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
  check_positive("window", window)
  if chunk_size is not None:
    check_positive("chunk_size", chunk_size)
  if backend not in ATTENTION_BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
  check_qkv(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
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
  check_positive("block_size", block_size)
  check_qkv(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
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


def explicit_mask(
  segment_ids_BxL: jax.Array,
  config: AttentionConfig,
  *,
  causal: bool = False,
  query_positions_BxS: jax.Array | None = None,
) -> jax.Array:
  """The ``[B, 1, L, L]`` boolean mask a kind is equivalent to: the O(L^2) reference the kernels are tested against.

  For ``dense`` this is `segment_mask`. For sparse kinds a pair (i, j) is allowed when j is a real key of i's
  segment (any real key for a padding query i), causal-ok, and either structurally close (same block, or
  ``|i - j| <= window``) or, for a real query, one of i and j is among the first ``global_tokens`` of the segment.
  With ``query_positions_BxS`` only those queries' rows are built: ``[B, 1, S, L]``, O(S * L).
  """
  seg = jnp.asarray(segment_ids_BxL).astype(jnp.int32)
  batch, length = seg.shape
  pos_L = jnp.arange(length)
  if query_positions_BxS is None:
    qpos_BxS = jnp.broadcast_to(pos_L, seg.shape)
  else:
    qpos_BxS = jnp.asarray(query_positions_BxS).astype(jnp.int32)
    if qpos_BxS.ndim != 2 or qpos_BxS.shape[0] != batch:
      raise ValueError(f"query_positions must be [B, S] with B = {batch}, got shape {qpos_BxS.shape}")
  qseg_BxS = jnp.take_along_axis(seg, qpos_BxS, axis=1)
  qseg, kseg = qseg_BxS[:, :, None], seg[:, None, :]
  qpos, kpos = qpos_BxS[:, :, None], pos_L[None, None, :]
  base = (kseg > 0) & ((qseg == kseg) | (qseg == 0))
  if causal:
    base &= kpos <= qpos
  if config.kind == "dense":
    return base[:, None]
  if config.kind == "blockwise":
    allowed = (qpos // config.block_size) == (kpos // config.block_size)
  else:
    allowed = jnp.abs(qpos - kpos) <= config.window
  if config.global_tokens:
    is_global_BxL = (seg > 0) & (pos_L[None] - segment_starts(seg) < config.global_tokens)
    is_global_q = jnp.take_along_axis(is_global_BxL, qpos_BxS, axis=1)[:, :, None]
    allowed |= (is_global_q | is_global_BxL[:, None, :]) & (qseg == kseg) & (qseg > 0)
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
  def __call__(
    self,
    q_BxLxHxD,
    k_BxLxHxD,
    v_BxLxHxD,
    segment_ids_BxL,
    *,
    query_positions_BxS=None,
    deterministic: bool = True,
  ):
    """Attention output ``[B, L, H, D]``; with ``query_positions_BxS``, q holds only those positions' queries
    (``[B, S, H, D]``) and the output is theirs, computed densely under the kind's mask rows (`explicit_mask`)."""
    cfg = self.config
    rng = None if deterministic or self.dropout_rate == 0.0 else self.make_rng("dropout")
    rate = 0.0 if deterministic else self.dropout_rate
    dropout = dict(dropout_rate=rate, dropout_rng=rng)
    if query_positions_BxS is not None:
      mask = explicit_mask(segment_ids_BxL, cfg, causal=self.causal, query_positions_BxS=query_positions_BxS)
      return masked_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask, **dropout)
    if cfg.kind == "dense":
      if rate == 0.0 and cfg.backend == "auto" and has_fused_kernel():
        # A flash kernel on GPU/TPU (`jfast.nn.fused_attention`); it cannot drop attention probabilities.
        return flash_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, causal=self.causal)
      return dense_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, causal=self.causal, **dropout)
    sparse = dict(mask=segment_ids_BxL, causal=self.causal, global_tokens=cfg.global_tokens, **dropout)
    if cfg.kind == "sliding_window":
      return sliding_window_attention(
        q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, cfg.window, chunk_size=cfg.chunk_size, backend=cfg.backend, **sparse
      )
    return blockwise_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, cfg.block_size, **sparse)
