"""Distillation losses as pure functions: soft targets (Hinton et al.), hidden states (TinyBERT), attention maps (MiniLM).

Every term is a per-example quantity summed over the real examples of a batch (hidden and attention terms: each
example's mean over its own tokens), like `jfast.train.classification_loss`, so packed rows and micro-batch
accumulation give exactly the loss of the whole batch unpacked. `jfast.distill` combines them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def soft_target_loss(student_logits, teacher_logits, temperature: float) -> jax.Array:
  """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per example (last axis: classes), float32.

  Example:
    >>> kd_BxS = soft_target_loss(student_BxSxC, teacher_BxSxC, temperature=2.0)  # doctest: +SKIP
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  logq = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  return temperature**2 * optax.losses.kl_divergence_with_log_targets(logq, logp)


def _token_weights(segment_ids_BxL):
  """(1 / length of the token's example, 0 on padding) and the same-example mask ``[B, L, L]``."""
  seg_BxL = segment_ids_BxL
  same_BxLxL = (seg_BxL[:, :, None] == seg_BxL[:, None, :]) & (seg_BxL[:, None, :] > 0)
  length_BxL = same_BxLxL.sum(-1).astype(jnp.float32)
  return jnp.where(seg_BxL > 0, 1.0 / jnp.maximum(length_BxL, 1.0), 0.0), same_BxLxL


def hidden_state_loss(student_BxLxD, teacher_BxLxE, segment_ids_BxL, projection_DxE=None) -> jax.Array:
  """Sum over the batch's examples of each example's mean (over its tokens and features) squared error.

  Args:
    student_BxLxD: a student layer's output.
    teacher_BxLxE: the matched teacher layer's output.
    segment_ids_BxL: 0 for padding, one id per example in a row (packed or not).
    projection_DxE: maps the student's width to the teacher's; required when D != E.

  Returns:
    A float32 scalar; divide by the number of examples for the mean.
  """
  s = student_BxLxD.astype(jnp.float32)
  if projection_DxE is not None:
    s = s @ projection_DxE.astype(jnp.float32)
  if s.shape != teacher_BxLxE.shape:
    raise ValueError(f"student hidden states {s.shape} do not match the teacher's {teacher_BxLxE.shape}")
  mse_BxL = jnp.mean((s - teacher_BxLxE.astype(jnp.float32)) ** 2, axis=-1)
  weight_BxL, _ = _token_weights(segment_ids_BxL)
  return jnp.sum(mse_BxL * weight_BxL)


def attention_probs(q_BxLxD, k_BxLxD, segment_ids_BxL, num_heads: int) -> jax.Array:
  """Softmax attention distributions ``[B, H, L, L]`` (float32) within each example, from query/key projections."""
  b, length, d = q_BxLxD.shape
  q_BxLxHxK = q_BxLxD.astype(jnp.float32).reshape(b, length, num_heads, d // num_heads)
  k_BxLxHxK = k_BxLxD.astype(jnp.float32).reshape(b, length, num_heads, d // num_heads)
  scores_BxHxLxL = jnp.einsum("bqhk,bthk->bhqt", q_BxLxHxK, k_BxLxHxK) / math.sqrt(d // num_heads)
  _, same_BxLxL = _token_weights(segment_ids_BxL)
  return jax.nn.softmax(jnp.where(same_BxLxL[:, None], scores_BxHxLxL, -1e30), axis=-1)


def attention_map_loss(student_probs_BxHxLxL, teacher_probs_BxHxLxL, segment_ids_BxL) -> jax.Array:
  """Sum over examples of the mean (over heads and the example's query tokens) KL(teacher || student)."""
  p, q = teacher_probs_BxHxLxL, student_probs_BxHxLxL
  kl_BxHxL = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.maximum(p, 1e-30)) - jnp.log(jnp.maximum(q, 1e-30))), 0), -1)
  weight_BxL, _ = _token_weights(segment_ids_BxL)
  return jnp.sum(kl_BxHxL.mean(axis=1) * weight_BxL)
