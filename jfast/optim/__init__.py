"""Optimizers as optax transformations: 8-bit AdamW, freezing by masks, clipping, and the default recipe
(`make_optimizer`: clipped AdamW with warm-up and linear decay)."""

from jfast.optim.adamw8bit import (
  CODE_MAPS,
  CodeBook,
  ScaleByAdam8bitState,
  adamw_8bit,
  codebooks,
  dequantize_blockwise,
  quantize_blockwise,
  scale_by_adam_8bit,
  state_bytes,
)
from jfast.optim.clipping import clip_by_global_norm
from jfast.optim.freezing import freeze, freeze_mask, param_paths
from jfast.optim.lora import lora_optimizer
from jfast.optim.recipe import (
  OPTIMIZERS,
  ROW_SPARSE_MODES,
  OptimizerConfig,
  decay_mask,
  learning_rate_schedule,
  make_optimizer,
)

__all__ = [
  "CODE_MAPS",
  "OPTIMIZERS",
  "ROW_SPARSE_MODES",
  "CodeBook",
  "OptimizerConfig",
  "ScaleByAdam8bitState",
  "adamw_8bit",
  "clip_by_global_norm",
  "codebooks",
  "decay_mask",
  "dequantize_blockwise",
  "freeze",
  "freeze_mask",
  "learning_rate_schedule",
  "lora_optimizer",
  "make_optimizer",
  "param_paths",
  "quantize_blockwise",
  "scale_by_adam_8bit",
  "state_bytes",
]
