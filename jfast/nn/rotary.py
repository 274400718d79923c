"""Rotary position embeddings (RoPE): the frequencies, Llama-3's long-context rescaling of them, and the rotation.

One implementation for every jfast model with rotary positions (GPT's ``position_embedding="rotary"`` and the
Llama family). The layout is GPT-NeoX's and Hugging Face Llama's: channel ``i`` is paired with channel ``i + D/2``
(``rotate_half``), not with its neighbour. Frequencies are computed the way ``transformers`` computes them
(``1 / theta ** (2i / D)`` in float32), so logits match a Hugging Face model on the same weights.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_SCALING_TYPES = ("llama3",)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3's frequency rescaling (``rope_scaling`` / ``rope_parameters`` with ``rope_type: llama3``).

  Low frequencies (wavelengths beyond ``original_max_position_embeddings / low_freq_factor``) are divided by
  ``factor``, high ones (below ``... / high_freq_factor``) kept, and the band between interpolated smoothly.
  """

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  rope_type: str = "llama3"

  def __post_init__(self):
    if self.rope_type not in ROPE_SCALING_TYPES:
      raise ValueError(f"unsupported RoPE scaling type {self.rope_type!r}; supported: {ROPE_SCALING_TYPES}")
    if self.factor <= 0 or self.original_max_position_embeddings <= 0:
      raise ValueError("RoPE scaling needs a positive factor and original_max_position_embeddings")
    if not self.high_freq_factor > self.low_freq_factor > 0:
      raise ValueError(
        f"RoPE scaling needs high_freq_factor > low_freq_factor > 0, got {self.high_freq_factor} and "
        f"{self.low_freq_factor}"
      )


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
  """The ``D/2`` inverse frequencies (float32) of a head of width ``head_dim``, optionally Llama-3-rescaled.

  Example:
    >>> rope_frequencies(4, 10000.0)
    array([1.  , 0.01], dtype=float32)
  """
  if head_dim % 2:
    raise ValueError(f"rotary positions need an even head dimension, got {head_dim}")
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
  if scaling is None:
    return inv_freq
  low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
  wavelen = (2 * math.pi / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(scaling.factor), inv_freq).astype(np.float32)
  smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
    scaling.high_freq_factor - scaling.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / np.float32(scaling.factor) + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rotary(x_BxLxHxD: jax.Array, position_ids_BxL: jax.Array, inv_freq_F) -> jax.Array:
  """Rotates channel pairs ``(i, i + D/2)`` of every head by ``position * inv_freq[i]``, in float32.

  Positions come from ``position_ids``, so packed documents, whose positions restart at 0, are encoded exactly as
  they would be alone, and a decoding step at position t is encoded as the t-th token of the full sequence.
  """
  half = x_BxLxHxD.shape[-1] // 2
  inv_freq_F = jnp.asarray(inv_freq_F, jnp.float32)
  if inv_freq_F.shape != (half,):
    raise ValueError(f"{inv_freq_F.shape[0]} frequencies for a head of width {x_BxLxHxD.shape[-1]}")
  angle_BxLxF = position_ids_BxL.astype(jnp.float32)[:, :, None] * inv_freq_F[None, None, :]
  cos_BxLx1xF, sin_BxLx1xF = jnp.cos(angle_BxLxF)[:, :, None], jnp.sin(angle_BxLxF)[:, :, None]
  x1, x2 = x_BxLxHxD[..., :half].astype(jnp.float32), x_BxLxHxD[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos_BxLx1xF - x2 * sin_BxLx1xF, x2 * cos_BxLx1xF + x1 * sin_BxLx1xF], axis=-1)
  return out.astype(x_BxLxHxD.dtype)


def rotary(x_BxLxHxD: jax.Array, position_ids_BxL: jax.Array, base: float = 10000.0) -> jax.Array:
  """RoPE with the unscaled frequencies of ``base`` (GPT's rotary positions): `apply_rotary` of
  `rope_frequencies`."""
  return apply_rotary(x_BxLxHxD, position_ids_BxL, rope_frequencies(x_BxLxHxD.shape[-1], base))
