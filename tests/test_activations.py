"""jfast.nn.activations.gelu against float64 numpy (values, and gradients by central differences), both forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfast.nn import ACTIVATIONS, gelu

_erf = np.vectorize(math.erf)


def _gelu64(x, approximate):
  if approximate:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_gelu_values_and_gradients_against_float64(approximate, dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 64, 512)) * 2.5, dtype)
  g = jnp.asarray(rng.normal(size=x.shape), dtype)
  x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
  y, vjp = jax.vjp(lambda x: gelu(x, approximate), x)
  (dx,) = vjp(g)
  assert y.dtype == dx.dtype == dtype
  eps = float(jnp.finfo(dtype).eps)
  want_y = _gelu64(x64, approximate)
  # Computed in float32 and rounded once: within one rounding of the half type (atol: float32 1 + tanh in the far
  # negative tail, as jax.nn.gelu and PyTorch compute it).
  np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=eps, atol=2e-5)
  h = 1e-6
  slope = (_gelu64(x64 + h, approximate) - _gelu64(x64 - h, approximate)) / (2 * h)
  np.testing.assert_allclose(np.asarray(dx, np.float64), g64 * slope, rtol=eps, atol=2e-5 * np.abs(g64).max())


@pytest.mark.parametrize("approximate", [False, True])
def test_float32_is_jax_nn_gelu_and_table_names(approximate):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 300)) * 3, jnp.float32)
  np.testing.assert_array_equal(gelu(x, approximate), jax.nn.gelu(x, approximate=approximate))
  np.testing.assert_array_equal(
    jax.grad(lambda x: gelu(x, approximate).sum())(x), jax.grad(lambda x: jax.nn.gelu(x, approximate).sum())(x)
  )
  name = "gelu_new" if approximate else "gelu"
  np.testing.assert_array_equal(ACTIVATIONS[name](x), jax.nn.gelu(x, approximate=approximate))


def test_half_gelu_saves_only_its_input():
  from jax._src.ad_checkpoint import saved_residuals

  x = jnp.asarray(np.random.default_rng(2).normal(size=(16, 128)), jnp.bfloat16)
  kept = [a.shape for a, source in saved_residuals(lambda x: gelu(x, True).astype(jnp.float32).sum(), x)]
  assert len(kept) == 1, kept
