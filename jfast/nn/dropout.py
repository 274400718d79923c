"""Dropout whose mask is a hash of each element's position and the key, computed inside the consumer's fusion.

`flax.linen.Dropout` draws its mask with `jax.random.bernoulli`: a separate random-bit kernel writes one 32-bit word
per element, and the mask is read back by the multiply. On XLA:CPU those kernels were the largest cost of a small
MiniLM train step after the matrix products: 19 dropout sites (3 per layer + embeddings) took 48 ms of the 270 ms
of thread time of a bf16 step on 32 sentences of 9 tokens, more than the optimizer update (profile in
``benchmarks/step_profile.py``).

Here the keep decision for element ``i`` (its flat index) is ``hash(i, key) >= rate * 2**32``, with ``hash`` two
rounds of a 32-bit integer mixer (lowbias32, C. Wellons' hash prospector) keyed by two words hashed from the key.
It is a handful of integer multiplies, shifts and xors that XLA fuses into the elementwise op that applies the mask,
so no random bits are stored. The mixer is a bijection of the 32-bit counter for a fixed key, so positions never
share a draw; it is not a cryptographic generator, and `tests/test_dropout.py` checks what dropout needs: the keep
rate overall and per position, no correlation between neighbouring elements or between keys, and determinism.

    y = dropout(x, 0.1, key)                        # a function
    y = Dropout(0.1)(x, deterministic=False)         # a Linen module, drop-in for nn.Dropout ("dropout" rng)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_U32 = jnp.uint32


def _mix(x: jax.Array) -> jax.Array:
  """lowbias32: a bijective 32-bit avalanche mixer (bias ~0.17 on the hash prospector's scale)."""
  x = x ^ (x >> 16)
  x = x * _U32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * _U32(0x846CA68B)
  return x ^ (x >> 16)


def _seeds(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Two uint32 words hashed from all of a key's data, typed or raw, of any implementation (threefry: 2, rbg: 4).

  Each word is folded in through the mixer in turn, from two different starting constants: XOR-folding would cancel
  out for keys whose halves repeat (split rbg keys do).
  """
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  words = jnp.asarray(key).astype(_U32).reshape(-1)
  if words.size < 2:
    raise ValueError(f"a dropout key needs at least 2 uint32 words of key data, got shape {key.shape}")
  s0, s1 = _U32(0x9E3779B9), _U32(0x85EBCA6B)
  for i in range(words.size):
    s0, s1 = _mix(s0 ^ words[i]), _mix(s1 + words[i])
  return s0, s1


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major position of every element, built from iotas so it fuses instead of being a stored array."""
  index = jnp.zeros(shape, _U32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(_U32, shape, axis) * _U32(stride % 2**32)
    stride *= shape[axis]
  return index


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """Boolean keep-mask of ``shape``: each element kept with probability ``1 - rate``, a pure function of ``key``.

  Args:
    key: a JAX PRNG key (typed, or raw key data such as ``jax.random.PRNGKey(0)``).
    rate: the drop probability, in [0, 1).
    shape: the mask's shape; at most 2**32 elements (positions are 32-bit counters).

  Returns:
    A ``bool`` array: True where the element is kept.

  Example:
    >>> keep = keep_mask(jax.random.PRNGKey(0), 0.1, (4, 128))
    >>> keep.shape, keep.dtype
    ((4, 128), dtype('bool'))
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  size = int(np.prod(shape, dtype=np.int64))
  if size > 2**32:
    raise ValueError(f"keep_mask draws at most 2**32 elements per key, got shape {shape} ({size} elements)")
  s0, s1 = _seeds(key)
  bits = _mix(_mix(_flat_index(tuple(shape)) ^ s0) + s1)
  # rate * 2**32 rounds to the nearest representable threshold: the keep probability is exact to 2**-32.
  threshold = min(round(rate * 2**32), 2**32 - 1)
  return bits >= _U32(threshold)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Inverted dropout: zeroes each element with probability ``rate`` and scales the rest by ``1 / (1 - rate)``.

  Args:
    x: any array.
    rate: the drop probability, in [0, 1).
    key: a JAX PRNG key; the same key and shape give the same mask.

  Returns:
    An array of ``x``'s shape and dtype.

  Example:
    >>> y = dropout(jnp.ones((2, 8)), 0.5, jax.random.PRNGKey(1))
    >>> sorted(set(y.ravel().tolist())) in ([0.0, 2.0], [2.0], [0.0])
    True
  """
  if rate == 0.0:
    return x
  keep = keep_mask(key, rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """`flax.linen.Dropout` with a fused hash mask (see the module docstring); same arguments, same rng collection.

  Attributes:
    rate: the drop probability, in [0, 1].
    deterministic: if True, the input passes unchanged (may also be given at call time).
    rng_collection: the rng stream the key comes from.
  """

  rate: float
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if not 0.0 <= self.rate <= 1.0:
      raise ValueError(f"dropout rate must be in [0, 1], got {self.rate}")
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    return dropout(x, self.rate, self.make_rng(self.rng_collection))
