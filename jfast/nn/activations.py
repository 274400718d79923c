"""The models' activation table, with a GELU that computes half-precision activations in float32.

``jax.nn.gelu`` on a bf16 input evaluates its polynomial and ``tanh`` (or ``erf``) in bf16, which XLA:CPU widens to
float32 and narrows back around every step; autodiff then saves the derivative's partial terms for the backward
pass as extra bf16 arrays. `gelu` does the forward in float32 from the bf16 input and keeps only that input: the
backward evaluates the derivative once more from it. Fewer, simpler loops, fewer saved arrays, and the float32
result is rounded once instead of at every step. float32 inputs take ``jax.nn.gelu`` unchanged, so the float32
models are bit-for-bit what they were (and what the PyTorch parity tests check).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _forward(x, approximate: bool):
  if approximate:
    return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
  return 0.5 * x * (1.0 + jax.lax.erf(x * _INV_SQRT_2))


def _derivative(x, approximate: bool):
  if approximate:
    t = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
  return 0.5 * (1.0 + jax.lax.erf(x * _INV_SQRT_2)) + x * jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _half_gelu(x, approximate: bool):
  return _forward(x.astype(jnp.float32), approximate).astype(x.dtype)


def _half_gelu_fwd(x, approximate):
  return _half_gelu(x, approximate), x


def _half_gelu_bwd(approximate, x, g):
  return ((g.astype(jnp.float32) * _derivative(x.astype(jnp.float32), approximate)).astype(x.dtype),)


_half_gelu.defvjp(_half_gelu_fwd, _half_gelu_bwd)


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
  """GELU, exact (``erf``) or with GPT-2's ``tanh`` approximation; same values as ``jax.nn.gelu``.

  Args:
    x: any shape; bf16 and float16 are computed in float32 with a custom VJP (module docstring).
    approximate: the ``tanh`` form (Hugging Face's ``gelu_new`` / ``gelu_pytorch_tanh``).

  Returns:
    ``x``'s shape and dtype.

  Example:
    >>> gelu(jnp.array([1.0, -1.0], jnp.bfloat16), approximate=True)  # doctest: +SKIP
  """
  if x.dtype in (jnp.bfloat16, jnp.float16):
    return _half_gelu(x, approximate)
  return jax.nn.gelu(x, approximate=approximate)


# Hugging Face's ``hidden_act`` / ``activation_function`` names. `gelu` is looked up when called, so that
# `benchmarks.step_profile --ab gelu` can swap ``jax.nn.gelu`` back in.
ACTIVATIONS = {
  "gelu": lambda x: gelu(x, approximate=False),
  "gelu_new": lambda x: gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: gelu(x, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
}
