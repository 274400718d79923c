"""Student construction for distillation: copy chosen teacher layers (DistilBERT's initialisation) or start fresh."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jfast.models.bert import BertConfig, BertForSequenceClassification, BertModel
from jfast.nn.scan import match_layout, unstack_layers


def _check_params(config: BertConfig, encoder_params) -> None:
  ids = jnp.zeros((1, 1), jnp.int32)
  unrolled = config.replace(scan_layers=False)
  expected = jax.eval_shape(lambda: BertModel(unrolled).init(jax.random.key(0), ids))["params"]
  got = jax.tree.map(lambda x: tuple(np.shape(x)), encoder_params)
  want = jax.tree.map(lambda s: tuple(s.shape), expected)
  if got != want:
    raise ValueError("teacher params do not match the teacher config (layer count, widths or names differ)")


def student_from_teacher(
  teacher_config: BertConfig, teacher_params: dict, layers: str | Sequence[int] = "every_other"
) -> tuple[BertConfig, dict]:
  """Builds a shallower student by copying some of the teacher's layers (DistilBERT's initialisation).

  Embeddings, pooler and classifier head (when present) are copied too; weights are copies, not views.

  Args:
    teacher_config: the teacher's config.
    teacher_params: `BertForSequenceClassification` params (``{"bert", "classifier"}``) or bare `BertModel` params;
      pruned weights are fine as long as their shapes match ``teacher_config``.
    layers: ``"every_other"`` (teacher layers 0, 2, 4, ...) or the teacher layer indices to keep, in student order.

  Returns:
    ``(student_config, student_params)`` in the structure ``teacher_params`` had, and in the layer layout the
    student config runs (`jfast.nn.match_layout`).

  Example:
    >>> s_cfg, s_params = student_from_teacher(t_cfg, t_params, layers=(0, 3))  # doctest: +SKIP
    >>> s_cfg.num_hidden_layers  # doctest: +SKIP
    2
  """
  n = teacher_config.num_hidden_layers
  if isinstance(layers, str):
    if layers != "every_other":
      raise ValueError(f"layers must be 'every_other' or a sequence of layer indices, got {layers!r}")
    layers = tuple(range(0, n, 2))
  layers = tuple(layers)
  if not layers or any(not isinstance(i, int | np.integer) or not 0 <= i < n for i in layers):
    raise ValueError(f"layers {layers} must be a non-empty sequence of teacher layer indices in [0, {n})")
  has_head = "classifier" in teacher_params
  encoder = unstack_layers(teacher_params["bert"] if has_head else teacher_params)
  _check_params(teacher_config, encoder)
  copy = functools.partial(jax.tree.map, lambda x: np.array(x, copy=True))
  student = {k: copy(v) for k, v in encoder.items() if not k.startswith("encoder_layer_")}
  for j, i in enumerate(layers):
    student[f"encoder_layer_{j}"] = copy(encoder[f"encoder_layer_{i}"])
  # A structurally pruned teacher has per-layer sizes: the student keeps those of the layers it copies.
  per_layer = {
    name: tuple(getattr(teacher_config, name)[i] for i in layers)
    for name in ("layer_num_heads", "layer_intermediate_sizes")
    if getattr(teacher_config, name, None) is not None
  }
  config = teacher_config.replace(num_hidden_layers=len(layers), **per_layer)
  student = match_layout(config, student)
  if has_head:
    return config, {"bert": student, "classifier": copy(teacher_params["classifier"])}
  return config, student


def fresh_student(teacher_config: BertConfig, num_labels: int, rng, **changes) -> tuple[BertConfig, dict]:
  """A randomly initialised smaller classifier that reads the teacher's tokens (same vocabulary).

  Args:
    teacher_config: the teacher's config; ``changes`` override its sizes (``num_hidden_layers``, ``hidden_size``,
      ``num_attention_heads``, ``intermediate_size``...).
    num_labels: the teacher's label count.
    rng: a JAX key.

  Returns:
    ``(student_config, student_params)`` for `BertForSequenceClassification`.
  """
  if "vocab_size" in changes and changes["vocab_size"] != teacher_config.vocab_size:
    raise ValueError("a student must keep the teacher's vocabulary (vocab_size) to learn from its outputs")
  config = teacher_config.replace(**changes)
  model = BertForSequenceClassification(config, num_labels=num_labels)
  params = jax.jit(model.init)(rng, jnp.zeros((1, 1), jnp.int32))["params"]
  return config, params


def num_params(params) -> int:
  """Number of scalar parameters in a tree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))
