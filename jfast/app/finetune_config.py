"""The fine-tune's typed config: one frozen dataclass per concern, composed into `FinetuneConfig`.

``jfast finetune`` / ``jfast distill`` build it from defaults, a YAML file and ``section.key=value`` words
(`jfast.app.config.load_config`), save it in the run folder, and run `jfast.app.finetune` with the equivalent
flags, so the script's own ``--flags`` and the config words are one set of options (a test checks every key has
its flag and the same default).

    jfast finetune optimizer.name=adamw_8bit precision.policy=bf16 memory.micro_batches=2 model.remat_policy=full
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jfast.app import finetune
from jfast.app.config import ConfigError, describe, load_config, to_dict
from jfast.app.runs import RunDir

DEFAULT_DATA = str(finetune.DEFAULT_DATA)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = DEFAULT_DATA  # folder of {split}.tsv/.csv files, one .tsv/.csv file, or a hub name
  model: str | None = None  # Hugging Face BERT folder; None: all-MiniLM-L6-v2
  train_split: str = "train"
  eval_split: str = "dev"
  eval_data: str | None = None  # folder or .tsv/.csv file to evaluate on; None: the dataset folder
  labels: tuple[str, ...] | None = None  # the label set in id order; None: known or inferred (jfast.data.datasets)
  text_column: str | None = None  # None: sentence or text
  label_column: str | None = None  # None: label
  encoding: str = "utf-8"
  max_train_examples: int | None = None  # None: all (or the preset's)


@dataclasses.dataclass(frozen=True)
class BatchingSection:
  strategy: str = "packed"
  batch_size: int = 16  # rows (packed: rows of row_length tokens; see examples_per_step)
  examples_per_step: int | None = None  # size batches in examples instead (packed: rows that hold about this many)
  tokens_per_step: int | None = None  # size batches in tokens (packed rows, or the token_budget strategy's budget)
  row_length: int | None = None
  num_buckets: int = 8
  token_budget: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  remat_policy: str = "none"  # a key of jfast.nn.REMAT_POLICIES
  attention: str = "dense"  # dense | sliding_window | blockwise
  window: int | None = None  # sliding_window: tokens each side
  fuse_qkv: str = "auto"  # auto (on GPUs) | on | off: one product for query, key and value
  attention_dropout: str = "auto"  # auto (0 on GPU/TPU: the fused kernel cannot drop) | a rate
  block_size: int | None = None  # blockwise
  scan_layers: str = "auto"  # auto (on; off with memory.freeze_layers) | on | off: identical layers as one nn.scan


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
  policy: str = "auto"  # auto (bf16 on GPU/TPU, fp32 on CPU) | fp32 | bf16 | fp16 | pure-bf16 | params=..,compute=..
  loss_scale: str | None = None  # none | dynamic | static:<scale>; None: the policy's default


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  micro_batches: int = 1  # in-step gradient accumulation
  freeze_layers: int = 0  # freeze the embeddings and this many bottom layers (0: train everything)


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
  name: str = "adamw"  # adamw | adamw_8bit
  learning_rate: float = 1e-4
  weight_decay: float = 0.01
  warmup_ratio: float = 0.06
  row_sparse_embeddings: str = "off"  # off | exact | lazy: the word table trains from each batch's rows


@dataclasses.dataclass(frozen=True)
class LoopSection:
  epochs: int = 1
  max_steps: int | None = None
  eval_every: int | None = None
  seed: int = 0
  checkpoint_dir: str | None = None
  checkpoint_every: int = 200
  export: bool = True  # write the trained model (config, weights, tokenizer) to the run folder's model/
  progress: bool = True  # a bar on a terminal; else (or False) a log line every log_every steps
  log_every: int = 50
  steps_per_call: int = 1  # train steps per jitted call (lax.scan), against per-step dispatch cost


@dataclasses.dataclass(frozen=True)
class PruningConfig:
  heads: float = 0.0  # fraction of attention heads removed before training (structured, shrinks)
  neurons: float = 0.0  # fraction of FFN neurons removed before training (structured, shrinks)
  importance: str = "gradient"  # gradient | magnitude
  sparsity: float = 0.0  # unstructured magnitude sparsity kept during training
  gradual: bool = False  # reach the sparsity on Zhu & Gupta's cubic schedule
  keep_head: bool = False  # start from the model folder's classifier head


@dataclasses.dataclass(frozen=True)
class DistillSection:
  teacher: str | None = None  # fine-tuned HF BERT folder with a classifier head (jfast distill needs it)
  student_layers: str = "every_other"  # every_other | teacher layer indices, e.g. 0,3
  temperature: float = 2.0
  alpha: float = 0.5  # soft-target weight; 1 - alpha on the labels
  hidden_weight: float = 0.0  # hidden-state matching weight
  teacher_precision: str | None = None  # e.g. bf16


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
  mode: str = "none"  # none | int8: after training, evaluate the int8 (post-training quantized) model too


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  mesh: str | None = None  # data=8 | fsdp=8 | data=4,tensor=2; None: one device
  coordinator: str | None = None  # multi-host: host:port of process 0
  num_processes: int | None = None
  process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Everything one fine-tune (or distillation) run needs; `describe(FinetuneConfig)` lists the keys."""

  name: str = "finetune"
  preset: str | None = None  # quick: the README's main job (40,000 examples); accelerator: batches in tokens
  output: str | None = None  # None: the run folder
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  batching: BatchingSection = dataclasses.field(default_factory=BatchingSection)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
  memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
  optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
  loop: LoopSection = dataclasses.field(default_factory=LoopSection)
  pruning: PruningConfig = dataclasses.field(default_factory=PruningConfig)
  distill: DistillSection = dataclasses.field(default_factory=DistillSection)
  quantization: QuantizationConfig = dataclasses.field(default_factory=QuantizationConfig)
  parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)


# section.key -> the script's flag. Booleans map to store_true flags (progress and export are inverted: --no-...).
FLAGS: dict[str, str] = {
  "data.dataset": "--data",
  "data.model": "--model",
  "data.train_split": "--train-split",
  "data.eval_split": "--eval-split",
  "data.eval_data": "--eval-data",
  "data.labels": "--labels",
  "data.text_column": "--text-column",
  "data.label_column": "--label-column",
  "data.encoding": "--encoding",
  "data.max_train_examples": "--max-train-examples",
  "preset": "--preset",
  "batching.strategy": "--strategy",
  "batching.batch_size": "--batch-size",
  "batching.examples_per_step": "--examples-per-step",
  "batching.tokens_per_step": "--tokens-per-step",
  "batching.row_length": "--row-length",
  "batching.num_buckets": "--num-buckets",
  "batching.token_budget": "--token-budget",
  "model.remat_policy": "--remat",
  "model.attention": "--attention",
  "model.window": "--window",
  "model.fuse_qkv": "--fuse-qkv",
  "model.attention_dropout": "--attention-dropout",
  "model.block_size": "--block-size",
  "model.scan_layers": "--scan-layers",
  "precision.policy": "--precision",
  "precision.loss_scale": "--loss-scale",
  "memory.micro_batches": "--micro-batches",
  "memory.freeze_layers": "--freeze-layers",
  "optimizer.name": "--optimizer",
  "optimizer.learning_rate": "--lr",
  "optimizer.weight_decay": "--weight-decay",
  "optimizer.warmup_ratio": "--warmup-ratio",
  "optimizer.row_sparse_embeddings": "--row-sparse-embeddings",
  "loop.epochs": "--epochs",
  "loop.max_steps": "--max-steps",
  "loop.eval_every": "--eval-every",
  "loop.seed": "--seed",
  "loop.checkpoint_dir": "--checkpoint-dir",
  "loop.checkpoint_every": "--checkpoint-every",
  "loop.export": "--no-export",
  "loop.progress": "--no-progress",
  "loop.log_every": "--log-every",
  "loop.steps_per_call": "--steps-per-call",
  "pruning.heads": "--prune-heads",
  "pruning.neurons": "--prune-neurons",
  "pruning.importance": "--prune-importance",
  "pruning.sparsity": "--sparsity",
  "pruning.gradual": "--gradual",
  "pruning.keep_head": "--keep-head",
  "distill.teacher": "--distill-from",
  "distill.student_layers": "--student-layers",
  "distill.temperature": "--temperature",
  "distill.alpha": "--alpha",
  "distill.hidden_weight": "--hidden-weight",
  "distill.teacher_precision": "--teacher-precision",
  "quantization.mode": "--quantize",
  "parallel.mesh": "--mesh",
  "parallel.coordinator": "--coordinator",
  "parallel.num_processes": "--num-processes",
  "parallel.process_id": "--process-id",
  "output": "--output",
}
_INVERTED = {"loop.progress", "loop.export"}


def _flat(config) -> dict[str, Any]:
  out = {}
  for key, value in to_dict(config).items():
    if isinstance(value, dict):
      out.update({f"{key}.{k}": v for k, v in value.items()})
    else:
      out[key] = value
  return out


def to_argv(config: FinetuneConfig, output: str | None = None) -> list[str]:
  """The `jfast.app.finetune` flags equivalent to ``config`` (defaults omitted are still explicit here)."""
  argv = []
  for key, value in _flat(config).items():
    if key == "name":
      continue
    if key == "output":
      value = value or output
    flag = FLAGS[key]
    if isinstance(value, bool):
      if value != (key in _INVERTED):
        argv.append(flag)
    elif value is not None:
      argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
  return argv


def run_from_cli(mode: str, config_file: str | None, words: list[str], runs_root: str = "runs") -> Path:
  """``jfast finetune`` / ``jfast distill``: config -> run folder -> the fine-tune -> metrics and summary there."""
  if any(w in ("help", "-h", "--help") for w in words):
    print(f"jfast {mode} [--config FILE] [section.key=value ...]; keys and defaults:\n")
    print(describe(FinetuneConfig))
    return Path()
  config = load_config(FinetuneConfig, config_file, [f"name={mode}", *words] if mode == "distill" else words)
  if mode == "distill" and not config.distill.teacher:
    raise ConfigError("jfast distill needs distill.teacher=<fine-tuned HF folder>")
  run = RunDir(config.name, root=runs_root, config=config)
  summary = finetune.main(to_argv(config, output=str(run.path)))
  for row in summary.get("history", []):
    run.log(**row)
  for row in summary.get("evals", []):
    run.log(row["step"], **{f"eval_{k}": v for k, v in row.items() if k != "step"})
  run.finish({k: v for k, v in summary.items() if k not in ("history", "evals")})
  print(f"[jfast] run folder: {run.path}")
  return run.path
