"""Every loss jfast trains with, as pure functions: classification over packed examples, next-token prediction, and
the distillation terms (soft targets, Hinton et al.; hidden states, TinyBERT; attention maps, MiniLM).

A loss factory takes the model and returns ``loss_fn(params, batch, rng, deterministic, *inputs) -> (loss, aux)``,
the form `jfast.training.make_train_step` differentiates; ``inputs`` are the step's extra arguments (a teacher's
parameters). ``aux`` holds sums that add up across batches, micro-batches and devices: ``loss_sum``, ``correct``,
``examples`` (what the loss averages over: real examples, or real next-token targets) and ``tokens`` (real input
tokens). Every term is a per-example quantity summed over the real examples of a batch (hidden and attention terms:
each example's mean over its own tokens), so packed rows and micro-batch accumulation give exactly the loss of the
whole batch unpacked.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from jfast.data.batch import Batch


def loss_sums(loss_BxS, correct_BxS, mask_BxS, segment_ids_BxL) -> dict[str, jax.Array]:
  """The additive ``aux`` sums of a loss over a ``[B, S]`` grid of examples (or targets) with a validity mask."""
  mask_BxS = mask_BxS.astype(jnp.float32)
  return {
    "loss_sum": jnp.sum(loss_BxS * mask_BxS),
    "correct": jnp.sum(correct_BxS * mask_BxS),
    "examples": mask_BxS.sum(),
    "tokens": (segment_ids_BxL > 0).sum().astype(jnp.float32),
  }


def classifier_logits(model: nn.Module, params, batch: Batch, *, deterministic: bool = True, rng=None, **kwargs):
  """``model.apply`` of a jfast classifier on a `Batch`: float32 logits ``[B, S, C]``, one per packed example.

  ``kwargs`` go to ``apply`` (``capture_intermediates``, ``mutable``).
  """
  return model.apply(
    {"params": params},
    batch.input_ids,
    segment_ids=batch.segment_ids,
    position_ids=batch.position_ids,
    cls_positions=batch.cls_positions,
    deterministic=deterministic,
    rngs=None if deterministic else {"dropout": rng},
    **kwargs,
  )


def cross_entropy(logits_BxSxC, labels_BxS) -> jax.Array:
  """Per-example cross-entropy in float32, from log-sum-exp (no second logits-sized array of log-probabilities)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxSxC.astype(jnp.float32), labels_BxS)


def classification_loss(model: nn.Module):
  """Cross-entropy over the real example slots of a `Batch` (packed or not), normalised by real examples.

  Returns:
    ``loss_fn(params, batch, rng, deterministic) -> (mean_loss, aux)`` (see the module docstring for ``aux``).

  Example:
    >>> step = make_train_step(classification_loss(model))  # doctest: +SKIP
  """

  def loss_fn(params, batch: Batch, rng, deterministic: bool):
    logits_BxSxC = classifier_logits(model, params, batch, deterministic=deterministic, rng=rng)
    aux = loss_sums(
      cross_entropy(logits_BxSxC, batch.labels),
      jnp.argmax(logits_BxSxC, -1) == batch.labels,
      batch.example_mask,
      batch.segment_ids,
    )
    return aux["loss_sum"] / jnp.maximum(aux["examples"], 1.0), aux

  return loss_fn


def lm_logits(model: nn.Module, params, batch: Any, *, deterministic: bool = True, rng=None):
  """A causal LM's float32 logits ``[B, L, V]`` on the rows of an `jfast.data.LMBatch` (segments and positions)."""
  return model.apply(
    {"params": params},
    batch.input_ids,
    segment_ids=batch.segment_ids,
    position_ids=batch.position_ids,
    deterministic=deterministic,
    rngs=None if deterministic else {"dropout": rng},
  )


def causal_lm_loss(model: nn.Module):
  """Next-token cross-entropy over real targets (``example_mask`` of an `jfast.data.LMBatch`), normalised by their
  count.

  Returns:
    ``loss_fn(params, batch, rng, deterministic) -> (mean_loss, aux)``; ``correct`` counts argmax hits and
    ``examples`` real targets.

  Example:
    >>> step = make_train_step(causal_lm_loss(GPT(config)))  # doctest: +SKIP
  """

  def loss_fn(params, batch: Any, rng, deterministic: bool):
    logits_BxLxV = lm_logits(model, params, batch, deterministic=deterministic, rng=rng)
    # "The target has the highest logit" instead of argmax == target: the same count (but for exact ties) from the
    # max the cross-entropy computes anyway; XLA:CPU's argmax over [B, L, V] took about 2% of the GPT step.
    label_logit_BxL = jnp.take_along_axis(logits_BxLxV, batch.labels[..., None], axis=-1)[..., 0]
    hit_BxL = label_logit_BxL >= jnp.max(logits_BxLxV, axis=-1)
    aux = loss_sums(cross_entropy(logits_BxLxV, batch.labels), hit_BxL, batch.example_mask, batch.segment_ids)
    return aux["loss_sum"] / jnp.maximum(aux["examples"], 1.0), aux

  return loss_fn


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
