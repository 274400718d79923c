"""Attention fwd+bwd time and compiled memory against sequence length: dense vs sliding window vs blockwise.

One attention layer (B=1, a few heads, head_dim 64) under `jax.value_and_grad`, for each length and kernel. Memory
is the compiled step's `memory_analysis()` (temp + arguments + outputs), read before anything runs, so a dense step
too large for this machine still gets its memory figure and is recorded as not run. Timings are medians after
warm-up, the kernels interleaved at each length (the machine is shared); compile time is reported apart.

    python -m benchmarks.attention_scaling                        # 1k..32k, dense up to what memory allows
    python -m benchmarks.attention_scaling --lengths 1024 2048 --reps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jfast.app.entry import run_main
from jfast.nn import blockwise_attention, dense_attention, sliding_window_attention

GIB = 2**30


def _available_bytes() -> int:
  with open("/proc/meminfo") as f:
    fields = dict(line.split(":", 1) for line in f)
  return int(fields["MemAvailable"].split()[0]) * 1024


def _kernels(windows, block):
  kernels = {"dense": lambda q, k, v, s: dense_attention(q, k, v, s)}
  for w in windows:
    kernels[f"window {w}"] = lambda q, k, v, s, w=w: sliding_window_attention(q, k, v, w, mask=s, backend="xla")
  kernels[f"block {block}"] = lambda q, k, v, s: blockwise_attention(q, k, v, block, mask=s)
  return kernels


def _compile(kernel, length, heads, depth):
  spec = jax.ShapeDtypeStruct((1, length, heads, depth), jnp.float32)
  seg = jax.ShapeDtypeStruct((1, length), jnp.int32)

  def loss(q, k, v, s, probe):
    return jnp.sum(kernel(q, k, v, s) * probe)

  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(spec, spec, spec, seg, spec).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  return compiled, seconds, peak, mem.temp_size_in_bytes


def _inputs(length, heads, depth, seed=0):
  rng = np.random.default_rng(seed)
  qkvp = [jnp.asarray(rng.normal(size=(1, length, heads, depth)), jnp.float32) for _ in range(4)]
  # The last 7 positions are padding, so every kernel runs its masking path.
  seg = jnp.asarray((np.arange(length) < length - 7).astype(np.int32)[None])
  return (*qkvp[:3], seg, qkvp[3])


def _run_length(length, kernels, args, budget) -> list[dict]:
  rows, ready = [], {}
  for name, kernel in kernels.items():
    compiled, compile_s, peak, temp = _compile(kernel, length, args.heads, args.head_dim)
    row = {"length": length, "kernel": name, "compile_s": compile_s, "memory_bytes": peak, "temp_bytes": temp}
    available = _available_bytes()
    if peak > min(budget, 0.8 * available):
      row["skipped"] = f"needs {peak / GIB:.1f} GiB; {available / GIB:.1f} GiB available"
      print(f"{length:>6} {name:<11} compiled memory {peak / GIB:7.2f} GiB: not run ({row['skipped']})", flush=True)
    else:
      ready[name] = compiled
    rows.append(row)
  inputs = _inputs(length, args.heads, args.head_dim)
  times = {name: [] for name in ready}
  for compiled in ready.values():
    for _ in range(args.warmup):
      jax.block_until_ready(compiled(*inputs))
  for _ in range(args.reps):  # interleaved, so a noisy neighbour hits every kernel alike
    for name, compiled in ready.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled(*inputs))
      times[name].append(time.perf_counter() - start)
  for row in rows:
    if row["kernel"] in times:
      row["times_s"] = times[row["kernel"]]
      row["median_s"] = statistics.median(times[row["kernel"]])
      print(
        f"{length:>6} {row['kernel']:<11} compiled memory {row['memory_bytes'] / GIB:7.2f} GiB  "
        f"fwd+bwd {row['median_s'] * 1e3:9.1f} ms  (compile {row['compile_s']:.1f} s)",
        flush=True,
      )
  return rows


def _find(rows, length, kernel):
  return next((r for r in rows if r["length"] == length and r["kernel"] == kernel), None)


def _targets(rows, window) -> list[dict]:
  """The issue's targets at 16k / 32k with ``window``."""
  name, out = f"window {window}", []
  dense16, win16, win32 = _find(rows, 16384, "dense"), _find(rows, 16384, name), _find(rows, 32768, name)
  if dense16 and win16:
    mem = dense16["memory_bytes"] / win16["memory_bytes"]
    out.append({"target": f"16k: dense / {name} compiled memory >= 10", "value": mem, "met": mem >= 10})
    if "median_s" in dense16 and "median_s" in win16:
      speed = dense16["median_s"] / win16["median_s"]
      out.append({"target": f"16k: dense / {name} fwd+bwd time >= 10", "value": speed, "met": speed >= 10})
    else:
      out.append({"target": f"16k: dense / {name} fwd+bwd time >= 10", "value": None, "met": None})
  if win16 and win32:
    mem = win32["memory_bytes"] / win16["memory_bytes"]
    out.append({"target": f"{name}: memory(32k) / memory(16k) <= 2.2", "value": mem, "met": mem <= 2.2})
    if "median_s" in win16 and "median_s" in win32:
      t = win32["median_s"] / win16["median_s"]
      out.append({"target": f"{name}: time(32k) / time(16k) <= 2.2", "value": t, "met": t <= 2.2})
  return out


def _table(rows, kernels, lengths) -> str:
  head = "| length | " + " | ".join(f"{k} ms" for k in kernels) + " | " + " | ".join(f"{k} MiB" for k in kernels)
  lines = [head + " |", "|" + "---|" * (1 + 2 * len(kernels))]
  for n in lengths:
    cells = []
    for k in kernels:
      r = _find(rows, n, k)
      cells.append("-" if r is None else (f"{r['median_s'] * 1e3:,.0f}" if "median_s" in r else "not run (memory)"))
    cells += [
      ("-" if _find(rows, n, k) is None else f"{_find(rows, n, k)['memory_bytes'] / 2**20:,.0f}") for k in kernels
    ]
    lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _plot(rows, kernels, path: Path, title: str):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
  for k in kernels:
    mine = [r for r in rows if r["kernel"] == k]
    timed = [r for r in mine if "median_s" in r]
    ax_t.loglog([r["length"] for r in timed], [r["median_s"] for r in timed], "o-", label=k)
    line = ax_m.loglog([r["length"] for r in mine], [r["memory_bytes"] / 2**20 for r in mine], "o-", label=k)[0]
    skipped = [r for r in mine if "skipped" in r]
    if skipped:
      ax_m.loglog([r["length"] for r in skipped], [r["memory_bytes"] / 2**20 for r in skipped], "x", ms=10,
                  color=line.get_color(), label=f"{k}: not run (memory)")  # fmt: skip
  for ax, label in ((ax_t, "fwd+bwd time (s)"), (ax_m, "compiled memory (MiB)")):
    ax.set_xlabel("sequence length")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  ax_t.legend(fontsize=8)
  ax_m.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
  parser.add_argument("--windows", type=int, nargs="+", default=[256, 512])
  parser.add_argument("--block", type=int, default=512)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--reps", type=int, default=3, help="timed runs per kernel and length (median reported)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--memory-budget-gib", type=float, default=12.0, help="skip steps whose compiled memory exceeds")
  parser.add_argument(
    "--kernels", nargs="+", choices=["dense", "window", "block"], default=["dense", "window", "block"]
  )
  parser.add_argument("--output", default="results/attention")
  args = parser.parse_args(argv)

  out = Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  kernels = {k: f for k, f in _kernels(args.windows, args.block).items() if k.split()[0] in args.kernels}
  device = jax.devices()[0]
  print(
    f"device: {device.platform} {device.device_kind}; B=1, heads={args.heads}, head_dim={args.head_dim}", flush=True
  )
  rows = []
  for length in args.lengths:
    rows += _run_length(length, kernels, args, args.memory_budget_gib * GIB)
  targets = [t for w in args.windows for t in _targets(rows, w)]
  setup = f"B=1, {args.heads} heads, head_dim {args.head_dim}, fp32, fwd+bwd, {device.platform} ({device.device_kind})"
  result = {"setup": setup, "args": vars(args), "rows": rows, "targets": targets}
  (out / "results.json").write_text(json.dumps(result, indent=2))
  lines = [
    f"# Attention scaling: {setup}",
    "",
    f"Median of {args.reps} interleaved runs after {args.warmup} warm-up; memory = compiled step's temp + arguments +"
    " outputs (`memory_analysis()`); `not run (memory)`: the compiled step needs more than this machine could give.",
    "",
    _table(rows, list(kernels), args.lengths),
    "",
    "| target | measured | met |",
    "|---|---|---|",
  ]
  for t in targets:
    value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
    met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
    lines.append(f"| {t['target']} | {value} | {met} |")
  (out / "results.md").write_text("\n".join(lines) + "\n")
  _plot(rows, list(kernels), out / "results.png", f"One attention layer: {setup}")
  print("\n".join(lines))
  return result


if __name__ == "__main__":
  run_main(main)
