"""Fused (flash-style) dense attention over segment ids: the kernel the platform being compiled for has.

Dense attention written out in XLA builds float32 ``[B, H, L, L]`` logits and probabilities (about 400 MB a layer
for BERT-base at 32 x 512) and reads them back for the backward pass. A flash kernel streams key blocks through an
online softmax instead and never materialises them. The Pallas kernels that ship with JAX take the same segment ids
jfast batches carry, so one kernel serves padded rows (segment 0 = padding) and packed rows (1..S) alike:

- GPU: `jax.experimental.pallas.ops.gpu.attention.mha` (Triton), forward and backward, segment-aware;
- TPU: `jax.experimental.pallas.ops.tpu.flash_attention` with its ``SegmentIds``;
- CPU: none (XLA's dense form, `jfast.nn.attention.dense_attention`).

The kernel is chosen by the platform being traced for (`jfast.cpu.current_platform`: a step's ``platform=``, else
the default backend), so a step built with ``platform="cuda"`` lowers on a CPU to exactly the Triton calls a GPU
runs. It is a trace-time choice rather than ``jax.lax.platform_dependent``, whose lowering keeps a ``case`` on a
constant platform index around every use: jfast's accelerator lowerings carry no ``case`` op at all (tested).

The kernels mask by segment equality, so a real token attends exactly the keys of its own example, as in
`dense_attention`; a padding query attends the padding keys of its row instead of every real key. Padding outputs
never reach a real token or a loss, so losses and gradients are the same. Neither kernel drops attention
probabilities: `jfast.nn.attention.Attention` uses them where attention dropout is off (evaluation, or
``attention_probs_dropout_prob=0``, the accelerator default of `jfast.app.finetune`), else XLA's dense form.

Rows are padded with segment-0 positions to a length the kernels' blocks divide (a multiple of 64 on GPU,
128 on TPU); the padding is cut off the output.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jfast.cpu.platform import current_platform

FUSED_PLATFORMS = ("gpu", "tpu")


def has_fused_kernel(platform: str | None = None) -> bool:
  """Whether the platform being traced for (or ``platform``: cpu, gpu, tpu) has a fused dense-attention kernel."""
  return (platform or current_platform()) in FUSED_PLATFORMS


def _pad_rows(x_BxLx, length: int, axis: int = 1):
  pad = [(0, 0)] * x_BxLx.ndim
  pad[axis] = (0, length - x_BxLx.shape[axis])
  return jnp.pad(x_BxLx, pad)


def _gpu_lengths(length: int) -> tuple[int, int, int]:
  """(padded length, forward block, backward block) for the Triton kernel: power-of-two blocks that divide it."""
  padded = max(16, 1 << (length - 1).bit_length()) if length < 64 else -(-length // 64) * 64
  forward = 128 if padded % 128 == 0 else min(64, padded)
  return padded, forward, min(32, padded)


def _gpu_flash(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, *, causal: bool, interpret: bool):
  from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

  length = q_BxLxHxD.shape[1]
  padded, block, back = _gpu_lengths(length)
  sizes = pallas_gpu.BlockSizes(
    block_q=block, block_k=block, block_q_dkv=back, block_kv_dkv=back, block_q_dq=back, block_kv_dq=back
  )
  q, k, v = (_pad_rows(x, padded) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
  seg_BxL = _pad_rows(segment_ids_BxL.astype(jnp.int32), padded)
  scale = 1.0 / math.sqrt(q_BxLxHxD.shape[-1])
  out = pallas_gpu.mha(q, k, v, seg_BxL, sm_scale=scale, causal=causal, block_sizes=sizes, interpret=interpret)
  return out[:, :length]


def _tpu_flash(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, *, causal: bool, interpret: bool):
  del interpret  # the TPU kernel runs on TPUs only; its numerics are Pallas's own tests'
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_tpu

  length = q_BxLxHxD.shape[1]
  padded = -(-length // 128) * 128
  q, k, v = (jnp.transpose(_pad_rows(x, padded), (0, 2, 1, 3)) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
  seg_BxL = _pad_rows(segment_ids_BxL.astype(jnp.int32), padded)
  scale = 1.0 / math.sqrt(q_BxLxHxD.shape[-1])
  out_BxHxLxD = pallas_tpu.flash_attention(
    q, k, v, segment_ids=pallas_tpu.SegmentIds(q=seg_BxL, kv=seg_BxL), causal=causal, sm_scale=scale
  )
  return jnp.transpose(out_BxHxLxD, (0, 2, 1, 3))[:, :length]


def flash_attention(
  q_BxLxHxD: jax.Array,
  k_BxLxHxD: jax.Array,
  v_BxLxHxD: jax.Array,
  segment_ids_BxL: jax.Array,
  *,
  causal: bool = False,
  platform: str | None = None,
  interpret: bool = False,
) -> jax.Array:
  """Dense softmax attention within segments by the platform's fused kernel; ``[B, L, H, D]`` in q's dtype.

  Args:
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD: queries, keys and values.
    segment_ids_BxL: 0 = padding, 1..S = the packed examples of a row.
    causal: decoder masking (key position <= query position) on top of the segments.
    platform: ``gpu`` or ``tpu``; default the platform being traced for.
    interpret: run the GPU kernel in Pallas's interpreter (any backend; for numerics tests on a CPU).

  Raises:
    ValueError: the platform has no fused kernel (use `jfast.nn.attention.dense_attention`).
  """
  platform = platform or current_platform()
  if platform == "gpu":
    return _gpu_flash(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, causal=causal, interpret=interpret)
  if platform == "tpu":
    return _tpu_flash(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, causal=causal, interpret=interpret)
  raise ValueError(f"no fused attention kernel for platform {platform!r} (fused: {FUSED_PLATFORMS})")
