"""jfast.nn.dropout: the hash mask against a numpy re-implementation, its statistics, and the Linen module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfast.nn import Dropout, keep_mask
from jfast.nn.dropout import dropout


def _np_mix(x):
  x = x.astype(np.uint64)
  x ^= x >> 16
  x = (x * 0x7FEB352D) & 0xFFFFFFFF
  x ^= x >> 15
  x = (x * 0x846CA68B) & 0xFFFFFFFF
  return x ^ (x >> 16)


def _np_keep(key_words, rate, shape):
  """The mask written out in numpy from the hash's definition: an independent check of the jnp code."""
  words = np.asarray(key_words, np.uint32).reshape(-1).astype(np.uint64)
  s0, s1 = np.uint64(0x9E3779B9), np.uint64(0x85EBCA6B)
  for w in words:
    s0, s1 = _np_mix(s0 ^ w), _np_mix((s1 + w) & 0xFFFFFFFF)
  index = np.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape)
  bits = _np_mix((_np_mix(index ^ s0) + s1) & 0xFFFFFFFF)
  return bits >= min(round(rate * 2**32), 2**32 - 1)


@pytest.mark.parametrize(
  "key", [jax.random.PRNGKey(3), jax.random.key_data(jax.random.key(7, impl="rbg")), jax.random.key(11)]
)
def test_mask_matches_numpy_reference(key):
  shape = (3, 17, 40)
  ours = np.asarray(keep_mask(key, 0.15, shape))
  words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  np.testing.assert_array_equal(ours, _np_keep(np.asarray(words), 0.15, shape))


def test_dropout_values_match_the_dense_formula():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 33, 64)).astype(np.float32)
  key = jax.random.PRNGKey(5)
  keep = _np_keep(np.asarray(key), 0.1, x.shape)
  expected = np.where(keep, x.astype(np.float64) / 0.9, 0.0)
  np.testing.assert_allclose(np.asarray(dropout(jnp.asarray(x), 0.1, key)), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_rate_overall_and_per_position(rate):
  shape = (64, 384)
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  masks = np.asarray(jax.vmap(lambda k: keep_mask(k, rate, shape))(keys))
  p, n = 1.0 - rate, masks.size
  assert abs(masks.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
  # Each position over 400 keys: a binomial; the worst of 24,576 positions stays within 5.5 sigma.
  per_position = masks.mean(axis=0)
  assert np.max(np.abs(per_position - p)) < 5.5 * np.sqrt(p * (1 - p) / len(keys))


def test_no_correlation_between_neighbours_or_keys():
  shape = (256, 1024)
  a = np.asarray(keep_mask(jax.random.PRNGKey(1), 0.3, shape)).astype(np.float64)
  b = np.asarray(keep_mask(jax.random.PRNGKey(2), 0.3, shape)).astype(np.float64)
  limit = 5 / np.sqrt(a.size)  # the standard error of a correlation coefficient is about 1/sqrt(n)
  for x, y in [
    (a[:, :-1], a[:, 1:]),  # next element in a row
    (a[:-1], a[1:]),  # next row, same column
    (a.ravel()[: -1024 * 7], a.ravel()[1024 * 7 :]),  # far apart
    (a, b),  # two keys
  ]:
    assert abs(np.corrcoef(x.ravel(), y.ravel())[0, 1]) < limit


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_same_key_same_mask_other_key_other_mask(impl):
  # Split rbg keys repeat their halves: a key reduction that XORs words together would give them one mask.
  keys = jax.random.split(jax.random.key(0, impl=impl), 6)
  masks = [np.asarray(keep_mask(k, 0.5, (8, 128))) for k in keys]
  again = jax.jit(keep_mask, static_argnums=(1, 2))(keys[0], 0.5, (8, 128))
  np.testing.assert_array_equal(masks[0], np.asarray(again))
  for i in range(len(masks)):
    for j in range(i):
      assert 0.4 < (masks[i] != masks[j]).mean() < 0.6


def test_gradient_is_the_mask_scaled():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 50)), jnp.float32)
  key = jax.random.PRNGKey(9)
  grad = jax.grad(lambda x: jnp.sum(dropout(x, 0.25, key) * 3.0))(x)
  keep = _np_keep(np.asarray(key), 0.25, x.shape)
  np.testing.assert_allclose(np.asarray(grad), np.where(keep, 3.0 / 0.75, 0.0), rtol=1e-6)


def test_module_modes_and_rng_stream():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 32)), jnp.float32)
  key = jax.random.PRNGKey(4)
  np.testing.assert_array_equal(Dropout(0.3).apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False), x)
  np.testing.assert_array_equal(Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": key}), 0.0)
  y1 = Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": key})
  y2 = Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": key})
  np.testing.assert_array_equal(y1, y2)
  zeros = float(jnp.mean(y1 == 0))
  assert 0.1 < zeros < 0.5


def test_bad_rates_are_clear_errors():
  with pytest.raises(ValueError, match="rate must be in"):
    keep_mask(jax.random.PRNGKey(0), 1.0, (4,))
  with pytest.raises(ValueError, match="rate must be in"):
    keep_mask(jax.random.PRNGKey(0), -0.1, (4,))
  with pytest.raises(ValueError, match="rate must be in"):
    Dropout(1.5).apply({}, jnp.ones((2, 3)), deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
  with pytest.raises(ValueError, match="at least 2 uint32 words"):
    keep_mask(jnp.zeros((1,), jnp.uint32), 0.1, (4,))
