"""Training: the train state, the one step builder every technique plugs into, every loss, gradient accumulation,
the generic loop and checkpoints. Data flows one way through it: batch -> loss -> step -> loop."""

from jfast.training.accumulation import NORMALIZERS, accumulate_gradients, multi_steps, split_micro_batches
from jfast.training.checkpoint import Checkpointer
from jfast.training.compile_cache import disable_compilation_cache, enable_compilation_cache
from jfast.training.loop import FitResult, LoopConfig, evaluate, fit, run, run_together, training_loop
from jfast.training.losses import (
  attention_map_loss,
  attention_probs,
  causal_lm_loss,
  classification_loss,
  classifier_logits,
  cross_entropy,
  hidden_state_loss,
  lm_logits,
  loss_sums,
  soft_target_loss,
)
from jfast.training.metrics import classification_report, confusion_matrix
from jfast.training.predict import make_predict_step, predict_probabilities
from jfast.training.state import RNG_IMPL, TrainState, create_train_state
from jfast.training.step import CompiledStep, LossFn, make_eval_step, make_train_step, stack_batches

__all__ = [
  "NORMALIZERS",
  "RNG_IMPL",
  "Checkpointer",
  "CompiledStep",
  "FitResult",
  "LoopConfig",
  "LossFn",
  "TrainState",
  "accumulate_gradients",
  "attention_map_loss",
  "attention_probs",
  "causal_lm_loss",
  "classification_loss",
  "classification_report",
  "classifier_logits",
  "confusion_matrix",
  "create_train_state",
  "cross_entropy",
  "disable_compilation_cache",
  "enable_compilation_cache",
  "evaluate",
  "fit",
  "hidden_state_loss",
  "lm_logits",
  "loss_sums",
  "make_eval_step",
  "make_predict_step",
  "make_train_step",
  "multi_steps",
  "predict_probabilities",
  "run",
  "run_together",
  "soft_target_loss",
  "split_micro_batches",
  "stack_batches",
  "training_loop",
]
