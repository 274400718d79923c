"""Loss scaling for float16 training, as pytrees whose methods return new values (no hidden state).

float16 represents nothing below about 6e-8, so small gradients flowing back through float16 activations round to
zero. Multiplying the loss by a large scale lifts them into range; the gradients are divided by it again in float32
before the optimizer sees them. `DynamicLossScale` finds the largest scale that does not overflow: a step whose
gradients hold an inf or NaN is skipped and the scale shrinks; after ``period`` finite steps in a row it grows.

Every field survives `jax.jit` and `jax.tree.flatten`/`unflatten`: the scale and counter are leaves, the
hyper-parameters are static fields of the tree definition. (jmp's ``DynamicLossScale`` drops ``min_loss_scale``
when flattened, so under jit it silently falls back to the default.)

    ls = DynamicLossScale(2.0**15)
    loss, grads = jax.value_and_grad(lambda p: ls.scale(loss_fn(p)))(params)
    grads = ls.unscale(grads)
    finite = all_finite(grads)
    params = select_tree(finite, optax.apply_updates(params, updates), params)
    ls = ls.adjust(finite)
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jfast.precision.policy import Policy, get_policy


def _is_host_number(x) -> bool:
  # Only host values are checked and normalised. Leaves are tracers inside jit, ShapeDtypeStructs under orbax's
  # restore targets, and device arrays when a jitted step returns: reading those back here would block on the
  # device each time a state is unflattened, so they pass through as they are.
  return isinstance(x, int | float | np.ndarray | np.generic)


def _leaf(x, dtype, name: str, *, positive: bool):
  """Normalises a concrete leaf to a 0-d host array of ``dtype`` and checks it; passes anything else through."""
  if not _is_host_number(x):
    return x
  if np.ndim(x) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(x)}")
  value = float(x)
  if not math.isfinite(value) or (value <= 0 if positive else value < 0):
    raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'} and finite, got {value}")
  # A 0-d numpy array of a fixed dtype, not a Python number: jit would trace a Python float as weakly typed, and
  # the strongly typed value the step returns would then trigger a second compilation.
  return np.asarray(x, dtype)


def _scale_tree(tree, factor):
  return jax.tree.map(lambda x: x * jnp.asarray(factor, jnp.float32).astype(x.dtype), tree)


def _unscale_tree(tree, scale):
  # Divide in float32: 2**16 is already inf in float16, and float16 or bfloat16 gradients would round on the way.
  inv = 1.0 / jnp.asarray(scale, jnp.float32)
  return jax.tree.map(lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype), tree)


@struct.dataclass
class NoOpLossScale:
  """No loss scaling: `scale` and `unscale` return their input; the train step never checks or skips.

  Example:
    >>> ls = NoOpLossScale()
    >>> float(ls.scale(jnp.float32(3.0)))
    3.0
  """

  @property
  def loss_scale(self) -> jax.Array:
    return jnp.ones((), jnp.float32)

  def scale(self, tree):
    return tree

  def unscale(self, tree):
    return tree

  def adjust(self, grads_finite: jax.Array) -> NoOpLossScale:
    del grads_finite
    return self


@struct.dataclass
class StaticLossScale:
  """A fixed loss scale. The train step still skips a step whose gradients are not finite (the scale never moves).

  Attributes:
    loss_scale: the factor the loss is multiplied by (positive).

  Example:
    >>> ls = StaticLossScale(128.0)
    >>> float(ls.unscale(ls.scale(jnp.float32(3.0))))
    3.0
  """

  loss_scale: Any = 2.0**15

  def __post_init__(self):
    object.__setattr__(self, "loss_scale", _leaf(self.loss_scale, np.float32, "loss_scale", positive=True))

  def scale(self, tree):
    return _scale_tree(tree, self.loss_scale)

  def unscale(self, tree):
    return _unscale_tree(tree, self.loss_scale)

  def adjust(self, grads_finite: jax.Array) -> StaticLossScale:
    del grads_finite
    return self


@struct.dataclass
class DynamicLossScale:
  """A loss scale that shrinks on overflow and grows while gradients stay finite (PyTorch's ``GradScaler`` rule).

  `adjust` divides the scale by ``factor`` after a step with non-finite gradients (never below ``min_scale``) and
  multiplies it by ``factor`` after ``period`` consecutive finite steps (never above ``max_scale``).

  Attributes:
    loss_scale: the current scale (a float32 leaf).
    counter: finite steps since the last change (an int32 leaf).
    period: finite steps before the scale grows (static).
    factor: growth and back-off factor, greater than 1; 2 halves on overflow (static).
    min_scale: lower bound (static).
    max_scale: upper bound (static).

  Example:
    >>> ls = DynamicLossScale(1024.0, period=2)
    >>> float(ls.adjust(jnp.bool_(False)).loss_scale)
    512.0
    >>> float(ls.adjust(jnp.bool_(True)).adjust(jnp.bool_(True)).loss_scale)
    2048.0
  """

  loss_scale: Any = 2.0**15
  counter: Any = 0
  period: int = struct.field(pytree_node=False, default=2000)
  factor: float = struct.field(pytree_node=False, default=2.0)
  min_scale: float = struct.field(pytree_node=False, default=1.0)
  max_scale: float = struct.field(pytree_node=False, default=2.0**24)

  def __post_init__(self):
    set_ = object.__setattr__
    set_(self, "loss_scale", _leaf(self.loss_scale, np.float32, "loss_scale", positive=True))
    set_(self, "counter", _leaf(self.counter, np.int32, "counter", positive=False))
    if isinstance(self.period, bool) or int(self.period) != self.period or self.period < 1:
      raise ValueError(f"period must be a positive integer, got {self.period!r}")
    if not self.factor > 1 or not math.isfinite(self.factor):
      raise ValueError(f"factor must be a finite number greater than 1, got {self.factor!r}")
    if not 0 < self.min_scale <= self.max_scale or not math.isfinite(self.max_scale):
      raise ValueError(
        f"need 0 < min_scale <= max_scale < inf, got min_scale={self.min_scale!r}, max_scale={self.max_scale!r}"
      )
    # Static fields hash into the jit cache key: plain Python numbers keep equal configs equal.
    set_(self, "period", int(self.period))
    for name in ("factor", "min_scale", "max_scale"):
      set_(self, name, float(getattr(self, name)))
    if _is_host_number(self.loss_scale) and not self.min_scale <= float(self.loss_scale) <= self.max_scale:
      raise ValueError(
        f"loss_scale {float(self.loss_scale)} is outside [min_scale, max_scale] = [{self.min_scale}, {self.max_scale}]"
      )

  def scale(self, tree):
    return _scale_tree(tree, self.loss_scale)

  def unscale(self, tree):
    return _unscale_tree(tree, self.loss_scale)

  def adjust(self, grads_finite: jax.Array) -> DynamicLossScale:
    """Returns the scale for the next step, given whether this step's gradients were all finite."""
    grads_finite = jnp.asarray(grads_finite, bool)
    scale = jnp.asarray(self.loss_scale, jnp.float32)
    counter = jnp.asarray(self.counter, jnp.int32) + 1
    grow = grads_finite & (counter >= self.period)
    grown = jnp.minimum(scale * self.factor, self.max_scale)
    shrunk = jnp.maximum(scale / self.factor, self.min_scale)
    new_scale = jnp.where(grads_finite, jnp.where(grow, grown, scale), shrunk)
    new_counter = jnp.where(grads_finite & ~grow, counter, 0).astype(jnp.int32)
    return self.replace(loss_scale=new_scale, counter=new_counter)


LossScale = NoOpLossScale | StaticLossScale | DynamicLossScale


def all_finite(tree) -> jax.Array:
  """True (a bool scalar) when no leaf of ``tree`` holds an inf or NaN; True for an empty tree.

  Example:
    >>> bool(all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])}))
    False
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.bool_(True)
  return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


def select_tree(pred: jax.Array, on_true, on_false):
  """Picks ``on_true`` or ``on_false`` leaf by leaf with one scalar predicate, exactly (no arithmetic).

  Args:
    pred: a bool scalar.
    on_true: a pytree.
    on_false: a pytree of the same structure, shapes and dtypes.

  Returns:
    ``on_true`` where ``pred`` holds, else ``on_false``, bit for bit.

  Example:
    >>> select_tree(jnp.bool_(False), {"w": jnp.ones(2)}, {"w": jnp.zeros(2)})["w"].tolist()
    [0.0, 0.0]
  """
  if jnp.shape(pred) != ():
    raise ValueError(f"select_tree needs a scalar predicate, got shape {jnp.shape(pred)}")
  if jax.tree.structure(on_true) != jax.tree.structure(on_false):
    raise ValueError("select_tree needs two trees of the same structure")
  return jax.tree.map(lambda a, b: jax.lax.select(jnp.asarray(pred, bool), a, b), on_true, on_false)


def get_loss_scale(spec: str | LossScale) -> LossScale:
  """Builds a loss scale from a word: ``none``, ``dynamic``, ``dynamic:<initial>`` or ``static:<scale>``.

  Example:
    >>> float(get_loss_scale("static:1024").loss_scale)
    1024.0
  """
  if isinstance(spec, NoOpLossScale | StaticLossScale | DynamicLossScale):
    return spec
  if not isinstance(spec, str):
    raise TypeError(f"a loss scale is a string or a loss-scale object, got {type(spec).__name__}")
  kind, sep, value = spec.strip().lower().partition(":")
  if kind == "none" and not sep:
    return NoOpLossScale()
  if kind in ("dynamic", "static"):
    try:
      initial = float(value) if sep else 2.0**15
    except ValueError:
      raise ValueError(f"loss scale {spec!r}: {value!r} is not a number") from None
    return DynamicLossScale(initial) if kind == "dynamic" else StaticLossScale(initial)
  raise ValueError(f"unknown loss scale {spec!r}; expected none, dynamic, dynamic:<initial> or static:<scale>")


def resolve_loss_scale(policy: str | Policy | None, loss_scale: str | LossScale | None) -> LossScale:
  """The loss scale a run uses: ``loss_scale`` when given, else what ``policy`` needs.

  float16 policies default to `DynamicLossScale`; every other policy to `NoOpLossScale`. Turning scaling off under a
  float16 policy is allowed, with a warning.

  Args:
    policy: a `Policy`, a policy string, or None (fp32).
    loss_scale: a loss-scale object or word (see `get_loss_scale`), or None for the policy's default.

  Returns:
    A loss-scale pytree.

  Example:
    >>> type(resolve_loss_scale("fp16", None)).__name__
    'DynamicLossScale'
  """
  policy = get_policy(policy)
  if loss_scale is None:
    return DynamicLossScale() if policy.needs_loss_scale else NoOpLossScale()
  loss_scale = get_loss_scale(loss_scale)
  if policy.needs_loss_scale and isinstance(loss_scale, NoOpLossScale):
    warnings.warn(
      f"precision policy {policy} computes in float16 without loss scaling: gradients below ~6e-8 become zero. "
      "Pass loss_scale=None (dynamic scaling) unless this is intended.",
      stacklevel=2,
    )
  return loss_scale
