"""Where a jfast step's compilation time goes, and what XLA:CPU's compile options trade for it.

    python -m benchmarks.compile_time --config packed_bf16                 # per-compile options, one process
    python -m benchmarks.compile_time --config packed_bf16 --cache DIR     # the persistent compilation cache

Compilation is jfast's own cost in `benchmarks.compare`'s end-to-end epoch (PyTorch's eager steps have none), so
it is measured apart here: tracing and lowering in Python (``step.lower``), then XLA's compilation of the lowered
module, first with the defaults and then with each option set of `OPTION_SETS` passed as ``compiler_options`` to
``Lowered.compile`` (one process, so the same lowered module; the first compilation also pays one-off start-up
work and is repeated at the end to show it). Each compiled variant then runs the same real batches, alternated
step by step, so a faster compile that buys a slower step shows up. ``--cache DIR`` times ``lower().compile()``
twice in fresh processes with JAX's persistent compilation cache in ``DIR`` (``jax_compilation_cache_dir``): the
first run writes the executable, the second reads it back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks.step_profile import _jax_step, _spec
from jfast.app.entry import run_main
from jfast.app.runs import cpu_description
from jfast.training.compile_cache import disable_compilation_cache

# Each a dict of XLA debug options for `Lowered.compile(compiler_options=...)`; the names are XLA's DebugOptions.
OPTION_SETS = {
  "fast-compile preset": {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"},
  "codegen split 2": {"xla_cpu_parallel_codegen_split_count": 2},
  "codegen split 8": {"xla_cpu_parallel_codegen_split_count": 8},
  "codegen split 128": {"xla_cpu_parallel_codegen_split_count": 128},
  "backend opt level 1": {"xla_backend_optimization_level": 1},
  "emitter verification off": {"xla_cpu_emitter_verification_level": 0},
  "fusion emitters off": {"xla_cpu_use_fusion_emitters": False},
}


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def options_table(config: str, steps: int) -> str:
  import jax

  spec = _spec(config)
  _, state, batches, model, params = _jax_step(spec)  # builds and compiles once: imports and start-up paid here
  from benchmarks.jax_runner import build_step

  state, step = build_step(spec, model, jax.tree.map(lambda x: x.copy(), params), 1000)
  lowered, lower_s = _timed(lambda: step.lower(state, batches[0]))
  variants = {"defaults": {}, **OPTION_SETS}
  compiled, compile_s = {}, {}
  for name, options in variants.items():
    compiled[name], compile_s[name] = _timed(lambda o=options: lowered.compile(compiler_options=o or None))
  _, again = _timed(lambda: lowered.compile())

  # One state per variant (each call donates its input), the same batches, variants alternated step by step.
  states = {name: jax.tree.map(lambda x: x.copy(), state) for name in variants}
  times = {name: [] for name in variants}
  for i in range(3 + steps):
    batch = batches[i % len(batches)]
    for name, fn in compiled.items():
      t0 = time.perf_counter()
      states[name], m = fn(states[name], batch)
      jax.block_until_ready((states[name], m))
      if i >= 3:
        times[name].append(time.perf_counter() - t0)
  base = statistics.median(times["defaults"])
  lines = [
    f"jfast `{config}` step, batches {'x'.join(map(str, batches[0].input_ids.shape))}, {cpu_description()}.",
    f"Tracing and lowering (`step.lower`): {lower_s:.2f} s. XLA compilation with the defaults again at the end:"
    f" {again:.2f} s. Step medians over {steps} alternated steps each.",
    "",
    "| compile options | compile s | step ms | step vs defaults |",
    "|---|---|---|---|",
  ]
  for name in variants:
    med = statistics.median(times[name])
    lines.append(f"| {name} | {compile_s[name]:.2f} | {med * 1e3:.1f} | {base / med:.3f}x |")
  return "\n".join(lines)


def _cache_child(config: str, cache_dir: str) -> dict:
  import jax

  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from benchmarks.jax_runner import build_model, build_step
  from benchmarks.step_profile import _batches

  spec = _spec(config)
  batches = _batches(spec)
  from benchmarks import data

  model, params = build_model(spec, data.NUM_LABELS[spec.task])
  state, step = build_step(spec, model, params, 1000)
  lowered, lower_s = _timed(lambda: step.lower(state, batches[0]))
  _, compile_s = _timed(lowered.compile)
  return {"lower_s": lower_s, "compile_s": compile_s}


def cache_table(config: str, cache_dir: str) -> str:
  rows = []
  for run in ("first (writes the cache)", "second (reads it)"):
    out = subprocess.run(
      [sys.executable, "-m", "benchmarks.compile_time", "--config", config, "--cache-child", cache_dir],
      capture_output=True,
      text=True,
      check=True,
      env={**os.environ},
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append(f"| {run} | {res['lower_s']:.2f} | {res['compile_s']:.2f} | {res['lower_s'] + res['compile_s']:.2f} |")
  return "\n".join(
    [
      f"jfast `{config}` step with JAX's persistent compilation cache (`{cache_dir}`), {cpu_description()}.",
      "",
      "| process | lower s | compile s | total s |",
      "|---|---|---|---|",
      *rows,
    ]
  )


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="packed_bf16")
  p.add_argument("--steps", type=int, default=20, help="alternated steps timed per variant")
  p.add_argument("--cache", default=None, help="time the persistent compilation cache in this (empty) folder")
  p.add_argument("--cache-child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--out", default=None, help="also write the markdown here")
  args = p.parse_args(argv)
  common.pin_threads(2)
  if not args.cache_child:
    disable_compilation_cache()  # cold compiles: the entry point's default cache would make repeats warm
  if args.cache_child:
    print(json.dumps(_cache_child(args.config, args.cache_child)))
    return
  if args.cache:
    if Path(args.cache).exists() and any(Path(args.cache).iterdir()):
      sys.exit(f"--cache folder {args.cache} is not empty: the first run must write it")
    text = cache_table(args.config, args.cache)
  else:
    text = options_table(args.config, args.steps)
  common.print_and_save(text, args.out)


if __name__ == "__main__":
  run_main(main)
