"""Distil the fine-tuned MiniLM (6 layers) into 3- and 2-layer students: hard labels vs soft targets vs hidden states.

    python -m experiments.distill                         # six runs over the 27,349 sentences the teacher never saw
    python -m experiments.distill --train-examples 8000   # CPU-sized: 8,000 of them (sentences 40,000-47,999)

The default sentences are 40,000-67,348 of SST-2 train (all after the first 40,000): the teacher fine-tuned on the
first 40,000, and on its own training sentences its outputs are little more than the labels it memorised.

Every student starts from the teacher's own layers (DistilBERT's initialisation), namely the layers its hidden
states are matched to, ``(i + 1) * N // M - 1``: 1,3,5 for three layers and 2,5 for two (the top layer included, as
DistilBERT's extraction took 0,2,4,7,9,11 of 12; before training, 1,3,5 scores 79% on dev and 0,2,4 56%). It then
trains one epoch over the same packed batches with the same optimizer, three ways:
``hard`` (labels only, the plain train step), ``soft`` (alpha * T^2 KL to the teacher + (1 - alpha) * CE) and
``soft+hidden`` (plus TinyBERT hidden-state MSE). Reports dev accuracy, parameters, CPU inference latency (batch 32
of dev sentences, median of interleaved repeats, teacher alongside) and train time (compile apart); writes
``results.json``, ``results.md`` and ``results.png`` under ``--output`` and copies the table and plot to
``docs/figures/distill_cpu.*``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from experiments.teacher import ensure_teacher
from jfast.app.entry import run_main
from jfast.app.finetune import DEFAULT_DATA, parse_layers, tokenizer_path
from jfast.compress import (
  DistillConfig,
  distillation_loss,
  num_params,
  precompute_teacher_logits,
  split_params,
  student_from_teacher,
)
from jfast.data import (
  BatchingConfig,
  TextDataset,
  fixed_pad,
  load_text_classification,
  load_tokenizer,
  make_batches,
  tokenize,
)
from jfast.models import BertForSequenceClassification, load_hf_bert, save_hf_bert
from jfast.optim import OptimizerConfig, make_optimizer
from jfast.training import LoopConfig, classification_loss, evaluate, fit, make_eval_step

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEACHER = ROOT / "runs" / "teacher" / "model"
MODES = ("hard", "soft", "soft+hidden")


def train_student(
  student_model,
  params,
  batches,
  *,
  teacher_model=None,
  teacher_params=None,
  distill: DistillConfig | None = None,
  optimizer: OptimizerConfig,
  precision: str = "fp32",
  teacher_precision: str | None = None,
  precompute: bool = False,
  seed: int = 0,
  log_every: int = 25,
):
  """Trains ``student_model`` over ``batches`` once (`jfast.training.fit`): hard labels when ``distill`` is None,
  else distillation from the teacher inside the step (or from its precomputed logits).

  Returns:
    ``(state, stats)`` with per-step wall times, first-step (compile) time and the run's mean loss terms.
  """
  loss, inputs = classification_loss, ()
  if distill is not None:
    if precompute:
      batches = precompute_teacher_logits(teacher_model, teacher_params, batches, policy=teacher_precision)

    def loss(student):
      teacher = None if precompute else teacher_model
      return distillation_loss(student, teacher, distill, teacher_policy=teacher_precision)

    inputs = (None if precompute else teacher_params,)

  def report(row):
    if log_every and row["step"] % log_every == 0:
      terms = " ".join(f"{k} {row[k]:.4f}" for k in ("kd", "hidden") if k in row)
      print(f"    step {row['step']}/{len(batches)} loss {row['loss']:.4f} {terms}", flush=True)

  result = fit(
    student_model,
    params,
    lambda total: make_optimizer(optimizer, total),
    batches,
    loss=loss,
    inputs=inputs,
    policy=precision,
    loop=LoopConfig(seed=seed, log_every=1, quiet=True, time_steps=True),
    on_log=report,
  )
  times = [seconds for _, seconds in result.stats["step_times"]]
  median = statistics.median(times[1:]) if len(times) > 1 else times[0]
  examples = max(sum(row["examples"] for row in result.history), 1.0)

  def mean(key):
    return sum(row[key] * row["examples"] for row in result.history) / examples

  stats = {
    "steps": len(times),
    "train_seconds": sum(times),
    "step_median_s": median,
    "compile_seconds": max(times[0] - median, 0.0),
    "train_seconds_excl_compile": sum(times) - max(times[0] - median, 0.0),
    "compiles": result.stats["train_compiles"],
    "train_loss": mean("loss"),
    "train_accuracy": mean("accuracy"),
  }
  if distill is not None:
    stats["teacher_agreement"] = mean("agree")
    for k in ("kd", "ce", "hidden"):
      stats[f"train_{k}"] = mean(k)
  return result.state, stats


def measure_latency(models: dict, batch, *, reps: int, warmup: int = 3) -> dict[str, float]:
  """Median forward time (ms) per model on one batch, repeats interleaved model by model to share the noise."""
  forwards = {}
  for name, (model, params) in models.items():
    fn = jax.jit(lambda p, ids, mask, model=model: model.apply({"params": p}, ids, mask))
    forwards[name] = (fn, params)
  times = {name: [] for name in models}
  for r in range(warmup + reps):
    for name, (fn, params) in forwards.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, *batch))
      if r >= warmup:
        times[name].append((time.perf_counter() - t0) * 1e3)
  return {name: statistics.median(t) for name, t in times.items()}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="fine-tuned HF BERT folder with a classifier head")
  p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the teacher's, else all-MiniLM-L6-v2)")
  p.add_argument("--data", default=str(DEFAULT_DATA))
  p.add_argument(
    "--train-examples", type=int, default=0, help="N SST-2 training sentences after the offset (0: all of them)"
  )
  p.add_argument(
    "--train-offset",
    type=int,
    default=40000,
    help="skip this many training sentences first (the teacher fine-tuned on the first 40,000)",
  )
  p.add_argument("--students", nargs="+", type=parse_layers, default=[(1, 3, 5), (2, 5)], help="layer lists")
  p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
  p.add_argument("--batch-size", type=int, default=16, help="packed rows per batch")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--temperature", type=float, default=2.0)
  p.add_argument("--alpha", type=float, default=0.5)
  p.add_argument("--hidden-weight", type=float, default=1.0)
  p.add_argument("--precision", default="fp32", help="the students' policy")
  p.add_argument("--teacher-precision", default=None, help="the teacher's policy inside the step (e.g. bf16)")
  p.add_argument("--precompute-logits", action="store_true", help="soft mode streams precomputed teacher logits")
  p.add_argument("--latency-batch", type=int, default=32)
  p.add_argument("--latency-reps", type=int, default=30)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default=str(ROOT / "results" / "distill"))
  p.add_argument("--figures", default=str(ROOT / "docs" / "figures"), help="copy table and plot here ('' to skip)")
  p.add_argument("--export", action="store_true", help="save each student as a Hugging Face folder under OUTPUT")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  teacher_dir = ensure_teacher(args.teacher, args.data)
  t_config, t_params = load_hf_bert(teacher_dir, head="classifier")
  num_labels = t_params["classifier"]["bias"].shape[0]
  teacher = BertForSequenceClassification(t_config, num_labels=num_labels)
  tokenizer_dir = args.tokenizer or tokenizer_path(teacher_dir)
  tokenizer = load_tokenizer(tokenizer_dir)
  train_ds = load_text_classification(args.data, "train")
  end = args.train_offset + args.train_examples if args.train_examples else None
  train_ds = TextDataset(
    train_ds.texts[args.train_offset : end], train_ds.labels[args.train_offset : end], train_ds.label_names
  )
  dev_ds = load_text_classification(args.data, "dev", label_names=train_ds.label_names)
  train_ids, _ = tokenize(tokenizer, train_ds.texts, max_length=t_config.max_position_embeddings)
  dev_ids, _ = tokenize(tokenizer, dev_ds.texts, max_length=t_config.max_position_embeddings)
  batching = BatchingConfig(strategy="packed", batch_size=args.batch_size)
  batches = make_batches(train_ids, train_ds.labels, batching, pad_id=t_config.pad_token_id, seed=args.seed).batches
  dev_batches = make_batches(
    dev_ids, dev_ds.labels, dataclasses.replace(batching, shuffle=False), pad_id=t_config.pad_token_id
  ).batches
  optimizer = OptimizerConfig(learning_rate=args.lr)
  print(f"{len(train_ds)} train sentences in {len(batches)} packed batches of {batches[0].shape}", flush=True)

  teacher_eval = evaluate(make_eval_step(classification_loss(teacher)), t_params, dev_batches)
  print(f"teacher dev accuracy {teacher_eval['accuracy']:.4f}", flush=True)
  configs = {
    "soft": DistillConfig(temperature=args.temperature, alpha=args.alpha),
    "soft+hidden": DistillConfig(temperature=args.temperature, alpha=args.alpha, hidden_weight=args.hidden_weight),
  }
  rows, finals = [], {}
  for layers in args.students:
    s_config, s_params = student_from_teacher(t_config, t_params, layers)
    student = BertForSequenceClassification(s_config, num_labels=num_labels)
    chosen = tuple(range(0, t_config.num_hidden_layers, 2)) if layers == "every_other" else layers
    init_eval = evaluate(make_eval_step(classification_loss(student)), s_params, dev_batches)
    print(f"student {chosen}: {num_params(s_params) / 1e6:.1f}M params, init dev {init_eval['accuracy']:.4f}")
    for mode in args.modes:
      print(f"  {mode}", flush=True)
      state, stats = train_student(
        student,
        s_params,
        batches,
        teacher_model=teacher,
        teacher_params=t_params,
        distill=configs.get(mode),
        optimizer=optimizer,
        precision=args.precision,
        teacher_precision=args.teacher_precision,
        precompute=args.precompute_logits and mode == "soft",
        seed=args.seed,
      )
      params = split_params(state.params)[0]
      dev = evaluate(make_eval_step(classification_loss(student)), params, dev_batches)
      print(f"  {mode}: dev {dev['accuracy']:.4f}, {stats['train_seconds']:.0f}s", flush=True)
      finals[s_config.num_hidden_layers] = (student, params)
      if args.export:
        folder = Path(args.output) / f"student{len(chosen)}_{mode}"
        save_hf_bert(folder, s_config, params, label_names=train_ds.label_names, tokenizer=tokenizer_dir)
      rows.append(
        {
          "layers": len(chosen),
          "teacher_layers": list(chosen),
          "mode": mode,
          "dev_accuracy": dev["accuracy"],
          "init_dev_accuracy": init_eval["accuracy"],
          "params": num_params(params),
          **stats,
        }
      )

  # Latency: one batch of dev sentences padded to their longest, every model in turn, repeats interleaved.
  sentences = dev_ids[: args.latency_batch]
  padded = fixed_pad(sentences, max(len(s) for s in sentences), t_config.pad_token_id)
  mask = (np.arange(padded.ids.shape[1])[None, :] < np.asarray(padded.lengths)[:, None]).astype(np.int32)
  latency_batch = (padded.ids, mask)
  models = {"teacher": (teacher, t_params), **{f"{n}-layer": m for n, m in sorted(finals.items(), reverse=True)}}
  latency = measure_latency(models, latency_batch, reps=args.latency_reps)
  for row in rows:
    row["latency_ms"] = latency[f"{row['layers']}-layer"]
    row["speedup"] = latency["teacher"] / row["latency_ms"]
    row["accuracy_retained"] = row["dev_accuracy"] / teacher_eval["accuracy"]
  result = {
    "teacher": {
      "path": str(teacher_dir),
      "layers": t_config.num_hidden_layers,
      "dev_accuracy": teacher_eval["accuracy"],
      "params": num_params(t_params),
      "latency_ms": latency["teacher"],
    },
    "rows": rows,
    "latency_shape": list(latency_batch[0].shape),
    "train_sentences": len(train_ds),
    "batch_shape": list(batches[0].shape),
    "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
    "devices": [str(d) for d in jax.devices()],
    "threads": os.cpu_count(),
  }
  write_outputs(result, Path(args.output), args.figures)
  return result


def write_outputs(result: dict, out: Path, figures: str) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
  t = result["teacher"]
  lines = [
    f"Teacher: {t['layers']}-layer MiniLM fine-tuned on SST-2, dev accuracy {t['dev_accuracy']:.2%}, "
    f"{t['params'] / 1e6:.1f}M params, {t['latency_ms']:.1f} ms per batch of {result['latency_shape'][0]} "
    f"(length {result['latency_shape'][1]}). Students trained on {result['train_sentences']} SST-2 sentences, "
    f"one epoch of packed batches {tuple(result['batch_shape'])}, 2-core CPU.",
    "",
    "| student | teacher layers | training | dev acc | % of teacher | params | latency (ms) | speed-up "
    "| train s (excl. compile) | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    lines.append(
      f"| {r['layers']}-layer | {','.join(map(str, r['teacher_layers']))} | {r['mode']} | {r['dev_accuracy']:.2%} "
      f"| {r['accuracy_retained']:.1%} | {r['params'] / 1e6:.1f}M | {r['latency_ms']:.1f} | {r['speedup']:.2f}x "
      f"| {r['train_seconds_excl_compile']:.0f} | {r['compile_seconds']:.0f} |"
    )
  (out / "results.md").write_text("\n".join(lines) + "\n")
  plot(result, out / "results.png")
  if figures:
    Path(figures).mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "results.md", Path(figures) / "distill_cpu.md")
    shutil.copy(out / "results.png", Path(figures) / "distill_cpu.png")
  print((out / "results.md").read_text())


def plot(result: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows, t = result["rows"], result["teacher"]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  layer_counts = sorted({r["layers"] for r in rows}, reverse=True)
  modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
  width = 0.8 / max(len(modes), 1)
  for k, mode in enumerate(modes):
    accs = [
      next((r["dev_accuracy"] for r in rows if r["layers"] == n and r["mode"] == mode), np.nan) for n in layer_counts
    ]
    xs = np.arange(len(layer_counts)) + (k - (len(modes) - 1) / 2) * width
    ax1.bar(xs, [a * 100 for a in accs], width, label=mode)
  ax1.axhline(t["dev_accuracy"] * 100, color="k", ls="--", lw=1, label="teacher")
  ax1.axhline(t["dev_accuracy"] * 97, color="gray", ls=":", lw=1, label="97% of teacher")
  ax1.set_xticks(np.arange(len(layer_counts)), [f"{n}-layer student" for n in layer_counts])
  accs_all = [r["dev_accuracy"] * 100 for r in rows] + [t["dev_accuracy"] * 100]
  ax1.set_ylim(min(accs_all) - 3, max(accs_all) + 1.5)
  ax1.set_ylabel("SST-2 dev accuracy (%)")
  ax1.legend(fontsize=7, loc="upper right", ncol=2)
  ax1.set_title("Same budget, three ways to train")
  best = {n: max((r for r in rows if r["layers"] == n), key=lambda r: r["dev_accuracy"]) for n in layer_counts}
  ax2.scatter([t["latency_ms"]], [t["dev_accuracy"] * 100], color="k", label=f"teacher ({t['layers']} layers)")
  for n, r in best.items():
    ax2.scatter([r["latency_ms"]], [r["dev_accuracy"] * 100], label=f"{n}-layer ({r['mode']}), {r['speedup']:.2f}x")
  ax2.set_xlabel(f"CPU latency, batch {result['latency_shape'][0]} (ms, median)")
  ax2.set_ylabel("SST-2 dev accuracy (%)")
  ax2.legend(fontsize=8)
  ax2.set_title("Accuracy vs inference latency")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  run_main(main)
