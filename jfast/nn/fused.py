"""Several Dense layers that read one input, run as one matrix product; their parameters stay separate layers'.

BERT's query, key and value projections read the same hidden states. Multiplying the input once by the three
kernels side by side gives one larger product, and one product each for the input and the weight gradient instead
of three, while the parameter tree (``query/kernel``, ``key/kernel``, ...) stays Hugging Face's. Written here
rather than taken from Flax: `flax.linen.DenseGeneral` fuses only into one parameter, which would change the tree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jfast.cpu.dots import add_bias, mixed_dot_general
from jfast.cpu.platform import active as cpu_active


class DenseParams(nn.Module):
  """A Dense layer's ``kernel`` and ``bias`` without its product, so layers reading one input can share one."""

  features: int
  kernel_init: Any

  @nn.compact
  def __call__(self, in_features: int):
    kernel_KxN = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
    return kernel_KxN, self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)


def fused_projections(
  x_BxTxK: jax.Array, names: tuple[str, ...], heads: int, head_dim: int, kernel_init: Any, dtype: Any
) -> list[jax.Array]:
  """``[Dense_name(x) as [B, T, heads, head_dim] for name in names]`` as one product of ``x`` with all the kernels.

  Call it inside a compact Flax module: it declares one `DenseParams` per name, with the paths and initial values
  separate ``nn.Dense(heads * head_dim, name=name)`` layers would have. The fused kernel puts the projections side
  by side per head (``[K, heads, len(names), head_dim]``): tensor parallelism splits every projection's kernel by
  heads, and in this layout each device's share of the fused kernel is made of its own shares of the parts, so
  fusing adds no communication (side by side whole, ``[K, 3 x heads x head_dim]``, it added collective permutes
  and all-gathers). The output is cut with one ``split``, whose gradient is one concatenate.

  Args:
    x_BxTxK: the shared input.
    names: the layers' names, e.g. ``("query", "key", "value")``.
    heads, head_dim: each layer's output is ``heads * head_dim`` wide, returned as ``[..., heads, head_dim]``.
    kernel_init: the kernels' initializer (biases start at zero).
    dtype: compute dtype; traced for the CPU, bf16/float16 run `jfast.cpu.mixed_dot_general` (float32 accumulation,
      float32 master kernels cast inside); otherwise an ordinary product in ``dtype``, as ``nn.Dense``.

  Returns:
    One array per name.

  Example:
    >>> q, k, v = fused_projections(x, ("query", "key", "value"), 12, 64, init, jnp.bfloat16)  # doctest: +SKIP
  """
  in_features = x_BxTxK.shape[-1]
  params = [DenseParams(heads * head_dim, kernel_init, name=name)(in_features) for name in names]
  kernel_KxN = jnp.stack([k.reshape(in_features, heads, head_dim) for k, _ in params], axis=2)
  kernel_KxN = kernel_KxN.reshape(in_features, -1)
  bias_N = jnp.stack([b.reshape(heads, head_dim) for _, b in params], axis=1).reshape(-1)
  dims = (((x_BxTxK.ndim - 1,), (0,)), ((), ()))
  if cpu_active(dtype):
    y_BxTxN = add_bias(mixed_dot_general(x_BxTxK.astype(dtype), kernel_KxN, dims), bias_N)
  else:
    # As nn.Dense(dtype=dtype): inputs and parameters cast to the compute dtype (pure-bf16 parameters too).
    y_BxTxN = jax.lax.dot_general(x_BxTxK.astype(dtype), kernel_KxN.astype(dtype), dims)
    y_BxTxN = y_BxTxN + bias_N.astype(dtype).reshape((1,) * (y_BxTxN.ndim - 1) + (-1,))
  y_BxTxHxNxD = y_BxTxN.reshape(*x_BxTxK.shape[:-1], heads, len(names), head_dim)
  return [part[..., 0, :] for part in jnp.split(y_BxTxHxNxD, len(names), axis=-2)]
