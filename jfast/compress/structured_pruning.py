"""Structured pruning of BERT: score attention heads and FFN neurons, pick the survivors, cut them out.

A head owns ``head_dim`` columns of the query/key/value kernels (and biases) and the same rows of the attention
output kernel; an FFN neuron owns one column (and bias) of ``intermediate`` and one row of ``output``. Removing
them shrinks real matrix dimensions, which is the only kind of pruning that makes a dense CPU/GPU matmul faster.
`shrink` returns a smaller `BertConfig` (per-layer head counts and FFN widths) and dense parameters that
`BertModel` runs directly; `jfast.models.pad_to_uniform` re-expands them with zeros for formats with one size per
model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jfast.compress.pruning_masks import apply_mask
from jfast.data.batch import Batch
from jfast.models.bert import BertConfig
from jfast.nn.scan import restack_like, unrolled, unstack_layers
from jfast.training.losses import classification_loss

_HEAD_COLUMNS = ("query", "key", "value")


class Importance(NamedTuple):
  """Scores per encoder layer: ``heads[l]`` is ``float[H_l]``, ``neurons[l]`` is ``float[F_l]`` (higher = keep)."""

  heads: tuple[np.ndarray, ...]
  neurons: tuple[np.ndarray, ...]


class Structure(NamedTuple):
  """What survives, per encoder layer: ``heads[l]`` is ``bool[H_l]``, ``neurons[l]`` is ``bool[F_l]`` (True = keep)."""

  heads: tuple[np.ndarray, ...]
  neurons: tuple[np.ndarray, ...]


def _encoder(params) -> dict:
  return params.get("bert", params)


def _with_encoder(params, encoder) -> dict:
  return {**params, "bert": encoder} if "bert" in params else encoder


def _layers(config: BertConfig, params) -> list[dict]:
  enc = _encoder(unstack_layers(params))
  missing = [i for i in range(config.num_hidden_layers) if f"encoder_layer_{i}" not in enc]
  if missing:
    raise ValueError(f"params have no encoder_layer_{missing[0]}: they do not belong to this config")
  return [jax.device_get(enc[f"encoder_layer_{i}"]) for i in range(config.num_hidden_layers)]


def magnitude_importance(config: BertConfig, params) -> Importance:
  """L2 norm of the weights each head and each FFN neuron owns (biases included).

  Example:
    >>> scores = magnitude_importance(config, params)  # doctest: +SKIP
  """
  heads, neurons = [], []
  d = config.head_dim
  for layer in _layers(config, params):
    sq = sum(np.asarray(layer[n]["kernel"], np.float64) ** 2 for n in _HEAD_COLUMNS).sum(0)
    sq = sq + sum(np.asarray(layer[n]["bias"], np.float64) ** 2 for n in _HEAD_COLUMNS)
    sq = sq + (np.asarray(layer["attention_output"]["kernel"], np.float64) ** 2).sum(1)
    heads.append(np.sqrt(sq.reshape(-1, d).sum(1)))
    sq = (np.asarray(layer["intermediate"]["kernel"], np.float64) ** 2).sum(0)
    sq = sq + np.asarray(layer["intermediate"]["bias"], np.float64) ** 2
    neurons.append(np.sqrt(sq + (np.asarray(layer["output"]["kernel"], np.float64) ** 2).sum(1)))
  return Importance(tuple(heads), tuple(neurons))


def _gate_interceptor(gates: dict, head_dim: int):
  """Multiplies each head's context vectors / each FFN neuron's activation by a per-row gate (1.0 = unchanged)."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    index = getattr(module.parent, "index", None)
    if context.method_name != "__call__" or index is None or module.name not in ("attention_output", "output"):
      return next_fun(*args, **kwargs)
    x_BxLxF = args[0]
    if module.name == "attention_output":
      gate_BxF = jnp.repeat(gates["heads"][index], head_dim, axis=1)
    else:
      gate_BxF = gates["neurons"][index]
    return next_fun(x_BxLxF * gate_BxF[:, None, :].astype(x_BxLxF.dtype), *args[1:], **kwargs)

  return interceptor


def gradient_importance(
  model: nn.Module, params, batches: Iterable[Batch], *, normalize_layers: bool = True
) -> Importance:
  """Michel et al. (2019) importance: ``sum over examples |d loss / d gate|`` for a gate on every head and neuron.

  Gates are per batch row, so an unpacked batch (one example per row) gives the per-example absolute values Michel
  et al. accumulate; a packed row sums its examples first. The gates are put in by Flax method interception on the
  ``attention_output`` and ``output`` projections' inputs, so the model carries no pruning code.

  Args:
    model: a `BertForSequenceClassification` (its ``config`` gives the layer sizes).
    params: its parameters.
    batches: a few labelled `Batch`es of training data (a few hundred examples are enough to rank).
    normalize_layers: divide each layer's scores by their L2 norm (Michel et al.), which makes scores comparable
      across layers for a global ranking.

  Returns:
    `Importance`.

  Example:
    >>> scores = gradient_importance(model, params, batches[:8])  # doctest: +SKIP
  """
  config: BertConfig = model.config
  model, params = unrolled(model, params)  # gates go on each layer's own modules
  loss_fn = classification_loss(model)

  @jax.jit
  def abs_grads(params, batch):
    rows = batch.input_ids.shape[0]
    sizes = [config.layer_sizes(i) for i in range(config.num_hidden_layers)]
    gates = {
      "heads": [jnp.ones((rows, h), jnp.float32) for h, _ in sizes],
      "neurons": [jnp.ones((rows, f), jnp.float32) for _, f in sizes],
    }

    def summed_loss(gates):
      with nn.intercept_methods(_gate_interceptor(gates, config.head_dim)):
        _, aux = loss_fn(params, batch, None, True)
      return aux["loss_sum"]

    grads = jax.grad(summed_loss)(gates)
    return jax.tree.map(lambda g: jnp.abs(g).sum(0), grads)

  totals = None
  for batch in batches:
    sums = abs_grads(params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError("gradient_importance needs at least one batch")
  totals = jax.device_get(totals)
  heads = [np.asarray(h, np.float64) for h in totals["heads"]]
  neurons = [np.asarray(n, np.float64) for n in totals["neurons"]]
  if normalize_layers:
    heads = [h / max(np.linalg.norm(h), 1e-30) for h in heads]
    neurons = [n / max(np.linalg.norm(n), 1e-30) for n in neurons]
  return Importance(tuple(heads), tuple(neurons))


def _check_fraction(name: str, value: float) -> None:
  if not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be in [0, 1) (the fraction removed), got {value}")


def _drop_lowest(scores: list[np.ndarray], fraction: float, scope: str, floor: int) -> list[np.ndarray]:
  keep = [np.ones(s.shape, bool) for s in scores]
  if scope == "layer":
    for k, s in zip(keep, scores, strict=True):
      k[np.argsort(s, kind="stable")[: round(fraction * s.size)]] = False
    return keep
  if scope != "global":
    raise ValueError(f"unknown structured scope {scope!r}; expected 'global' or 'layer'")
  todo = round(fraction * sum(s.size for s in scores))
  flat = [(v, li, j) for li, s in enumerate(scores) for j, v in enumerate(s)]
  for _, li, j in sorted(flat, key=lambda t: t[0]):
    if todo == 0:
      break
    if keep[li].sum() > floor:  # a layer keeps at least `floor` units; the next-lowest elsewhere goes instead
      keep[li][j] = False
      todo -= 1
  if todo:
    raise ValueError(f"cannot remove that many units while keeping {floor} per layer")
  return keep


def select(
  importance: Importance,
  *,
  heads: float = 0.0,
  neurons: float = 0.0,
  head_scope: str = "global",
  neuron_scope: str = "layer",
  min_heads: int = 1,
) -> Structure:
  """Keeps the most important heads and neurons.

  Args:
    importance: from `magnitude_importance` or `gradient_importance`.
    heads: fraction of all heads to remove, in [0, 1).
    neurons: fraction of all FFN neurons to remove, in [0, 1).
    head_scope: ``global`` ranks heads across layers (layers keep different counts); ``layer`` removes the same
      fraction from each.
    neuron_scope: ``layer`` (default) removes the same fraction of neurons in every layer, so the shrunk model keeps
      one FFN width, which Hugging Face's BertConfig can express; ``global`` ranks across layers.
    min_heads: heads every layer keeps under a global ranking (a layer needs at least one head to run).

  Returns:
    A `Structure` for `shrink` or `structure_mask`.

  Example:
    >>> structure = select(gradient_importance(model, params, batches), heads=0.5, neurons=0.5)  # doctest: +SKIP
  """
  _check_fraction("heads", heads)
  _check_fraction("neurons", neurons)
  head_keep = _drop_lowest(list(importance.heads), heads, head_scope, min_heads)
  neuron_keep = _drop_lowest(list(importance.neurons), neurons, neuron_scope, 1)
  return Structure(tuple(head_keep), tuple(neuron_keep))


def _check_structure(config: BertConfig, structure: Structure) -> None:
  if len(structure.heads) != config.num_hidden_layers or len(structure.neurons) != config.num_hidden_layers:
    raise ValueError(
      f"structure has {len(structure.heads)} head and {len(structure.neurons)} neuron entries "
      f"for {config.num_hidden_layers} layers"
    )
  for i, (h, n) in enumerate(zip(structure.heads, structure.neurons, strict=True)):
    num_heads, ffn = config.layer_sizes(i)
    if np.shape(h) != (num_heads,) or np.shape(n) != (ffn,):
      raise ValueError(
        f"layer {i}: structure shapes {np.shape(h)} / {np.shape(n)}, model has {num_heads} heads / {ffn} neurons"
      )
    if not np.any(h):
      raise ValueError(
        f"the structure prunes every head of layer {i}: a BERT layer needs at least one head "
        "(select(..., min_heads=1) keeps one per layer)"
      )
    if not np.any(n):
      raise ValueError(f"the structure prunes every FFN neuron of layer {i}: keep at least one")


def structure_mask(config: BertConfig, params, structure: Structure):
  """The bool pytree (True = keep) that zeroes exactly the weights `shrink` removes; usable with `keep_pruned`."""
  _check_structure(config, structure)
  mask = jax.tree.map(lambda p: np.ones(np.shape(p), bool), unstack_layers(jax.device_get(params)))
  enc = _encoder(mask)
  for i, (h, n) in enumerate(zip(structure.heads, structure.neurons, strict=True)):
    layer = enc[f"encoder_layer_{i}"]
    cols = np.repeat(np.asarray(h, bool), config.head_dim)
    for name in _HEAD_COLUMNS:
      layer[name]["kernel"][:, ~cols] = False
      layer[name]["bias"][~cols] = False
    layer["attention_output"]["kernel"][~cols, :] = False
    layer["intermediate"]["kernel"][:, ~np.asarray(n, bool)] = False
    layer["intermediate"]["bias"][~np.asarray(n, bool)] = False
    layer["output"]["kernel"][~np.asarray(n, bool), :] = False
  return restack_like(mask, params)


def mask_structure(config: BertConfig, params, structure: Structure):
  """``params`` with the pruned heads' and neurons' weights set to zero, at full size (the reference for `shrink`)."""
  return apply_mask(params, structure_mask(config, params, structure))


def shrink(config: BertConfig, params, structure: Structure) -> tuple[BertConfig, dict]:
  """Physically removes the pruned heads and FFN neurons.

  Args:
    config: the model's config (may already be shrunk).
    params: `BertModel` or `BertForSequenceClassification` parameters.
    structure: what to keep, from `select` (shapes must match ``config``'s layer sizes).

  Returns:
    ``(config, params)``: the config has ``layer_num_heads`` / ``layer_intermediate_sizes``; the params are numpy
    arrays of the smaller shapes, one module per layer (layers of different sizes run unrolled). The model
    computes what the unshrunk model computes with those heads and neurons zeroed (`mask_structure`), up to float
    rounding from the shorter matmul reductions.

  Example:
    >>> structure = select(magnitude_importance(config, params), heads=0.5, neurons=0.5)  # doctest: +SKIP
    >>> small_config, small_params = shrink(config, params, structure)  # doctest: +SKIP
    >>> logits = BertForSequenceClassification(small_config).apply({"params": small_params}, ids, mask)  # doctest: +SKIP
  """
  _check_structure(config, structure)
  params = unstack_layers(jax.device_get(params))
  enc = dict(_encoder(params))
  for i, (h, n) in enumerate(zip(structure.heads, structure.neurons, strict=True)):
    layer = {k: dict(v) for k, v in enc[f"encoder_layer_{i}"].items()}
    cols = np.repeat(np.asarray(h, bool), config.head_dim)
    n = np.asarray(n, bool)
    for name in _HEAD_COLUMNS:
      layer[name] = {
        "kernel": np.asarray(layer[name]["kernel"])[:, cols],
        "bias": np.asarray(layer[name]["bias"])[cols],
      }
    layer["attention_output"]["kernel"] = np.asarray(layer["attention_output"]["kernel"])[cols, :]
    layer["intermediate"] = {
      "kernel": np.asarray(layer["intermediate"]["kernel"])[:, n],
      "bias": np.asarray(layer["intermediate"]["bias"])[n],
    }
    layer["output"]["kernel"] = np.asarray(layer["output"]["kernel"])[n, :]
    enc[f"encoder_layer_{i}"] = layer
  small = config.replace(
    layer_num_heads=tuple(int(np.sum(h)) for h in structure.heads),
    layer_intermediate_sizes=tuple(int(np.sum(n)) for n in structure.neurons),
  )
  return small, _with_encoder(params, enc)
