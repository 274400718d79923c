"""Attention kernels behind one entry point, so a model swaps the kernel by config, not by rewrite.

Every kernel takes ``segment_ids`` instead of a boolean mask: padding is segment 0, and packed rows number their
examples 1..S. That one integer array expresses padding, packing and (for decoders) causality without a second
mask representation travelling through the model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

ATTENTION_KINDS = ("dense",)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Which attention kernel the model runs.

  Attributes:
    kind: ``dense`` computes every query-key pair and masks; later kinds (sliding window, block sparse,
      global tokens) plug in here.
  """

  kind: str = "dense"

  def __post_init__(self):
    if self.kind not in ATTENTION_KINDS:
      raise ValueError(f"unknown attention kind {self.kind!r}; expected one of {ATTENTION_KINDS}")


def segment_mask(segment_ids_BxL: jax.Array, *, causal: bool = False) -> jax.Array:
  """Boolean ``[B, 1, L, L]`` mask: query i may attend key j.

  Keys must be real tokens of the query's own segment. Padding queries (segment 0) attend to every real key, as
  Hugging Face BERT does, so their (ignored) outputs stay finite and match PyTorch position for position.
  """
  q_BxLx1 = segment_ids_BxL[:, :, None]
  k_Bx1xL = segment_ids_BxL[:, None, :]
  mask_BxLxL = (k_Bx1xL > 0) & ((q_BxLx1 == k_Bx1xL) | (q_BxLx1 == 0))
  if causal:
    length = segment_ids_BxL.shape[1]
    mask_BxLxL &= jnp.tril(jnp.ones((length, length), dtype=bool))[None]
  return mask_BxLxL[:, None]


def dense_attention(
  q_BxLxHxD: jax.Array,
  k_BxLxHxD: jax.Array,
  v_BxLxHxD: jax.Array,
  segment_ids_BxL: jax.Array,
  *,
  causal: bool = False,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """Masked softmax attention over all pairs; softmax in float32 whatever the compute dtype."""
  depth = q_BxLxHxD.shape[-1]
  logits_BxHxLxL = jnp.einsum("bqhd,bkhd->bhqk", q_BxLxHxD, k_BxLxHxD) / jnp.sqrt(depth).astype(q_BxLxHxD.dtype)
  logits_BxHxLxL = logits_BxHxLxL.astype(jnp.float32)
  mask = segment_mask(segment_ids_BxL, causal=causal)
  # A finite floor instead of -inf keeps fully masked rows (all-padding rows) NaN-free.
  logits_BxHxLxL = jnp.where(mask, logits_BxHxLxL, jnp.finfo(jnp.float32).min)
  probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1).astype(v_BxLxHxD.dtype)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BxHxLxL.shape)
    probs_BxHxLxL = jnp.where(keep, probs_BxHxLxL / (1.0 - dropout_rate), 0).astype(v_BxLxHxD.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs_BxHxLxL, v_BxLxHxD)


class Attention(nn.Module):
  """Dispatches to the kernel named by ``config.kind``; projections live in the caller."""

  config: AttentionConfig
  dropout_rate: float = 0.0
  causal: bool = False

  @nn.compact
  def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, *, deterministic: bool = True):
    rng = None if deterministic or self.dropout_rate == 0.0 else self.make_rng("dropout")
    rate = 0.0 if deterministic else self.dropout_rate
    return dense_attention(
      q_BxLxHxD,
      k_BxLxHxD,
      v_BxLxHxD,
      segment_ids_BxL,
      causal=self.causal,
      dropout_rate=rate,
      dropout_rng=rng,
    )
