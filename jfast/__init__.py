"""jfast: fast, memory-lean Transformer training in JAX/Flax. The flat public API lives here."""

from jfast import optim
from jfast.attention import AttentionConfig, blockwise_attention, sliding_window_attention
from jfast.checkpoint import Checkpointer
from jfast.clipping import clip_by_global_norm
from jfast.data import Batch, BatchingConfig, make_batches, padding_efficiency
from jfast.distill import DistillConfig, TeacherBatch, make_distill_step, student_from_teacher
from jfast.loop import FitResult, LoopConfig, evaluate, fit
from jfast.loss_scale import (
  DynamicLossScale,
  NoOpLossScale,
  StaticLossScale,
  all_finite,
  get_loss_scale,
  resolve_loss_scale,
  select_tree,
)
from jfast.models import BertConfig, BertForSequenceClassification, BertModel, load_hf_bert, save_hf_bert
from jfast.models.bert import extend_position_embeddings
from jfast.models.gpt import GPT, GPTConfig, generate
from jfast.models.gpt_io import load_hf_gpt2, save_hf_gpt2
from jfast.optim import adamw_8bit, state_bytes
from jfast.precision import Policy, get_policy, mixed_dot_general
from jfast.pruning import PruningSchedule, gradual_pruning, keep_pruned, magnitude_mask, shrink
from jfast.quant import QuantDense, calibrate, load_quantized, quantize, save_quantized
from jfast.remat import REMAT_POLICIES, remat_policy
from jfast.row_sparse import RowSparseEmbedding, row_sparse_adamw, row_sparse_embedding
from jfast.sharding import ShardingRules, make_mesh, shard_batch, tree_shardings
from jfast.train import (
  CompiledStep,
  OptimizerConfig,
  TrainState,
  classification_loss,
  create_train_state,
  make_eval_step,
  make_optimizer,
  make_train_step,
)

__version__ = "0.1.0"

__all__ = [
  "GPT",
  "REMAT_POLICIES",
  "AttentionConfig",
  "Batch",
  "BatchingConfig",
  "BertConfig",
  "BertForSequenceClassification",
  "BertModel",
  "Checkpointer",
  "CompiledStep",
  "DistillConfig",
  "DynamicLossScale",
  "FitResult",
  "GPTConfig",
  "LoopConfig",
  "NoOpLossScale",
  "OptimizerConfig",
  "Policy",
  "PruningSchedule",
  "QuantDense",
  "RowSparseEmbedding",
  "ShardingRules",
  "StaticLossScale",
  "TeacherBatch",
  "TrainState",
  "adamw_8bit",
  "all_finite",
  "blockwise_attention",
  "calibrate",
  "classification_loss",
  "clip_by_global_norm",
  "create_train_state",
  "evaluate",
  "extend_position_embeddings",
  "fit",
  "generate",
  "get_loss_scale",
  "get_policy",
  "gradual_pruning",
  "keep_pruned",
  "load_hf_bert",
  "load_hf_gpt2",
  "load_quantized",
  "magnitude_mask",
  "make_batches",
  "make_distill_step",
  "make_eval_step",
  "make_mesh",
  "make_optimizer",
  "make_train_step",
  "mixed_dot_general",
  "optim",
  "padding_efficiency",
  "quantize",
  "remat_policy",
  "resolve_loss_scale",
  "row_sparse_adamw",
  "row_sparse_embedding",
  "save_hf_bert",
  "save_hf_gpt2",
  "save_quantized",
  "select_tree",
  "shard_batch",
  "shrink",
  "sliding_window_attention",
  "state_bytes",
  "student_from_teacher",
  "tree_shardings",
]
