"""Per-device memory of data, FSDP and tensor parallelism for BERT-base and a BERT-large-shaped model.

    python -m experiments.parallel                            # 8 simulated CPU devices, both models, every strategy
    python -m experiments.parallel --models bert-base --strategies single,fsdp8

Nothing is materialised: the train state's shapes come from `jax.eval_shape`, its per-device bytes from the
shardings the rules give (exact), and the compiled step's per-device argument, output and temporary (activation)
bytes from `compiled.memory_analysis()` of the SPMD-partitioned step. The collectives XLA inserted are counted in
the compiled HLO. Sets ``--xla_force_host_platform_device_count`` itself before importing jax (CPU only; on a real
accelerator host the devices present are used). Writes ``results.json``, ``results.md`` and ``parallel.png`` under
``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from jfast.app.config import ConfigError
from jfast.app.entry import run_main

STRATEGIES = {
  "single": {"data": 1},
  "data8": {"data": 8},
  "fsdp8": {"data": 1, "fsdp": 8},
  "tensor8": {"data": 1, "tensor": 8},
  "data4_tensor2": {"data": 4, "tensor": 2},
  "fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2},
}
# Vocabulary padded 30522 -> 30528 (a multiple of 64, as Megatron pads it) so the table splits 8 ways.
MODELS = {
  "bert-base": dict(vocab_size=30528),
  "bert-large": dict(
    vocab_size=30528, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
  ),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
  p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, of {list(STRATEGIES)}")
  p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (ignored off CPU)")
  p.add_argument("--batch-size", type=int, default=32, help="global rows per step")
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--optimizer", default="adamw", help="adamw | adamw_8bit")
  p.add_argument("--output", default="results/parallel")
  return p.parse_args(argv)


def _count_collectives(hlo: str) -> dict[str, int]:
  return {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}


def measure(model_name: str, strategy: str, args) -> dict:
  import jax
  import numpy as np

  from jfast.data import Batch
  from jfast.models import BertConfig, BertForSequenceClassification
  from jfast.optim import OptimizerConfig, make_optimizer
  from jfast.parallel import make_mesh, per_device_bytes, tree_shardings
  from jfast.training import classification_loss, create_train_state, make_train_step

  config = BertConfig(**MODELS[model_name])
  model = BertForSequenceClassification(config, num_labels=2)
  axes = STRATEGIES[strategy]
  size = int(np.prod(list(axes.values())))
  mesh = make_mesh(**axes, devices=jax.devices()[:size])
  tx = make_optimizer(OptimizerConfig(name=args.optimizer), total_steps=1000)
  ids = jax.ShapeDtypeStruct((1, 8), np.int32)
  state = jax.eval_shape(
    lambda: create_train_state(
      model, lambda: model.init(jax.random.PRNGKey(0), np.zeros(ids.shape, ids.dtype))["params"], tx
    )
  )
  shardings = tree_shardings(state, mesh)
  rows, length = args.batch_size, args.seq_len
  batch = Batch(
    *(jax.ShapeDtypeStruct((rows, length), np.int32) for _ in range(3)),
    labels=jax.ShapeDtypeStruct((rows, 1), np.int32),
    cls_positions=jax.ShapeDtypeStruct((rows, 1), np.int32),
    example_mask=jax.ShapeDtypeStruct((rows, 1), np.bool_),
  )
  step = make_train_step(classification_loss(model), mesh=mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return {
    "model": model_name,
    "strategy": strategy,
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "devices": size,
    "param_bytes": per_device_bytes(state.params, shardings.params),
    "opt_state_bytes": per_device_bytes(state.opt_state, shardings.opt_state),
    "full_param_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params)),
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "alias_bytes": int(mem.alias_size_in_bytes),
    "temp_bytes": int(mem.temp_size_in_bytes),
    "collectives": _count_collectives(compiled.as_text()),
    "compile_seconds": compile_s,
  }


def _mib(b: float) -> str:
  return f"{b / 2**20:,.1f}"


def write_report(rows: list[dict], meta: dict, out: Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  lines = [
    f"Per-device memory of one train step (AdamW, fp32, global batch {meta['batch_size']} x {meta['seq_len']} "
    f"tokens), {meta['platform']} with {meta['device_count']} devices ({meta['device_kind']}). MiB per device; "
    "params and optimizer state from the shardings, the rest from `compiled.memory_analysis()`; peak = arguments "
    "+ outputs - donated aliases + temporaries.",
    "",
    "| model | strategy | mesh (data x fsdp x tensor) | params | optimizer state | temp (activations) | arguments | "
    "peak | vs single | collectives (AR/AG/RS/A2A/CP) | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  single = {r["model"]: r for r in rows if r["strategy"] == "single"}
  for r in rows:
    peak = r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
    r["peak_bytes"] = peak
    base = single.get(r["model"])
    ratio = f"{peak / base['peak_bytes']:.2f}x" if base and "peak_bytes" in base else "-"
    mesh = " x ".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    coll = "/".join(str(r["collectives"][c]) for c in COLLECTIVES)
    lines.append(
      f"| {r['model']} | {r['strategy']} | {mesh} | {_mib(r['param_bytes'])} | {_mib(r['opt_state_bytes'])} | "
      f"{_mib(r['temp_bytes'])} | {_mib(r['argument_bytes'])} | {_mib(peak)} | {ratio} | {coll} | "
      f"{r['compile_seconds']:.0f} |"
    )
  (out / "results.md").write_text("\n".join(lines) + "\n")
  (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
  for ax, model in zip(axes[0], models, strict=True):
    sub = [r for r in rows if r["model"] == model]
    x = range(len(sub))
    bottom = [0.0] * len(sub)
    for key, label in (("param_bytes", "params"), ("opt_state_bytes", "optimizer state"), ("temp_bytes", "temp")):
      vals = [r[key] / 2**20 for r in sub]
      ax.bar(x, vals, bottom=bottom, label=label)
      bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(list(x), [r["strategy"] for r in sub], rotation=30, ha="right")
    ax.set_ylabel("MiB per device")
    ax.set_title(f"{model}: one train step, {meta['device_count']} simulated devices")
    ax.legend()
  fig.tight_layout()
  fig.savefig(out / "parallel.png", dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    flags = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    if "jax" in sys.modules:
      # Imported already (by `jfast experiment parallel`, whose run folder records the devices): XLA read its flags
      # when it started, so the simulated devices need a fresh process.
      argv = list(argv if argv is not None else sys.argv[1:])
      subprocess.run(
        [sys.executable, "-m", "experiments.parallel", *argv], env={**os.environ, "XLA_FLAGS": flags}, check=True
      )
      return json.loads((Path(args.output) / "results.json").read_text())
    os.environ["XLA_FLAGS"] = flags
  import jax

  models = [m for m in args.models.split(",") if m]
  strategies = [s for s in args.strategies.split(",") if s]
  for name in models:
    if name not in MODELS:
      raise ConfigError(f"unknown model {name!r}; expected some of {list(MODELS)}")
  for name in strategies:
    if name not in STRATEGIES:
      raise ConfigError(f"unknown strategy {name!r}; expected some of {list(STRATEGIES)}")
  rows = []
  for model_name in models:
    for strategy in strategies:
      size = 1
      for v in STRATEGIES[strategy].values():
        size *= v
      if size > jax.device_count():
        print(f"skip {model_name}/{strategy}: needs {size} devices, {jax.device_count()} present")
        continue
      row = measure(model_name, strategy, args)
      rows.append(row)
      print(
        f"{model_name:10s} {strategy:14s} params {_mib(row['param_bytes'])} MiB, opt {_mib(row['opt_state_bytes'])}"
        f" MiB, temp {_mib(row['temp_bytes'])} MiB, compile {row['compile_seconds']:.0f}s",
        flush=True,
      )
  meta = {
    "platform": jax.default_backend(),
    "device_count": jax.device_count(),
    "device_kind": jax.devices()[0].device_kind,
    "batch_size": args.batch_size,
    "seq_len": args.seq_len,
    "optimizer": args.optimizer,
    "jax": jax.__version__,
    "command": "python -m experiments.parallel " + " ".join(argv if argv is not None else sys.argv[1:]),
  }
  write_report(rows, meta, Path(args.output))
  return {"meta": meta, "rows": rows}


if __name__ == "__main__":
  run_main(main)
