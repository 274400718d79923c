"""The BERT compression case study on SST-2: fine-tuned MiniLM -> structured pruning -> distilled student -> int8.

    python -m experiments.compress                          # defaults: about 13 minutes on 2 shared cores
    python -m experiments.compress --prune-steps 100 --distill-steps 300   # a 4-minute version, 1 point worse

One pipeline (`compress`), the recipe the seeds recommend: *train* with pruning and distillation, *serve* with
quantization (and sparse attention where sequences are long enough for it to matter). Every stage is measured
as it comes out of the pipeline: SST-2 dev accuracy, size on disk (one safetensors file), and CPU latency of the
forward pass at batch 1 and batch 32 (medians, all stages timed interleaved in one run):

  1 fine-tuned MiniLM    the teacher (default runs/teacher/model), float32
  2 pruned               gradient-importance structured pruning (heads and FFN neurons, `jfast.compress`), then a
                         short recovery fine-tune distilled from the teacher
  3 distilled student    every other layer of the pruned model (`jfast.compress.student_from_teacher`), distilled
                         from the teacher on its soft targets (`make_distill_step`)
  4 int8                 `jfast.compress.quantize` (int8 weights and per-token activations) of the student; the
                         checkpoint stores the embedding tables as int8 rows too
  5 int8 + sparse attn.  (with --window) the int8 student with sliding-window attention at inference

Writes results/compress/{results.json, results.md, compress_cpu.png}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from experiments import quantize as qexp
from experiments.teacher import ensure_teacher
from jfast import compress as quant
from jfast.app.entry import run_main
from jfast.compress import (
  DistillConfig,
  distill_params,
  distillation_loss,
  gradient_importance,
  select,
  shrink,
  split_params,
  student_from_teacher,
)
from jfast.models import BertForSequenceClassification, load_hf_bert
from jfast.nn import AttentionConfig
from jfast.optim import OptimizerConfig, make_optimizer
from jfast.training import LoopConfig, fit


def distill(teacher, teacher_params, student_config, student_params, batches, *, lr, config, seed=0):
  """Trains the student on ``batches`` against the teacher (`jfast.training.fit`); returns (params, seconds)."""
  student = BertForSequenceClassification(student_config, num_labels=teacher.num_labels)
  trainable = distill_params(student_params, student_config, teacher.config, config)
  t = time.perf_counter()
  result = fit(
    student,
    trainable,
    lambda total: make_optimizer(OptimizerConfig(learning_rate=lr), total),
    batches,
    loss=lambda m: distillation_loss(m, teacher, config),
    inputs=(teacher_params,),
    loop=LoopConfig(seed=seed, progress=False, log_every=max(len(batches), 1)),
  )
  params = jax.device_get(split_params(result.state.params)[0])
  return params, time.perf_counter() - t


def compress(teacher_config, teacher_params, data: qexp.Data, args, log=print) -> dict[str, dict]:
  """The whole recipe: prune -> recover -> shrink depth -> distill -> quantize (-> sparse attention).

  Returns:
    ``stage name -> {"config", "params", "embeddings" (checkpoint storage), "train_seconds", "notes"}``.
  """
  num_labels = teacher_params["classifier"]["bias"].shape[0]
  teacher = BertForSequenceClassification(teacher_config, num_labels=num_labels)
  kd = DistillConfig(temperature=args.temperature, alpha=args.alpha)
  stages = {
    "fine-tuned MiniLM": {
      "config": teacher_config,
      "params": teacher_params,
      "embeddings": "float32",
      "train_seconds": 0.0,
      "notes": "teacher, float32",
    }
  }
  # Training batches never overlap the dev set; the teacher saw sentences 0..40k, we re-read them (as DistilBERT).
  train = qexp.train_batches(data, 0, len(data.train_ids), 16, seed=3)
  needed = args.prune_steps + args.distill_steps
  train = (train * (needed // len(train) + 1))[:needed]  # more steps than one epoch: go round again

  # 2. structured pruning, ranked by Michel et al.'s gradient importance on a few unpacked train batches.
  t = time.perf_counter()
  rank_batches = qexp.train_batches(data, 0, 32 * args.importance_batches, 32, seed=4)[: args.importance_batches]
  importance = gradient_importance(teacher, teacher_params, rank_batches)
  structure = select(importance, heads=args.prune_heads, neurons=args.prune_neurons)
  pruned_config, pruned_params = shrink(teacher_config, teacher_params, structure)
  rank_s = time.perf_counter() - t
  recover = train[: args.prune_steps]
  if recover:
    pruned_params, s = distill(teacher, teacher_params, pruned_config, pruned_params, recover, lr=args.lr, config=kd)
  else:
    s = 0.0
  stages["pruned"] = {
    "config": pruned_config,
    "params": pruned_params,
    "embeddings": "float32",
    "train_seconds": rank_s + s,
    "notes": f"-{args.prune_heads:.0%} heads, -{args.prune_neurons:.0%} FFN neurons; {len(recover)} recovery steps",
  }
  log(f"pruned: heads per layer {pruned_config.layer_num_heads}, FFN {pruned_config.layer_intermediate_sizes}")

  # 3. shallower student from the pruned model's layers, distilled from the (unpruned) teacher.
  layers = tuple(int(i) for i in args.student_layers.split(","))
  student_config, student_params = student_from_teacher(pruned_config, pruned_params, layers=layers)
  steps = train[args.prune_steps : args.prune_steps + args.distill_steps]
  student_params, s = distill(teacher, teacher_params, student_config, student_params, steps, lr=args.lr, config=kd)
  stages["distilled student"] = {
    "config": student_config,
    "params": student_params,
    "embeddings": "float32",
    "train_seconds": s,
    "notes": f"layers {layers} of the pruned model; {len(steps)} distillation steps (T={kd.temperature}, "
    f"alpha={kd.alpha})",
  }

  # 4. int8 inference.
  int8_config = student_config.replace(quantization="int8")
  stages["int8"] = {
    "config": int8_config,
    "params": quant.quantize(student_params),
    "embeddings": "int8",
    "train_seconds": 0.0,
    "notes": "int8 weights (per channel) and activations (per token); int8 embedding storage",
  }
  if args.window:
    sparse = AttentionConfig(kind="sliding_window", window=args.window, global_tokens=1)
    stages[f"int8 + window {args.window}"] = {
      **stages["int8"],
      "config": int8_config.replace(attention=sparse),
      "notes": f"sliding-window attention (w={args.window}, [CLS] global) at inference only",
    }
  return stages


def _file(checkpoints: str, name: str) -> Path:
  return Path(checkpoints) / f"{name.replace(' ', '_')}.safetensors"


def _notes(args) -> dict[str, str]:
  return {
    "fine-tuned MiniLM": "teacher, float32",
    "pruned": f"-{args.prune_heads:.0%} heads, -{args.prune_neurons:.0%} FFN neurons; {args.prune_steps} recovery steps",
    "distilled student": f"layers ({args.student_layers}) of the pruned model; {args.distill_steps} distillation "
    f"steps (T={args.temperature}, alpha={args.alpha})",
    "int8": "int8 weights (per channel) and activations (per token); int8 embedding storage",
  }


def reuse(args, out: Path) -> dict[str, dict]:
  """The stages a past run saved under ``--checkpoints``, to re-measure them without retraining."""
  previous = (
    json.loads((out / "results.json").read_text()).get("stages", {}) if (out / "results.json").is_file() else {}
  )
  stages = {}
  for name, note in _notes(args).items():
    config, params = quant.load_quantized(_file(args.checkpoints, name))
    old = previous.get(name, {})
    stages[name] = {
      "config": config,
      "params": params,
      "embeddings": "int8" if name == "int8" else "float32",
      "train_seconds": old.get("train_seconds", float("nan")),
      "notes": note + " (checkpoint of an earlier run of this pipeline)",
    }
  if args.window:
    sparse = AttentionConfig(kind="sliding_window", window=args.window, global_tokens=1)
    stages[f"int8 + window {args.window}"] = {
      **stages["int8"],
      "config": stages["int8"]["config"].replace(attention=sparse),
      "notes": f"sliding-window attention (w={args.window}, [CLS] global) at inference only",
    }
  return stages


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=str(qexp.DEFAULT_MODEL), help="fine-tuned HF folder with a classifier head")
  p.add_argument("--data", default=str(qexp.DEFAULT_DATA))
  p.add_argument("--prune-heads", type=float, default=0.5, help="fraction of attention heads removed")
  p.add_argument("--prune-neurons", type=float, default=0.5, help="fraction of FFN neurons removed")
  p.add_argument("--importance-batches", type=int, default=8, help="train batches of 32 to rank heads/neurons")
  p.add_argument("--prune-steps", type=int, default=200, help="recovery distillation steps after pruning")
  p.add_argument("--student-layers", default="1,3,5", help="pruned-model layers the student keeps")
  p.add_argument("--distill-steps", type=int, default=900, help="student distillation steps (16 packed rows each)")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--temperature", type=float, default=2.0)
  p.add_argument("--alpha", type=float, default=0.5)
  p.add_argument("--window", type=int, default=0, help="also serve with sliding-window attention of this reach")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--latency-batches", type=int, default=8)
  p.add_argument("--single", type=int, default=32)
  p.add_argument("--output", default=str(qexp.ROOT / "results" / "compress"))
  p.add_argument("--checkpoints", default=str(qexp.ROOT / "runs" / "compress"))
  p.add_argument("--reuse", action="store_true", help="re-measure the stages saved under --checkpoints by a past run")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  ensure_teacher(args.model, args.data)
  config, params = load_hf_bert(args.model, head="classifier")
  num_labels = params["classifier"]["bias"].shape[0]
  data = qexp.load_data(args.data, args.model, single=args.single, pad_id=config.pad_token_id)
  if args.reuse:
    stages = reuse(args, out)
  else:
    stages = compress(config, params, data, args, log=lambda m: print(m, flush=True))

  results, fns = {}, {}
  for name, st in stages.items():
    fn = qexp.forward_fn(BertForSequenceClassification(st["config"], num_labels=num_labels))
    compile_s = qexp.compile_seconds(fn, st["params"], data.dev + data.dev_single)
    file = _file(args.checkpoints, name)
    size = quant.save_quantized(file, st["params"], config=st["config"], embeddings=st["embeddings"])
    # Evaluate what the checkpoint holds (int8 embedding rows come back dequantized), not the in-memory tree.
    _, stored = quant.load_quantized(file)
    stored = qexp.on_device(stored)
    fns[name] = (fn, stored)
    results[name] = {
      "dev_accuracy": qexp.accuracy(fn, stored, data.dev),
      "disk_mb": size / 1e6,
      "params_millions": sum(int(np.size(x)) for x in jax.tree.leaves(st["params"])) / 1e6,
      "train_seconds": st["train_seconds"],
      "compile_s": compile_s,
      "notes": st["notes"],
    }
    print(f"{name}: dev accuracy {results[name]['dev_accuracy']:.4f}, {size / 1e6:.1f} MB", flush=True)
  picks = np.linspace(0, len(data.dev) - 1, args.latency_batches).astype(int)
  lat32 = qexp.interleaved_latency(fns, [data.dev[i] for i in picks], args.rounds)
  lat1 = qexp.interleaved_latency(fns, data.dev_single, args.rounds)
  for name in results:
    results[name]["latency_b32_ms"] = lat32[name]["median_ms"]
    results[name]["latency_b1_ms"] = lat1[name]["median_ms"]
  base, final = results["fine-tuned MiniLM"], results["int8"]
  summary = {
    "model": args.model,
    "stages": results,
    "pipeline": {
      "accuracy_drop_points": 100 * (base["dev_accuracy"] - final["dev_accuracy"]),
      "smaller": base["disk_mb"] / final["disk_mb"],
      "faster_b32": base["latency_b32_ms"] / final["latency_b32_ms"],
      "faster_b1": base["latency_b1_ms"] / final["latency_b1_ms"],
    },
    "rounds": args.rounds,
    "threads": os.cpu_count(),
    "wall_seconds": time.perf_counter() - t0,
    "args": vars(args),
  }
  (out / "results.json").write_text(json.dumps(summary, indent=2))
  (out / "results.md").write_text(markdown(summary))
  plot(summary, out / "compress_cpu.png")
  print(markdown(summary))
  return summary


def _seconds(value) -> str:
  return "n/a" if value is None or value != value else f"{value:.0f}"


def markdown(s: dict) -> str:
  base = s["stages"]["fine-tuned MiniLM"]
  lines = [
    "| stage | dev accuracy | size (MB) | smaller | latency b32 (ms) | faster | latency b1 (ms) | faster | params (M) "
    "| train (s) | what |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in s["stages"].items():
    lines.append(
      f"| {name} | {100 * r['dev_accuracy']:.2f}% | {r['disk_mb']:.1f} | {base['disk_mb'] / r['disk_mb']:.1f}x "
      f"| {r['latency_b32_ms']:.1f} | {base['latency_b32_ms'] / r['latency_b32_ms']:.2f}x | {r['latency_b1_ms']:.2f} "
      f"| {base['latency_b1_ms'] / r['latency_b1_ms']:.2f}x | {r['params_millions']:.1f} | {_seconds(r['train_seconds'])} "
      f"| {r['notes']} |"
    )
  p = s["pipeline"]
  lines += [
    "",
    f"Pipeline (fine-tuned MiniLM -> int8 student): {p['smaller']:.1f}x smaller, {p['faster_b32']:.2f}x faster at "
    f"batch 32 ({p['faster_b1']:.2f}x at batch 1), {p['accuracy_drop_points']:+.2f} points of dev accuracy lost.",
  ]
  return "\n".join(lines) + "\n"


def plot(s: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(s["stages"])
  st = s["stages"]
  fig, axes = plt.subplots(1, 4, figsize=(16, 4))
  for ax, key, title in (
    (axes[0], "dev_accuracy", "SST-2 dev accuracy (%)"),
    (axes[1], "disk_mb", "size on disk (MB)"),
    (axes[2], "latency_b32_ms", "latency, batch 32 (ms)"),
    (axes[3], "latency_b1_ms", "latency, batch 1 (ms)"),
  ):
    vals = [100 * st[n][key] if key == "dev_accuracy" else st[n][key] for n in names]
    bars = ax.bar(range(len(names)), vals, color="#1f77b4")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    if key == "dev_accuracy":
      ax.set_ylim(min(vals) - 3, max(vals) + 1)
  fig.suptitle("Compressing a SST-2 fine-tuned MiniLM, stage by stage (2-core CPU, XLA:CPU)", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  run_main(main)
