"""Every batching strategy, fine-tuning the real MiniLM, on SST-2 (short phrases) and AG News (long tail).

    python -m experiments.padding                                    # CPU-sized subsets, 48 min on 2 shared cores
    python -m experiments.padding --strategies packed bucket         # a quick look: two strategies
    python -m experiments.padding --train-examples sst2=0,agnews=0   # full training sets (a GPU run)

For each (dataset, strategy) it trains one epoch from the same pretrained weights with the same optimizer and seed,
then evaluates; it writes ``padding.json``, ``padding.md`` and ``padding.png`` under ``--output``. Epoch time
includes compilation (that is the real cost of recompiling); compile time is also estimated apart from the
per-step wall times (first step of each shape minus the median step of that shape).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from jfast.app.entry import run_main
from jfast.app.finetune import DEFAULT_DATA, default_model_path
from jfast.data import STRATEGIES, BatchingConfig, load_text_classification, load_tokenizer, tokenize
from jfast.models import init_classifier, load_hf_bert
from jfast.optim import OptimizerConfig, make_optimizer
from jfast.training import LoopConfig, fit

# (train split, eval split) of each dataset folder; AG News ships a 10k subset of its train split as dev.tsv.
SPLITS = {"sst2": ("train", "dev"), "agnews": ("dev", "test")}
CPU_SIZES = {"sst2": (2000, 872), "agnews": (500, 1000)}


def _parse_sizes(text: str | None, index: int) -> dict[str, int]:
  sizes = {name: size[index] for name, size in CPU_SIZES.items()}
  for item in (text or "").split(","):
    if item:
      name, value = item.split("=")
      sizes[name] = int(value)
  return sizes


def strategy_config(
  strategy: str, lengths: np.ndarray, batch_size: int, num_buckets: int, dynamic_multiple: int | None = None
) -> BatchingConfig:
  """The batching config each strategy runs with, sized so a batch holds about ``batch_size`` examples."""
  longest = int(lengths.max())
  mean = float(lengths.mean())
  common = {"strategy": strategy, "num_buckets": num_buckets}
  if strategy == "fixed":
    return BatchingConfig(batch_size=batch_size, max_length=longest, **common)
  if strategy == "token_budget":
    return BatchingConfig(batch_size=batch_size, token_budget=max(int(batch_size * mean * 1.2), longest), **common)
  if strategy == "packed":
    rows = max(1, round(batch_size * mean / longest))
    return BatchingConfig(batch_size=rows, row_length=longest, **common)
  if strategy == "dynamic":
    return BatchingConfig(batch_size=batch_size, pad_to_multiple_of=dynamic_multiple, **common)
  return BatchingConfig(batch_size=batch_size, **common)


def run_one(args, name, strategy, data, config, encoder_params) -> dict:
  (train_ids, train_labels), (eval_ids, eval_labels), num_labels, lengths = data
  batching = strategy_config(strategy, lengths, args.batch_size, args.num_buckets, args.dynamic_multiple)
  eval_batching = BatchingConfig(strategy="bucket", batch_size=64, num_buckets=4, shuffle=False)
  model, params = init_classifier(config, encoder_params, num_labels, jax.random.PRNGKey(args.seed))
  opt = OptimizerConfig(learning_rate=args.lr)
  # No per-step sync: compile time is measured by the step itself (`CompiledStep.compile_log`), steady throughput
  # leaves out the compiling steps (`jfast.training.loop`).
  loop = LoopConfig(epochs=1, seed=args.seed, progress=not args.no_progress)
  t0 = time.perf_counter()
  result = fit(
    model,
    params,
    lambda n: make_optimizer(opt, n),
    (train_ids, train_labels),
    (eval_ids, eval_labels),
    batching=batching,
    eval_batching=eval_batching,
    loop=loop,
    pad_id=config.pad_token_id,
  )
  stats = result.stats
  epoch_seconds = stats["epoch_seconds"][0]
  compile_s = stats["compile_seconds"]
  row = {
    "dataset": name,
    "strategy": strategy,
    "train_examples": len(train_ids),
    "steps": result.stats["final_step"],
    "padding_efficiency": result.stats["padding_efficiency"],
    "compiles": result.stats["train_compiles"],
    "epoch_seconds": epoch_seconds,
    "compile_seconds": compile_s,
    "compiles_from_cache": stats["cached_compiles"],
    "steady_epoch_seconds": epoch_seconds - compile_s,
    "real_tokens_per_second": stats["end_to_end_tokens_per_second"],  # end to end, compiles included
    "steady_real_tokens_per_second": stats["steady_tokens_per_second"],
    "dev_accuracy": result.evals[-1]["accuracy"],
    "wall_seconds": time.perf_counter() - t0,
    "batching": dataclasses.asdict(batching),
  }
  print(
    f"{name:7s} {strategy:12s} eff {row['padding_efficiency']:.3f}  compiles {row['compiles']:3d}  "
    f"epoch {epoch_seconds:7.1f}s (compile {compile_s:6.1f}s)  {row['steady_real_tokens_per_second'] or 0:8.0f} "
    f"steady / {row['real_tokens_per_second']:8.0f} end-to-end tok/s  "
    f"dev acc {row['dev_accuracy']:.4f}",
    flush=True,
  )
  return row


def load(args, name, tokenizer, max_length):
  train_split, eval_split = SPLITS[name]
  folder = Path(args.data_root) / name
  train = load_text_classification(folder, train_split)
  evals = load_text_classification(folder, eval_split, label_names=train.label_names)
  train_ids, _ = tokenize(tokenizer, train.texts, max_length=max_length)
  # Fixed padding pads to the maximum of the whole training split, not of the subset: that is the PyTorch habit.
  lengths_all = np.array([len(x) for x in train_ids])
  n_train, n_eval = args.train_sizes[name] or len(train), args.eval_sizes[name] or len(evals)
  order = np.random.default_rng(0).permutation(len(train))[:n_train]
  eval_ids, _ = tokenize(tokenizer, evals.texts[:n_eval], max_length=max_length)
  train_sub = ([train_ids[i] for i in order], train.labels[order])
  return train_sub, (eval_ids, evals.labels[:n_eval]), len(train.label_names), lengths_all


def write_report(rows: list[dict], out: Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "padding.json").write_text(json.dumps(rows, indent=2))
  lines = [
    "| dataset | strategy | examples | padding eff. | compiles (cached) | epoch s | compile s | steady s | "
    "steady real tok/s | end-to-end real tok/s | x fixed (epoch) | dev acc |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    fixed = next((f for f in rows if f["dataset"] == r["dataset"] and f["strategy"] == "fixed"), None)
    speedup = f"{fixed['epoch_seconds'] / r['epoch_seconds']:.2f}" if fixed else "-"
    lines.append(
      f"| {r['dataset']} | {r['strategy']} | {r['train_examples']} | {r['padding_efficiency']:.3f} | {r['compiles']} "
      f"({r['compiles_from_cache']}) | {r['epoch_seconds']:.1f} | {r['compile_seconds']:.1f} | "
      f"{r['steady_epoch_seconds']:.1f} | {r['steady_real_tokens_per_second'] or 0:.0f} | "
      f"{r['real_tokens_per_second']:.0f} | {speedup} | {r['dev_accuracy']:.4f} |"
    )
  (out / "padding.md").write_text("\n".join(lines) + "\n")
  _plot(rows, out / "padding.png")


def _plot(rows: list[dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  datasets = sorted({r["dataset"] for r in rows})
  fig, axes = plt.subplots(len(datasets), 3, figsize=(15, 3.6 * len(datasets)), squeeze=False)
  for ax_row, name in zip(axes, datasets, strict=True):
    sub = [r for r in rows if r["dataset"] == name]
    labels = [r["strategy"] for r in sub]
    for ax, key, title in zip(
      ax_row,
      ("padding_efficiency", "epoch_seconds", "real_tokens_per_second"),
      ("padding efficiency (real / computed)", "epoch seconds (incl. compiles)", "real tokens / s"),
      strict=True,
    ):
      values = [r[key] for r in sub]
      ax.bar(labels, values, color="tab:blue")
      if key == "epoch_seconds":
        ax.bar(labels, [r["compile_seconds"] for r in sub], color="tab:red", label="compile")
        ax.legend()
      ax.set_title(f"{name}: {title}")
      ax.tick_params(axis="x", rotation=30)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data-root", default=str(DEFAULT_DATA.parent))
  p.add_argument("--model", default=None)
  p.add_argument("--datasets", nargs="+", default=list(SPLITS), choices=list(SPLITS))
  p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
  p.add_argument("--train-examples", default=None, help="e.g. sst2=2000,agnews=500 (0: all)")
  p.add_argument("--eval-examples", default=None, help="e.g. sst2=872,agnews=1000 (0: all)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--num-buckets", type=int, default=8)
  p.add_argument("--dynamic-multiple", type=int, default=None, help="dynamic: pad to a multiple of this")
  p.add_argument("--lr", type=float, default=5e-5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default="results/padding")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  args.train_sizes, args.eval_sizes = _parse_sizes(args.train_examples, 0), _parse_sizes(args.eval_examples, 1)
  model_path = args.model or default_model_path()
  config, encoder_params = load_hf_bert(model_path)
  tokenizer = load_tokenizer(model_path)
  rows = []
  for name in args.datasets:
    data = load(args, name, tokenizer, config.max_position_embeddings)
    for strategy in args.strategies:
      rows.append(run_one(args, name, strategy, data, config, encoder_params))
      write_report(rows, Path(args.output))
  print(f"\ndevice: {jax.devices()[0].device_kind}; report: {Path(args.output) / 'padding.md'}")
  print((Path(args.output) / "padding.md").read_text())
  return rows


if __name__ == "__main__":
  run_main(main)
