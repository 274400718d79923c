"""Train and eval steps: pure functions, jit-compiled once, with a compile counter.

`make_train_step` is the one builder every technique plugs into. It takes a loss function
``loss_fn(params, batch, rng, deterministic) -> (loss, aux)`` that closes over the model, and returns a
`CompiledStep` ``(state, batch) -> (state, metrics)`` whose state buffers are donated.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh

from jfast import freezing, mesh_jit
from jfast.accumulation import accumulate_gradients
from jfast.data.batch import Batch
from jfast.loss_scale import LossScale, NoOpLossScale, all_finite, resolve_loss_scale
from jfast.optimizer import OPTIMIZERS, OptimizerConfig, make_optimizer
from jfast.precision import Policy, get_policy
from jfast.row_sparse import RowSparseEmbedding, apply_updates, compact_params_and_batch, find_row_sparse_state
from jfast.sharding import ShardingRules

# The optimizer lives in `jfast.optimizer`; re-exported so one import builds a state and its step.
__all__ = [
  "OPTIMIZERS",
  "RNG_IMPL",
  "CompiledStep",
  "LossFn",
  "OptimizerConfig",
  "TrainState",
  "classification_loss",
  "create_train_state",
  "make_eval_step",
  "make_optimizer",
  "make_train_step",
]

LossFn = Callable[[Any, Batch, jax.Array, bool], tuple[jax.Array, dict[str, jax.Array]]]


# Dropout draws a random bit per activation; threefry (JAX's default) makes that the most expensive part of a CPU
# backward pass (measured: 0.36 s -> 0.28 s per MiniLM step at 32x16 with rbg). rbg is splittable and
# reproducible, which is all dropout needs.
RNG_IMPL = "rbg"


class TrainState(train_state.TrainState):
  """Flax `TrainState` plus the RNG, so a restored state continues the same dropout stream, and the loss scale.

  ``rng`` holds raw key data (a plain uint32 array, which checkpoints as any other array) of an `RNG_IMPL` key.
  ``loss_scale`` is a `jfast.loss_scale` pytree (`NoOpLossScale` unless the run scales its loss); a dynamic scale
  changes from step to step, so it lives here and is checkpointed with the rest.
  """

  rng: jax.Array
  loss_scale: LossScale = struct.field(default_factory=NoOpLossScale)

  def dropout_key(self) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng, impl=RNG_IMPL), self.step)


def create_train_state(
  model: nn.Module,
  params,
  tx: optax.GradientTransformation,
  seed: int = 0,
  *,
  policy: str | Policy | None = None,
  loss_scale: str | LossScale | None = None,
  mesh: Mesh | None = None,
  rules: ShardingRules | None = None,
) -> TrainState:
  """Wraps parameters, a freshly initialised optimizer state and an RNG into a `TrainState` (one jitted init).

  Args:
    model: the Flax module (its ``apply`` is kept on the state).
    params: its parameters, or a zero-argument callable that creates them (run inside the jitted init, so with a
      mesh the weights are only ever materialised sharded).
    tx: the optimizer.
    seed: seeds the dropout stream.
    policy: a precision policy (`jfast.get_policy` spec); the parameters are cast to its param dtype, and the
      optimizer state follows them (optax allocates Adam's moments like the parameters). None keeps them as given.
    loss_scale: a loss-scale object or word (``none``, ``dynamic``, ``static:<scale>``); None picks the policy's
      default: dynamic for float16 policies, none otherwise.
    mesh: a `jfast.sharding.make_mesh` mesh: the state is created directly sharded by ``rules`` (shapes from
      `jax.eval_shape`, then a jit with those out shardings); None: one device.
    rules: `jfast.sharding.ShardingRules` (default: the library's table).

  Returns:
    The `TrainState`.

  Example:
    >>> tx = make_optimizer(OptimizerConfig(), total_steps=100)
    >>> state = create_train_state(model, params, tx, policy="fp16")  # doctest: +SKIP
    >>> type(state.loss_scale).__name__  # doctest: +SKIP
    'DynamicLossScale'
  """
  cast = (lambda p: p) if policy is None else get_policy(policy).cast_to_param
  scale = resolve_loss_scale(policy, loss_scale)

  def init(p, ls):
    state = TrainState.create(
      apply_fn=model.apply,
      params=cast(p),
      tx=tx,
      rng=jax.random.key_data(jax.random.key(seed, impl=RNG_IMPL)),
      loss_scale=ls,
    )
    # A strongly typed step counter: flax's is a weakly typed 0, and a checkpoint restores it strongly typed, so a
    # resumed run would otherwise compile its step a second time.
    return state.replace(step=jnp.zeros((), jnp.int32))

  if mesh is not None:
    return mesh_jit.sharded_init(init, params, scale, mesh=mesh, rules=rules)
  if callable(params):
    make_params = params
    return jax.jit(lambda ls: init(make_params(), ls))(scale)
  return jax.jit(init)(params, scale)


class CompiledStep:
  """A jitted step that counts its compilations (one per distinct input shape), for recompilation budgets."""

  def __init__(self, fn: Callable, *, mesh: Mesh | None = None, rules: ShardingRules | None = None, **jit_kwargs):
    self._traces = 0

    @functools.wraps(fn)
    def counted(*args, **kwargs):
      # Runs only while JAX traces, i.e. once per new shape signature: exactly when XLA compiles.
      self._traces += 1
      return fn(*args, **kwargs)

    # With a mesh, in/out shardings come from the state's paths and shapes, known only at the first call.
    if mesh is None:
      self._jitted = jax.jit(counted, **jit_kwargs)
    else:
      self._jitted = mesh_jit.MeshJit(counted, mesh, rules, **jit_kwargs)

  def __call__(self, *args):
    return self._jitted(*args)

  @property
  def num_compiles(self) -> int:
    return self._traces

  def lower(self, *args):
    return self._jitted.lower(*args)


def classification_loss(model: nn.Module) -> LossFn:
  """Cross-entropy over the real example slots of a `Batch` (packed or not), normalised by real examples.

  Returns:
    ``loss_fn(params, batch, rng, deterministic) -> (mean_loss, aux)`` where ``aux`` holds sums
    (``loss_sum``, ``correct``, ``examples``, ``tokens``) that add up across batches and devices.
  """

  def loss_fn(params, batch: Batch, rng, deterministic: bool):
    logits_BxSxC = model.apply(
      {"params": params},
      batch.input_ids,
      segment_ids=batch.segment_ids,
      position_ids=batch.position_ids,
      cls_positions=batch.cls_positions,
      deterministic=deterministic,
      rngs=None if deterministic else {"dropout": rng},
    )
    logp_BxSxC = jax.nn.log_softmax(logits_BxSxC.astype(jnp.float32), axis=-1)
    nll_BxS = -jnp.take_along_axis(logp_BxSxC, batch.labels[..., None], axis=-1)[..., 0]
    mask_BxS = batch.example_mask.astype(jnp.float32)
    examples = mask_BxS.sum()
    loss_sum = (nll_BxS * mask_BxS).sum()
    correct = ((jnp.argmax(logits_BxSxC, -1) == batch.labels) * mask_BxS).sum()
    aux = {
      "loss_sum": loss_sum,
      "correct": correct,
      "examples": examples,
      "tokens": (batch.segment_ids > 0).sum().astype(jnp.float32),
    }
    return loss_sum / jnp.maximum(examples, 1.0), aux

  return loss_fn


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
  batch: Batch,
  *,
  loss_fn: LossFn,
  policy: Policy | None = None,
  micro_batches: int = 1,
  freeze_mask=None,
  normalize_by: str = "examples",
  rows_spec: RowSparseEmbedding | None = None,
):
  if policy is not None:
    _check_policy(state, policy)
  ls = state.loss_scale
  # Differentiate the trainable partition only: XLA then never builds the frozen weights' gradients, nor any
  # backward below the lowest trainable layer.
  if freeze_mask is None:
    trainable, frozen = state.params, None
  else:
    trainable, frozen = freezing.split(state.params, freeze_mask)
  extra_args = {}
  if find_row_sparse_state(state.opt_state) != (rows_spec is not None):
    raise ValueError(
      "the optimizer and the step disagree about row-sparse embeddings: build both or neither, "
      "make_optimizer(OptimizerConfig(row_sparse_embeddings='exact' or 'lazy'), ...) with "
      "make_train_step(..., row_sparse=row_sparse_embedding(model))"
    )
  if rows_spec is not None:
    # The table becomes the batch's rows and the batch indexes into them (`jfast.row_sparse`).
    trainable, batch, rows = compact_params_and_batch(trainable, batch, rows_spec.path)
    loss_fn = rows_spec.make_loss(rows.shape[0])
    extra_args = {"rows": rows}

  def apply_gradients(st, grads):
    if not extra_args:
      return st.apply_gradients(grads=grads)
    updates, opt_state = st.tx.update(grads, st.opt_state, st.params, **extra_args)
    # The lazy table update is rows only (`RowUpdate`), scattered in place.
    return st.replace(step=st.step + 1, params=apply_updates(st.params, updates), opt_state=opt_state)

  def scaled_loss_fn(params, batch, rng, deterministic):
    if freeze_mask is not None:
      params = freezing.merge(params, frozen, freeze_mask)
    loss, aux = loss_fn(params, batch, rng, deterministic)
    if policy is not None:
      loss = policy.cast_to_output(loss)
    return ls.scale(loss), (loss, aux)

  if micro_batches == 1:
    (_, (loss, aux)), grads = jax.value_and_grad(scaled_loss_fn, has_aux=True)(
      trainable, batch, state.dropout_key(), False
    )
  else:

    def merged_loss_fn(params, batch, rng, deterministic):
      return scaled_loss_fn(params, batch, rng, deterministic)[1]

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


def _eval_step(params, batch: Batch, *, loss_fn: LossFn):
  _, aux = loss_fn(params, batch, None, True)
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
  row_sparse: RowSparseEmbedding | None = None,
) -> CompiledStep:
  """Builds the jitted train step ``(state, batch) -> (state, metrics)``.

  The step scales the loss by ``state.loss_scale``, unscales the gradients in float32 and, under loss scaling,
  skips a step whose gradients are not all finite: params and optimizer state stay bit for bit as they were,
  ``state.step`` still advances (it counts batches), and the scale adjusts. Metrics include ``loss_scale`` (the
  scale this step used) and ``skipped`` (1.0 for a skipped step).

  Args:
    loss_fn: ``(params, batch, rng, deterministic) -> (loss, aux)``, e.g. from `classification_loss`.
    policy: a precision policy (`jfast.get_policy` spec). The loss is cast to its output dtype, and the first call
      checks that the state's parameters are in its param dtype (fails) and that a float16 policy has loss scaling
      (warns). The compute dtype is the model's (``policy.configure(config)``). None: no checks.
    micro_batches: accumulate gradients over this many consecutive row blocks of each batch inside the step (a
      `lax.scan`; activation memory of one block), normalising by the whole batch's real count (`normalize_by`),
      so the update equals the full batch's. The batch's rows must divide by it.
    freeze_mask: from `jfast.freezing.freeze_mask` (True = frozen): gradients are taken for the trainable
      partition only. Build the optimizer with `jfast.freezing.freeze(tx, mask)` so frozen leaves keep no state.
    normalize_by: ``examples`` or ``tokens``: what the accumulated loss is averaged over.
    state_sharding: sharding (or pytree of shardings) of the `TrainState`; None lets JAX place it.
    batch_sharding: sharding of the `Batch`; None lets JAX place it.
    donate: donate the input state's buffers, so the update happens in place and peak memory holds one state.
    mesh: a `jfast.sharding.make_mesh` mesh: the step compiles with in/out shardings from ``rules`` (state laid
      out as `create_train_state(..., mesh=mesh)` makes it, batch rows over data x fsdp, metrics replicated);
      a batch whose rows do not divide over the data axes fails with a `ValueError`. Replaces the two shardings.
    rules: `jfast.sharding.ShardingRules` (default: the library's table).
    compiler_options: XLA options for this step's compilation, e.g. `jfast.remat.compiler_options(policy)`, which
      remat needs on CPU to save any memory.
    row_sparse: from `jfast.row_sparse.row_sparse_embedding(model)`: the word table's gradient is taken for the
      batch's rows only, and the optimizer (``OptimizerConfig(row_sparse_embeddings="exact")``) scatters it into
      its moments: the same AdamW update without a table-sized gradient (``"lazy"``: SparseAdam's update instead).
      ``loss_fn`` is then unused: the spec's ``make_loss`` builds the loss of the model with a compact table.

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
  if not isinstance(micro_batches, int) or micro_batches < 1:
    raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}")
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
    rows_spec=row_sparse,
  )
  return CompiledStep(step, mesh=mesh, rules=rules, **jit_kwargs)


def make_eval_step(
  loss_fn: LossFn,
  *,
  param_sharding=None,
  batch_sharding=None,
  mesh: Mesh | None = None,
  rules: ShardingRules | None = None,
) -> CompiledStep:
  """Builds the jitted eval step ``(params, batch) -> sums`` (dropout off); add the sums over batches.

  With ``mesh``, params are laid out by ``rules``, batch rows over data x fsdp, and the sums come back replicated.
  """
  jit_kwargs: dict[str, Any] = {}
  if param_sharding is not None or batch_sharding is not None:
    jit_kwargs.update(in_shardings=(param_sharding, batch_sharding))
  if mesh is not None:
    loss_fn = mesh_jit.gather_params(loss_fn, mesh, rules)
  return CompiledStep(functools.partial(_eval_step, loss_fn=loss_fn), mesh=mesh, rules=rules, **jit_kwargs)
