"""Train and eval steps: pure functions, jit-compiled once, with a compile counter.

`make_train_step` is the one builder every technique plugs into. It takes a loss function
``loss_fn(params, batch, rng, deterministic, *inputs) -> (loss, aux)`` that closes over the model (any model: a
jfast model, a user's Flax Linen or NNX module, a plain function of a parameter pytree) and returns a
`CompiledStep` ``(state, *inputs, batch) -> (state, metrics)`` whose state buffers are donated. ``inputs`` are
further jit arguments the loss reads but never differentiates, such as a distillation teacher's parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jfast.cpu.platform import target
from jfast.optim import freezing
from jfast.parallel import mesh_jit
from jfast.parallel.sharding import ShardingRules
from jfast.precision.loss_scale import NoOpLossScale, all_finite
from jfast.precision.policy import Policy, get_policy
from jfast.training.accumulation import NORMALIZERS, accumulate_gradients
from jfast.training.compile_cache import cache_events
from jfast.training.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


class CompiledStep:
  """A jitted step that counts its compilations (one per distinct input shape), for recompilation budgets, and
  times them.

  ``compile_log`` holds one ``{"seconds", "cached"}`` per compilation: the wall time of the call that traced,
  compiled (or loaded from the persistent cache: ``cached``) and dispatched it. Execution is asynchronous, so that
  time is the compile's, not the step's.

  ``platform`` (``cuda``, ``rocm``, ``tpu``, ``cpu``; None: the default backend) is the platform the step is traced
  for (`jfast.cpu.target`); `lower` then lowers for it too, so a step for an accelerator can be inspected on a CPU.
  """

  steps_per_call = 1  # > 1: a `make_train_step(steps_per_call=K)` step, with `single` for one batch
  single: CompiledStep | None = None

  def __init__(
    self,
    fn: Callable,
    *,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    platform: str | None = None,
    **jit_kwargs,
  ):
    self._traces = 0
    self.platform = platform
    self._compile_log: list[dict[str, Any]] = []
    self._events = cache_events()

    @functools.wraps(fn)
    def counted(*args, **kwargs):
      # Runs only while JAX traces, i.e. once per new shape signature: exactly when XLA compiles.
      self._traces += 1
      with target(platform) if platform is not None else contextlib.nullcontext():
        return fn(*args, **kwargs)

    # With a mesh, in/out shardings come from the state's paths and shapes, known only at the first call.
    if mesh is None:
      self._jitted = jax.jit(counted, **jit_kwargs)
    else:
      self._jitted = mesh_jit.MeshJit(counted, mesh, rules, **jit_kwargs)

  def __call__(self, *args):
    traces, hits, t0 = self._traces, self._events.hits, time.perf_counter()
    out = self._jitted(*args)
    if self._traces != traces:
      self._compile_log.append({"seconds": time.perf_counter() - t0, "cached": self._events.hits > hits})
    return out

  @property
  def compile_seconds(self) -> float:
    """Seconds spent compiling (or loading compiled programs) so far."""
    return float(sum(c["seconds"] for c in self.compile_log))

  @property
  def num_compiles(self) -> int:
    """Compilations so far (a ``steps_per_call`` step's one-step fallback included)."""
    return self._traces + (self.single.num_compiles if self.single is not None else 0)

  @property
  def compile_log(self) -> list[dict[str, Any]]:
    return self._compile_log + (self.single.compile_log if self.single is not None else [])

  def lower(self, *args):
    """The lowered step for these arguments, for the step's platform (`jax.stages.Lowered`)."""
    if self.platform is None:
      return self._jitted.lower(*args)
    return self._jitted.trace(*args).lower(lowering_platforms=(self.platform,))


def _check_policy(state: TrainState, policy: Policy) -> None:
  # Runs while tracing: a state built without the policy fails here, not as a silent float32 run.
  wrong = {
    x.dtype.name
    for x in jax.tree.leaves(state.params)
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != policy.param_dtype
  }
  if wrong:
    raise ValueError(
      f"the state's parameters are {sorted(wrong)} but precision policy {policy} stores them as "
      f"{policy.param_dtype.name}; build the state with create_train_state(..., policy=policy)"
    )
  if policy.needs_loss_scale and isinstance(state.loss_scale, NoOpLossScale):
    warnings.warn(
      f"precision policy {policy} trains without loss scaling (state.loss_scale is NoOpLossScale): gradients "
      "below ~6e-8 become zero. create_train_state(..., policy=policy) turns dynamic scaling on.",
      stacklevel=2,
    )


def _train_step(
  state: TrainState,
  *args,
  loss_fn: LossFn,
  policy: Policy | None = None,
  micro_batches: int = 1,
  freeze_mask=None,
  normalize_by: str = "examples",
  row_sparse=None,
):
  *inputs, batch = args
  if policy is not None:
    _check_policy(state, policy)
  ls = state.loss_scale
  # Differentiate the trainable partition only: XLA then never builds the frozen weights' gradients, nor any
  # backward below the lowest trainable layer.
  if freeze_mask is None:
    trainable, frozen = state.params, None
  else:
    trainable, frozen = freezing.split(state.params, freeze_mask)
  extra_args, apply_updates = {}, optax.apply_updates
  if row_sparse is not None:
    # The table becomes the batch's rows and the batch indexes into them (`jfast.cpu.row_sparse`).
    row_sparse.check(state.opt_state)
    trainable, batch, loss_fn, extra_args = row_sparse.prepare(trainable, batch)
    apply_updates = row_sparse.apply_updates

  def apply_gradients(st, grads):
    updates, opt_state = st.tx.update(grads, st.opt_state, st.params, **extra_args)
    return st.replace(step=st.step + 1, params=apply_updates(st.params, updates), opt_state=opt_state)

  def merged_loss_fn(params, batch, rng, deterministic):
    if freeze_mask is not None:
      params = freezing.merge(params, frozen, freeze_mask)
    loss, aux = loss_fn(params, batch, rng, deterministic, *inputs)
    if policy is not None:
      loss = policy.cast_to_output(loss)
    return loss, aux

  if micro_batches == 1:

    def scaled_loss_fn(params):
      loss, aux = merged_loss_fn(params, batch, state.dropout_key(), False)
      return ls.scale(loss), (loss, aux)

    (_, (loss, aux)), grads = jax.value_and_grad(scaled_loss_fn, has_aux=True)(trainable)
  else:
    loss, aux, grads = accumulate_gradients(
      merged_loss_fn,
      trainable,
      batch,
      state.dropout_key(),
      micro_batches,
      normalize_by=normalize_by,
      scale_fn=ls.scale,
    )
  grads = ls.unscale(grads)
  if freeze_mask is not None:
    # The optimizer (wrapped by `freezing.freeze`) routes these zeros to set_to_zero; XLA removes them.
    grads = freezing.merge(grads, jax.tree.map(jnp.zeros_like, frozen), freeze_mask)
  if isinstance(ls, NoOpLossScale):
    new_state = apply_gradients(state, grads)
    skipped = jnp.zeros((), jnp.float32)
  else:
    # A step whose gradients hold an inf or NaN returns the old params and optimizer state as they are, so the
    # optimizer's own count and schedule do not advance; state.step still counts the batch, which keeps the dropout
    # stream and the loop's data position in step with the batches consumed. A cond, not a select over every leaf
    # (`select_tree`): the select keeps old and new optimizer state alive together (+65 MiB of temp for MiniLM)
    # and took XLA:CPU 58 s instead of 9 s to compile.
    finite = all_finite(grads)

    def update(st):
      new = apply_gradients(st, grads)
      return new.params, new.opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda st: (st.params, st.opt_state), state)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=ls.adjust(finite))
    skipped = 1.0 - finite.astype(jnp.float32)
  metrics = {
    "loss": loss,
    "accuracy": aux["correct"] / jnp.maximum(aux["examples"], 1.0),
    "grad_norm": optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads)),
    "loss_scale": jnp.asarray(ls.loss_scale, jnp.float32),
    "skipped": skipped,
    **aux,
  }
  return new_state, metrics


def _scanned_steps(state: TrainState, *args, step_fn: Callable):
  """``K`` train steps in one program: ``lax.scan`` of ``step_fn`` over batches stacked on a leading axis."""
  *inputs, batches = args
  return jax.lax.scan(lambda st, batch: step_fn(st, *inputs, batch), state, batches)


def stack_batches(batches):
  """Batches of one shape stacked on a new leading axis: the input of a ``steps_per_call`` step."""
  return jax.tree.map(
    lambda *leaves: jnp.stack(leaves) if isinstance(leaves[0], jax.Array) else np.stack(leaves), *batches
  )


def _eval_step(params, *args, loss_fn: LossFn):
  *inputs, batch = args
  _, aux = loss_fn(params, batch, None, True, *inputs)
  return aux


def make_train_step(
  loss_fn: LossFn,
  *,
  policy: str | Policy | None = None,
  micro_batches: int = 1,
  freeze_mask=None,
  normalize_by: str = "examples",
  state_sharding=None,
  batch_sharding=None,
  donate: bool = True,
  mesh: Mesh | None = None,
  rules: ShardingRules | None = None,
  compiler_options: dict[str, Any] | None = None,
  row_sparse=None,
  platform: str | None = None,
  steps_per_call: int = 1,
) -> CompiledStep:
  """Builds the jitted train step ``(state, *inputs, batch) -> (state, metrics)``.

  The step scales the loss by ``state.loss_scale``, unscales the gradients in float32 and, under loss scaling,
  skips a step whose gradients are not all finite: params and optimizer state stay bit for bit as they were,
  ``state.step`` still advances (it counts batches), and the scale adjusts. Metrics include ``loss_scale`` (the
  scale this step used) and ``skipped`` (1.0 for a skipped step).

  Args:
    loss_fn: ``(params, batch, rng, deterministic, *inputs) -> (loss, aux)``, e.g. from
      `jfast.training.classification_loss`; ``aux`` needs ``correct`` and ``examples`` (and ``loss_sum`` for
      ``micro_batches > 1``), see `jfast.training.losses`.
    policy: a precision policy (`jfast.precision.get_policy` spec). The loss is cast to its output dtype, and the
      first call checks that the state's parameters are in its param dtype (fails) and that a float16 policy has loss
      scaling (warns). The compute dtype is the model's (``policy.configure(config)``). None: no checks.
    micro_batches: accumulate gradients over this many consecutive row blocks of each batch inside the step (a
      `lax.scan`; activation memory of one block), normalising by the whole batch's real count (`normalize_by`),
      so the update equals the full batch's. The batch's rows must divide by it.
    freeze_mask: from `jfast.optim.freeze_mask` (True = frozen): gradients are taken for the trainable
      partition only. Build the optimizer with `jfast.optim.freeze(tx, mask)` so frozen leaves keep no state.
    normalize_by: ``examples`` or ``tokens``: what the accumulated loss is averaged over.
    state_sharding: sharding (or pytree of shardings) of the `TrainState`; None lets JAX place it.
    batch_sharding: sharding of the batch; None lets JAX place it.
    donate: donate the input state's buffers, so the update happens in place and peak memory holds one state.
    mesh: a `jfast.parallel.make_mesh` mesh: the step compiles with in/out shardings from ``rules`` (state laid
      out as `create_train_state(..., mesh=mesh)` makes it, batch rows over data x fsdp, metrics replicated);
      a batch whose rows do not divide over the data axes fails with a `ValueError`. Replaces the two shardings.
    rules: `jfast.parallel.ShardingRules` (default: the library's table).
    compiler_options: XLA options for this step's compilation, e.g. `jfast.cpu.compiler_options(remat_policy)`,
      which remat needs on CPU to save any memory.
    row_sparse: from `jfast.cpu.row_sparse_embedding(model, loss)` (an opt-in CPU technique): the word table's
      gradient is taken for the batch's rows only, and the optimizer (``OptimizerConfig(row_sparse_embeddings=
      "exact")``) scatters it into its moments: the same AdamW update without a table-sized gradient (``"lazy"``:
      SparseAdam's update instead). ``loss_fn`` is then unused: the spec builds the loss of the model with a compact
      table.
    platform: the platform the step is traced and lowered for (``cuda``, ``rocm``, ``tpu``, ``cpu``; None: the
      default backend); see `jfast.cpu.target`.
    steps_per_call: run this many steps in one jitted call (a ``lax.scan`` over ``K`` batches of one shape stacked
      on a leading axis, `stack_batches`; metrics come back stacked ``[K]``): one dispatch per K steps, which small
      models and TPUs need against per-step dispatch overhead. The returned step's ``single`` attribute runs one
      step (for leftover batches of other shapes); `jfast.training.training_loop` groups batches itself. Not with
      ``mesh`` yet.

  Returns:
    A `CompiledStep`; ``step.num_compiles`` counts XLA compilations.

  Example:
    >>> step = make_train_step(classification_loss(model), policy="bf16")  # doctest: +SKIP
    >>> state, metrics = step(state, batch)  # doctest: +SKIP
  """
  jit_kwargs: dict[str, Any] = {"donate_argnames": ("state",)} if donate else {}
  if compiler_options:
    jit_kwargs["compiler_options"] = dict(compiler_options)
  if state_sharding is not None or batch_sharding is not None:
    if mesh is not None:
      raise ValueError("pass either mesh (shardings from the rules) or state_sharding/batch_sharding, not both")
    jit_kwargs.update(in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None))
  policy = None if policy is None else get_policy(policy)
  if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
    raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}")
  if normalize_by not in NORMALIZERS:
    raise ValueError(f"unknown normalize_by {normalize_by!r}; expected one of {NORMALIZERS}")
  if mesh is not None:
    loss_fn = mesh_jit.gather_params(loss_fn, mesh, rules)  # FSDP: gather weights, keep activations batch-split
    if row_sparse is not None:
      make_loss = row_sparse.make_loss
      row_sparse = dataclasses.replace(
        row_sparse, make_loss=lambda n: mesh_jit.gather_params(make_loss(n), mesh, rules)
      )
  step = functools.partial(
    _train_step,
    loss_fn=loss_fn,
    policy=policy,
    micro_batches=micro_batches,
    freeze_mask=freeze_mask,
    normalize_by=normalize_by,
    row_sparse=row_sparse,
  )
  if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or steps_per_call < 1:
    raise ValueError(f"steps_per_call must be a positive integer, got {steps_per_call!r}")
  single = CompiledStep(step, mesh=mesh, rules=rules, platform=platform, **jit_kwargs)
  if steps_per_call == 1:
    return single
  if mesh is not None:
    raise ValueError("steps_per_call > 1 with a mesh is not supported yet: use steps_per_call=1 on a mesh")
  scanned = functools.partial(_scanned_steps, step_fn=step)
  multi = CompiledStep(scanned, mesh=mesh, rules=rules, platform=platform, **jit_kwargs)
  multi.steps_per_call, multi.single = steps_per_call, single
  return multi


def make_eval_step(
  loss_fn: LossFn,
  *,
  param_sharding=None,
  batch_sharding=None,
  mesh: Mesh | None = None,
  rules: ShardingRules | None = None,
  platform: str | None = None,
) -> CompiledStep:
  """Builds the jitted eval step ``(params, *inputs, batch) -> sums`` (dropout off); add the sums over batches.

  With ``mesh``, params are laid out by ``rules``, batch rows over data x fsdp, and the sums come back replicated.
  """
  jit_kwargs: dict[str, Any] = {}
  if param_sharding is not None or batch_sharding is not None:
    jit_kwargs.update(in_shardings=(param_sharding, batch_sharding))
  if mesh is not None:
    loss_fn = mesh_jit.gather_params(loss_fn, mesh, rules)
  step = functools.partial(_eval_step, loss_fn=loss_fn)
  return CompiledStep(step, mesh=mesh, rules=rules, platform=platform, **jit_kwargs)
