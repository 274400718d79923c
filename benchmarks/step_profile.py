"""Where a jfast train step's time goes on this machine, and what each of the library's choices is worth.

    python -m benchmarks.step_profile --config grouped_bf16            # per-category op time from a profiler trace
    python -m benchmarks.step_profile --config packed_bf16 --ab cpulayer # jfast.cpu's bf16 products vs stock nn.Dense
    python -m benchmarks.step_profile --config packed_bf16 --ab clsonly  # the classifier's last layer: all rows vs [CLS]
    python -m benchmarks.step_profile --config packed_bf16 --ab fuseqkv  # q, k, v as three products or one
    python -m benchmarks.step_profile --config grouped_bf16 --side torch # the PyTorch step, torch.profiler
    python -m benchmarks.step_profile --config grouped_bf16 --ab hugepages [--side torch]  # glibc's THP tunable
    python -m benchmarks.step_profile --config gpt_bf16 [--ab cpulayer]  # experiments.lm's GPT
    python -m benchmarks.step_profile --config gpt_bf16 --ab xla_flags [--xla-flags="--xla_cpu_..."]  # XLA:CPU flags

The step is the one `benchmarks.compare` times (the real MiniLM, SST-2 batches cut by the config's strategy,
`make_train_step` with the precision policy). Profile mode traces a few steps with `jax.profiler` (XLA:CPU emits one
event per thunk with ``--xla_cpu_enable_xprof_traceme``) and sums each op's time over the worker threads into
categories read from the HLO metadata: matrix products, dropout masks, the embedding gradient, dtype casts, layout
copies, optimizer update and the remaining forward / backward elementwise work. A/B mode builds both variants of
the step in one process and alternates them step by step, so machine noise hits both alike; medians after warm-up.
Each variant is an explicit switch of the library (`AB_VARIANTS`): a model flag, or `jfast.cpu.use_layer`, which
traces the CPU layer's forms or the stock GPU/TPU forms for the CPU.
``--ab hugepages`` cannot share a process (glibc reads the tunable at start): it alternates fresh processes with and
without ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (`jfast.cpu.hugepages`), and with it plus `jfast.cpu.hugepages.RETAIN`
(freed buffers kept in the process), three of each, and reports each median;
``--ab xla_flags`` does the same for XLA:CPU compiler flags (`XLA_FLAG_VARIANTS`, or ``--xla-flags``) against XLA's
defaults.
``--side torch`` profiles the PyTorch step of the same config on the same batches with `torch.profiler`, by the
same categories (self time of each aten op, which on the calling thread is wall time, not summed over threads).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
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
from jfast.app.entry import run_main

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


@dataclasses.dataclass(frozen=True)
class GPTSpec:
  """The jfast side of `experiments.lm` with its defaults (4-layer GPT on tiny-shakespeare, 8 x 256 tokens)."""

  config: str
  precision: str


GPT_CONFIGS = {"gpt_fp32": "fp32", "gpt_bf16": "bf16"}


def _spec(config: str) -> RunSpec | GPTSpec:
  if config in GPT_CONFIGS:
    return GPTSpec(config, GPT_CONFIGS[config])
  row = CONFIGS.get(config)
  if row is None or row.jax is None:
    raise SystemExit(
      f"unknown jfast config {config!r}; try grouped_bf16, packed_bf16, grouped, packed, fixed, gpt_bf16, gpt_fp32"
    )
  return specs_for(row, {})["jax"]


def _chosen(spec: RunSpec, n: int = 12):
  """The first ``n`` batches of the epoch that share the first batch's shape (one compilation), with the examples
  and the batch plan of just those batches (so the PyTorch side can train on the same sentences)."""
  train, _ = data.load_task(spec.task, max_train_examples=4000)
  epoch = data.make_epoch(train, spec)
  shape = epoch.batches[0].input_ids.shape
  picked = [k for k, b in enumerate(epoch.batches) if b.input_ids.shape == shape][:n]
  plan = data.Plan([epoch.example_index[k] for k in picked], [shape[1]] * len(picked))
  return [epoch.batches[k] for k in picked], train, plan


def _batches(spec: RunSpec, n: int = 12):
  return _chosen(spec, n)[0]


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


def _gpt_step(spec: GPTSpec, config=None, params=None):
  """`_jax_step` for the GPT of `experiments.lm`: its JaxSide's step on its first 12 training batches."""
  import jax

  from experiments import lm

  args = lm.parse_args(["--precision", spec.precision, "--sides", "jfast"])
  with tempfile.TemporaryDirectory() as tmp:
    tok, train_rows, _ = lm.load_corpus(Path(args.data), args.vocab, args.length, args.packing, Path(tmp))
  if config is None:
    config = lm.gpt_config(args, tok)
    params = jax.device_get(lm.init_gpt(config, jax.random.key(args.seed))[1])
  side = lm.JaxSide(config, jax.tree.map(lambda x: x.copy(), params), args, 1000)
  batches = lm.lm_batches(train_rows, args.batch_size, seed=args.seed, epoch=0)[:12]
  return side.step_fn.lower(side.state, batches[0]).compile(), side.state, batches, config, params


def _jax_step(spec: RunSpec | GPTSpec, model=None, params=None):
  """jfast's compiled step for ``spec`` on the `_batches`: ``(compiled, state, batches, model, params)``.

  Pass ``model`` and ``params`` to build another variant of the same model (they are copied, the state is donated).
  """
  import jax

  from benchmarks.jax_runner import build_model, build_step

  if isinstance(spec, GPTSpec):
    return _gpt_step(spec, model, params)

  batches = _batches(spec)
  if model is None:
    model, params = build_model(spec, data.NUM_LABELS[spec.task])
  state, step = build_step(spec, model, jax.tree.map(lambda x: x.copy(), params), 1000)
  return step.lower(state, batches[0]).compile(), state, batches, model, params


def profile(spec: RunSpec, steps: int, top: int) -> str:
  import jax
  from jax.profiler import ProfileData

  compiled, state, batches, _, _ = _jax_step(spec)
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
  tokens = sum(b.num_real_tokens for b in batches[:steps]) / min(steps, len(batches))
  lines = [
    f"jfast `{spec.config}`, batches {shape} ({tokens:.0f} real tokens a step on average): {wall * 1e3:.1f} ms wall per step, {total:.1f} ms of op time summed over "
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


def _torch_category(op: str) -> str:
  if op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm") or "mkldnn" in op or "linear" in op:
    return "matrix products"
  if "dropout" in op or "bernoulli" in op:
    return "dropout masks"
  if "embedding" in op and "backward" in op:
    return "embedding gradient"
  if op in ("aten::copy_", "aten::to", "aten::_to_copy"):
    return "dtype casts"
  if op in ("aten::contiguous", "aten::clone", "aten::transpose", "aten::t", "aten::permute"):
    return "layout copies"
  if "adam" in op or "foreach" in op or op in ("aten::_foreach_norm", "aten::linalg_vector_norm"):
    return "optimizer update"
  return "other (forward and backward)"


def _torch_step(spec: RunSpec):
  """The PyTorch step of ``spec``'s config on the same sentences as `_chosen`: ``(train_step, step_batches)``."""
  import torch

  from benchmarks import torch_runner

  torch_spec = specs_for(CONFIGS[spec.config], {})["torch"]
  torch.set_num_threads(len(os.sched_getaffinity(0)))  # as pinned by --threads
  _, train, plan = _chosen(spec)
  if plan.slots[0].shape[1] != 1:
    raise SystemExit(f"{spec.config} packs several sentences a row; PyTorch BERT has no packed form to profile")
  step_batches, _ = torch_runner.make_steps(dataclasses.replace(torch_spec, warmup=3, steps=9), train, plan)
  model = torch_runner.build_model(torch_spec, data.NUM_LABELS[spec.task])
  model.train()
  opt, sched = torch_runner.build_optimizer(torch_spec, model, total_steps=1000)
  params = [p for p in model.parameters() if p.requires_grad]
  amp = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[torch_spec.dtype]
  scaler = torch.amp.GradScaler("cpu", enabled=amp is torch.float16)
  return torch_runner.make_train_step(model, opt, sched, scaler, params, torch.device("cpu"), amp), step_batches


def profile_torch(spec: RunSpec, steps: int, top: int) -> str:
  from torch.profiler import ProfilerActivity
  from torch.profiler import profile as torch_profile

  train_step, step_batches = _torch_step(spec)
  for micros in step_batches[:3]:
    train_step(micros)
  with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    for i in range(steps):
      train_step(step_batches[3 + i % (len(step_batches) - 3)])
    wall = (time.perf_counter() - t0) / steps
  per_op = {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}
  per_cat = collections.Counter()
  for op, ms in per_op.items():
    per_cat[_torch_category(op)] += ms
  total = sum(per_cat.values())
  tokens = sum(int(m.attention_mask.sum()) for micros in step_batches[3:] for m in micros) / (len(step_batches) - 3)
  lines = [
    f"PyTorch `{spec.config}` (the same examples, padded by its collator; {tokens:.0f} real tokens a step on "
    f"average): {wall * 1e3:.1f} ms wall per step, {total:.1f} ms of aten self time.",
    "",
    "| category | ms per step (self time) | share |",
    "|---|---|---|",
  ]
  cats = (*CATEGORIES[:6], "other (forward and backward)")
  lines += [f"| {c} | {per_cat[c]:.1f} | {per_cat[c] / total:.0%} |" for c in cats if per_cat[c]]
  lines += ["", f"Top {top} ops:", "", "| ms | op | category |", "|---|---|---|"]
  for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f"| {ms:.2f} | `{op}` | {_torch_category(op)} |")
  return "\n".join(lines)


# What `--ab` compares: each variant is an explicit switch of the library (a model flag, or the CPU layer turned off
# for the trace with `jfast.cpu.use_layer`), never a patched function.
AB_VARIANTS = {
  "clsonly": {
    "every row through the last layer": {"last_layer_pooled_only": False},
    "last layer at the [CLS] rows only (default)": {},
  },
  "fuseqkv": {
    "query, key and value as three products": {"fuse_qkv": False},
    "query, key and value as one product (BertConfig.fuse_qkv)": {"fuse_qkv": True},
  },
  "cpulayer": {
    "stock nn.Dense and XLA's autodiff (the GPU/TPU path)": {"cpu_layer": False},
    "jfast.cpu layer: bf16 products in XLA:CPU's kernel forms (default on CPUs with bf16 instructions)": {
      "cpu_layer": True
    },
  },
}
BERT_ONLY_AB = ("clsonly", "fuseqkv")


def _variant(model, switches: dict):
  if "last_layer_pooled_only" in switches:
    model = model.clone(last_layer_pooled_only=switches["last_layer_pooled_only"])
  if "fuse_qkv" in switches:
    model = model.clone(config=model.config.replace(fuse_qkv=switches["fuse_qkv"]))
  return model


def ab(spec: RunSpec | GPTSpec, what: str, steps: int) -> str:
  """Both variants of the step built in one process, alternated step by step."""
  import jax

  from jfast.cpu import use_layer

  model = params = None
  if what in BERT_ONLY_AB:
    from benchmarks.jax_runner import build_model

    model, params = build_model(spec, data.NUM_LABELS[spec.task])
  runs = {}
  for name, switches in AB_VARIANTS[what].items():
    variant = None if model is None else _variant(model, switches)
    with use_layer(switches.get("cpu_layer")):
      if isinstance(spec, GPTSpec):
        compiled, state, batches, _, params = _gpt_step(spec, None, params)
      else:
        compiled, state, batches, variant, params = _jax_step(spec, variant, params)
    runs[name] = [state, compiled, []]
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


def step_time(spec: RunSpec, side: str, steps: int) -> float:
  """Median seconds of the plain step (jfast's compiled step, or the PyTorch step) after 3 warm-up steps."""
  if side == "torch":
    run, chosen = _torch_step(spec)
  else:
    import jax

    compiled, state, chosen, _, _ = _jax_step(spec)
    holder = [state]

    def run(batch):
      holder[0], _ = compiled(holder[0], batch)
      jax.block_until_ready(holder[0])

  batches = [chosen[i % len(chosen)] for i in range(3 + steps)]
  times = []
  for batch in batches:
    t0 = time.perf_counter()
    run(batch)
    times.append(time.perf_counter() - t0)
  return statistics.median(times[3:])


# XLA:CPU switches that change how a step is compiled; `--ab xla_flags` times each against the defaults.
XLA_FLAG_VARIANTS = (
  "--xla_cpu_experimental_ynn_fusion_type=",  # YNNPACK dots off: Eigen's
  "--xla_cpu_use_xnnpack=false",
  "--xla_cpu_prefer_vector_width=512",
  "--xla_cpu_enable_concurrency_optimized_scheduler=true",
  "--xla_cpu_use_thunk_runtime=false",
  "--xla_cpu_enable_fast_math=true",
)


def _env_runs(args, envs: dict, repeats: int) -> dict[str, list[float]]:
  """Fresh processes, one per environment in turn, ``repeats`` rounds; each reports its median step."""
  import subprocess

  cmd = [sys.executable, "-m", "benchmarks.step_profile", "--config", args.config, "--side", args.side]
  cmd += ["--time-only", "--steps", str(args.steps or 12), "--threads", str(args.threads)]
  runs = {name: [] for name in envs}
  for _ in range(repeats):
    for name, env in envs.items():
      done = subprocess.run(cmd, env=env, capture_output=True, text=True)
      if done.returncode:
        raise SystemExit(f"{name}: the timing process failed:\n{done.stderr[-2000:]}")
      runs[name].append(float(done.stdout.strip().splitlines()[-1]))
  return runs


def ab_xla_flags(args) -> str:
  """Each XLA:CPU flag set in fresh processes (XLA reads its flags once), alternated with the defaults."""
  base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  envs = {"defaults": base} | {flags: {**base, "XLA_FLAGS": flags} for flags in args.xla_flags or XLA_FLAG_VARIANTS}
  return _env_table(args, _env_runs(args, envs, 3), "XLA_FLAGS")


def ab_hugepages(args) -> str:
  """Fresh processes alternated: no tunable, huge pages, huge pages with freed memory retained, freed memory
  retained in 4 KiB pages; each reports its median step."""
  from benchmarks.compare import allocator_env

  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JFAST_HUGEPAGES")}
  envs = {
    "4 KiB pages (default)": base,
    "glibc.malloc.hugetlb=1": allocator_env(base, hugepages=True, retain=False),
    "hugetlb=1 + freed memory retained (RETAIN)": allocator_env(base, hugepages=True, retain=True),
    "freed memory retained (RETAIN), 4 KiB pages": allocator_env(base, hugepages=False, retain=True),
  }
  return _env_table(args, _env_runs(args, envs, 3), "allocation")


def _env_table(args, runs: dict[str, list[float]], what: str) -> str:
  base_median = statistics.median(next(iter(runs.values())))
  who = "PyTorch" if args.side == "torch" else "jfast"
  repeats = len(next(iter(runs.values())))
  lines = [f"{who} `{args.config}`, {repeats} fresh processes each, alternated; median step of each (ms):", ""]
  lines += [f"| {what} | process medians (ms) | median | vs first |", "|---|---|---|---|"]
  for name, values in runs.items():
    m = statistics.median(values)
    lines.append(
      f"| {name} | {', '.join(f'{v * 1e3:.1f}' for v in values)} | {m * 1e3:.1f} | {base_median / m:.2f}x |"
    )
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
    "--config", default="grouped_bf16", help="a jfast config of benchmarks.configs, or gpt_bf16 / gpt_fp32"
  )
  p.add_argument(
    "--ab", choices=(*AB_VARIANTS, "hugepages", "xla_flags"), help="time two variants instead of profiling"
  )
  p.add_argument(
    "--xla-flags",
    action="append",
    help='one flag set for --ab xla_flags, as --xla-flags="--xla_cpu_a=1 --xla_cpu_b=2" (repeatable; default: '
    "each of XLA_FLAG_VARIANTS)",
  )
  p.add_argument("--time-only", action="store_true", help="print the plain step's median seconds and exit")
  p.add_argument("--side", choices=("jax", "torch"), default="jax", help="profile jfast's step or PyTorch's")
  p.add_argument("--steps", type=int, default=None, help="steps traced (profile: 5) or timed per side (A/B: 20)")
  p.add_argument("--top", type=int, default=25, help="ops listed one by one")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--out", default=None, help="also write the markdown here")
  args = p.parse_args(argv)
  if (
    not args.ab
    and not args.time_only
    and args.side == "jax"
    and "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", "")
  ):
    # Per-thunk trace events exist only with this flag, and XLA reads its flags once: rerun with it set.
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme").strip()}
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.step_profile", *(argv or sys.argv[1:])], env)
  spec = _spec(args.config)
  if isinstance(spec, GPTSpec) and args.side == "torch":
    raise SystemExit(f"{args.config}: the GPT step has the jfast side only here (experiments.lm times PyTorch's)")
  if isinstance(spec, GPTSpec) and args.ab in BERT_ONLY_AB:
    raise SystemExit(
      f"{args.config}: --ab {args.ab} is the BERT classifier's (the GPT has no [CLS] rows, its c_attn is one product)"
    )
  common.pin_threads(args.threads)
  if args.time_only:
    print(step_time(spec, args.side, args.steps or 12))
    return
  if args.ab == "hugepages":
    text = ab_hugepages(args)
  elif args.ab == "xla_flags":
    text = ab_xla_flags(args)
  elif args.ab:
    text = ab(spec, args.ab, args.steps or 20)
  elif args.side == "torch":
    text = profile_torch(spec, args.steps or 5, args.top)
  else:
    text = profile(spec, args.steps or 5, args.top)
  common.print_and_save(text, args.out)


if __name__ == "__main__":
  run_main(main)
