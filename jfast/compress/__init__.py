"""Model compression: pruning (magnitude and N:M masks, gradual schedules, structured shrinking), knowledge
distillation, and int8 post-training quantization with quantized checkpoints (the int8 layer itself is
`jfast.nn.QuantDense`)."""

from jfast.compress.distillation import (
  DistillConfig,
  TeacherBatch,
  causal_lm_distillation_loss,
  check_compatible,
  distill_params,
  distillation_loss,
  make_distill_step,
  precompute_teacher_logits,
  split_params,
)
from jfast.compress.gradual_pruning import GradualPruningState, PruningSchedule, gradual_pruning, keep_pruned
from jfast.compress.pruning_masks import (
  DEFAULT_EXCLUDE,
  DEFAULT_INCLUDE,
  apply_mask,
  eligible,
  magnitude_mask,
  nm_mask,
  sparsity,
)
from jfast.compress.quant_io import load_quantized, save_quantized
from jfast.compress.quantization import calibrate, dequantize, is_quantized, quantizable_layers, quantize
from jfast.compress.structured_pruning import (
  Importance,
  Structure,
  gradient_importance,
  magnitude_importance,
  mask_structure,
  select,
  shrink,
  structure_mask,
)
from jfast.compress.student import fresh_student, num_params, student_from_teacher

__all__ = [
  "DEFAULT_EXCLUDE",
  "DEFAULT_INCLUDE",
  "DistillConfig",
  "GradualPruningState",
  "Importance",
  "PruningSchedule",
  "Structure",
  "TeacherBatch",
  "apply_mask",
  "calibrate",
  "causal_lm_distillation_loss",
  "check_compatible",
  "dequantize",
  "distill_params",
  "distillation_loss",
  "eligible",
  "fresh_student",
  "gradient_importance",
  "gradual_pruning",
  "is_quantized",
  "keep_pruned",
  "load_quantized",
  "magnitude_importance",
  "magnitude_mask",
  "make_distill_step",
  "mask_structure",
  "nm_mask",
  "num_params",
  "precompute_teacher_logits",
  "quantizable_layers",
  "quantize",
  "save_quantized",
  "select",
  "shrink",
  "sparsity",
  "split_params",
  "structure_mask",
  "student_from_teacher",
]
