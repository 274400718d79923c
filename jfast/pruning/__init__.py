"""Pruning: unstructured masks (magnitude, N:M), pruning during training (fixed mask or Zhu & Gupta's gradual
schedule, as optax transformations), and structured pruning of heads and FFN neurons that shrinks the model.

Only structured pruning makes a dense model faster; unstructured masks change values, not shapes.
"""

from jfast.pruning.gradual import GradualPruningState, PruningSchedule, gradual_pruning, keep_pruned
from jfast.pruning.masks import (
  DEFAULT_EXCLUDE,
  DEFAULT_INCLUDE,
  apply_mask,
  eligible,
  magnitude_mask,
  nm_mask,
  sparsity,
)
from jfast.pruning.structured import (
  Importance,
  Structure,
  count_params,
  gradient_importance,
  magnitude_importance,
  mask_structure,
  pad_to_uniform,
  select,
  shrink,
  structure_mask,
)

__all__ = [
  "DEFAULT_EXCLUDE",
  "DEFAULT_INCLUDE",
  "GradualPruningState",
  "Importance",
  "PruningSchedule",
  "Structure",
  "apply_mask",
  "count_params",
  "eligible",
  "gradient_importance",
  "gradual_pruning",
  "keep_pruned",
  "magnitude_importance",
  "magnitude_mask",
  "mask_structure",
  "nm_mask",
  "pad_to_uniform",
  "select",
  "shrink",
  "sparsity",
  "structure_mask",
]
