"""jfast: fast, memory-lean Transformer training in JAX/Flax. The flat public API lives here.

Every name is imported from its package on first use (`jfast._lazy`), so ``import jfast`` is cheap; the packages are
``jfast.data``, ``nn``, ``models``, ``precision``, ``optim``, ``training``, ``compress``, ``parallel``, ``cpu`` and
``app`` (docs/architecture.md).
"""

from jfast._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
  # data
  "Batch": "jfast.data.batch",
  "BatchingConfig": "jfast.data.batching",
  "make_batches": "jfast.data.batching",
  "padding_efficiency": "jfast.data.padding",
  # nn
  "AttentionConfig": "jfast.nn.attention_config",
  "blockwise_attention": "jfast.nn.attention",
  "sliding_window_attention": "jfast.nn.attention",
  "QuantDense": "jfast.nn.quant_dense",
  "REMAT_POLICIES": "jfast.nn.remat",
  "remat_policy": "jfast.nn.remat",
  "unstack_layers": "jfast.nn.scan",
  "match_layout": "jfast.nn.scan",
  "RopeScaling": "jfast.nn.rotary",
  "LoRAConfig": "jfast.nn.lora",
  "LoRAModel": "jfast.nn.lora",
  "add_lora": "jfast.nn.lora",
  "with_lora": "jfast.nn.lora",
  "merge_lora": "jfast.nn.lora",
  "lora_mask": "jfast.nn.lora",
  "split_lora": "jfast.nn.lora",
  # models
  "BertConfig": "jfast.models.bert",
  "BertForSequenceClassification": "jfast.models.bert",
  "BertModel": "jfast.models.bert",
  "extend_position_embeddings": "jfast.models.bert",
  "load_hf_bert": "jfast.models.bert_io",
  "save_hf_bert": "jfast.models.bert_io",
  "GPT": "jfast.models.gpt",
  "GPTConfig": "jfast.models.gpt",
  "generate": "jfast.models.gpt",
  "load_hf_gpt2": "jfast.models.gpt_io",
  "save_hf_gpt2": "jfast.models.gpt_io",
  "nnx_split": "jfast.models.nnx",
  "Llama": "jfast.models.llama",
  "LlamaConfig": "jfast.models.llama",
  "init_llama": "jfast.models.llama",
  "load_hf_llama": "jfast.models.llama_io",
  "save_hf_llama": "jfast.models.llama_io",
  "generate_with_cache": "jfast.models.generation",
  "filter_logits": "jfast.models.generation",
  "save_peft": "jfast.models.peft_io",
  "load_peft": "jfast.models.peft_io",
  # precision
  "Policy": "jfast.precision.policy",
  "get_policy": "jfast.precision.policy",
  "DynamicLossScale": "jfast.precision.loss_scale",
  "NoOpLossScale": "jfast.precision.loss_scale",
  "StaticLossScale": "jfast.precision.loss_scale",
  "all_finite": "jfast.precision.loss_scale",
  "get_loss_scale": "jfast.precision.loss_scale",
  "resolve_loss_scale": "jfast.precision.loss_scale",
  "select_tree": "jfast.precision.loss_scale",
  # optim
  "optim": "jfast.optim",
  "OptimizerConfig": "jfast.optim.recipe",
  "make_optimizer": "jfast.optim.recipe",
  "adamw_8bit": "jfast.optim.adamw8bit",
  "state_bytes": "jfast.optim.adamw8bit",
  "clip_by_global_norm": "jfast.optim.clipping",
  "freeze": "jfast.optim.freezing",
  "freeze_mask": "jfast.optim.freezing",
  "lora_optimizer": "jfast.optim.lora",
  # training
  "TrainState": "jfast.training.state",
  "create_train_state": "jfast.training.state",
  "CompiledStep": "jfast.training.step",
  "make_train_step": "jfast.training.step",
  "make_eval_step": "jfast.training.step",
  "classification_loss": "jfast.training.losses",
  "causal_lm_loss": "jfast.training.losses",
  "multi_steps": "jfast.training.accumulation",
  "Checkpointer": "jfast.training.checkpoint",
  "FitResult": "jfast.training.loop",
  "LoopConfig": "jfast.training.loop",
  "evaluate": "jfast.training.loop",
  "fit": "jfast.training.loop",
  "enable_compilation_cache": "jfast.training.compile_cache",
  "make_predict_step": "jfast.training.predict",
  "predict_probabilities": "jfast.training.predict",
  "classification_report": "jfast.training.metrics",
  "load_classification_splits": "jfast.data.datasets",
  "load_text_classification": "jfast.data.datasets",
  "training_loop": "jfast.training.loop",
  # compress
  "DistillConfig": "jfast.compress.distillation",
  "TeacherBatch": "jfast.compress.distillation",
  "distillation_loss": "jfast.compress.distillation",
  "causal_lm_distillation_loss": "jfast.compress.distillation",
  "make_distill_step": "jfast.compress.distillation",
  "student_from_teacher": "jfast.compress.student",
  "PruningSchedule": "jfast.compress.gradual_pruning",
  "gradual_pruning": "jfast.compress.gradual_pruning",
  "keep_pruned": "jfast.compress.gradual_pruning",
  "magnitude_mask": "jfast.compress.pruning_masks",
  "shrink": "jfast.compress.structured_pruning",
  "calibrate": "jfast.compress.quantization",
  "quantize": "jfast.compress.quantization",
  "load_quantized": "jfast.compress.quant_io",
  "save_quantized": "jfast.compress.quant_io",
  # parallel
  "ShardingRules": "jfast.parallel.sharding",
  "make_mesh": "jfast.parallel.sharding",
  "shard_batch": "jfast.parallel.sharding",
  "tree_shardings": "jfast.parallel.sharding",
  # cpu
  "mixed_dot_general": "jfast.cpu.dots",
  "RowSparseEmbedding": "jfast.cpu.row_sparse",
  "row_sparse_adamw": "jfast.cpu.row_sparse",
  "row_sparse_embedding": "jfast.cpu.row_sparse",
}
_PACKAGES = ("data", "nn", "models", "precision", "training", "compress", "parallel", "cpu", "app")

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, {**_EXPORTS, **{p: f"jfast.{p}" for p in _PACKAGES}})
