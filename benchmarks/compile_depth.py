"""How compile time and program size grow with depth, scanned layers against unrolled ones: the MiniLM-width
classifier's train step at 6 and 24 layers, and the step time of both layouts side by side.

    python -m benchmarks.compile_depth                          # 6 and 24 layers, both layouts, this CPU
    python -m benchmarks.compile_depth --layers 6,12,24 --out docs/figures/compile_depth_cpu.md

For each depth and layout: the seconds to trace and lower the train step, the seconds XLA:CPU takes to compile it
(persistent cache off: cold), and the size of its StableHLO text lowered for the CPU and for ``cuda`` (what a GPU
would be given, lowered here without one). Unrolled layers make all of these grow with depth; scanned layers (one
layer's program inside a loop, `jfast.nn.scan`) keep them nearly flat. Ratios are to the first depth of the same
layout. Then the compiled steps at the first depth run alternately (``--repeats`` timed calls each after 2
warm-ups): unrolled, scanned, and scanned with ``scan_unroll`` = depth (the stacked layout as straight-line code);
median milliseconds per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks import common
from jfast.app.entry import run_main
from jfast.app.runs import cpu_description
from jfast.training.compile_cache import disable_compilation_cache


def _step_and_inputs(layers: int, scan: bool, rows: int, length: int, seed: int, unroll: int = 1):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jfast.data import batch_from_rows
  from jfast.models import BertConfig, BertForSequenceClassification
  from jfast.optim import OptimizerConfig, make_optimizer
  from jfast.training import classification_loss, create_train_state, make_train_step

  config = BertConfig(**common.MINILM_WIDTH, num_hidden_layers=layers, scan_layers=scan, scan_unroll=unroll)
  model = BertForSequenceClassification(config, num_labels=2)
  params = jax.jit(lambda: model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])()
  state = create_train_state(model, params, make_optimizer(OptimizerConfig(), 100))
  rng = np.random.default_rng(seed)
  seqs = [rng.integers(1, 30522, size=int(n)) for n in rng.integers(8, length, size=rows)]
  batch = batch_from_rows(seqs, rng.integers(0, 2, size=rows), length, pad_id=0)
  return model, state, batch, make_train_step(classification_loss(model), donate=False)


def measure(layers: int, scan: bool, *, rows: int = 16, length: int = 64, seed: int = 0) -> dict:
  """Lower, compile and size one depth's fp32 train step (packed-shape batch of ``rows x length``)."""
  from jfast.training import classification_loss, make_train_step

  model, state, batch, step = _step_and_inputs(layers, scan, rows, length, seed)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  lowered.compile()
  compile_s = time.perf_counter() - t0
  cuda = make_train_step(classification_loss(model), donate=False, platform="cuda").lower(state, batch).as_text()
  return {
    "layers": layers,
    "layout": "scanned" if scan else "unrolled",
    "lower_s": lower_s,
    "compile_s": compile_s,
    "cpu_hlo_chars": len(lowered.as_text()),
    "cuda_hlo_chars": len(cuda),
  }


def step_ab(layers: int, *, repeats: int, rows: int = 16, length: int = 64, seed: int = 0) -> dict:
  """Median ms per train step of both layouts, timed alternately on the same state and batch."""
  import jax

  compiled = {}
  for name, scan, unroll in (("unrolled", False, 1), ("scanned", True, 1), ("scanned_unroll_all", True, layers)):
    _, state, batch, step = _step_and_inputs(layers, scan, rows, length, seed, unroll)
    fn = step.lower(state, batch).compile()
    for _ in range(2):
      jax.block_until_ready(fn(state, batch))
    compiled[name] = (fn, state, batch)
  times = {name: [] for name in compiled}
  for _ in range(repeats):
    for name, (fn, state, batch) in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(state, batch))
      times[name].append(1000 * (time.perf_counter() - t0))
  med = {name: statistics.median(v) for name, v in times.items()}
  return {
    "layers": layers,
    "repeats": repeats,
    "median_ms": med,
    "scanned_over_unrolled": med["scanned"] / med["unrolled"],
    "unroll_all_over_unrolled": med["scanned_unroll_all"] / med["unrolled"],
  }


def table(results: list[dict], ab: dict) -> str:
  lines = [
    f"MiniLM-width classifier (hidden 384, 12 heads, FFN 1536), fp32 train step on a 16 x 64 batch, cold compiles; "
    f"{cpu_description()}.",
    "",
    "| layers | layout | lower s | compile s | compile x | CPU StableHLO chars | x | cuda StableHLO chars | x |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    base = next(b for b in results if b["layout"] == r["layout"])
    lines.append(
      f"| {r['layers']} | {r['layout']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | "
      f"{r['compile_s'] / base['compile_s']:.2f} | "
      f"{r['cpu_hlo_chars']:,} | {r['cpu_hlo_chars'] / base['cpu_hlo_chars']:.2f} | {r['cuda_hlo_chars']:,} | "
      f"{r['cuda_hlo_chars'] / base['cuda_hlo_chars']:.2f} |"
    )
  med = ab["median_ms"]
  lines += [
    "",
    f"Step time at {ab['layers']} layers, compiled steps run alternately, median of {ab['repeats']} after 2 warm-ups: "
    f"unrolled {med['unrolled']:.1f} ms, scanned {med['scanned']:.1f} ms (scanned / unrolled "
    f"{ab['scanned_over_unrolled']:.3f}), scanned with scan_unroll={ab['layers']} (straight-line code over the stacked "
    f"parameters) {med['scanned_unroll_all']:.1f} ms ({ab['unroll_all_over_unrolled']:.3f}).",
  ]
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", default="6,24", help="comma-separated depths; ratios are to the first")
  p.add_argument("--repeats", type=int, default=20, help="timed steps per layout in the step-time A/B")
  p.add_argument("--out", default=None, help="also write the markdown table here (and JSON beside it)")
  args = p.parse_args(argv)
  disable_compilation_cache()  # cold compiles: a cached program would hide what depth costs
  depths = [int(x) for x in args.layers.split(",")]
  results = []
  for scan in (False, True):
    for layers in depths:
      results.append(measure(layers, scan))
      print(json.dumps(results[-1]), flush=True)
  ab = step_ab(depths[0], repeats=args.repeats)
  print(json.dumps(ab), flush=True)
  text = table(results, ab)
  print(text)
  if args.out:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"compile": results, "step_ab": ab}, indent=2))
  return results


if __name__ == "__main__":
  run_main(main)
