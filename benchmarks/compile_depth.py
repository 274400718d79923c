"""How compile time and program size grow with depth: the MiniLM-width classifier's train step at 6 and 24 layers.

    python -m benchmarks.compile_depth                          # 6 and 24 layers, cold compiles, this CPU
    python -m benchmarks.compile_depth --layers 6,12,24 --out docs/figures/compile_depth_cpu.md

For each depth: the seconds to trace and lower the train step, the seconds XLA:CPU takes to compile it (persistent
cache off: cold), and the size of its StableHLO text lowered for the CPU and for ``cuda`` (what a GPU would be given,
lowered here without one). Layers written out one by one make all of these grow with depth; a scanned layer stack
(one layer's program inside a loop) would keep them nearly flat. Ratios are to the first depth.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jfast.app.entry import run_main
from jfast.app.runs import cpu_description
from jfast.training.compile_cache import disable_compilation_cache


def measure(layers: int, *, rows: int = 16, length: int = 64, seed: int = 0) -> dict:
  """Lower, compile and size one depth's fp32 train step (packed-shape batch of ``rows x length``)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jfast.data import batch_from_rows
  from jfast.models import BertConfig, BertForSequenceClassification
  from jfast.optim import OptimizerConfig, make_optimizer
  from jfast.training import classification_loss, create_train_state, make_train_step

  config = BertConfig(
    vocab_size=30522, hidden_size=384, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=1536
  )
  model = BertForSequenceClassification(config, num_labels=2)
  params = jax.jit(lambda: model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])()
  state = create_train_state(model, params, make_optimizer(OptimizerConfig(), 100))
  rng = np.random.default_rng(seed)
  seqs = [rng.integers(1, 30522, size=int(n)) for n in rng.integers(8, length, size=rows)]
  batch = batch_from_rows(seqs, rng.integers(0, 2, size=rows), length, pad_id=0)
  step = make_train_step(classification_loss(model), donate=False)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  lowered.compile()
  compile_s = time.perf_counter() - t0
  cuda = make_train_step(classification_loss(model), donate=False, platform="cuda").lower(state, batch).as_text()
  return {
    "layers": layers,
    "lower_s": lower_s,
    "compile_s": compile_s,
    "cpu_hlo_chars": len(lowered.as_text()),
    "cuda_hlo_chars": len(cuda),
  }


def table(results: list[dict]) -> str:
  base = results[0]
  lines = [
    f"MiniLM-width classifier (hidden 384, 12 heads, FFN 1536), fp32 train step on a 16 x 64 batch, cold compiles; "
    f"{cpu_description()}.",
    "",
    "| layers | lower s | compile s | compile x | CPU StableHLO chars | x | cuda StableHLO chars | x |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    lines.append(
      f"| {r['layers']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | {r['compile_s'] / base['compile_s']:.2f} | "
      f"{r['cpu_hlo_chars']:,} | {r['cpu_hlo_chars'] / base['cpu_hlo_chars']:.2f} | {r['cuda_hlo_chars']:,} | "
      f"{r['cuda_hlo_chars'] / base['cuda_hlo_chars']:.2f} |"
    )
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", default="6,24", help="comma-separated depths; ratios are to the first")
  p.add_argument("--out", default=None, help="also write the markdown table here (and JSON beside it)")
  args = p.parse_args(argv)
  disable_compilation_cache()  # cold compiles: a cached program would hide what depth costs
  depths = [int(x) for x in args.layers.split(",")]
  results = []
  for layers in depths:
    results.append(measure(layers))
    print(json.dumps(results[-1]), flush=True)
  text = table(results)
  print(text)
  if args.out:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
  return results


if __name__ == "__main__":
  run_main(main)
