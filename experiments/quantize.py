"""Int8 inference for the SST-2 fine-tuned MiniLM: accuracy, size and CPU latency of float32 vs int8 PTQ vs QAT.

    python -m experiments.quantize                      # the small default: a few minutes on 2 cores
    python -m experiments.quantize --qat-steps 0        # PTQ only

Variants, all from the same fine-tuned model (default ``runs/teacher/model``):
  float32       the fine-tuned model as it is
  int8          PTQ, int8 weights (per output channel) and activations (per token, at run time)
  int8-static   PTQ, activation scales calibrated on SST-2 *train* batches (one per layer)
  qat-int8      a short fake-quant fine-tune (straight-through estimator), then `int8`
  bf16          reference only: the float model with bfloat16 matmuls

Latency is the forward pass (logits) on SST-2 dev sentences in their order, batch 32 padded to the batch's longest
(rounded up to 16) and batch 1; the variants are timed interleaved, round by round, and the medians reported.
A matmul micro-benchmark at MiniLM's shapes runs in subprocesses under several XLA:CPU flag sets. Writes
results/quantize/{results.json, results.md, quantize_cpu.png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.teacher import ensure_teacher
from jfast import compress as quant
from jfast.app.entry import run_main
from jfast.data import Batch, BatchingConfig, load_text_classification, load_tokenizer, make_batches, tokenize
from jfast.models import BertForSequenceClassification, load_hf_bert
from jfast.optim import OptimizerConfig, make_optimizer, state_bytes
from jfast.training import LoopConfig, classifier_logits, fit

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2"
DEFAULT_MODEL = ROOT / "runs" / "teacher" / "model"
XLA_FLAG_SETS = (
  "",
  "--xla_cpu_use_onednn=true",
  "--xla_cpu_experimental_onednn_fusion_type=dot",
  "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
)
MATMUL_SHAPES = ((1024, 384, 1536), (1024, 1536, 384), (1024, 384, 384), (16, 384, 384))


# ---------------------------------------------------------------- shared helpers (experiments/compress.py uses them)
@dataclasses.dataclass
class Data:
  dev: list[Batch]  # batch-32 dev batches in input order
  dev_single: list[Batch]  # batch-1 dev batches
  train_ids: list[np.ndarray]
  train_labels: np.ndarray
  pad_id: int


def tokenizer_folder(model_path: str) -> str:
  """The model folder if it holds a tokenizer, else all-MiniLM-L6-v2's (an exported fine-tune has only weights)."""
  if (Path(model_path) / "tokenizer.json").is_file() or (Path(model_path) / "vocab.txt").is_file():
    return model_path
  from jfast.app.finetune import default_model_path

  return default_model_path()


def load_data(data: str, model_path: str, *, pad_id: int, batch_size: int = 32, single: int = 32) -> Data:
  tokenizer = load_tokenizer(tokenizer_folder(model_path))
  train = load_text_classification(data, "train")
  dev = load_text_classification(data, "dev", label_names=train.label_names)
  dev_ids, _ = tokenize(tokenizer, dev.texts, max_length=512)
  train_ids, _ = tokenize(tokenizer, train.texts, max_length=512)
  batching = BatchingConfig(strategy="dynamic", batch_size=batch_size, pad_to_multiple_of=16, shuffle=False)
  dev_batches = make_batches(dev_ids, dev.labels, batching, pad_id=pad_id).batches
  # Batch 1: evenly spaced dev sentences, so short and long ones both count.
  picks = np.linspace(0, len(dev_ids) - 1, single).astype(int)
  one = dataclasses.replace(batching, batch_size=1)
  singles = make_batches([dev_ids[i] for i in picks], dev.labels[picks], one, pad_id=pad_id).batches
  return Data(dev_batches, singles, train_ids, np.asarray(train.labels), pad_id)


def on_device(params):
  """Params as device arrays: numpy leaves would be copied host -> device on every call, and timed with it."""
  return jax.block_until_ready(jax.device_put(params))


def forward_fn(model):
  """A jitted ``(params, batch) -> logits [B, S, C]`` inference function."""

  return jax.jit(lambda params, batch: classifier_logits(model, params, batch))


def accuracy(fn, params, batches) -> float:
  correct = total = 0
  for b in batches:
    pred = np.asarray(jnp.argmax(fn(params, b), -1))
    correct += int(((pred == b.labels) & b.example_mask).sum())
    total += int(b.example_mask.sum())
  return correct / total


def compile_seconds(fn, params, batches) -> float:
  """Compiles (by running once) every distinct batch shape; returns the seconds that took."""
  t = time.perf_counter()
  seen = set()
  for b in batches:
    if b.shape not in seen:
      seen.add(b.shape)
      jax.block_until_ready(fn(params, b))
  return time.perf_counter() - t


def interleaved_latency(variants: dict, batches: list[Batch], rounds: int) -> dict[str, dict]:
  """Times ``fn(params, batch)`` for every variant on every batch, variants interleaved batch by batch.

  Args:
    variants: ``name -> (fn, params)``, already compiled for these shapes.

  Returns:
    ``name -> {median_ms, p25_ms, p75_ms, pass_ms}``: per-batch medians, and the median over rounds of the time of
    one pass over all batches.
  """
  times = {name: [] for name in variants}
  passes = {name: [] for name in variants}
  names = list(variants)
  for r in range(rounds):
    per_pass = dict.fromkeys(names, 0.0)
    for i, b in enumerate(batches):
      order = names[(r + i) % len(names) :] + names[: (r + i) % len(names)]  # rotate who goes first
      for name in order:
        fn, params = variants[name]
        t = time.perf_counter()
        jax.block_until_ready(fn(params, b))
        dt = time.perf_counter() - t
        times[name].append(dt)
        per_pass[name] += dt
    for name in names:
      passes[name].append(per_pass[name])
  return {
    name: {
      "median_ms": 1e3 * float(np.median(times[name])),
      "p25_ms": 1e3 * float(np.percentile(times[name], 25)),
      "p75_ms": 1e3 * float(np.percentile(times[name], 75)),
      "pass_ms": 1e3 * float(np.median(passes[name])),
    }
    for name in names
  }


def disk_bytes(path: Path, params, config) -> int:
  return quant.save_quantized(path, params, config=config)


def quantized_weight_bytes(params, qparams) -> tuple[int, int]:
  """Bytes of the quantized layers' weights before (float kernels) and after (int8 kernels + scales)."""
  before = after = 0
  for path in quant.quantizable_layers(params):
    node_f, node_q = params, qparams
    for key in path:
      node_f, node_q = node_f[key], node_q[key]
    before += state_bytes(node_f["kernel"])
    after += state_bytes([node_q["kernel"], node_q["kernel_scale"]])
  return before, after


def train_batches(data: Data, start: int, count: int, batch_size: int, seed: int) -> list[Batch]:
  ids = data.train_ids[start : start + count]
  labels = data.train_labels[start : start + count]
  cfg = BatchingConfig(strategy="packed", batch_size=batch_size)
  return make_batches(ids, labels, cfg, pad_id=data.pad_id, seed=seed).batches


def fine_tune(model, params, batches: list[Batch], lr: float, seed: int = 0):
  """A short fine-tune (AdamW, warm-up and linear decay) over ``batches``; returns the new params and seconds."""
  t = time.perf_counter()
  result = fit(
    model,
    params,
    lambda total: make_optimizer(OptimizerConfig(learning_rate=lr), total),
    batches,
    loop=LoopConfig(seed=seed, progress=False, log_every=max(len(batches), 1)),
  )
  return result.state.params, time.perf_counter() - t


# ---------------------------------------------------------------- matmul micro-benchmark (one XLA flag set per process)
def _matmul_bench(reps: int) -> list[dict]:
  rng = np.random.default_rng(0)
  dims = (((1,), (0,)), ((), ()))
  f32 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims))
  s8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.int32))
  bf16 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32))
  rows = []
  for m, k, n in MATMUL_SHAPES:
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    ops = {
      "float32": (f32, jnp.asarray(a), jnp.asarray(b)),
      "int8": (
        s8,
        jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8),
        jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8),
      ),
      "bf16": (bf16, jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)),
    }
    times = {name: [] for name in ops}
    for fn, x, y in ops.values():
      jax.block_until_ready(fn(x, y))
    for _ in range(reps):
      for name, (fn, x, y) in ops.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(x, y))
        times[name].append(time.perf_counter() - t)
    rows.append({"shape": [m, k, n], **{f"{n_}_ms": 1e3 * float(np.median(t)) for n_, t in times.items()}})
  return rows


def matmul_flag_sweep(flag_sets, reps: int) -> list[dict]:
  out = []
  for flags in flag_sets:
    env = dict(os.environ, XLA_FLAGS=flags)
    cmd = [sys.executable, "-m", "experiments.quantize", "--matmul-only", "--matmul-reps", str(reps)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      out.append({"xla_flags": flags, "error": proc.stderr.strip().splitlines()[-1:]})
      continue
    out.append({"xla_flags": flags, "rows": json.loads(proc.stdout.strip().splitlines()[-1])})
  return out


# ---------------------------------------------------------------- the experiment
def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=str(DEFAULT_MODEL), help="fine-tuned HF folder with a classifier head")
  p.add_argument("--data", default=str(DEFAULT_DATA))
  p.add_argument("--calibration-batches", type=int, default=16, help="SST-2 train batches of 32 for static scales")
  p.add_argument("--percentile", type=float, default=99.99, help="calibration percentile of per-token maxima")
  p.add_argument("--qat-steps", type=int, default=120, help="QAT fine-tune steps (packed rows of train data; 0: off)")
  p.add_argument("--qat-lr", type=float, default=1e-5)
  p.add_argument("--qat-offset", type=int, default=40000, help="first train sentence QAT reads (the teacher read 0..)")
  p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  p.add_argument("--latency-batches", type=int, default=8, help="batch-32 dev batches timed (evenly spaced)")
  p.add_argument("--single", type=int, default=32, help="batch-1 dev sentences timed")
  p.add_argument("--matmul-reps", type=int, default=20)
  p.add_argument("--no-flag-sweep", action="store_true")
  p.add_argument("--matmul-only", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--reuse", action="store_true", help="measure the variants saved under --checkpoints by a past run")
  p.add_argument("--output", default=str(ROOT / "results" / "quantize"))
  p.add_argument("--checkpoints", default=str(ROOT / "runs" / "quantize"), help="where the checkpoints go")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.matmul_only:
    print(json.dumps(_matmul_bench(args.matmul_reps)))
    return {}
  out = Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  ensure_teacher(args.model, args.data)
  config, params = load_hf_bert(args.model, head="classifier")
  num_labels = params["classifier"]["bias"].shape[0]
  data = load_data(args.data, args.model, single=args.single, pad_id=config.pad_token_id)
  model = BertForSequenceClassification(config, num_labels=num_labels)

  # PTQ: dynamic, and static from calibration batches of the *training* split.
  calib = train_batches(data, 0, 32 * args.calibration_batches, 32, seed=1)[: args.calibration_batches]
  calibrate_s = qat_s = None
  previous = {}
  if args.reuse:
    variants = {}
    for name in ("float32", "int8", "int8-static", "bf16", "qat-int8"):
      file = Path(args.checkpoints) / f"{name}.safetensors"
      if file.is_file():
        variants[name] = quant.load_quantized(file)
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    calibrate_s = previous.get("calibration", {}).get("seconds")
    qat_s = previous.get("qat", {}).get("seconds")
  else:
    t = time.perf_counter()
    scales = quant.calibrate(model, params, calib, percentile=args.percentile)
    calibrate_s = time.perf_counter() - t
  variants = (
    variants
    if args.reuse
    else {
      "float32": (config, params),
      "int8": (config.replace(quantization="int8"), quant.quantize(params)),
      "int8-static": (
        config.replace(quantization="int8-static"),
        quant.quantize(params, mode="int8-static", input_scales=scales),
      ),
      "bf16": (config.replace(dtype="bfloat16"), params),
    }
  )
  if args.qat_steps and not args.reuse:
    qat_model = BertForSequenceClassification(config.replace(quantization="qat"), num_labels=num_labels)
    batches = train_batches(data, args.qat_offset, 80 * args.qat_steps, 16, seed=2)[: args.qat_steps]
    qat_params, qat_s = fine_tune(qat_model, params, batches, args.qat_lr)
    variants["qat-int8"] = (config.replace(quantization="int8"), quant.quantize(qat_params))

  results = {}
  fns = {}
  for name, (cfg, p) in variants.items():
    p = on_device(p)
    fn = forward_fn(BertForSequenceClassification(cfg, num_labels=num_labels))
    compile_s = compile_seconds(fn, p, data.dev + data.dev_single)
    fns[name] = (fn, p)
    size = disk_bytes(Path(args.checkpoints) / f"{name}.safetensors", p, cfg)
    results[name] = {
      "dev_accuracy": accuracy(fn, p, data.dev),
      "disk_mb": size / 1e6,
      "param_mb": state_bytes(p) / 1e6,
      "compile_s": compile_s,
    }
    print(f"{name}: dev accuracy {results[name]['dev_accuracy']:.4f}, {size / 1e6:.1f} MB", flush=True)
  picks = np.linspace(0, len(data.dev) - 1, args.latency_batches).astype(int)
  lat32 = interleaved_latency(fns, [data.dev[i] for i in picks], args.rounds)
  lat1 = interleaved_latency(fns, data.dev_single, args.rounds)
  for name in results:
    results[name]["latency_b32_ms"] = lat32[name]["median_ms"]
    results[name]["latency_b32_iqr_ms"] = [lat32[name]["p25_ms"], lat32[name]["p75_ms"]]
    results[name]["latency_b1_ms"] = lat1[name]["median_ms"]
    results[name]["latency_b1_iqr_ms"] = [lat1[name]["p25_ms"], lat1[name]["p75_ms"]]
  matmul = [] if args.no_flag_sweep else matmul_flag_sweep(XLA_FLAG_SETS, args.matmul_reps)
  if args.reuse and args.no_flag_sweep:
    matmul = previous.get("matmul", [])  # the micro-benchmark of the run whose checkpoints these are
  before, after = quantized_weight_bytes(params, quant.quantize(params))
  base = results["float32"]
  summary = {
    "model": args.model,
    "dev_examples": sum(int(b.example_mask.sum()) for b in data.dev),
    "latency_batch32_shapes": sorted({data.dev[i].shape for i in picks}),
    "variants": results,
    "quantized_weights_mb": {"float32": before / 1e6, "int8": after / 1e6, "ratio": before / after},
    "checks": {
      "ptq_accuracy_drop_points": 100 * (base["dev_accuracy"] - results["int8"]["dev_accuracy"]),
      "ptq_static_accuracy_drop_points": 100 * (base["dev_accuracy"] - results["int8-static"]["dev_accuracy"]),
      "qat_accuracy_drop_points": (
        100 * (base["dev_accuracy"] - results["qat-int8"]["dev_accuracy"]) if "qat-int8" in results else None
      ),
      "int8_b32_latency_ratio": results["int8"]["latency_b32_ms"] / base["latency_b32_ms"],
      "int8_static_b32_latency_ratio": results["int8-static"]["latency_b32_ms"] / base["latency_b32_ms"],
      "int8_b1_latency_ratio": results["int8"]["latency_b1_ms"] / base["latency_b1_ms"],
      "disk_ratio": base["disk_mb"] / results["int8"]["disk_mb"],
    },
    "calibration": {"batches": len(calib), "percentile": args.percentile, "seconds": calibrate_s},
    "qat": {"steps": args.qat_steps, "lr": args.qat_lr, "seconds": qat_s},
    "matmul": matmul,
    "rounds": args.rounds,
    "threads": os.cpu_count(),
    "devices": [str(d) for d in jax.devices()],
    "wall_seconds": time.perf_counter() - t0,
    "args": vars(args),
  }
  (out / "results.json").write_text(json.dumps(summary, indent=2))
  (out / "results.md").write_text(markdown(summary))
  plot(summary, out / "quantize_cpu.png")
  print(markdown(summary))
  return summary


def markdown(s: dict) -> str:
  lines = [
    "| variant | dev accuracy | size on disk (MB) | latency batch 32 (ms, median) | vs float32 | latency batch 1 (ms) "
    "| vs float32 | compile (s) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  base = s["variants"]["float32"]
  for name, r in s["variants"].items():
    lines.append(
      f"| {name} | {100 * r['dev_accuracy']:.2f}% | {r['disk_mb']:.1f} | {r['latency_b32_ms']:.1f} "
      f"| {r['latency_b32_ms'] / base['latency_b32_ms']:.2f}x | {r['latency_b1_ms']:.2f} "
      f"| {r['latency_b1_ms'] / base['latency_b1_ms']:.2f}x | {r['compile_s']:.1f} |"
    )
  w = s["quantized_weights_mb"]
  lines += [
    "",
    f"Quantized layers' weights: {w['float32']:.2f} MB float32 -> {w['int8']:.2f} MB int8 + scales "
    f"({w['ratio']:.2f}x smaller). Embeddings, norms, pooler and classifier stay float32.",
  ]
  for sweep in s["matmul"]:
    if "rows" not in sweep:
      lines.append(f"\nXLA_FLAGS={sweep['xla_flags']!r}: failed ({sweep['error']})")
      continue
    lines += ["", f"Matmul micro-benchmark, XLA_FLAGS={sweep['xla_flags']!r} (ms, median):", ""]
    lines += ["| M x K x N | float32 | int8 (int32 acc.) | int8 / float32 | bf16 |", "|---|---|---|---|---|"]
    for r in sweep["rows"]:
      m, k, n = r["shape"]
      lines.append(
        f"| {m}x{k}x{n} | {r['float32_ms']:.3f} | {r['int8_ms']:.3f} | {r['int8_ms'] / r['float32_ms']:.2f}x "
        f"| {r['bf16_ms']:.3f} |"
      )
  return "\n".join(lines) + "\n"


def plot(s: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(s["variants"])
  v = s["variants"]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for ax, key, title in (
    (axes[0], "dev_accuracy", "SST-2 dev accuracy (%)"),
    (axes[1], "latency_b32_ms", "latency, batch 32 (ms, median)"),
    (axes[2], "disk_mb", "size on disk (MB)"),
  ):
    vals = [100 * v[n][key] if key == "dev_accuracy" else v[n][key] for n in names]
    bars = ax.bar(names, vals, color=["#555", "#1f77b4", "#2ca02c", "#bbb", "#d62728"][: len(names)])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    if key == "dev_accuracy":
      ax.set_ylim(min(vals) - 3, max(vals) + 1)
  fig.suptitle("MiniLM fine-tuned on SST-2: int8 on a 2-core CPU (XLA:CPU)", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  run_main(main)
