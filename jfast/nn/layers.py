"""The Dense and LayerNorm layers every jfast model builds, chosen once for all of them.

Under a half-precision compute dtype traced for a CPU with bf16 instructions (`jfast.cpu.active`), a Dense layer is
`jfast.cpu.MixedDense` (bf16 x bf16 -> float32 products in the forms XLA:CPU's bf16 kernel takes, with their own
gradient products). Everywhere else it is stock ``nn.Dense`` in the compute dtype, differentiated by XLA, so GPUs and TPUs get the dots and
bias-add epilogues their libraries fuse. Parameters are the same tree either way (``kernel`` [in, out], ``bias``).

Under half precision the norm is recomputed in the backward pass from its half-precision input: its float32
intermediates (centred input, normalised output) are what autodiff would otherwise keep, three float32 copies of the
residual stream per norm, which is most of the activation memory half precision is meant to save.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from jfast.cpu.dots import MixedDense
from jfast.cpu.platform import active

# Every spelling of the compute dtypes a model config names.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_RematLayerNorm = nn.remat(nn.LayerNorm)
_RematRMSNorm = nn.remat(nn.RMSNorm)


def dense(features: int, dtype: Any, kernel_init: Any, *, name: str, use_bias: bool = True) -> nn.Module:
  """A Dense layer with float32 parameters computing in ``dtype``: `MixedDense` on the CPU in half precision, else
  ``nn.Dense``. ``use_bias=False`` leaves the bias out (Llama-family projections).

  Example:
    >>> layer = dense(64, jnp.bfloat16, nn.initializers.normal(0.02), name="proj")  # doctest: +SKIP
  """
  if active(dtype):
    return MixedDense(features, dtype, kernel_init, use_bias=use_bias, name=name)
  return nn.Dense(
    features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init, name=name
  )


def layer_norm(epsilon: float, dtype: Any, *, name: str) -> nn.Module:
  """LayerNorm with float32 statistics whatever ``dtype`` (they overflow or lose precision otherwise) and output in
  ``dtype``, so the residual stream shrinks with the policy; recomputed in the backward pass under half precision."""
  cls = nn.LayerNorm if jnp.dtype(dtype) == jnp.float32 else _RematLayerNorm
  return cls(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, force_float32_reductions=True, name=name)


def rms_norm(epsilon: float, dtype: Any, *, name: str) -> nn.Module:
  """RMSNorm (``x / sqrt(mean(x^2) + eps) * scale``, Llama's norm) with float32 statistics and output in ``dtype``;
  recomputed in the backward pass under half precision, as `layer_norm` is."""
  cls = nn.RMSNorm if jnp.dtype(dtype) == jnp.float32 else _RematRMSNorm
  return cls(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, force_float32_reductions=True, name=name)
