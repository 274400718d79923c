"""Jitting on a mesh: sharded state initialisation, ZeRO-3 weight gathering, and a ``jax.jit`` with derived shardings.

The layouts come from `jfast.parallel.sharding` (one table of rules); this module applies them to the functions a
run compiles, which is what `jfast.training.create_train_state` and `jfast.training.make_train_step` use when given a
mesh.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jfast.parallel.sharding import FSDP, ShardingRules, batch_sharding, check_batch, tree_shardings


def compute_shardings(tree: Any, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
  """The layout parameters are used in: the rules' shardings with the ``fsdp`` axis removed (tensor axes kept)."""

  def drop_fsdp(s: NamedSharding) -> NamedSharding:
    spec = []
    for entry in s.spec:
      axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a != FSDP)
      spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(drop_fsdp, tree_shardings(tree, mesh, rules))


def gather_params(loss_fn: Callable, mesh: Mesh, rules: ShardingRules | None = None) -> Callable:
  """Wraps ``loss_fn(params, ...)`` so FSDP-sharded weights are all-gathered where they are used (ZeRO-3).

  Without it XLA may meet a weight split over ``fsdp`` and activations split over ``fsdp`` (their rows) by
  re-sharding the activations instead, leaving every device with the whole batch. Constraining the parameters to
  their compute layout makes it gather the weights; the constraint's transpose reduce-scatters their gradients.
  A no-op on meshes whose ``fsdp`` axis has size 1.
  """
  if mesh.shape[FSDP] == 1:
    return loss_fn

  @functools.wraps(loss_fn)
  def wrapped(params, *args, **kwargs):
    params = jax.lax.with_sharding_constraint(params, compute_shardings(params, mesh, rules))
    return loss_fn(params, *args, **kwargs)

  return wrapped


def sharded_init(init_fn: Callable, params: Any, *args, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
  """Runs ``init_fn(params, *args)`` under jit with sharded outputs, so no full copy lands on one device.

  Args:
    init_fn: builds the state from the parameters and ``args``.
    params: a parameter pytree (host or device arrays; moved shard by shard) or a zero-argument callable that
      creates them (run inside the jit, so even the initial weights are only ever materialised sharded).
    args: further (small) arguments of ``init_fn``.
    mesh: the mesh.
    rules: the tables.

  Returns:
    The state, every leaf laid out by `tree_shardings`.
  """
  if callable(params):
    make_params = params

    def fn(*rest):
      return init_fn(make_params(), *rest)

  else:
    params = jax.device_put(params, tree_shardings(params, mesh, rules))
    fn, args = init_fn, (params, *args)
  abstract = jax.eval_shape(fn, *args)
  return jax.jit(fn, out_shardings=tree_shardings(abstract, mesh, rules))(*args)


class MeshJit:
  """``jax.jit`` of a step ``(state_or_params, ..., batch) -> outputs`` with shardings from the rules.

  The shardings depend on the state's paths and shapes, known at the first call; they are computed then (once per
  state structure). The last argument is the batch (rows over ``data x fsdp``, checked); the others are laid out
  by `tree_shardings`. An output with the first argument's structure (the new state) keeps its sharding, so donated
  buffers are updated in place; other outputs (metrics, sums) are replicated.
  """

  def __init__(self, fn: Callable, mesh: Mesh, rules: ShardingRules | None = None, **jit_kwargs):
    for key in ("in_shardings", "out_shardings"):
      if key in jit_kwargs:
        raise ValueError(f"{key} is derived from the mesh and the rules; pass one or the other, not both")
    self._fn, self._mesh, self._rules, self._jit_kwargs = fn, mesh, rules, jit_kwargs
    self._cache: dict[Any, Callable] = {}

  def _jitted(self, args):
    if not args:
      raise TypeError("a mesh step takes at least a batch argument")
    check_batch(args[-1], self._mesh)
    state_args = args[:-1]
    key = tuple(
      (jax.tree.structure(a), tuple((np.shape(x), str(x.dtype)) for x in jax.tree.leaves(a))) for a in state_args
    )
    if key not in self._cache:
      in_shardings = tuple(tree_shardings(a, self._mesh, self._rules) for a in state_args)
      # Traces the undecorated function: the caller's compile counter should count compilations only.
      out = jax.eval_shape(getattr(self._fn, "__wrapped__", self._fn), *args)
      replicated = NamedSharding(self._mesh, P())
      first = jax.tree.structure(state_args[0]) if state_args else None

      def out_sharding(o):
        return in_shardings[0] if first is not None and jax.tree.structure(o) == first else replicated

      out_shardings = tuple(out_sharding(o) for o in out) if isinstance(out, tuple) else out_sharding(out)
      self._cache[key] = jax.jit(
        self._fn,
        in_shardings=(*in_shardings, batch_sharding(self._mesh)),
        out_shardings=out_shardings,
        **self._jit_kwargs,
      )
    return self._cache[key]

  def __call__(self, *args):
    return self._jitted(args)(*args)

  def lower(self, *args):
    return self._jitted(args).lower(*args)

  def trace(self, *args):
    return self._jitted(args).trace(*args)
