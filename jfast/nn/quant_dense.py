"""`QuantDense`: a drop-in for ``nn.Dense`` that runs int8 (or fake-quantized) matmuls.

`jfast.models.bert` builds it instead of ``nn.Dense`` for the encoder's six projections when
``BertConfig.quantization`` is not ``"none"``. Its parameters by mode:

- ``"int8"``: ``kernel`` int8 ``[in, out]``, ``kernel_scale`` float32 ``[out]``, ``bias`` float32 ``[out]``;
  activations are quantized per token at run time (dynamic range).
- ``"int8-static"``: the same plus ``input_scale`` float32 ``[]``, one activation scale per layer from calibration
  (`jfast.compress.calibrate`), so no reduction over the activations runs at inference.
- ``"qat"``: ``kernel`` and ``bias`` float32, exactly ``nn.Dense``'s tree, so a float checkpoint fine-tunes under
  fake quantization as it is, and `jfast.compress.quantize` turns the result into ``"int8"`` parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

import jfast.nn.int8 as numerics

QUANTIZATION_MODES = ("none", "int8", "int8-static", "qat")
# The encoder projections that hold nearly all of BERT's matmul work and non-embedding weights. The pooler and
# classifier (one [CLS] vector per example) stay float: negligible time, and the logits are what accuracy reads.
QUANTIZED_LAYERS = ("query", "key", "value", "attention_output", "intermediate", "output")


def check_mode(mode: str) -> str:
  if mode not in QUANTIZATION_MODES:
    raise ValueError(f"unknown quantization {mode!r}; expected one of {QUANTIZATION_MODES}")
  return mode


def _lift(v_O: jax.Array, ndim: int) -> jax.Array:
  # Explicit leading axes: the project runs with jax_numpy_rank_promotion="raise".
  return v_O.reshape((1,) * (ndim - 1) + v_O.shape)


class QuantDense(nn.Module):
  """Dense layer ``y = x @ W + b`` with int8 weights and activations (see the module docstring for modes).

  Attributes:
    features: output width.
    mode: ``"int8"``, ``"int8-static"`` or ``"qat"``.
    dtype: dtype of the output (the model's compute dtype); the rescale itself runs in float32.
    kernel_init: initialiser of the float kernel (``"qat"``; int8 modes initialise to zeros, their parameters come
      from `jfast.quant.quantize`).
  """

  features: int
  mode: str = "int8"
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  use_bias: bool = True

  @nn.compact
  def __call__(self, x_NxI: jax.Array) -> jax.Array:
    check_mode(self.mode)
    width = x_NxI.shape[-1]
    if self.mode == "qat":
      kernel_IxO = self.param("kernel", self.kernel_init, (width, self.features), jnp.float32)
      x_NxI = numerics.fake_quant_per_token(x_NxI.astype(jnp.float32))
      y_NxO = jnp.dot(x_NxI, numerics.fake_quant_weight(kernel_IxO))
      return (y_NxO + self._bias(y_NxO.ndim)).astype(self.dtype)
    if self.mode == "none":
      raise ValueError("QuantDense with mode 'none': build nn.Dense instead")
    kernel_IxO = self.param("kernel", nn.initializers.zeros_init(), (width, self.features), jnp.int8)
    scale_O = self.param("kernel_scale", nn.initializers.ones_init(), (self.features,), jnp.float32)
    if self.mode == "int8-static":
      scale_x = self.param("input_scale", nn.initializers.ones_init(), (), jnp.float32)
      x_q_NxI = numerics.round_to_int8(x_NxI, scale_x)
    else:
      x_q_NxI, scale_x = numerics.quantize_per_token(x_NxI)
    acc_NxO = numerics.int8_matmul(x_q_NxI, kernel_IxO)
    # One multiply by the outer product of the two scales, then the bias: XLA fuses it into the int32 -> f32 convert.
    y_NxO = acc_NxO.astype(jnp.float32) * (scale_x * _lift(scale_O, acc_NxO.ndim)) + self._bias(acc_NxO.ndim)
    return y_NxO.astype(self.dtype)

  def _bias(self, ndim: int):
    if not self.use_bias:
      return jnp.zeros((1,) * ndim, jnp.float32)
    return _lift(self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32), ndim)
