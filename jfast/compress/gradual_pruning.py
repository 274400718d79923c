"""Pruning during training as optax transformations: a fixed mask (`keep_pruned`) or Zhu & Gupta's gradual schedule.

Both wrap the inner optimizer rather than sit beside it in a chain, because keeping a pruned weight at zero needs
both ends of the update: gradients are masked on the way in (so Adam's moments of pruned weights stay zero and
cannot revive them) and updates are masked on the way out, replaced by ``-param`` where the mask is False, so
``params + updates`` is exactly 0.0 there whatever momentum or weight decay computed. A weight newly pruned by a
mask update is zeroed by the same rule on that step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jfast.compress.pruning_masks import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, check_sparsity, eligible, magnitude_mask


@dataclasses.dataclass(frozen=True)
class PruningSchedule:
  """Zhu & Gupta's cubic sparsity schedule, with masks recomputed every ``update_every`` steps.

  ``s(t) = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0))**3`` for ``t_0 <= t <= t_1``: fast pruning while
  redundant weights are plentiful, slow near the end. Before ``begin_step`` nothing is pruned; after ``end_step``
  the sparsity stays at ``final_sparsity`` and the mask stops changing (fine-tuning continues under it).

  Attributes:
    final_sparsity: s_f in [0, 1).
    begin_step: t_0, the first pruning step.
    end_step: t_1, the step at which s_f is reached (> begin_step).
    initial_sparsity: s_i, applied at t_0.
    update_every: steps between mask updates (Zhu & Gupta's Δt); ``end_step`` is always an update step.

  Example:
    >>> schedule = PruningSchedule(final_sparsity=0.9, begin_step=0, end_step=1000, update_every=100)
    >>> round(float(schedule(500)), 4)
    0.7875
  """

  final_sparsity: float
  begin_step: int
  end_step: int
  initial_sparsity: float = 0.0
  update_every: int = 100

  def __post_init__(self):
    check_sparsity(self.final_sparsity)
    check_sparsity(self.initial_sparsity)
    if self.initial_sparsity > self.final_sparsity:
      raise ValueError(f"initial_sparsity {self.initial_sparsity} exceeds final_sparsity {self.final_sparsity}")
    if not 0 <= self.begin_step < self.end_step:
      raise ValueError(f"need 0 <= begin_step < end_step, got {self.begin_step} and {self.end_step}")
    if self.update_every < 1:
      raise ValueError(f"update_every must be >= 1, got {self.update_every}")

  def __call__(self, step) -> jax.Array:
    """The target sparsity at ``step`` (0 before ``begin_step``)."""
    span = self.end_step - self.begin_step
    progress = jnp.clip((jnp.asarray(step, jnp.float32) - self.begin_step) / span, 0.0, 1.0)
    value = self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3
    return jnp.where(step < self.begin_step, 0.0, value)

  def is_update_step(self, step) -> jax.Array:
    """True on the steps where the mask is recomputed."""
    offset = step - self.begin_step
    in_range = (offset >= 0) & (step <= self.end_step)
    return in_range & ((offset % self.update_every == 0) | (step == self.end_step))


class GradualPruningState(NamedTuple):
  """State of `gradual_pruning` / `keep_pruned`: the step, the current masks (bool, params' structure), the inner
  optimizer's state."""

  count: jax.Array
  masks: optax.Params
  inner_state: optax.OptState


def _masked_update(inner, grads, inner_state, params, masks):
  if params is None:
    raise ValueError("pruning transformations need the parameters: call tx.update(grads, state, params)")
  grads = jax.tree.map(lambda g, k: jnp.where(k, g, jnp.zeros((), g.dtype)), grads, masks)
  updates, inner_state = inner.update(grads, inner_state, params)
  # -p, not 0: a weight pruned on this step must land on exactly zero, and p + (-p) == 0.0 in IEEE arithmetic.
  updates = jax.tree.map(lambda u, p, k: jnp.where(k, u, -p.astype(u.dtype)), updates, params, masks)
  return updates, inner_state


def keep_pruned(inner: optax.GradientTransformation, mask) -> optax.GradientTransformation:
  """Trains under a fixed pruning mask: pruned weights become zero on the first step and stay exactly zero.

  Args:
    inner: the optimizer (e.g. `jfast.optim.make_optimizer`'s AdamW chain).
    mask: a bool pytree shaped like the parameters (True = keep), from `magnitude_mask` or `nm_mask`.

  Returns:
    A `GradientTransformation` with `GradualPruningState`; it needs ``params`` in ``update``.

  Example:
    >>> mask = magnitude_mask(params, 0.5)  # doctest: +SKIP
    >>> tx = keep_pruned(make_optimizer(OptimizerConfig(), total_steps=500), mask)  # doctest: +SKIP
  """

  def init_fn(params):
    masks = jax.tree.map(lambda p, k: jnp.broadcast_to(jnp.asarray(k, bool), jnp.shape(p)), params, mask)
    return GradualPruningState(jnp.zeros([], jnp.int32), masks, inner.init(params))

  def update_fn(updates, state, params=None):
    updates, inner_state = _masked_update(inner, updates, state.inner_state, params, state.masks)
    return updates, GradualPruningState(optax.safe_increment(state.count), state.masks, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def gradual_pruning(
  inner: optax.GradientTransformation,
  schedule: PruningSchedule,
  *,
  scope: str = "global",
  include: Sequence[str] = DEFAULT_INCLUDE,
  exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> optax.GradientTransformation:
  """Gradual magnitude pruning (Zhu & Gupta 2017) around an optimizer.

  On every update step of ``schedule`` the mask is recomputed from the current weights' magnitudes at the scheduled
  sparsity (already-pruned weights stay pruned, so sparsity only grows); between them it is held. Gradients of
  pruned weights are zeroed before ``inner`` and their updates replaced so the weights stay exactly zero.

  Args:
    inner: the optimizer to wrap.
    schedule: a `PruningSchedule`.
    scope: ``global``, ``layer`` or ``tensor`` (see `magnitude_mask`).
    include: path patterns of prunable parameters (see `magnitude_mask`).
    exclude: path patterns kept dense.

  Returns:
    A `GradientTransformation` whose state is a `GradualPruningState` (``state.masks`` is the live mask).

  Example:
    >>> schedule = PruningSchedule(final_sparsity=0.5, begin_step=0, end_step=300, update_every=10)
    >>> tx = gradual_pruning(make_optimizer(OptimizerConfig(), total_steps=400), schedule)  # doctest: +SKIP
    >>> state = create_train_state(model, params, tx)  # doctest: +SKIP
  """
  if not isinstance(schedule, PruningSchedule):
    raise TypeError(f"schedule must be a PruningSchedule, got {type(schedule).__name__}")

  def init_fn(params):
    eligible(params, include, exclude)  # fails on patterns that match nothing before any training
    masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
    return GradualPruningState(jnp.zeros([], jnp.int32), masks, inner.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("gradual_pruning needs the parameters: call tx.update(grads, state, params)")
    masks = jax.lax.cond(
      schedule.is_update_step(state.count),
      lambda: magnitude_mask(
        params, schedule(state.count), scope=scope, include=include, exclude=exclude, previous=state.masks
      ),
      lambda: state.masks,
    )
    updates, inner_state = _masked_update(inner, updates, state.inner_state, params, masks)
    return updates, GradualPruningState(optax.safe_increment(state.count), masks, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
