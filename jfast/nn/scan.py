"""Scanned layers: a model's identical layers run as one ``nn.scan`` over parameters stacked on a leading axis.

XLA then compiles one layer body instead of N copies, so compile time and program size stop growing with depth
(`benchmarks.compile_depth`), and the remat policy applies to each layer as before (``nn.remat`` inside the scan,
as MaxText does). Layers that differ (per-layer sizes after structured pruning, quantized layers, BERT's
classifier-only last layer) stay outside the scan.

Parameter layout: a stacked group holds layers ``0..K-1`` of one model under one name, each leaf with a leading
layer axis (``encoder_layers/query/kernel: [K, D, D]``); the layers after it keep their own modules
(``encoder_layer_K``). `STACKED_GROUPS` names each group and the per-layer modules it stands for, so that code
that works layer by layer (Hugging Face I/O, pruning, distillation's layer maps, freezing by layer) reads the
unstacked view `unstack_layers` gives, and `match_layout` converts any tree into the layout a config runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jfast.nn.remat import remat_policy
from jfast.paths import compile_patterns, param_paths

# Stacked group name -> the prefix of the per-layer modules it holds (layer i is f"{prefix}{i}").
STACKED_GROUPS: Mapping[str, str] = {"encoder_layers": "encoder_layer_", "h": "h_", "layers": "layers_"}


def scan_layers(
  layer_cls: type[nn.Module], length: int, *, remat: str, static_argnum: int, broadcast: int, unroll: int = 1
):
  """``layer_cls`` as ``length`` layers under one `nn.scan`, each rematerialised by the policy named ``remat``.

  Args:
    layer_cls: a module whose ``__call__(carry, *args)`` returns ``(carry, None)`` (the layer's output is the
      carry: the next layer's input).
    length: layers in the scan.
    remat: a key of `jfast.nn.REMAT_POLICIES` (``none``: no remat).
    static_argnum: the position of the ``deterministic`` flag among the call's arguments, counting the module as
      0: it must stay a Python bool under remat.
    broadcast: how many arguments after the carry every layer shares (segment ids, positions, the flag).
    unroll: layers per loop iteration (`jax.lax.scan`'s ``unroll``); ``length`` gives straight-line code over the
      stacked parameters: the unrolled step's speed and compile time, in the scanned layout.

  Returns:
    A module class with the same constructor arguments; its parameters and ``intermediates`` carry a leading
    layer axis, and each layer draws its own ``params`` and ``dropout`` keys.
  """
  cls = layer_cls
  if remat != "none":
    cls = nn.remat(layer_cls, policy=remat_policy(remat), static_argnums=(static_argnum,), prevent_cse=False)
  return nn.scan(
    cls,
    # "cache": a decoder's per-layer key/value cache during generation (`jfast.models.llama`).
    variable_axes={"params": 0, "intermediates": 0, "cache": 0},
    split_rngs={"params": True, "dropout": True},
    in_axes=(nn.broadcast,) * broadcast,
    length=length,
    unroll=min(unroll, length),
  )


def _stacked_size(group) -> int | None:
  leaves = jax.tree.leaves(group)
  if not isinstance(group, Mapping) or not leaves:
    return None
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  return sizes.pop() if len(sizes) == 1 else None


def unstack_layers(tree):
  """The per-layer view of a parameter tree (or a tree of the same structure: gradients, masks, optimizer moments).

  Every stacked group (`STACKED_GROUPS`) becomes its layers' own modules, ``encoder_layers`` of K layers ->
  ``encoder_layer_0..K-1``; other entries are kept as they are. Differentiable (plain indexing), so a loss may
  run a model unrolled on the per-layer view of stacked parameters. A tree without stacked groups comes back
  unchanged.

  Example:
    >>> tree = {"encoder_layers": {"w": np.zeros((2, 3))}, "encoder_layer_2": {"w": np.ones(3)}}
    >>> sorted(unstack_layers(tree))
    ['encoder_layer_0', 'encoder_layer_1', 'encoder_layer_2']
  """
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for key, value in tree.items():
    prefix = STACKED_GROUPS.get(key)
    count = _stacked_size(value) if prefix is not None else None
    if count is None:
      out[key] = unstack_layers(value)
      continue
    for i in range(count):
      name = f"{prefix}{i}"
      if name in tree:
        raise ValueError(f"{key!r} stacks layer {i} but the tree also holds {name!r}: the layout is ambiguous")
      out[name] = jax.tree.map(lambda x, i=i: x[i], value)
  return out


def stack_layers(tree, group: str, count: int):
  """Stacks the per-layer modules ``{prefix}0..count-1`` of ``group`` into one entry (the inverse of
  `unstack_layers` for those layers). ``count`` 0 returns ``tree`` unchanged.

  Raises:
    ValueError: when a layer is missing or the layers' parameters differ in structure or shape (layers that
      differ cannot share a scan).
  """
  prefix = STACKED_GROUPS[group]
  if count == 0 or not isinstance(tree, Mapping):
    return tree
  if f"{prefix}0" not in tree:
    return {k: stack_layers(v, group, count) for k, v in tree.items()}
  missing = [i for i in range(count) if f"{prefix}{i}" not in tree]
  if missing:
    raise ValueError(f"cannot stack {group!r}: the tree has no {prefix}{missing[0]}")
  layers = [tree[f"{prefix}{i}"] for i in range(count)]
  first = jax.tree.map(np.shape, layers[0])
  for i, layer in enumerate(layers[1:], 1):
    if jax.tree.map(np.shape, layer) != first:
      raise ValueError(
        f"cannot stack {group!r}: {prefix}{i} differs in parameters or shapes from {prefix}0 (a pruned or "
        "quantized layer); such layers run unrolled (scan_layers=False)"
      )

  def stack(*xs):
    return np.stack(xs) if all(isinstance(x, np.ndarray | np.generic) for x in xs) else jnp.stack(xs)

  def index(key):
    rest = key[len(prefix) :] if key.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None

  out = {k: v for k, v in tree.items() if index(k) is None}
  out[group] = jax.tree.map(stack, *layers)
  out.update({k: v for k, v in tree.items() if index(k) is not None and index(k) >= count})
  return out


def match_layout(config, tree):
  """``tree`` (any layout) in the layout ``config`` runs: its first ``config.stacked_layers`` layers stacked under
  ``config.layer_group``, the rest per layer. A no-op when it already is."""
  return stack_layers(unstack_layers(tree), config.layer_group, config.stacked_layers)


def check_patterns_outside_stacks(tree, patterns, what: str) -> None:
  """Raises when a path pattern selects some of the layers stacked in one array (freezing or pruning part of a
  scan), naming the way out; a pattern that selects a whole stack, or layers outside stacks, passes.

  Example:
    >>> tree = {"encoder_layers": {"w": np.zeros((2, 3))}}
    >>> check_patterns_outside_stacks(tree, ["encoder_layers"], "freeze")
  """
  stacked = set(_group_counts(tree))
  if not stacked:
    return
  paths, per_layer = param_paths(tree), param_paths(unstack_layers(tree))
  for pattern, regex in compile_patterns(patterns, what):
    if any(regex.search(p) for p in paths):
      continue
    inside = [p for p in per_layer if regex.search(p) and p not in paths]
    if inside:
      group = next(g for g in stacked if STACKED_GROUPS[g] in inside[0])
      raise ValueError(
        f"{what} pattern {pattern!r} selects layers stacked under {group!r} (scanned layers share one array per "
        f"parameter, e.g. {inside[0]!r}); build the model with scan_layers=False and convert the parameters with "
        f"jfast.unstack_layers, or select the whole stack with {group!r}"
      )


def unrolled(model: nn.Module, params):
  """``(model, params)`` with every layer unrolled: the model with ``scan_layers=False`` and the per-layer view of
  its parameters, for code that reads or intercepts one layer at a time (activation calibration, per-layer hidden
  states, head gates). Differentiable in ``params``; a model without ``scan_layers`` is returned as it is."""
  config = getattr(model, "config", None)
  if getattr(config, "scan_layers", False):
    model = model.clone(config=config.replace(scan_layers=False))
  return model, unstack_layers(params)


def restack_like(tree, like):
  """The per-layer ``tree`` stacked as ``like`` is (the same groups, the same layer counts): how a function that
  works on `unstack_layers`'s view hands back a result in its caller's layout."""
  for group, count in _group_counts(like).items():
    tree = stack_layers(tree, group, count)
  return tree


def _group_counts(tree) -> dict[str, int]:
  counts: dict[str, int] = {}
  if isinstance(tree, Mapping):
    for key, value in tree.items():
      size = _stacked_size(value) if key in STACKED_GROUPS else None
      if size is not None:
        counts[key] = size
      else:
        counts.update(_group_counts(value))
  return counts
