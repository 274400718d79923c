"""8-bit AdamW against float32 AdamW on the real MiniLM and SST-2, in jfast and in PyTorch (bitsandbytes).

    python -m experiments.optim8bit                          # CPU-sized: 4,000 sentences (59 steps per run)
    python -m experiments.optim8bit --max-train-examples 0   # all 67,349 sentences
    python -m experiments.optim8bit --part jfast             # one side only (merged with the other's saved part)

jfast: the pretrained all-MiniLM-L6-v2 encoder under one seeded classifier head, fine-tuned for one epoch of packed
batches with the schedule of ``experiments/finetune.py`` (AdamW, lr 1e-4, 6% warm-up, linear decay, clip 1.0), once
with ``optax.adamw`` and once with ``jfast.optim.adamw_8bit``; the two take turns step by step on the same batches,
so load from other processes falls on both alike and their step-time medians compare. PyTorch: the same initial
weights (written by ``save_hf_bert``) in ``transformers.BertForSequenceClassification``, the same examples in the
same steps (each packed batch unpacked into one padded batch), with ``torch.optim.AdamW`` and with
``bitsandbytes.optim.AdamW8bit``. Also: each code map's storage error on the real moments of the float32 run.
Writes part_jfast.json / part_torch.json, then results.json, results.md and loss_curves.png under ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jfast.app.config import ConfigError
from jfast.app.entry import run_main
from jfast.app.finetune import DEFAULT_DATA, default_model_path
from jfast.data import BatchingConfig, load_text_classification, load_tokenizer, make_batches, tokenize
from jfast.models import init_classifier, load_hf_bert, save_hf_bert
from jfast.optim import (
  CODE_MAPS,
  OptimizerConfig,
  codebooks,
  dequantize_blockwise,
  make_optimizer,
  quantize_blockwise,
  state_bytes,
)
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

OPTIMIZERS = ("adamw", "adamw_8bit")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(DEFAULT_DATA), help="SST-2 folder of TSVs")
  p.add_argument("--model", default=None, help="Hugging Face BERT folder (default: all-MiniLM-L6-v2, pretrained)")
  p.add_argument("--max-train-examples", type=int, default=4000, help="first N training sentences (0: all)")
  p.add_argument("--batch-size", type=int, default=16, help="packed rows per batch")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--weight-decay", type=float, default=0.01)
  p.add_argument("--warmup-ratio", type=float, default=0.06)
  p.add_argument("--block-size", type=int, default=256)
  p.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the step-time medians")
  p.add_argument("--update-rounds", type=int, default=30, help="interleaved rounds of the optimizer-only timing")
  p.add_argument("--log-every", type=int, default=5, help="steps per point of the loss curves")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--part",
    default="all",
    choices=("all", "jfast", "torch", "report"),
    help="run one side only (the report merges it with the other side's saved part in --output); report: only merge",
  )
  p.add_argument("--output", default="results/optim8bit")
  return p.parse_args(argv)


def _windows(losses: list[float], examples: list[float], every: int) -> list[dict]:
  """Example-weighted mean training loss over consecutive windows of ``every`` steps."""
  out = []
  for start in range(0, len(losses), every):
    ls, ex = np.asarray(losses[start : start + every]), np.asarray(examples[start : start + every])
    out.append({"step": start + len(ls), "loss": float((ls * ex).sum() / max(ex.sum(), 1.0))})
  return out


def run_jfast(args, data: dict) -> tuple[list[dict], dict]:
  """Both jfast optimizers, taking turns step by step; returns their summaries and the float32 run's moments."""
  total = len(data["train_batches"])
  runs = []
  for name in OPTIMIZERS:
    model, params = init_classifier(data["config"], data["encoder"], 2, jax.random.PRNGKey(args.seed))
    opt = OptimizerConfig(
      learning_rate=args.lr,
      weight_decay=args.weight_decay,
      warmup_ratio=args.warmup_ratio,
      name=name,
      block_size=args.block_size,
    )
    tx = make_optimizer(opt, total)
    state = create_train_state(model, params, tx, seed=args.seed)
    loss_fn = classification_loss(model)
    t0 = time.perf_counter()
    compiled = make_train_step(loss_fn).lower(state, data["train_batches"][0]).compile()
    compile_seconds = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    runs.append(
      {
        "name": name,
        "tx": tx,
        "state": state,
        "compiled": compiled,
        "eval_step": make_eval_step(loss_fn),
        "compile_seconds": compile_seconds,
        "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "opt_state_bytes": state_bytes(state.opt_state),
        "params_bytes": state_bytes(state.params),
        "metrics": [],
        "seconds": [],
      }
    )
    print(f"   jfast {name}: compiled in {compile_seconds:.1f}s, state {runs[-1]['opt_state_bytes'] / 2**20:.1f} MiB")
  # Turns, one step each (jfast.training.run_together): a neighbour's load on a shared machine then slows both alike.
  loop = LoopConfig(seed=args.seed, log_every=1, quiet=True, time_steps=True)

  def progress(name):
    def log(row):
      if row["step"] % 20 == 0:
        print(f"   {name} step {row['step']}/{total}: loss {row['loss']:.3f}", flush=True)

    return log

  fitted = run_together(
    *(
      training_loop(r["state"], r["compiled"], data["train_batches"], loop=loop, on_log=progress(r["name"]))
      for r in runs
    )
  )
  for run, result in zip(runs, fitted, strict=True):
    run["state"] = result.state
    run["seconds"] = [seconds for _, seconds in result.stats["step_times"]]
    run["metrics"] = result.history
  update_seconds = time_updates(runs, args.update_rounds)
  results = []
  for run in runs:
    history = run["metrics"]
    dev = evaluate(run["eval_step"], run["state"].params, data["dev_batches"])
    steady = run["seconds"][args.warmup_steps :] or run["seconds"]
    losses = [float(m["loss"]) for m in history]
    examples = [float(m["examples"]) for m in history]
    results.append(
      {
        "stack": "jfast",
        "optimizer": run["name"],
        "dev_accuracy": dev["accuracy"],
        "dev_loss": dev["loss"],
        "dev_examples": dev["examples"],
        "steps": len(history),
        "final_train_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
        "opt_state_bytes": run["opt_state_bytes"],
        "params_bytes": run["params_bytes"],
        "median_step_seconds": float(np.median(steady)),
        "median_update_seconds": update_seconds[run["name"]],
        "compile_seconds": run["compile_seconds"],
        "temp_bytes": run["temp_bytes"],
        "argument_bytes": run["argument_bytes"],
        "curve": _windows(losses, examples, args.log_every),
      }
    )
  adam = runs[0]["state"].opt_state[1][0]  # clip, then adamw's chain: (ScaleByAdamState, decay, lr)
  return results, {"mu": adam.mu, "nu": adam.nu, "count": int(adam.count)}


def time_updates(runs: list[dict], rounds: int) -> dict[str, float]:
  """Median seconds of the optimizer alone (``tx.update`` + ``apply_updates``), the two taking turns."""
  grads = jax.tree.map(
    lambda p: 1e-3 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape, p.dtype), runs[0]["state"].params
  )
  fns, states, times = {}, {}, {r["name"]: [] for r in runs}
  for run in runs:
    tx = run["tx"]

    def update(g, opt_state, params, tx=tx):
      updates, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    fns[run["name"]] = jax.jit(update, donate_argnums=(1, 2))
    copy = jax.tree.map(jnp.copy, (run["state"].opt_state, run["state"].params))
    states[run["name"]] = fns[run["name"]](grads, *copy)
  jax.block_until_ready(states)
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      states[name] = jax.block_until_ready(fn(grads, states[name][1], states[name][0]))
      times[name].append(time.perf_counter() - t)
  return {name: float(np.median(ts)) for name, ts in times.items()}


def code_map_errors(moments: dict, block_size: int, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> list:
  """Each code map's storage error on real moments: relative L2 error of m, v and of Adam's update m̂/(√v̂+ε)."""
  count = moments["count"]
  c1, c2 = 1 - b1**count, 1 - b2**count
  rows = []
  for name in CODE_MAPS:
    m_book, v_book = codebooks(name)
    sums = dict.fromkeys(("dm", "m", "dv", "v", "du", "u", "lost", "nonzero"), 0.0)
    for m, v in zip(jax.tree.leaves(moments["mu"]), jax.tree.leaves(moments["nu"]), strict=True):
      if m.size < 4096:
        continue
      mq = dequantize_blockwise(*quantize_blockwise(m, m_book, block_size), m_book, block_size)
      vq = dequantize_blockwise(*quantize_blockwise(v, v_book, block_size), v_book, block_size)
      u = (m / c1) / (jnp.sqrt(v / c2) + eps)
      uq = (mq / c1) / (jnp.sqrt(vq / c2) + eps)
      for key, a, b in (("m", mq, m), ("v", vq, v), ("u", uq, u)):
        sums["d" + key] += float(jnp.sum((a - b) ** 2))
        sums[key] += float(jnp.sum(b**2))
      sums["lost"] += float(jnp.sum((vq == 0) & (v > 0)))
      sums["nonzero"] += float(jnp.sum(v > 0))
    rows.append(
      {
        "code_map": name,
        "m_rel_error": (sums["dm"] / sums["m"]) ** 0.5,
        "v_rel_error": (sums["dv"] / sums["v"]) ** 0.5,
        "update_rel_error": (sums["du"] / sums["u"]) ** 0.5,
        "v_flushed_to_zero": sums["lost"] / max(sums["nonzero"], 1.0),
        "m_max_error_per_block_scale": m_book.max_error,
        "v_max_error_per_block_scale": v_book.max_error,
      }
    )
  return rows


def _unpack(batch) -> tuple[list[np.ndarray], np.ndarray]:
  """The examples of a (packed) `Batch`, in slot order: token arrays and labels."""
  seqs, labels = [], []
  for b, s in zip(*np.nonzero(batch.example_mask), strict=True):
    segment = batch.segment_ids[b, batch.cls_positions[b, s]]
    seqs.append(batch.input_ids[b][batch.segment_ids[b] == segment])
    labels.append(batch.labels[b, s])
  return seqs, np.asarray(labels)


def _padded(torch, seqs, pad_id):
  length = max(len(s) for s in seqs)
  ids = np.full((len(seqs), length), pad_id, np.int64)
  mask = np.zeros((len(seqs), length), np.int64)
  for i, s in enumerate(seqs):
    ids[i, : len(s)], mask[i, : len(s)] = s, 1
  return torch.from_numpy(ids), torch.from_numpy(mask)


def _torch_state_bytes(opt) -> int:
  seen, total = set(), 0
  for st in opt.state.values():
    for t in st.values():
      if hasattr(t, "data_ptr") and t.data_ptr() not in seen:
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
  return total


def run_torch(args, data: dict, hf_dir: str) -> list[dict]:
  """torch AdamW and bitsandbytes AdamW8bit on the same initial weights, examples, steps and schedule."""
  import torch
  import transformers

  total = len(data["train_batches"])
  warmup = int(args.warmup_ratio * total)

  def lr_factor(t: int) -> float:  # optax's join of two linear schedules, as make_optimizer builds it
    return t / warmup if t < warmup else max(0.0, 1 - (t - warmup) / max(total - warmup, 1))

  unpacked = [_unpack(b) for b in data["train_batches"]]
  results = []
  for name in ("torch AdamW", "bnb AdamW8bit"):
    torch.manual_seed(args.seed)
    model = transformers.BertForSequenceClassification.from_pretrained(hf_dir).train()
    no_decay = ("bias", "LayerNorm.weight", "embeddings")  # make_optimizer's mask: no decay on biases, norms, tables
    named = list(model.named_parameters())
    groups = [
      {"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": args.weight_decay},
      {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    if name.startswith("bnb"):
      import bitsandbytes as bnb

      opt = bnb.optim.AdamW8bit(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    else:
      opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    losses, examples, seconds = [], [], []
    for i, (seqs, labels) in enumerate(unpacked):
      t = time.perf_counter()
      # The step's examples in chunks of similar length (padding one batch to its longest sentence would do ~4x
      # the real work); the summed per-example losses over the step's count give the step's exact mean gradient.
      order = np.argsort([len(x) for x in seqs], kind="stable")
      loss_sum = 0.0
      for chunk in np.array_split(order, max(1, len(order) // 16)):
        ids, mask = _padded(torch, [seqs[j] for j in chunk], data["pad_id"])
        logits = model(input_ids=ids, attention_mask=mask).logits
        target = torch.from_numpy(labels[chunk]).long()
        chunk_loss = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        (chunk_loss / len(seqs)).backward()
        loss_sum += chunk_loss.item()
      loss = torch.tensor(loss_sum / len(seqs))
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      sched.step()
      opt.zero_grad(set_to_none=True)
      seconds.append(time.perf_counter() - t)
      losses.append(loss.item())
      examples.append(float(len(seqs)))
      if (i + 1) % 20 == 0:
        print(f"   {name} step {i + 1}/{total}: loss {np.mean(losses[-20:]):.3f}", flush=True)
    model.eval()
    correct = 0
    dev_seqs, dev_labels = data["dev"]
    with torch.no_grad():
      for start in range(0, len(dev_seqs), 64):
        ids, mask = _padded(torch, dev_seqs[start : start + 64], data["pad_id"])
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).numpy()
        correct += int((pred == dev_labels[start : start + 64]).sum())
    steady = seconds[args.warmup_steps :] or seconds
    results.append(
      {
        "stack": "pytorch",
        "optimizer": name,
        "dev_accuracy": correct / len(dev_seqs),
        "dev_examples": len(dev_seqs),
        "steps": len(losses),
        "final_train_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
        "opt_state_bytes": _torch_state_bytes(opt),
        "params_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "median_step_seconds": float(np.median(steady)),
        "curve": _windows(losses, examples, args.log_every),
      }
    )
    print(
      f"   {name}: dev acc {results[-1]['dev_accuracy']:.4f}, state {results[-1]['opt_state_bytes'] / 2**20:.1f} MiB"
    )
  return results


def markdown(results: list[dict], errors: list[dict], meta: dict) -> str:
  lines = [
    f"Device: {meta['device']} · MiniLM (all-MiniLM-L6-v2, pretrained) · {meta['train_examples']} SST-2 train "
    f"sentences in {meta['steps']} steps of {meta['batch_shape'][0]}x{meta['batch_shape'][1]} packed tokens · "
    f"{meta['dev_examples']} dev sentences · jax {meta['jax']}, torch {meta.get('torch', 'n/a')}, bitsandbytes "
    f"{meta.get('bitsandbytes', 'n/a')}",
    "",
    "| stack | optimizer | dev acc | Δ vs its float32 (points) | optimizer state MiB | vs float32 | final train loss "
    "| median step (s) | step vs float32 | median optimizer update (s) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    base = results[0] if r["stack"] == "jfast" else next(x for x in results if x["stack"] == "pytorch")
    update = f"{r['median_update_seconds']:.3f}" if "median_update_seconds" in r else "n/a"
    lines.append(
      f"| {r['stack']} | {r['optimizer']} | {100 * r['dev_accuracy']:.2f}% "
      f"| {100 * (r['dev_accuracy'] - base['dev_accuracy']):+.2f} | {r['opt_state_bytes'] / 2**20:.1f} "
      f"| {r['opt_state_bytes'] / base['opt_state_bytes']:.3f}x | {r['final_train_loss']:.4f} "
      f"| {r['median_step_seconds']:.3f} | {r['median_step_seconds'] / base['median_step_seconds']:.3f}x | {update} |"
    )
  jf = [r for r in results if r["stack"] == "jfast"]
  lines += [
    "",
    f"jfast compiled train step: temp {jf[0]['temp_bytes'] / 2**20:.0f} MiB (float32) vs "
    f"{jf[1]['temp_bytes'] / 2**20:.0f} MiB (8-bit); arguments (state + batch) {jf[0]['argument_bytes'] / 2**20:.0f} "
    f"vs {jf[1]['argument_bytes'] / 2**20:.0f} MiB; compile {jf[0]['compile_seconds']:.1f} s vs "
    f"{jf[1]['compile_seconds']:.1f} s.",
    "",
    f"Storage error of each code map on the float32 run's final moments (tensors of >= 4096 elements, block "
    f"{meta['args']['block_size']}): relative L2 error",
    "",
    "| code map | m | v | update m̂/(√v̂+ε) | v > 0 stored as 0 | max error / block scale (m, v) |",
    "|---|---|---|---|---|---|",
  ]
  for e in errors:
    lines.append(
      f"| {e['code_map']} | {e['m_rel_error']:.2e} | {e['v_rel_error']:.2e} | {e['update_rel_error']:.2e} "
      f"| {100 * e['v_flushed_to_zero']:.3f}% | {e['m_max_error_per_block_scale']:.4f}, "
      f"{e['v_max_error_per_block_scale']:.4f} |"
    )
  return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  styles = {"adamw": "C0-", "adamw_8bit": "C1--", "torch AdamW": "C2-", "bnb AdamW8bit": "C3--"}
  for r in results:
    steps = [c["step"] for c in r["curve"]]
    ax.plot(
      steps, [c["loss"] for c in r["curve"]], styles.get(r["optimizer"], "-"), label=f"{r['stack']} {r['optimizer']}"
    )
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (window mean)")
  ax.set_title("MiniLM on SST-2: float32 vs 8-bit AdamW")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  t_start = time.perf_counter()
  model_path = args.model or default_model_path()
  config, encoder = load_hf_bert(model_path)
  tokenizer = load_tokenizer(model_path)
  train_ds = load_text_classification(args.data, "train")
  if args.max_train_examples:
    train_ds = train_ds.take(args.max_train_examples)
  dev_ds = load_text_classification(args.data, "dev", label_names=train_ds.label_names)
  train_ids, _ = tokenize(tokenizer, train_ds.texts, max_length=config.max_position_embeddings)
  dev_ids, _ = tokenize(tokenizer, dev_ds.texts, max_length=config.max_position_embeddings)
  batching = BatchingConfig(strategy="packed", batch_size=args.batch_size)
  first = make_batches(train_ids, train_ds.labels, batching, pad_id=config.pad_token_id, seed=args.seed, epoch=0)
  dev_batching = BatchingConfig(strategy="packed", batch_size=args.batch_size, shuffle=False)
  dev_batches = make_batches(dev_ids, dev_ds.labels, dev_batching, pad_id=config.pad_token_id, seed=0).batches
  data = {
    "config": config,
    "encoder": encoder,
    "pad_id": config.pad_token_id,
    "train_batches": first.batches,
    "dev_batches": dev_batches,
    "dev": (dev_ids, np.asarray(dev_ds.labels)),
  }
  device = jax.devices()[0]
  meta = {
    "device": f"{device.platform}: {getattr(device, 'device_kind', '')} ({os.cpu_count()} host cores)",
    "jax": jax.__version__,
    "optax": optax.__version__,
    "python": platform.python_version(),
    "train_examples": len(train_ds),
    "dev_examples": len(dev_ds),
    "steps": len(first.batches),
    "batch_shape": list(first.batches[0].shape),
    "args": vars(args),
  }
  out = Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  if args.part in ("all", "jfast"):
    print(f"jfast: {len(first.batches)} steps of {first.batches[0].shape} packed tokens, float32 and 8-bit AdamW")
    results, moments = run_jfast(args, data)
    part = {"meta": meta, "results": results, "code_map_errors": code_map_errors(moments, args.block_size)}
    (out / "part_jfast.json").write_text(json.dumps(part, indent=2))
  if args.part in ("all", "torch"):
    import bitsandbytes
    import torch

    torch_meta = {
      "torch": torch.__version__,
      "bitsandbytes": bitsandbytes.__version__,
      "threads": torch.get_num_threads(),
    }
    _, init_params = init_classifier(config, encoder, 2, jax.random.PRNGKey(args.seed))
    with tempfile.TemporaryDirectory() as hf_dir:
      save_hf_bert(hf_dir, config, init_params, label_names=train_ds.label_names, tokenizer=model_path)
      part = {"meta": {**meta, **torch_meta}, "results": run_torch(args, data, hf_dir)}
    (out / "part_torch.json").write_text(json.dumps(part, indent=2))
  parts = {
    name: json.loads((out / f"part_{name}.json").read_text())
    for name in ("jfast", "torch")
    if (out / f"part_{name}.json").is_file()
  }
  for name, part in parts.items():
    if part["meta"]["args"]["max_train_examples"] != args.max_train_examples or part["meta"]["steps"] != meta["steps"]:
      raise ConfigError(f"the saved {name} part was run on other data ({part['meta']['args']}); run it again")
  if "jfast" not in parts:
    raise ConfigError(f"no jfast part in {out}: run with --part jfast (or all) first")
  results = parts["jfast"]["results"] + parts.get("torch", {}).get("results", [])
  errors = parts["jfast"]["code_map_errors"]
  meta.update({k: v for k, v in parts.get("torch", {}).get("meta", {}).items() if k in ("torch", "bitsandbytes")})
  meta["wall_seconds"] = time.perf_counter() - t_start
  summary = {
    "meta": meta,
    "results": results,
    "code_map_errors": errors,
    "parts": {k: v["meta"] for k, v in parts.items()},
  }
  (out / "results.json").write_text(json.dumps(summary, indent=2))
  table = markdown(results, errors, meta)
  (out / "results.md").write_text(table)
  plot(results, out / "loss_curves.png")
  print(table)
  print(f"wrote {out}/results.json, results.md, loss_curves.png in {meta['wall_seconds']:.0f}s")
  return summary


if __name__ == "__main__":
  run_main(main)
