"""Mixed precision on the real MiniLM and SST-2: fp32, bf16, fp16 with dynamic loss scaling, pure bf16.

    python -m experiments.precision                                  # CPU-sized, ~6 minutes on 2 cores
    python -m experiments.precision --max-train-examples 0           # all 67,349 sentences (a GPU run)
    python -m experiments.precision --dot-benchmark                  # one matmul: fp32 vs bf16 forms, and PyTorch

Each policy fine-tunes the same pretrained weights with the same head initialisation, data order, optimizer and seed
for one epoch, then evaluates on the dev set; the policies train side by side, taking turns step by step, so that
load from other processes falls on all of them alike. For each it reports dev accuracy, the median step time after
warm-up (compile time apart), the compiled train step's memory analysis (temp = activations, gradients and other
scratch), the activations two ways (the bytes autodiff saves for the backward pass, parameters excluded; and the
compiled step's own figure, the temp that grows with the batch: 2 x (temp(B) - temp(B/2))), skipped steps
and the final loss scale. Writes ``precision.json`` and ``precision.md`` under ``--output``. Nothing here is
CPU-specific.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jfast.app.entry import run_main
from jfast.app.finetune import DEFAULT_DATA, default_model_path
from jfast.data import BatchingConfig, load_text_classification, load_tokenizer, make_batches, tokenize
from jfast.models import init_classifier, load_hf_bert
from jfast.optim import OptimizerConfig, make_optimizer
from jfast.precision import get_policy
from jfast.training import (
  LoopConfig,
  classification_loss,
  create_train_state,
  evaluate,
  make_eval_step,
  make_train_step,
  run_together,
  training_loop,
)

DEFAULT_POLICIES = "fp32,bf16,fp16,pure-bf16"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(DEFAULT_DATA), help="dataset folder of TSVs (SST-2), or a hub name")
  p.add_argument("--model", default=None, help="Hugging Face BERT folder (default: all-MiniLM-L6-v2)")
  p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated presets or policy strings")
  p.add_argument("--max-train-examples", type=int, default=6000, help="first N training sentences (0: all)")
  p.add_argument("--max-dev-examples", type=int, default=0, help="first N dev sentences (0: all 872)")
  p.add_argument("--batch-size", type=int, default=16, help="packed rows per batch")
  p.add_argument("--row-length", type=int, default=None, help="packed row length (default: longest sentence)")
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the step-time median")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default="results/precision", help="folder for precision.json and precision.md")
  p.add_argument(
    "--dot-benchmark", action="store_true", help="only time one matmul in fp32/bf16 forms (and PyTorch) and exit"
  )
  return p.parse_args(argv)


def _dot_operand_dtypes(compiled_text: str) -> list[str]:
  """``lhs x rhs -> out`` dtypes of every dot XLA finally runs (operands are fusion parameters or local values)."""
  found = []
  for comp in re.split(r"\n(?=%?[\w.-]+ \(.*\) -> .* \{)", compiled_text):
    head = comp.split("\n", 1)[0]
    for out, *operands in re.findall(r"= (\w+)\[[\d,]*\]\S* dot\(%([\w.-]+), %([\w.-]+)\)", comp):
      types = []
      for name in operands:
        m = re.search(rf"\b{re.escape(name)}: (\w+)\[", head) or re.search(rf"%{re.escape(name)} = (\w+)\[", comp)
        types.append(m.group(1) if m else "?")
      found.append(f"{types[0]} x {types[1]} -> {out}")
  return found


def dot_benchmark(m: int = 2048, k: int = 384, n: int = 1536, rounds: int = 30) -> list[dict]:
  """Times one matmul in the forms a bf16 model produces, and reports which dot XLA really runs for each.

  The shape is MiniLM's MLP up-projection on 2048 tokens (the issue's measurement).
  """
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)
  f32, bf16 = jnp.float32, jnp.bfloat16
  cases = {
    "XLA float32": (lambda x, y: x @ y, f32, False),
    "XLA bf16 x bf16 -> bf16 (jnp default)": (lambda x, y: x @ y, bf16, False),
    "XLA bf16 x bf16 -> f32 (preferred_element_type)": (
      lambda x, y: jnp.matmul(x, y, preferred_element_type=f32),
      bf16,
      False,
    ),
    "XLA bf16 x bf16^T -> f32 (transposed operand)": (
      lambda x, yt: jnp.matmul(x, yt.T, preferred_element_type=f32),
      bf16,
      True,
    ),
  }
  runs, rows = {}, []
  for name, (fn, dtype, transposed) in cases.items():
    x, y = jnp.asarray(a, dtype), jnp.asarray(b.T.copy() if transposed else b, dtype)
    jitted = jax.jit(fn)
    kernels = _dot_operand_dtypes(jitted.lower(x, y).compile().as_text())
    runs[name] = (lambda f=jitted, x=x, y=y: f(x, y).block_until_ready(), kernels)
  try:
    import torch

    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ta16, tb16 = ta.bfloat16(), tb.bfloat16()
    runs["PyTorch float32"] = (lambda: ta @ tb, ["(oneDNN)"])
    runs["PyTorch bfloat16"] = (lambda: ta16 @ tb16, ["(oneDNN)"])
  except ImportError:
    pass
  times = {name: [] for name in runs}
  # Each library's cases interleaved with each other, so a neighbour's load hits them alike; the libraries apart,
  # so that neither's thread pool is still busy while the other's call is timed.
  for group in ([n for n in runs if n.startswith("XLA")], [n for n in runs if not n.startswith("XLA")]):
    for name in group:
      runs[name][0]()
    for _ in range(rounds):
      for name in group:
        t = time.perf_counter()
        runs[name][0]()
        times[name].append(time.perf_counter() - t)
  for name, (_, kernels) in runs.items():
    seconds = float(np.median(times[name]))
    rows.append({"case": name, "seconds": seconds, "gflops": 2 * m * k * n / seconds / 1e9, "dots": kernels})
  return rows


def _saved_residual_bytes(loss_fn, params, batch, rng) -> int | None:
  """Bytes autodiff keeps from the forward pass for the backward pass, parameters (arguments) excluded."""
  try:
    from jax._src.ad_checkpoint import saved_residuals  # the function behind jax.ad_checkpoint.print_saved_residuals
  except ImportError:
    return None
  residuals = saved_residuals(lambda p: loss_fn(p, batch, rng, False)[0], params)
  return sum(aval.size * aval.dtype.itemsize for aval, source in residuals if "argument" not in source)


def setup_policy(name: str, args, data: dict) -> dict:
  """Builds one policy's model, state and compiled step from the shared pretrained weights; measures memory."""
  policy = get_policy(name)
  config = policy.configure(data["config"])
  model, params = init_classifier(config, data["encoder"], data["num_labels"], jax.random.PRNGKey(args.seed))
  batch = data["train_batches"][0]
  tx = make_optimizer(OptimizerConfig(learning_rate=args.lr), len(data["train_batches"]) * args.epochs)
  state = create_train_state(model, params, tx, seed=args.seed, policy=policy)
  loss_fn = classification_loss(model)
  step = make_train_step(loss_fn, policy=policy)
  activation_bytes = _saved_residual_bytes(loss_fn, state.params, batch, state.dropout_key())
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - t0
  print(f"   {name}: compiled in {compile_seconds:.1f}s", flush=True)
  # The compiled step's temp holds gradients and optimizer scratch besides activations; the part that grows with
  # the batch is the activations. Compiling the same step for half the rows gives it: 2 x (temp(B) - temp(B/2)).
  half = jax.tree.map(lambda x: x[: x.shape[0] // 2], batch)
  half_temp = step.lower(state, half).compile().memory_analysis().temp_size_in_bytes
  compiled_activation_bytes = 2 * (compiled.memory_analysis().temp_size_in_bytes - half_temp)
  return {
    "name": name,
    "policy": policy,
    "state": state,
    "compiled": compiled,
    "eval_step": make_eval_step(loss_fn),
    "compile_seconds": compile_seconds,
    "memory": compiled.memory_analysis(),
    "activation_bytes": activation_bytes,
    "compiled_activation_bytes": compiled_activation_bytes,
    "step_seconds": [],
    "history": [],
  }


def finish_policy(run: dict, args, data: dict) -> dict:
  """Evaluates one trained policy and summarises its run."""
  state, memory = run["state"], run["memory"]
  history = run["history"]
  dev = evaluate(run["eval_step"], state.params, data["dev_batches"])
  steady = run["step_seconds"][args.warmup_steps :] or run["step_seconds"]
  last = history[-max(1, len(history) // 10) :]
  train_seconds = sum(run["step_seconds"])
  return {
    "policy": run["name"],
    "policy_string": str(run["policy"]),
    "dev_accuracy": dev["accuracy"],
    "dev_loss": dev["loss"],
    "dev_examples": dev["examples"],
    "final_train_loss": float(np.mean([float(m["loss"]) for m in last])),
    "steps": len(run["step_seconds"]),
    "median_step_seconds": float(np.median(steady)),
    "p90_step_seconds": float(np.percentile(steady, 90)),
    "train_seconds": train_seconds,
    "compile_seconds": run["compile_seconds"],
    "temp_bytes": int(memory.temp_size_in_bytes),
    "argument_bytes": int(memory.argument_size_in_bytes),
    "output_bytes": int(memory.output_size_in_bytes),
    "alias_bytes": int(memory.alias_size_in_bytes),
    "activation_bytes": run["activation_bytes"],
    "compiled_activation_bytes": run["compiled_activation_bytes"],
    "skipped_steps": int(sum(float(m["skipped"]) for m in history)),
    "final_loss_scale": float(jax.device_get(state.loss_scale.loss_scale)),
    "real_tokens_per_second": data["train_tokens"] * args.epochs / train_seconds,
  }


def _mib(n) -> str:
  return "n/a" if n is None else f"{n / 2**20:.0f}"


def markdown(results: list[dict], meta: dict) -> str:
  base = next((r for r in results if r["policy"] == "fp32"), results[0])
  lines = [
    f"Device: {meta['device']} · {meta['train_examples']} train sentences in {results[0]['steps']} steps of "
    f"{meta['batch_shape'][0]}x{meta['batch_shape'][1]} packed tokens · {meta['dev_examples']} dev sentences · "
    f"jax {meta['jax']}",
    "",
    "| policy | dev acc | Δ vs fp32 (points) | median step (s) | speed vs fp32 | compile (s) | temp MiB (vs fp32) "
    "| saved activations MiB (vs fp32) | compiled activations MiB (vs fp32) | skipped | final loss scale |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    act = r["activation_bytes"]
    act_ratio = "" if act is None or not base["activation_bytes"] else f" ({act / base['activation_bytes']:.2f}x)"
    cact = r["compiled_activation_bytes"]
    cact_ratio = f" ({cact / base['compiled_activation_bytes']:.2f}x)"
    lines.append(
      f"| {r['policy']} | {100 * r['dev_accuracy']:.2f}% | {100 * (r['dev_accuracy'] - base['dev_accuracy']):+.2f} "
      f"| {r['median_step_seconds']:.3f} | {base['median_step_seconds'] / r['median_step_seconds']:.2f}x "
      f"| {r['compile_seconds']:.1f} | {_mib(r['temp_bytes'])} ({r['temp_bytes'] / base['temp_bytes']:.2f}x) "
      f"| {_mib(act)}{act_ratio} | {_mib(cact)}{cact_ratio} | {r['skipped_steps']} | {r['final_loss_scale']:g} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.dot_benchmark:
    rows = dot_benchmark()
    print("| matmul 2048x384 @ 384x1536 | median ms | GFLOP/s | dots XLA runs (lhs x rhs -> out) |\n|---|---|---|---|")
    for r in rows:
      print(f"| {r['case']} | {1e3 * r['seconds']:.1f} | {r['gflops']:.0f} | {'; '.join(r['dots'])} |")
    return {"dot_benchmark": rows}
  t_start = time.perf_counter()
  names = [n.strip() for n in args.policies.split(",") if n.strip()]
  for name in names:
    get_policy(name)  # fail on a bad name before loading anything
  model_path = args.model or default_model_path()
  config, encoder = load_hf_bert(model_path)
  tokenizer = load_tokenizer(model_path)
  train_ds = load_text_classification(args.data, "train")
  if args.max_train_examples:
    train_ds = train_ds.take(args.max_train_examples)
  dev_ds = load_text_classification(args.data, "dev", label_names=train_ds.label_names)
  if args.max_dev_examples:
    dev_ds = dev_ds.take(args.max_dev_examples)
  train_ids, _ = tokenize(tokenizer, train_ds.texts, max_length=config.max_position_embeddings)
  dev_ids, _ = tokenize(tokenizer, dev_ds.texts, max_length=config.max_position_embeddings)
  batching = BatchingConfig(strategy="packed", batch_size=args.batch_size, row_length=args.row_length)
  first = make_batches(train_ids, train_ds.labels, batching, pad_id=config.pad_token_id, seed=args.seed, epoch=0)
  eval_batching = BatchingConfig(strategy="packed", batch_size=args.batch_size, row_length=args.row_length)
  dev_batches = make_batches(dev_ids, dev_ds.labels, eval_batching, pad_id=config.pad_token_id, seed=0).batches
  data = {
    "config": config,
    "encoder": encoder,
    "num_labels": len(train_ds.label_names),
    "train": (train_ids, train_ds.labels),
    "batching": batching,
    "pad_id": config.pad_token_id,
    "train_batches": first.batches,
    "train_tokens": sum(b.num_real_tokens for b in first.batches),
    "dev_batches": dev_batches,
  }
  device = jax.devices()[0]
  meta = {
    "device": f"{device.platform}: {getattr(device, 'device_kind', '')} ({os.cpu_count()} host cores)",
    "jax": jax.__version__,
    "python": platform.python_version(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "train_examples": len(train_ds),
    "dev_examples": len(dev_ds),
    "batch_shape": list(first.batches[0].shape),
    "args": vars(args),
  }
  runs = [setup_policy(name, args, data) for name in names]
  # The policies take turns, one step each (jfast.training.run_together): a neighbour's load on a shared machine
  # then slows them alike, where running them one after another would hand whichever ran in a quiet minute a
  # speed-up it did not earn.
  loop = LoopConfig(epochs=args.epochs, seed=args.seed, log_every=1, quiet=True, time_steps=True)

  def epoch_batches(epoch):
    if epoch == 0:
      return data["train_batches"]
    return make_batches(*data["train"], data["batching"], pad_id=data["pad_id"], seed=args.seed, epoch=epoch).batches

  fitted = run_together(*(training_loop(r["state"], r["compiled"], epoch_batches, loop=loop) for r in runs))
  for run, result in zip(runs, fitted, strict=True):
    run["state"], run["history"] = result.state, result.history
    run["step_seconds"] = [seconds for _, seconds in result.stats["step_times"]]
  results = []
  for run in runs:
    results.append(finish_policy(run, args, data))
    r = results[-1]
    print(
      f"{r['policy']}: dev acc {r['dev_accuracy']:.4f} | median step {r['median_step_seconds']:.3f}s | compile "
      f"{r['compile_seconds']:.1f}s | temp {_mib(r['temp_bytes'])} MiB | activations {_mib(r['activation_bytes'])} MiB"
      f" saved, {_mib(r['compiled_activation_bytes'])} MiB compiled"
      f" | skipped {r['skipped_steps']} | loss scale {r['final_loss_scale']:g}",
      flush=True,
    )
  meta["wall_seconds"] = time.perf_counter() - t_start
  out = Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  summary = {"meta": meta, "results": results}
  (out / "precision.json").write_text(json.dumps(summary, indent=2))
  table = markdown(results, meta)
  (out / "precision.md").write_text(table)
  print(table)
  print(f"wrote {out / 'precision.json'} and {out / 'precision.md'} in {meta['wall_seconds']:.0f}s")
  return summary


if __name__ == "__main__":
  run_main(main)
