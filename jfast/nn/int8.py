"""Symmetric int8 numerics: per-channel weight scales, per-token activation scales, the int8 matmul, fake quant.

Everything here is a pure function of arrays, so the Flax module (`jfast.nn.quant_dense`), post-training quantization
(`jfast.compress.quantization`) and the tests share one definition of what "int8" means:

- values are rounded to the nearest integer of ``x / scale`` and clipped to ``[-127, 127]``: symmetric, so -128 is
  never produced and ``-q`` is always representable;
- a weight matrix ``[in, out]`` gets one scale per output column (``absmax / 127``), an activation ``[..., in]`` one
  scale per token (row) at run time, or one per tensor from calibration;
- the product of two int8 operands accumulates in int32 (`lax.dot_general` with ``preferred_element_type``) and is
  rescaled once in float32: ``y = (x_q @ w_q) * s_x * s_w``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

INT8_MAX = 127
# int32 accumulation of products of values in [-127, 127] cannot overflow while the contraction is at most this
# long: 133,144 * 127 * 127 = 2,147,441,776 <= 2**31 - 1. BERT widths (384 .. 4096) are 30x or more below it.
MAX_CONTRACTION = (2**31 - 1) // (INT8_MAX * INT8_MAX)
FLOAT_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def _scale_from_absmax(absmax: jax.Array) -> jax.Array:
  # An all-zero channel or token gets scale 1 (its values quantize to 0 exactly) instead of a division by zero.
  absmax = absmax.astype(jnp.float32)
  return jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)


def round_to_int8(x: jax.Array, scale: jax.Array) -> jax.Array:
  """``clip(round(x / scale), -127, 127)`` as int8; ``scale`` broadcasts against ``x``."""
  return jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)


def quantize_weight(kernel_IxO: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Quantizes a Dense kernel ``[in, out]`` with one symmetric scale per output channel.

  Args:
    kernel_IxO: a float32/bfloat16/float16 kernel.

  Returns:
    ``(q_IxO int8, scale_O float32)``; ``q * scale`` is within ``scale / 2`` of the kernel, entry by entry.

  Example:
    >>> q, s = quantize_weight(jnp.array([[0.5, -2.0], [-1.0, 1.0]]))
    >>> q.tolist(), s.tolist()
    ([[64, -127], [-127, 64]], [0.007874015718698502, 0.015748031437397003])
  """
  _check_float(kernel_IxO, "kernel")
  if kernel_IxO.ndim != 2:
    raise ValueError(f"a Dense kernel must be 2-D [in, out], got shape {kernel_IxO.shape}")
  scale_1xO = _scale_from_absmax(jnp.max(jnp.abs(kernel_IxO), axis=0, keepdims=True))
  return round_to_int8(kernel_IxO, scale_1xO), scale_1xO[0]


def dequantize_weight(q_IxO: jax.Array, scale_O: jax.Array) -> jax.Array:
  """The float32 kernel an int8 kernel stands for: ``q * scale`` per output column."""
  return q_IxO.astype(jnp.float32) * scale_O.astype(jnp.float32)[None, :]


def quantize_per_token(x_NxI: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Dynamic activation quantization: one scale per token (row over the last axis), computed from the data.

  Returns:
    ``(q int8 [..., in], scale float32 [..., 1])``.
  """
  scale_Nx1 = _scale_from_absmax(jnp.max(jnp.abs(x_NxI), axis=-1, keepdims=True))
  return round_to_int8(x_NxI, scale_Nx1), scale_Nx1


def int8_matmul(x_q_NxI: jax.Array, w_q_IxO: jax.Array) -> jax.Array:
  """``x_q @ w_q`` over the last axis of ``x_q``, int8 operands, exact int32 accumulation.

  Exact (no rounding at all) while ``in <= MAX_CONTRACTION``; `jfast.compress.quantize` refuses wider kernels.
  """
  if x_q_NxI.dtype != jnp.int8 or w_q_IxO.dtype != jnp.int8:
    raise TypeError(f"int8_matmul takes int8 operands, got {x_q_NxI.dtype} and {w_q_IxO.dtype}")
  dims = (((x_q_NxI.ndim - 1,), (0,)), ((), ()))
  return lax.dot_general(x_q_NxI, w_q_IxO, dims, preferred_element_type=jnp.int32)


def fake_quant(x: jax.Array, scale: jax.Array) -> jax.Array:
  """Rounds ``x`` to the int8 grid of ``scale`` in the forward pass; identity in the backward pass.

  The straight-through estimator of quantization-aware training (Q8BERT): the loss sees int8 rounding, the
  gradient flows as if there were none. Scales come from absmax, so nothing is clipped and the plain identity is
  the right estimator (no clipping mask is needed).
  """
  scale = lax.stop_gradient(scale)
  rounded = jnp.clip(jnp.round(x / scale), -INT8_MAX, INT8_MAX) * scale
  return x + lax.stop_gradient(rounded.astype(x.dtype) - x)


def fake_quant_weight(kernel_IxO: jax.Array) -> jax.Array:
  """Per-output-channel fake quantization of a kernel (straight-through gradient)."""
  return fake_quant(kernel_IxO, _scale_from_absmax(jnp.max(jnp.abs(kernel_IxO), axis=0, keepdims=True)))


def fake_quant_per_token(x_NxI: jax.Array) -> jax.Array:
  """Per-token fake quantization of activations (straight-through gradient)."""
  return fake_quant(x_NxI, _scale_from_absmax(jnp.max(jnp.abs(x_NxI), axis=-1, keepdims=True)))


def _check_float(x, what: str) -> None:
  dtype = np.dtype(x.dtype)
  if dtype == np.int8:
    raise ValueError(f"{what} is already int8: it has been quantized before")
  if dtype not in FLOAT_DTYPES:
    raise TypeError(f"{what} has dtype {dtype.name}; int8 quantization takes float32, bfloat16 or float16")
