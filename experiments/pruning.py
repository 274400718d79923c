"""Pruning MiniLM fine-tuned on SST-2: accuracy against sparsity, and what structured pruning buys on this CPU.

    python -m experiments.pruning                      # CPU-sized defaults, ~10 minutes on 2 idle cores
    python -m experiments.pruning --gradual 0.5,0.7,0.9 --train-examples 16000

Four parts, all starting from the same fine-tuned model (``--model``, default ``runs/teacher/model``):
1. one-shot global magnitude pruning at each ``--sweep`` sparsity, evaluated on SST-2 dev without training;
2. gradual magnitude pruning (Zhu & Gupta's cubic schedule, masks every ``--update-every`` steps) at each
   ``--gradual`` sparsity, as a short fine-tune on ``--train-examples`` SST-2 training sentences;
3. structured pruning of ``--structured`` fractions of heads and FFN neurons (Michel et al.'s gradient importance
   from ``--importance-batches`` batches of training data), `shrink`, dev accuracy before and after a recovery
   fine-tune, parameter count;
4. CPU inference latency at batch 32 (real dev sentences), dense, 50% unstructured and shrunk models interleaved,
   medians after warm-up, compile time apart.
Writes ``results.json``, ``results.md`` and ``results.png`` under ``--output``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from experiments.teacher import ensure_teacher
from jfast.app.entry import run_main
from jfast.app.finetune import DEFAULT_DATA, default_model_path
from jfast.compress import (
  PruningSchedule,
  apply_mask,
  gradient_importance,
  gradual_pruning,
  magnitude_importance,
  magnitude_mask,
  num_params,
  select,
  shrink,
  sparsity,
)
from jfast.data import BatchingConfig, dynamic_pad, load_text_classification, load_tokenizer, make_batches, tokenize
from jfast.models import BertForSequenceClassification, load_hf_bert
from jfast.optim import OptimizerConfig, make_optimizer
from jfast.training import LoopConfig, classification_loss, evaluate, fit, make_eval_step

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "runs" / "teacher" / "model"


def _floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=str(DEFAULT_MODEL), help="fine-tuned HF folder with a classifier head")
  p.add_argument("--data", default=str(DEFAULT_DATA))
  p.add_argument("--output", default="results/pruning")
  p.add_argument("--sweep", default="0.2,0.4,0.5,0.6,0.7,0.8,0.9", help="one-shot sparsities (0%%: the dense model)")
  p.add_argument("--gradual", default="0.5,0.9", help="gradual-pruning target sparsities ('' to skip)")
  p.add_argument("--structured", default="0.25,0.5", help="fractions of heads and FFN neurons removed ('' to skip)")
  p.add_argument("--train-offset", type=int, default=40000, help="training sentences start here (the teacher saw 0..)")
  p.add_argument("--train-examples", type=int, default=8000, help="sentences per pruning/recovery fine-tune")
  p.add_argument("--batch-size", type=int, default=16, help="packed rows per training step")
  p.add_argument("--lr", type=float, default=5e-5, help="learning rate of the gradual-pruning fine-tunes")
  p.add_argument("--recovery-lr", type=float, default=1e-4, help="learning rate of the structured recovery")
  p.add_argument("--update-every", type=int, default=5, help="steps between gradual mask updates")
  p.add_argument("--prune-until", type=float, default=0.6, help="fraction of the run over which sparsity ramps up")
  p.add_argument("--importance", default="gradient", help="gradient (Michel et al.) | magnitude")
  p.add_argument("--importance-batches", type=int, default=8, help="batches of 32 training sentences for importance")
  p.add_argument("--latency-rounds", type=int, default=30)
  p.add_argument("--latency-batch", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


class _Evaluator:
  """Dev accuracy of any (config, params): one eval step per config, packed dev batches built once."""

  def __init__(self, dev_ids, dev_labels, num_labels, pad_id):
    batching = BatchingConfig(strategy="packed", batch_size=16, shuffle=False)
    self.batches = make_batches(dev_ids, dev_labels, batching, pad_id=pad_id, seed=0, epoch=0).batches
    self.num_labels = num_labels
    self._steps = {}

  def __call__(self, config, params) -> float:
    if config not in self._steps:
      model = BertForSequenceClassification(config, num_labels=self.num_labels)
      self._steps[config] = make_eval_step(classification_loss(model))
    return evaluate(self._steps[config], params, self.batches)["accuracy"]


def _fine_tune(config, params, tx_factory, train, dev, args, num_labels, pad_id):
  model = BertForSequenceClassification(config, num_labels=num_labels)
  batching = BatchingConfig(strategy="packed", batch_size=args.batch_size)
  result = fit(
    model,
    params,
    tx_factory,
    train,
    dev,
    batching=batching,
    eval_batching=dataclasses.replace(batching, batch_size=16, shuffle=False),
    loop=LoopConfig(seed=args.seed, progress=False),
    pad_id=pad_id,
  )
  return result.state, result.evals[-1]["accuracy"], sum(result.stats["epoch_seconds"]), result.stats["final_step"]


def _latency(variants: dict, ids, mask, rounds: int) -> dict[str, dict[str, float]]:
  """Median forward time per variant, the variants interleaved round by round so load drifts hit all alike."""
  fns, out = {}, {}
  for name, (config, params) in variants.items():
    model = BertForSequenceClassification(config, num_labels=2)
    fn = jax.jit(lambda p, i, m, model=model: model.apply({"params": p}, i, m))
    params = jax.device_put(params)
    t0 = time.perf_counter()
    fn(params, ids, mask).block_until_ready()
    out[name] = {"compile_s": time.perf_counter() - t0}
    for _ in range(3):
      fn(params, ids, mask).block_until_ready()
    fns[name] = (fn, params)
  times = {name: [] for name in variants}
  for _ in range(rounds):
    for name, (fn, params) in fns.items():
      t0 = time.perf_counter()
      fn(params, ids, mask).block_until_ready()
      times[name].append(time.perf_counter() - t0)
  for name, ts in times.items():
    out[name].update(median_ms=1e3 * float(np.median(ts)), p25_ms=1e3 * float(np.percentile(ts, 25)))
  return out


def main(argv=None) -> dict:
  args = parse_args(argv)
  t_start = time.perf_counter()
  ensure_teacher(args.model, args.data)
  config, params = load_hf_bert(args.model, head="classifier")
  num_labels = int(np.shape(params["classifier"]["bias"])[0])
  has_tokenizer = (Path(args.model) / "tokenizer.json").is_file()
  tokenizer = load_tokenizer(args.model if has_tokenizer else default_model_path())  # exports hold weights only
  pad_id = config.pad_token_id
  train_ds = load_text_classification(args.data, "train")
  dev_ds = load_text_classification(args.data, "dev", label_names=train_ds.label_names)
  lo = args.train_offset
  train_texts = train_ds.texts[lo : lo + args.train_examples]
  train_ids, _ = tokenize(tokenizer, train_texts, max_length=config.max_position_embeddings)
  train = (train_ids, train_ds.labels[lo : lo + args.train_examples])
  dev_ids, _ = tokenize(tokenizer, dev_ds.texts, max_length=config.max_position_embeddings)
  dev = (dev_ids, dev_ds.labels)
  evaluator = _Evaluator(dev_ids, dev_ds.labels, num_labels, pad_id)
  results: dict = {"model": args.model, "args": vars(args), "devices": [str(d) for d in jax.devices()]}
  results["threads"] = os.cpu_count()
  dense_acc = evaluator(config, params)
  results["dense"] = {"dev_accuracy": dense_acc, "params": num_params(params)}
  print(f"dense: dev accuracy {dense_acc:.4f}, {num_params(params):,} parameters", flush=True)

  results["one_shot"] = [{"sparsity": 0.0, "measured_sparsity": 0.0, "dev_accuracy": dense_acc}]
  for s in [s for s in _floats(args.sweep) if s > 0]:
    pruned = apply_mask(params, magnitude_mask(params, s))
    acc = evaluator(config, pruned)
    results["one_shot"].append({"sparsity": s, "measured_sparsity": sparsity(pruned), "dev_accuracy": acc})
    print(f"one-shot {s:.0%}: dev accuracy {acc:.4f}", flush=True)

  results["gradual"] = []
  for s in _floats(args.gradual):

    def tx_factory(total, s=s):
      end = max(1, int(args.prune_until * total))
      schedule = PruningSchedule(final_sparsity=s, begin_step=0, end_step=end, update_every=args.update_every)
      return gradual_pruning(make_optimizer(OptimizerConfig(learning_rate=args.lr), total), schedule)

    state, acc, seconds, steps = _fine_tune(config, params, tx_factory, train, dev, args, num_labels, pad_id)
    row = {"sparsity": s, "measured_sparsity": sparsity(state.params), "dev_accuracy": acc, "steps": steps}
    results["gradual"].append({**row, "train_seconds": seconds})
    print(f"gradual {s:.0%}: dev accuracy {acc:.4f} ({steps} steps, {seconds:.0f}s)", flush=True)

  results["structured"] = []
  variants = {
    "dense": (config, params),
    "unstructured 50% (zeros)": (config, apply_mask(params, magnitude_mask(params, 0.5))),
  }
  fractions = _floats(args.structured)
  if fractions:
    imp_batching = BatchingConfig(strategy="dynamic", batch_size=32, shuffle=True)
    imp_batches = make_batches(*train, imp_batching, pad_id=pad_id, seed=args.seed + 1, epoch=0).batches
    model = BertForSequenceClassification(config, num_labels=num_labels)
    t0 = time.perf_counter()
    scores = {
      "gradient": gradient_importance(model, params, imp_batches[: args.importance_batches]),
      "magnitude": magnitude_importance(config, params),
    }
    results["importance_seconds"] = time.perf_counter() - t0
    for f in fractions:
      row = {"fraction": f}
      for name, score in scores.items():  # before recovery, both importance measures (evaluation only)
        small_config, small_params = shrink(config, params, select(score, heads=f, neurons=f))
        row[f"dev_accuracy_before_{name}"] = evaluator(small_config, small_params)
      small_config, small_params = shrink(config, params, select(scores[args.importance], heads=f, neurons=f))
      row.update(
        importance=args.importance,
        layer_num_heads=small_config.layer_num_heads,
        layer_intermediate_sizes=small_config.layer_intermediate_sizes,
        params=num_params(small_params),
        encoder_layer_params=num_params({k: v for k, v in small_params["bert"].items() if "layer" in k}),
        dev_accuracy_before=row[f"dev_accuracy_before_{args.importance}"],
      )

      def tx_factory(total):
        return make_optimizer(OptimizerConfig(learning_rate=args.recovery_lr), total)

      state, acc, seconds, steps = _fine_tune(
        small_config, small_params, tx_factory, train, dev, args, num_labels, pad_id
      )
      row.update(dev_accuracy_after=acc, recovery_steps=steps, recovery_seconds=seconds)
      results["structured"].append(row)
      variants[f"structured {f:.0%}"] = (small_config, jax.device_get(state.params))
      print(
        f"structured {f:.0%}: {row['params']:,} params, heads {small_config.layer_num_heads}, dev accuracy "
        f"{row['dev_accuracy_before']:.4f} -> {acc:.4f} after {steps} recovery steps",
        flush=True,
      )
    results["dense"]["encoder_layer_params"] = num_params({k: v for k, v in params["bert"].items() if "layer" in k})

  results["latency"], results["latency_batch_shape"] = {}, None
  order = np.arange(len(dev_ids))[: args.latency_batch if args.latency_rounds else 0]
  if len(order):
    padded = dynamic_pad([dev_ids[i] for i in order], pad_id=pad_id)
    ids = padded.ids
    mask = (np.arange(ids.shape[1])[None, :] < padded.lengths[:, None]).astype(np.int32)
    results["latency_batch_shape"] = list(ids.shape)
    results["latency"] = _latency(variants, ids, mask, args.latency_rounds)
    base = results["latency"]["dense"]["median_ms"]
    for name, lat in results["latency"].items():
      lat["speedup"] = base / lat["median_ms"]
      print(f"latency {name}: {lat['median_ms']:.1f} ms median ({lat['speedup']:.2f}x)", flush=True)
  results["wall_seconds"] = time.perf_counter() - t_start
  _write(results, Path(args.output))
  return results


def _write(results: dict, out: Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=2, default=lambda o: list(o)))
  (out / "results.md").write_text(_markdown(results))
  _plot(results, out / "results.png")
  print(f"wrote {out / 'results.md'} in {results['wall_seconds']:.0f}s", flush=True)


def combine(parts: list[str], output: str) -> dict:
  """Merges runs made in parallel (e.g. one with ``--structured ''``, one with ``--sweep '' --gradual ''``)."""
  runs = [json.loads((Path(p) / "results.json").read_text()) for p in parts]
  merged = dict(runs[0])
  for run in runs[1:]:
    if run["dense"]["dev_accuracy"] != merged["dense"]["dev_accuracy"]:
      raise ValueError("the runs start from different models")
    for key in ("one_shot", "gradual", "structured"):
      merged[key] = merged[key] if len(merged[key]) >= len(run[key]) else run[key]
    for key in ("latency", "latency_batch_shape", "importance_seconds", "dense"):
      if run.get(key):
        merged[key] = run[key]
  merged["wall_seconds"] = max(r["wall_seconds"] for r in runs)
  merged["parts"] = [r["args"] for r in runs]
  _write(merged, Path(output))
  return merged


def _markdown(r: dict) -> str:
  dense = r["dense"]["dev_accuracy"]
  a = r["args"]
  lines = [
    f"# Pruning MiniLM fine-tuned on SST-2 (dev accuracy of the dense model: {dense:.2%})",
    "",
    f"Devices: {', '.join(r['devices'])}; {r['threads']} CPU threads. Command: `python -m experiments.pruning` "
    f"(train slice {a['train_offset']}..{a['train_offset'] + a['train_examples']}, packed rows of "
    f"{a['batch_size']}; gradual lr {a['lr']}, recovery lr {a['recovery_lr']}). Wall time {r['wall_seconds']:.0f}s.",
    "",
    "## Unstructured (global magnitude over the encoder layers' 36 weight matrices; pooler and classifier dense)",
    "",
    "| sparsity | one-shot dev acc | gradual dev acc | gradual - dense |",
    "|---|---|---|---|",
  ]
  gradual = {g["sparsity"]: g for g in r["gradual"]}
  for row in r["one_shot"]:
    g = gradual.pop(row["sparsity"], None)
    gtxt = f"{g['dev_accuracy']:.2%} | {100 * (g['dev_accuracy'] - dense):+.2f} pts" if g else "| "
    lines.append(f"| {row['sparsity']:.0%} | {row['dev_accuracy']:.2%} | {gtxt} |")
  for s, g in gradual.items():
    lines.append(f"| {s:.0%} | | {g['dev_accuracy']:.2%} | {100 * (g['dev_accuracy'] - dense):+.2f} pts |")
  if r["gradual"]:
    g = r["gradual"][0]
    lines += [
      "",
      f"Gradual runs: {g['steps']} steps each, sparsity reached exactly (measured {g['measured_sparsity']:.4f}).",
    ]
  if r["structured"]:
    lines += [
      "",
      "## Structured (heads and FFN neurons removed; `shrink` makes the matrices smaller)",
      "",
      f"Importance: {r['structured'][0]['importance']} (Michel et al. 2019, {a['importance_batches']} batches of 32) "
      f"for the kept model; magnitude shown for comparison before recovery. Importance took {r['importance_seconds']:.0f}s.",
      "",
      "| removed | params | encoder-layer params | heads per layer | dev acc before (magnitude / gradient) "
      "| after recovery | after - dense |",
      "|---|---|---|---|---|---|---|",
      f"| 0% | {r['dense']['params']:,} | {r['dense']['encoder_layer_params']:,} | 12 x 6 | {dense:.2%} | | |",
    ]
    for s in r["structured"]:
      lines.append(
        f"| {s['fraction']:.0%} | {s['params']:,} | {s['encoder_layer_params']:,} | "
        f"{' '.join(map(str, s['layer_num_heads']))} | {s['dev_accuracy_before_magnitude']:.2%} / "
        f"{s['dev_accuracy_before_gradient']:.2%} | {s['dev_accuracy_after']:.2%} | "
        f"{100 * (s['dev_accuracy_after'] - dense):+.2f} pts |"
      )
  shape = r["latency_batch_shape"]
  if not shape:
    return "\n".join(lines) + "\n"
  lines += [
    "",
    f"## CPU inference latency (batch {shape[0]} dev sentences padded to {shape[1]} tokens, fp32, "
    f"{a['latency_rounds']} interleaved rounds)",
    "",
    "| model | median ms | 25th pct ms | speed-up vs dense | compile s |",
    "|---|---|---|---|---|",
  ]
  for name, lat in r["latency"].items():
    lines.append(
      f"| {name} | {lat['median_ms']:.1f} | {lat['p25_ms']:.1f} | {lat['speedup']:.2f}x | {lat['compile_s']:.1f} |"
    )
  return "\n".join(lines) + "\n"


def _plot(r: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
  dense = 100 * r["dense"]["dev_accuracy"]
  xs = [100 * x["sparsity"] for x in r["one_shot"]]
  ax.plot(xs, [100 * x["dev_accuracy"] for x in r["one_shot"]], "o-", label="one-shot magnitude (no training)")
  if r["gradual"]:
    ax.plot(
      [100 * g["sparsity"] for g in r["gradual"]],
      [100 * g["dev_accuracy"] for g in r["gradual"]],
      "s--",
      label="gradual (cubic schedule, short fine-tune)",
    )
  ax.axhline(dense, color="grey", lw=1, label=f"dense {dense:.1f}%")
  ax.set(xlabel="unstructured sparsity (%)", ylabel="SST-2 dev accuracy (%)", title="Unstructured pruning")
  ax.legend(fontsize=8)
  names = list(r["latency"]) or ["(not measured)"]
  r = {**r, "latency": r["latency"] or {"(not measured)": {"median_ms": 0.0, "speedup": 0.0}}}
  bx.bar(range(len(names)), [r["latency"][n]["median_ms"] for n in names], color="tab:blue")
  for i, n in enumerate(names):
    bx.text(i, r["latency"][n]["median_ms"], f"{r['latency'][n]['speedup']:.2f}x", ha="center", va="bottom")
  bx.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
  bx.set(ylabel="median ms / batch of 32", title="CPU inference latency")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  run_main(main)
