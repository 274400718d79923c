"""jfast: fast, memory-lean Transformer training in JAX/Flax. The flat public API lives here."""

from jfast.checkpoint import Checkpointer
from jfast.data import Batch, BatchingConfig, make_batches, padding_efficiency
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
from jfast.precision import Policy, get_policy, mixed_dot_general
from jfast.remat import REMAT_POLICIES, remat_policy
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
  "REMAT_POLICIES",
  "Batch",
  "BatchingConfig",
  "BertConfig",
  "BertForSequenceClassification",
  "BertModel",
  "Checkpointer",
  "CompiledStep",
  "DynamicLossScale",
  "FitResult",
  "LoopConfig",
  "NoOpLossScale",
  "OptimizerConfig",
  "Policy",
  "StaticLossScale",
  "TrainState",
  "all_finite",
  "classification_loss",
  "create_train_state",
  "evaluate",
  "fit",
  "get_loss_scale",
  "get_policy",
  "load_hf_bert",
  "make_batches",
  "make_eval_step",
  "make_optimizer",
  "make_train_step",
  "mixed_dot_general",
  "padding_efficiency",
  "remat_policy",
  "resolve_loss_scale",
  "save_hf_bert",
  "select_tree",
]
