"""Flax NNX modules as a pure function of a parameter dict, so they train through jfast's step builders.

jfast's steps differentiate a pytree of parameters and call a loss function; an NNX module holds its parameters as
object state. `nnx_split` separates the two: the parameters become a plain nested dict (paths like
``blocks/0/linear/kernel``, the form freezing patterns, sharding rules, precision casts and optimizers read) and the
module's structure becomes ``apply(params, *args, **kwargs)``, which rebuilds the module from them for one call.
Non-parameter state (batch statistics, RNG counters) is held fixed at what it was when split.

    apply, params = nnx_split(MyModel(nnx.Rngs(0)))
    def loss_fn(params, batch, rng, deterministic):
      logits = apply(params, batch.x)
      ...
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx


def nnx_split(module: nnx.Module) -> tuple[Callable, dict]:
  """``(apply, params)``: a pure function of a plain parameter dict that calls ``module``, and that dict.

  Example:
    >>> apply, params = nnx_split(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
    >>> sorted(params), apply(params, jax.numpy.ones((3, 4))).shape
    (['bias', 'kernel'], (3, 2))
  """
  if not isinstance(module, nnx.Module):
    raise TypeError(f"nnx_split takes a flax.nnx.Module, got {type(module).__name__}")
  graphdef, state, rest = nnx.split(module, nnx.Param, ...)
  params = nnx.to_pure_dict(state)

  def apply(params, *args, **kwargs):
    bound = nnx.clone(state)
    nnx.replace_by_pure_dict(bound, params)
    return nnx.merge(graphdef, bound, rest)(*args, **kwargs)

  return apply, params
