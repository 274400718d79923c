"""Gradient accumulation inside one jitted step: k micro-batches under `lax.scan`, one optimizer update.

The loss of every micro-batch is divided by the real-example (or real-token) count of the whole batch, not by its
own, so micro-batches of different lengths or fill give exactly the full batch's gradient. Peak activation memory is
that of one micro-batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jfast.data.batch import Batch

NORMALIZERS = ("examples", "tokens")


def real_count(batch: Batch, normalize_by: str) -> jax.Array:
  """Real examples (``example_mask``) or real tokens (``segment_ids > 0``) in ``batch``, as float32."""
  if normalize_by == "examples":
    return batch.example_mask.sum().astype(jnp.float32)
  if normalize_by == "tokens":
    return (batch.segment_ids > 0).sum().astype(jnp.float32)
  raise ValueError(f"unknown normalize_by {normalize_by!r}; expected one of {NORMALIZERS}")


def split_micro_batches(batch: Batch, k: int) -> Batch:
  """Reshapes every ``[B, ...]`` field to ``[k, B // k, ...]``; rows are consecutive, so row order is kept."""
  rows = batch.input_ids.shape[0]
  if k < 1:
    raise ValueError(f"micro_batches must be at least 1, got {k}")
  if rows % k:
    raise ValueError(f"a batch of {rows} rows does not divide into {k} micro-batches")
  return jax.tree.map(lambda x: x.reshape((k, rows // k, *x.shape[1:])), batch)


def accumulate_gradients(loss_fn, params, batch: Batch, rng, k: int, *, normalize_by: str = "examples", scale_fn=None):
  """Gradient of the whole batch's loss, computed k micro-batches at a time.

  Args:
    loss_fn: ``(params, batch, rng, deterministic) -> (loss, aux)`` with ``aux["loss_sum"]`` the summed loss.
    params: what to differentiate (a trainable partition is fine).
    batch: the full batch; its rows must divide by k.
    rng: dropout key; folded with the micro-batch index.
    k: micro-batches.
    normalize_by: ``examples`` (classification) or ``tokens`` (language modelling).
    scale_fn: applied to each micro-batch's loss before differentiation (a loss scale's ``scale``); the returned
      gradient is then scaled likewise.

  Returns:
    ``(loss, aux, grads)``: the whole batch's mean loss, ``aux`` summed over micro-batches, and its gradient.

  Example:
    >>> loss, aux, grads = accumulate_gradients(loss_fn, params, batch, key, k=4)  # doctest: +SKIP
  """
  total = jnp.maximum(real_count(batch, normalize_by), 1.0)
  micro = split_micro_batches(batch, k)

  def micro_loss(p, mb, key):
    _, aux = loss_fn(p, mb, key, False)
    loss = aux["loss_sum"] / total
    return (loss if scale_fn is None else scale_fn(loss)), aux

  grad_fn = jax.grad(micro_loss, has_aux=True)

  def body(carry, xs):
    grads_acc, aux_acc = carry
    index, mb = xs
    grads, aux = grad_fn(params, mb, None if rng is None else jax.random.fold_in(rng, index))
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
    return (grads_acc, aux_acc), None

  first = jax.tree.map(lambda x: x[0], micro)
  aux_shape = jax.eval_shape(lambda: loss_fn(params, first, rng, False)[1])
  init = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape))
  (grads, aux), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
  return aux["loss_sum"] / total, aux, grads


def multi_steps(tx: optax.GradientTransformation, every_k: int) -> optax.GradientTransformation:
  """Accumulation across calls: `optax.MultiSteps`, one real update every ``every_k`` train steps.

  For when one micro-batch is all a step can hold, or micro-batches arrive one at a time (streamed data). Each
  call's gradient is its own micro-batch's mean; MultiSteps averages the k means. That equals the full batch's
  gradient when the k micro-batches hold the same number of real examples (fixed-size batches, or packed rows
  with `make_batches(..., strategy="packed")` filled to the same count); with variable fill it weights small
  micro-batches up. The in-step `accumulate_gradients` (``make_train_step(micro_batches=k)``) is exact in every
  case; prefer it when the batch fits in host memory.

  Args:
    tx: the optimizer chain (clipping included: it then clips the accumulated gradient, as it should).
    every_k: micro-steps per update.

  Returns:
    An optax transformation whose update is zero for k-1 calls and the optimizer's update on the k-th.

  Example:
    >>> tx = multi_steps(optax.adamw(1e-4), every_k=4)
  """
  if not isinstance(every_k, int) or every_k < 1:
    raise ValueError(f"every_k must be a positive integer, got {every_k!r}")
  return optax.MultiSteps(tx, every_k_schedule=every_k, use_grad_mean=True)
