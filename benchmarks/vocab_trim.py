"""What trimming the word-embedding table to the tokens a run sees is worth to each side's step.

    python -m benchmarks.vocab_trim --side jax   --config packed_bf16
    python -m benchmarks.vocab_trim --side torch --config grouped_bf16

MiniLM's word embeddings are 11.7M of its 22.7M parameters, and the first 20,000 SST-2 training sentences plus the
dev set use 11,110 of the 30,522 token ids. A row no batch touches has a zero gradient, so AdamW's moments stay
zero and, with embeddings out of weight decay on both sides, its update is exactly zero: training on the table cut
to the used rows (ids remapped) computes the same model, while the step zero-fills, clips and updates a third of
the table. This times the full and the trimmed table alternated step by step in one process, on the same batches
(`benchmarks.step_profile`'s), for one side at a time. A measurement, not a benchmark row: the technique has the
same form on both sides, so the verdict is the ratio of the two sides' gains.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import numpy as np

from benchmarks import common, data
from benchmarks.configs import CONFIGS, specs_for
from benchmarks.step_profile import _chosen, _spec


def used_ids(max_train_examples: int = 20000) -> np.ndarray:
  """Sorted token ids of the first ``max_train_examples`` SST-2 training sentences and the dev set, with padding."""
  train, dev = data.load_task("sst2", max_train_examples=max_train_examples)
  return np.union1d(np.concatenate([r for ex in (train, dev) for r in ex.ids]), [0])


def _remap(keep: np.ndarray, vocab: int) -> np.ndarray:
  table = np.full(vocab, -1, np.int64)
  table[keep] = np.arange(keep.size)
  return table


def _alternate(variants: dict, steps: int) -> dict[str, float]:
  times = {name: [] for name in variants}
  for i in range(3 + steps):
    for name, run in variants.items():
      t0 = time.perf_counter()
      run(i)
      if i >= 3:
        times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def trim_jax(model, params, batches, keep: np.ndarray):
  """The classifier with its word-embedding table cut to rows ``keep`` and the batches' ids renumbered to match."""
  import jax

  table = _remap(keep, model.config.vocab_size)
  trimmed_batches = [b._replace(input_ids=table[b.input_ids].astype(b.input_ids.dtype)) for b in batches]
  if any((b.input_ids < 0).any() for b in trimmed_batches):
    raise ValueError("a batch holds a token outside the kept ids")
  trimmed_model = model.clone(config=model.config.replace(vocab_size=int(keep.size)))
  words = params["bert"]["embeddings"]["word_embeddings"]["embedding"]
  trimmed_params = jax.tree.map(lambda x: x, params)
  trimmed_params["bert"]["embeddings"]["word_embeddings"] = {"embedding": words[keep]}
  return trimmed_model, trimmed_params, trimmed_batches


def jax_variants(config: str, keep: np.ndarray) -> dict:
  import jax

  from benchmarks.jax_runner import build_model, build_step

  spec = _spec(config)
  batches, _, _ = _chosen(spec)
  model, params = build_model(spec, data.NUM_LABELS[spec.task])
  trimmed = trim_jax(model, params, batches, keep)
  variants = {}
  for name, (m, p, bs) in (("full", (model, params, batches)), ("trimmed", trimmed)):
    state, step = build_step(spec, m, jax.tree.map(lambda x: x.copy(), p), 1000)
    holder = [step.lower(state, bs[0]).compile(), state]

    def run(i, holder=holder, bs=bs):
      holder[1], metrics = holder[0](holder[1], bs[i % len(bs)])
      jax.block_until_ready((holder[1], metrics))

    variants[name] = run
  return variants


def torch_variants(config: str, keep: np.ndarray) -> dict:
  import torch

  from benchmarks import torch_runner

  spec = specs_for(CONFIGS[config], {})["torch"]
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  _, train, plan = _chosen(_spec(config))
  table = _remap(keep, 30522)
  trimmed_train = data.Examples([table[r].astype(np.int32) for r in train.ids], train.labels)
  variants = {}
  for name, examples in (("full", train), ("trimmed", trimmed_train)):
    steps, _ = torch_runner.make_steps(dataclasses.replace(spec, warmup=3, steps=9), examples, plan)
    model = torch_runner.build_model(spec, data.NUM_LABELS[spec.task])
    if name == "trimmed":
      old = model.bert.embeddings.word_embeddings
      new = torch.nn.Embedding(int(keep.size), old.embedding_dim, padding_idx=0)
      with torch.no_grad():
        new.weight.copy_(old.weight[torch.as_tensor(keep)])
      model.bert.embeddings.word_embeddings = new
    model.train()
    opt, sched = torch_runner.build_optimizer(spec, model, total_steps=1000)
    params = [p for p in model.parameters() if p.requires_grad]
    amp = {"float32": None, "bfloat16": torch.bfloat16}[spec.dtype]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step = torch_runner.make_train_step(model, opt, sched, scaler, params, torch.device("cpu"), amp)
    variants[name] = lambda i, s=steps, f=train_step: f(s[i % len(s)])
  return variants


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--side", choices=("jax", "torch"), default="jax")
  p.add_argument("--config", default=None, help="default: packed_bf16 (jax), grouped_bf16 (torch)")
  p.add_argument("--steps", type=int, default=40, help="alternated steps timed per variant")
  args = p.parse_args(argv)
  common.pin_threads(2)
  config = args.config or {"jax": "packed_bf16", "torch": "grouped_bf16"}[args.side]
  if config not in CONFIGS or args.side not in CONFIGS[config].sides():
    raise SystemExit(f"configuration {config!r} has no {args.side} side")
  keep = used_ids()
  make = jax_variants if args.side == "jax" else torch_variants
  medians = _alternate(make(config, keep), args.steps)
  print(
    f"{args.side} `{config}`: word embeddings 30,522 -> {keep.size:,} rows; median step full "
    f"{medians['full'] * 1e3:.1f} ms, trimmed {medians['trimmed'] * 1e3:.1f} ms "
    f"({medians['full'] / medians['trimmed']:.2f}x), {args.steps} alternated steps each"
  )


if __name__ == "__main__":
  main()
