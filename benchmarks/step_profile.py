"""Where a jfast train step's time goes on this machine, and what two of the library's choices are worth.

    python -m benchmarks.step_profile --config grouped_bf16            # per-category op time from a profiler trace
    python -m benchmarks.step_profile --config packed_bf16 --ab dropout  # flax's Dropout vs jfast.dropout, interleaved
    python -m benchmarks.step_profile --config grouped_bf16 --ab clip    # optax's clip vs jfast.clipping, interleaved

The step is the one `benchmarks.compare` times (the real MiniLM, SST-2 batches cut by the config's strategy,
`make_train_step` with the precision policy). Profile mode traces a few steps with `jax.profiler` (XLA:CPU emits one
event per thunk with ``--xla_cpu_enable_xprof_traceme``) and sums each op's time over the worker threads into
categories read from the HLO metadata: matrix products, dropout masks, the embedding gradient, dtype casts, layout
copies, optimizer update and the remaining forward / backward elementwise work. A/B mode builds both variants of
the step in one process and alternates them step by step, so machine noise hits both alike; medians after warm-up.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common, data
from benchmarks.configs import CONFIGS, RunSpec, specs_for

CATEGORIES = (
  "matrix products",
  "dropout masks",
  "embedding gradient",
  "dtype casts",
  "layout copies",
  "optimizer update",
  "other forward",
  "other backward",
)


def _spec(config: str) -> RunSpec:
  row = CONFIGS.get(config)
  if row is None or row.jax is None:
    raise SystemExit(f"unknown jfast config {config!r}; try grouped_bf16, packed_bf16, grouped, packed, fixed")
  return specs_for(row, {})["jax"]


def _batches(spec: RunSpec, n: int = 12):
  """The first ``n`` batches of the epoch that share the first batch's shape (one compilation)."""
  train, _ = data.load_task(spec.task, max_train_examples=4000)
  epoch = data.make_epoch(train, spec)
  shape = epoch.batches[0].input_ids.shape
  return [b for b in epoch.batches if b.input_ids.shape == shape][:n]


def _op_names(hlo: str) -> dict[str, tuple[str, str]]:
  """instruction name -> (shape, op_name), a fusion without metadata taking the first op_name inside it."""
  bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M)}
  out = {}
  for m in re.finditer(r"^\s*%([\w.\-]+) = (\S+) ([^\n]*)$", hlo, re.M):
    name, shape, rest = m.groups()
    op = re.search(r'op_name="([^"]*)"', rest)
    if op is None and (called := re.search(r"calls=%([\w.\-]+)", rest)):
      op = re.search(r'op_name="([^"]*)"', bodies.get(called.group(1), ""))
    out[name] = (shape, op.group(1) if op else "")
  return out


def categorize(name: str, op_name: str) -> str:
  if name.startswith(("ynn_fusion", "xnn_fusion", "dot", "onednn")) or "dot_general" in op_name:
    return "matrix products"
  if any(s in op_name for s in ("Dropout", "bernoulli", "rng_bit_generator", "threefry", "keep_mask")):
    return "dropout masks"
  if "word_embeddings" in op_name:
    return "embedding gradient" if "transpose(" in op_name else "other forward"
  if name.startswith("wrapped_convert"):
    return "dtype casts"
  if name.startswith(("bitcast_bitcast_fusion", "copy", "wrapped_transpose", "transpose")):
    return "layout copies"
  if "transpose(" in op_name:
    return "other backward"
  if "jvp(" in op_name:
    return "other forward"
  return "optimizer update"


def profile(spec: RunSpec, steps: int, top: int) -> str:
  import jax
  from jax.profiler import ProfileData

  from benchmarks.jax_runner import build_model, build_step

  batches = _batches(spec)
  model, params = build_model(spec, data.NUM_LABELS[spec.task])
  state, step = build_step(spec, model, params, 1000)
  compiled = step.lower(state, batches[0]).compile()
  names = _op_names(compiled.as_text())
  for b in batches[:3]:
    state, _ = compiled(state, b)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    t0 = time.perf_counter()
    for i in range(steps):
      state, _ = compiled(state, batches[i % len(batches)])
      jax.block_until_ready(state)
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    trace = ProfileData.from_file(sorted(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True))[-1])
  per_op = collections.Counter()
  for plane in trace.planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name and "PjRtCpuClient" not in line.name:
        continue
      for event in line.events:
        if event.name in names:
          per_op[event.name] += event.duration_ns / steps / 1e6
  per_cat = collections.Counter()
  for name, ms in per_op.items():
    per_cat[categorize(name, names[name][1])] += ms
  total = sum(per_cat.values())
  shape = "x".join(map(str, batches[0].input_ids.shape))
  lines = [
    f"`{spec.config}`, batches {shape}: {wall * 1e3:.1f} ms wall per step, {total:.1f} ms of op time summed over "
    f"the worker threads ({total / wall / 1e3:.2f} threads busy on average).",
    "",
    "| category | ms per step (thread time) | share |",
    "|---|---|---|",
  ]
  lines += [f"| {c} | {per_cat[c]:.1f} | {per_cat[c] / total:.0%} |" for c in CATEGORIES if per_cat[c]]
  lines += ["", f"Top {top} ops:", "", "| ms | op | shape | category | HLO op_name (tail) |", "|---|---|---|---|---|"]
  for name, ms in per_op.most_common(top):
    shp, op = names[name]
    lines.append(f"| {ms:.2f} | `{name}` | `{shp[:32]}` | {categorize(name, op)} | `{op[-70:]}` |")
  return "\n".join(lines)


def ab(spec: RunSpec, what: str, steps: int) -> str:
  """Both variants of the step built in one process, alternated step by step."""
  import flax.linen as nn
  import jax
  import optax

  import jfast.attention as attention
  import jfast.models.bert as bert
  import jfast.train as train
  from benchmarks.jax_runner import build_model, build_step

  if what == "dropout":
    variants = {
      "flax nn.Dropout + jax.random.bernoulli": lambda: (
        setattr(bert, "Dropout", nn.Dropout),
        setattr(attention, "keep_mask", lambda key, rate, shape: jax.random.bernoulli(key, 1.0 - rate, shape)),
      ),
      "jfast.dropout (hash mask)": lambda: None,
    }
  else:
    variants = {
      "optax.clip_by_global_norm": lambda: setattr(train, "clip_by_global_norm", optax.clip_by_global_norm),
      "jfast.clipping.clip_by_global_norm": lambda: None,
    }
  saved = (bert.Dropout, attention.keep_mask, train.clip_by_global_norm)
  batches = _batches(spec)
  model, params = build_model(spec, data.NUM_LABELS[spec.task])
  runs = {}
  for name, patch in variants.items():
    patch()
    state, step = build_step(spec, model, jax.tree.map(lambda x: x.copy(), params), 1000)
    runs[name] = [state, step.lower(state, batches[0]).compile(), []]
    bert.Dropout, attention.keep_mask, train.clip_by_global_norm = saved
  warmup = 4
  for i in range(warmup + steps):
    for run in runs.values():
      t0 = time.perf_counter()
      run[0], _ = run[1](run[0], batches[i % len(batches)])
      jax.block_until_ready(run[0])
      run[2].append(time.perf_counter() - t0)
  medians = {name: statistics.median(run[2][warmup:]) for name, run in runs.items()}
  base = next(iter(medians.values()))
  shape = "x".join(map(str, batches[0].input_ids.shape))
  lines = [f"`{spec.config}`, batches {shape}, {steps} alternated steps a side after {warmup} warm-up:", ""]
  lines += ["| variant | median step (ms) | vs first |", "|---|---|---|"]
  lines += [f"| {name} | {m * 1e3:.1f} | {base / m:.2f}x |" for name, m in medians.items()]
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="grouped_bf16", help="a jfast config of benchmarks.configs")
  p.add_argument("--ab", choices=("dropout", "clip"), help="time two variants side by side instead of profiling")
  p.add_argument("--steps", type=int, default=None, help="steps traced (profile: 5) or timed per side (A/B: 20)")
  p.add_argument("--top", type=int, default=25, help="ops listed one by one")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--out", default=None, help="also write the markdown here")
  args = p.parse_args(argv)
  if not args.ab and "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
    # Per-thunk trace events exist only with this flag, and XLA reads its flags once: rerun with it set.
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme").strip()}
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.step_profile", *(argv or sys.argv[1:])], env)
  common.pin_threads(args.threads)
  spec = _spec(args.config)
  text = ab(spec, args.ab, args.steps or 20) if args.ab else profile(spec, args.steps or 5, args.top)
  print(text)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
  main()
