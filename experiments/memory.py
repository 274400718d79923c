"""Memory and compute savers measured from the compiled train step: remat policies, accumulation, freezing.

    python -m experiments.memory                      # CPU: memory/FLOPs for every cell, step times for MiniLM
    python -m experiments.memory --time-all           # also time BERT-base (slow on a CPU; for a GPU run)

Memory comes from the compiled step's `memory_analysis()` (temp = activations and workspace; arguments/outputs are
the state and batch), FLOPs from `cost_analysis()`, step time as the median of timed steps after one warm-up.
Writes ``memory.json``, ``memory.md`` and ``memory.png`` under ``--output``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jfast.app.entry import run_main
from jfast.cpu import compiler_options as remat_compiler_options
from jfast.data import batch_from_rows
from jfast.models import BertConfig, BertForSequenceClassification
from jfast.nn import REMAT_POLICIES
from jfast.optim import OptimizerConfig, freeze, freeze_mask, make_optimizer
from jfast.training import LoopConfig, classification_loss, create_train_state, make_train_step, run, training_loop

MODELS = {
  "minilm": BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
  "bert-base": BertConfig(),
}


def _batch(rows: int, length: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  # Real-sized random token ids with a spread of lengths up to the full row, never constant inputs.
  lengths = rng.integers(length // 2, length + 1, size=rows)
  seqs = [rng.integers(1000, 29000, size=n).astype(np.int32) for n in lengths]
  return batch_from_rows(seqs, rng.integers(0, 2, size=rows), length, pad_id=0)


def measure(config: BertConfig, rows: int, length: int, *, micro_batches=1, frozen_layers=None, time_steps=0):
  """Compiles one train step and returns its memory, FLOPs and (optionally) median step time."""
  model = BertForSequenceClassification(config, num_labels=2)
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"])(jax.random.PRNGKey(0))
  tx = make_optimizer(OptimizerConfig(), total_steps=1000)
  mask = None
  if frozen_layers is not None:
    mask = freeze_mask(params, bottom_layers=frozen_layers)
    tx = freeze(tx, mask)
  state = create_train_state(model, params, tx)
  step = make_train_step(
    classification_loss(model),
    micro_batches=micro_batches,
    freeze_mask=mask,
    compiler_options=remat_compiler_options(model.config.remat_policy),
  )
  batch = _batch(rows, length)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  out = {
    "temp_bytes": int(mem.temp_size_in_bytes),
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "flops": float(cost.get("flops", float("nan"))),
    "compile_seconds": compile_s,
  }
  if time_steps:
    loop = LoopConfig(quiet=True, time_steps=True, log_every=time_steps + 1)
    result = run(training_loop(state, compiled, [batch] * (time_steps + 1), loop=loop))
    # The first call warms caches and allocations.
    out["step_seconds"] = float(np.median([seconds for _, seconds in result.stats["step_times"][1:]]))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  p.add_argument("--lengths", nargs="+", type=int, default=[128, 256, 512])
  p.add_argument("--rows", type=int, default=8)
  p.add_argument("--policies", nargs="+", default=None, help="remat policies (default: all this backend supports)")
  p.add_argument("--timed-steps", type=int, default=3)
  p.add_argument("--time-all", action="store_true", help="time every cell, not just MiniLM at the shortest length")
  p.add_argument("--output", default="results/memory")
  args = p.parse_args(argv)
  policies = args.policies or [n for n in REMAT_POLICIES if n != "offload" or jax.default_backend() != "cpu"]
  rows = []

  def record(kind, model, length, setting, **kw):
    timed = args.time_all or (model == "minilm" and length == min(args.lengths))
    config = MODELS[model].replace(remat_policy=setting) if kind == "remat" else MODELS[model]
    res = measure(config, args.rows, length, time_steps=args.timed_steps if timed else 0, **kw)
    row = {"kind": kind, "model": model, "length": length, "setting": setting, **res}
    rows.append(row)
    step = f"{row['step_seconds']:.3f}s" if "step_seconds" in row else "-"
    print(
      f"{kind:8s} {model:9s} L={length:4d} {setting!s:20s} temp {row['temp_bytes'] / 2**20:9.1f} MiB  "
      f"GFLOPs {row['flops'] / 1e9:8.1f}  step {step}",
      flush=True,
    )

  for model in args.models:
    for length in args.lengths:
      for policy in policies:
        record("remat", model, length, policy)
    length = min(args.lengths)
    for k in (1, 2, 4, 8):
      record("accum", model, length, k, micro_batches=k)
    layers = MODELS[model].num_hidden_layers
    for n in sorted({0, layers // 2, layers}):
      record("freeze", model, length, n, frozen_layers=n)
  out = Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  (out / "memory.json").write_text(json.dumps({"device": jax.devices()[0].device_kind, "rows": rows}, indent=2))
  (out / "memory.md").write_text(markdown(rows))
  _plot(rows, out / "memory.png")
  print(markdown(rows))
  return rows


def markdown(rows: list[dict]) -> str:
  """One table; ratios are against the same model and length with no remat / k=1 / nothing frozen."""
  lines = [
    "| kind | model | length | setting | temp MiB | x baseline | GFLOPs | x baseline | step s | x baseline |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  base_setting = {"remat": "none", "accum": 1, "freeze": 0}
  for r in rows:
    base = next(
      b
      for b in rows
      if (b["kind"], b["model"], b["length"], b["setting"])
      == (r["kind"], r["model"], r["length"], base_setting[r["kind"]])
    )
    step = f"{r['step_seconds']:.3f}" if "step_seconds" in r else "-"
    step_x = (
      f"{r['step_seconds'] / base['step_seconds']:.2f}" if "step_seconds" in r and "step_seconds" in base else "-"
    )
    lines.append(
      f"| {r['kind']} | {r['model']} | {r['length']} | {r['setting']} | {r['temp_bytes'] / 2**20:.1f} | "
      f"{r['temp_bytes'] / max(base['temp_bytes'], 1):.2f} | {r['flops'] / 1e9:.1f} | "
      f"{r['flops'] / max(base['flops'], 1):.2f} | {step} | {step_x} |"
    )
  return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  remat = [r for r in rows if r["kind"] == "remat"]
  models = sorted({r["model"] for r in remat})
  fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4), squeeze=False)
  for ax, model in zip(axes[0], models, strict=True):
    for length in sorted({r["length"] for r in remat}):
      sub = [r for r in remat if r["model"] == model and r["length"] == length]
      ax.plot([r["setting"] for r in sub], [r["temp_bytes"] / 2**20 for r in sub], marker="o", label=f"L={length}")
    ax.set_title(f"{model}: compiled temp memory by remat policy")
    ax.set_ylabel("MiB")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  run_main(main)
