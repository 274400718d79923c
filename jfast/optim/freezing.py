"""Layer freezing by masks: pick frozen parameters by path, train only the rest.

Two halves, both driven by one boolean mask tree (True = frozen):
- the optimizer: `freeze(tx, mask)` routes frozen leaves to `optax.set_to_zero()` through `optax.multi_transform`,
  so they keep no optimizer state and never move (AdamW's weight decay included);
- the step: `make_train_step(..., freeze_mask=mask)` asks `jax.grad` for the trainable partition only, so XLA never
  builds the frozen parameters' weight gradients, and below the lowest trainable layer no backward at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax

from jfast.nn.scan import STACKED_GROUPS, check_patterns_outside_stacks
from jfast.paths import match_paths, param_paths


def freeze_mask(params, patterns: Sequence[str] = (), *, bottom_layers: int | None = None):
  """Builds the frozen-parameter mask.

  Args:
    params: the parameter tree.
    patterns: regular expressions matched against whole path components (`jfast.paths`): ``embeddings`` freezes
      everything under any ``embeddings`` module; ``encoder_layer_[0-3]`` the bottom four layers; ``bert/pooler/.*``
      one module. Scanned layers share one array per parameter (`jfast.nn.scan`): a pattern may select the whole
      stack (``encoder_layers``) but not some of its layers (a clear error says how to unroll them).
    bottom_layers: freeze the embeddings and the bottom N layers (the usual fine-tuning recipe), named as the model
      names them: BERT's ``embeddings`` and ``encoder_layer_i``, Llama's ``embed_tokens`` and ``layers_i``, GPT's
      ``wte``/``wpe`` and ``h_i``.

  Returns:
    A pytree of Python bools with the structure of ``params`` (True = frozen).

  Example:
    >>> mask = freeze_mask(params, ["embeddings", "encoder_layer_[0-2]"])  # doctest: +SKIP
  """
  patterns = list(patterns)
  if bottom_layers is not None:
    if bottom_layers < 0:
      raise ValueError(f"bottom_layers must be >= 0, got {bottom_layers}")
    patterns += _bottom_patterns(params, bottom_layers)
  if not patterns:
    raise ValueError("freeze_mask needs at least one pattern or bottom_layers")
  check_patterns_outside_stacks(params, patterns, "freeze")
  frozen = match_paths(param_paths(params), patterns, "freeze")
  if all(frozen):
    raise ValueError("the freeze patterns match every parameter: nothing would train")
  return jax.tree.unflatten(jax.tree.structure(params), frozen)


STACKED_GROUPS_BY_PREFIX = {prefix: group for group, prefix in STACKED_GROUPS.items()}
# (per-layer module prefix, embedding modules) of each model family, for ``bottom_layers``.
_FAMILIES = (("encoder_layer_", ("embeddings",)), ("layers_", ("embed_tokens",)), ("h_", ("wte", "wpe")))


def _bottom_patterns(params, count: int) -> list[str]:
  names = {part for path in param_paths(params) for part in path.split("/")}
  for prefix, tables in _FAMILIES:
    group = STACKED_GROUPS_BY_PREFIX.get(prefix)
    if f"{prefix}0" in names or group in names:
      return [t for t in tables if t in names] + [f"{prefix}{i}" for i in range(count)]
  return ["embeddings"] + [f"encoder_layer_{i}" for i in range(count)]


def freeze(tx: optax.GradientTransformation, mask) -> optax.GradientTransformation:
  """Wraps ``tx`` so frozen leaves get zero updates and no optimizer state.

  Args:
    tx: the optimizer for the trainable parameters (any optax transformation, 8-bit ones included).
    mask: from `freeze_mask` (True = frozen).

  Returns:
    An `optax.multi_transform` of ``tx`` (trainable) and ``set_to_zero`` (frozen).
  """
  labels = jax.tree.map(lambda frozen: "frozen" if frozen else "trainable", mask)
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def split(params, mask):
  """Splits ``params`` into (trainable, frozen) trees; the other side's leaves are None."""
  trainable = jax.tree.map(lambda p, frozen: None if frozen else p, params, mask)
  frozen = jax.tree.map(lambda p, frozen: p if frozen else None, params, mask)
  return trainable, frozen


def merge(trainable, frozen, mask):
  """Inverse of `split`."""
  return jax.tree.map(
    lambda is_frozen, t, f: f if is_frozen else t, mask, trainable, frozen, is_leaf=lambda x: x is None
  )
