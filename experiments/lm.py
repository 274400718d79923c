"""A small GPT trained from scratch on tiny-shakespeare, jfast and PyTorch GPT-2 side by side.

    python -m experiments.lm                          # default: 4 layers, d=256, ctx 256, BPE 2048, both sides
    python -m experiments.lm --precision bf16 --remat full --freeze embeddings --sides jfast
    python -m experiments.lm --attention sliding_window --window 64 --positions rotary --sides jfast

The text is split 90/10 by characters (train / held-out, as nanoGPT does), cut into documents at blank lines
(one speech each), tokenized with a byte-level BPE trained on the train split only (saved as ``tokenizer.json``),
and packed into rows of ``--length`` tokens with documents as segments. Both sides start from the same weights
(jfast's init exported to a GPT-2 folder and loaded by ``transformers.GPT2LMHeadModel``), see the same batches in
the same order, and use the same AdamW (same decay groups, warm-up/decay schedule, clipping). They run in one
process, alternating step by step, so load from other processes on a shared machine hits both alike; training time
excludes evaluation, and the first step of each side (jfast: XLA compilation; PyTorch: warm-up) is reported apart.

Every technique is a config word: ``--precision`` (fp32 | bf16 | fp16 | pure-bf16; PyTorch: bf16 autocast),
``--remat`` (a `jfast.nn.remat` policy; PyTorch: non-reentrant gradient checkpointing), ``--micro-batches``,
``--freeze`` (none | embeddings | N bottom blocks + embeddings), ``--optimizer`` (adamw | adamw_8bit; PyTorch:
bitsandbytes AdamW8bit), ``--attention`` / ``--window`` (dense | sliding_window; jfast only), ``--positions``
(learned | rotary; jfast only), ``--packing`` (packed | padded).

Writes ``lm.json``, ``lm.md`` and ``lm.png`` (validation loss against training wall time) under ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jfast.app.config import ConfigError
from jfast.app.entry import run_main
from jfast.app.runs import cpu_description
from jfast.cpu import compiler_options as remat_compiler_options
from jfast.cpu.hugepages import ensure_hugepages, tunables_set
from jfast.data import (
  LMBatch,
  check_vocab,
  encode_documents,
  lm_batches,
  pack_documents,
  pad_documents,
  save_tokenizer,
  split_documents,
  train_bpe,
)
from jfast.data.bpe import END_OF_TEXT
from jfast.models import GPT, GPTConfig, init_gpt, save_hf_gpt2
from jfast.nn import AttentionConfig
from jfast.optim import OptimizerConfig, freeze, freeze_mask, make_optimizer
from jfast.precision import get_policy
from jfast.training import (
  LoopConfig,
  causal_lm_loss,
  create_train_state,
  make_eval_step,
  make_train_step,
  training_loop,
)

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def _rss_kib(field: str) -> int:
  return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _reset_peak_rss() -> int:
  """Resets the process's peak-RSS mark (Linux ``clear_refs`` 5) and returns the current RSS in KiB."""
  try:
    Path("/proc/self/clear_refs").write_text("5")
  except OSError:
    return -1
  return _rss_kib("VmRSS")


def _freeze_patterns(word: str, layers: int, learned_positions: bool = True) -> list[str]:
  if word == "none":
    return []
  tables = ["wte", "wpe"] if learned_positions else ["wte"]  # rotary models have no position table
  if word == "embeddings":
    return tables
  n = int(word)
  if not 0 <= n <= layers:
    raise ConfigError(f"--freeze {n}: the model has {layers} blocks")
  return tables + [f"h_{i}" for i in range(n)]


def load_corpus(path: Path, vocab: int, length: int, packing: str, out: Path):
  """Train/held-out split, BPE trained on the train split, packed (or padded) rows of both.

  ``path`` is a text file, or a folder holding ``input.txt`` (tiny-shakespeare's layout).
  """
  path = Path(path)
  if path.is_dir():
    path = path / "input.txt"
  if not path.is_file():
    raise ConfigError(f"--data: no corpus at {path} (a UTF-8 text file, or a folder with input.txt)")
  text = path.read_text(encoding="utf-8")
  cut = int(0.9 * len(text))
  train_docs, val_docs = split_documents(text[:cut]), split_documents(text[cut:])
  tok = train_bpe(train_docs, vocab_size=vocab)
  save_tokenizer(tok, out)
  bos = tok.token_to_id(END_OF_TEXT)
  rows_fn = pack_documents if packing == "packed" else pad_documents
  train = rows_fn(encode_documents(tok, train_docs, bos_id=bos), length, pad_id=bos, vocab_size=vocab)
  val = pack_documents(encode_documents(tok, val_docs, bos_id=bos), length, pad_id=bos, vocab_size=vocab)
  return tok, train, val


class JaxSide:
  """jfast: one jitted train step (state donated) run by `jfast.training.training_loop`, one jitted eval step.

  ``model_class`` and `frozen` are the model-specific parts (`experiments.llm` puts a Llama here); `build` sets up
  any model, optimizer and freeze mask for the methods below.
  """

  name = "jfast"
  model_class = GPT

  def __init__(self, config: GPTConfig, params, args, total_steps: int):
    policy = get_policy(args.precision)
    self.config = policy.configure(config)
    tx = make_optimizer(self._opt_config(args), total_steps)
    mask = None
    patterns = self.frozen(args, config)
    if patterns:
      mask = freeze_mask(params, patterns)
      tx = freeze(tx, mask)
    self.build(self.model_class(self.config), params, tx, policy, mask, args.micro_batches)

  @staticmethod
  def frozen(args, config: GPTConfig) -> list[str]:
    """Path patterns of the parameters ``--freeze`` keeps fixed."""
    return _freeze_patterns(args.freeze, config.n_layer, config.position_embedding == "learned")

  def build(self, model, params, tx, policy, mask=None, micro_batches: int = 1) -> None:
    """The train state, train step and eval step of ``model`` (any model `causal_lm_loss` takes)."""
    self.model = model
    self.state = create_train_state(model, params, tx, policy=policy)
    loss_fn = causal_lm_loss(model)
    # On the CPU, remat needs an XLA option to take effect in unrolled layers (jfast.cpu.remat).
    options = remat_compiler_options(model.config.remat_policy)
    self.step_fn = make_train_step(
      loss_fn, policy=policy, micro_batches=micro_batches, freeze_mask=mask, compiler_options=options
    )
    self.eval_fn = make_eval_step(loss_fn)
    self.compiled = self.loop = None

  @staticmethod
  def _opt_config(args) -> OptimizerConfig:
    name = "adamw_8bit" if args.optimizer == "adamw_8bit" else "adamw"
    return OptimizerConfig(
      learning_rate=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup, max_grad_norm=1.0, name=name
    )

  @staticmethod
  def inputs(batches: list[LMBatch]) -> list[LMBatch]:
    """The batches as `train_step` and `evaluate` take them (as they are)."""
    return batches

  def compile(self, batch: LMBatch) -> dict:
    t0 = time.perf_counter()
    self.compiled = self.step_fn.lower(self.state, batch).compile()
    seconds = time.perf_counter() - t0
    mem = self.compiled.memory_analysis()
    leaves = jax.tree.leaves(self.state.opt_state)
    return {
      "compile_s": seconds,
      "temp_bytes": int(mem.temp_size_in_bytes),
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "alias_bytes": int(mem.alias_size_in_bytes),
      "param_bytes": int(sum(x.nbytes for x in jax.tree.leaves(self.state.params))),
      "opt_state_bytes": int(sum(x.nbytes for x in leaves if hasattr(x, "nbytes"))),
    }

  def start(self, batches: list[LMBatch]) -> None:
    """The training loop over ``batches``, advanced one step per `train_step`."""
    loop = LoopConfig(log_every=len(batches), quiet=True)
    self.loop = training_loop(self.state, self.compiled, batches, loop=loop)

  def train_step(self, batch: LMBatch) -> float:
    del batch  # the loop holds the batches, in the order the PyTorch side gets them
    out = next(self.loop)
    self.state = out["state"]
    return float(out["metrics"]["loss"])  # waits for the step: the timing is of finished work

  def evaluate(self, batches) -> float:
    loss_sum = targets = 0.0
    for b in batches:
      aux = self.eval_fn(self.state.params, b)
      loss_sum += float(aux["loss_sum"])
      targets += float(aux["examples"])
    return loss_sum / targets


class TorchSide:
  """transformers' GPT2LMHeadModel trained the usual way: sdpa attention, fused AdamW, autocast for bf16.

  `load`, `frozen` and `no_decay` are the model-specific parts (`experiments.llm` loads a LlamaForCausalLM).
  """

  name = "pytorch"

  def __init__(self, folder: Path, args, total_steps: int, threads: int):
    import torch

    torch.set_num_threads(threads)
    self.torch = torch
    self.model = self.load(folder)
    self.model.train()
    if args.remat != "none":
      self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patterns = self.frozen(args)
    for name, p in self.model.named_parameters():
      flax_like = name.removeprefix("transformer.").replace("h.", "h_", 1).split(".")[0]
      if flax_like in patterns:
        p.requires_grad = False
    decay, no_decay = [], []
    for name, p in self.model.named_parameters():
      if p.requires_grad:
        (no_decay if self.no_decay(name) else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": args.lr, "betas": (0.9, 0.999), "eps": 1e-8}
    if args.optimizer == "adamw_8bit":
      import bitsandbytes as bnb

      self.opt = bnb.optim.AdamW8bit(groups, **kwargs)
    else:
      try:
        self.opt = torch.optim.AdamW(groups, fused=True, **kwargs)
      except (RuntimeError, TypeError):
        self.opt = torch.optim.AdamW(groups, foreach=True, **kwargs)
    warmup = int(args.warmup * total_steps)

    def factor(s):  # optax's join of two linear schedules, step for step
      if s < warmup:
        return s / max(warmup, 1)
      return max(0.0, 1.0 - (s - warmup) / max(total_steps - warmup, 1))

    self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
    self.autocast = args.precision in ("bf16", "pure-bf16")
    self.micro = args.micro_batches
    self.params = [p for p in self.model.parameters() if p.requires_grad]

  @staticmethod
  def load(folder: Path):
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="sdpa")

  def frozen(self, args) -> list[str]:
    """jfast's top-level names (``h_3``, ``wte``) of the parameters ``--freeze`` keeps fixed."""
    return _freeze_patterns(args.freeze, self.model.config.n_layer)

  @staticmethod
  def no_decay(name: str) -> bool:
    """jfast's decay mask: no decay on biases, norm scales and embedding tables."""
    return name.endswith("bias") or ".ln_" in name or "wte" in name or "wpe" in name

  def inputs(self, batches: list[LMBatch]) -> list:
    """The batches as `train_step` and `evaluate` take them: torch tensors."""
    return [self.to_torch(b) for b in batches]

  def to_torch(self, b: LMBatch):
    t = self.torch
    labels = np.where(b.example_mask, b.labels, -100)
    return (
      t.from_numpy(b.input_ids.astype(np.int64)),
      t.from_numpy(b.position_ids.astype(np.int64)),
      t.from_numpy(labels.astype(np.int64)),
    )

  def _loss_sum(self, ids, pos, labels):
    t = self.torch
    # No attention_mask and no cache: only then does transformers read the packed documents from the restarting
    # position_ids and build the block-diagonal causal mask jfast builds from segment_ids. With the default
    # use_cache=True it silently attends across documents (tests/test_gpt.py checks both).
    with t.autocast("cpu", dtype=t.bfloat16, enabled=self.autocast):
      logits = self.model(input_ids=ids, position_ids=pos, use_cache=False).logits
    return t.nn.functional.cross_entropy(
      logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )

  def train_step(self, batch) -> float:
    t = self.torch
    labels = batch[2]
    total = max(int((labels != -100).sum()), 1)
    self.opt.zero_grad(set_to_none=True)
    loss = 0.0
    for chunk in zip(*(x.chunk(self.micro) for x in batch), strict=True):
      part = self._loss_sum(*chunk) / total
      part.backward()
      loss += part.item()
    t.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.opt.step()
    self.sched.step()
    return loss

  def evaluate(self, batches) -> float:
    t = self.torch
    self.model.eval()
    loss_sum = targets = 0.0
    with t.no_grad():
      for ids, pos, labels in batches:
        loss_sum += float(self._loss_sum(ids, pos, labels))
        targets += float((labels != -100).sum())
    self.model.train()
    return loss_sum / targets


def time_to(curve: list[dict], target: float) -> dict | None:
  """First evaluation at or below ``target``: its step and cumulative training seconds."""
  for point in curve:
    if point["val_loss"] <= target:
      return point
  return None


def gpt_config(args, tok) -> GPTConfig:
  """The model the command line describes, reading its special token from the trained tokenizer."""
  attention = (
    AttentionConfig() if args.attention == "dense" else AttentionConfig(kind=args.attention, window=args.window)
  )
  config = GPTConfig(
    vocab_size=args.vocab,
    n_positions=args.length,
    n_embd=args.d_model,
    n_layer=args.layers,
    n_head=args.heads,
    resid_pdrop=args.dropout,
    embd_pdrop=args.dropout,
    attn_pdrop=args.dropout,
    bos_token_id=tok.token_to_id(END_OF_TEXT),
    eos_token_id=tok.token_to_id(END_OF_TEXT),
    position_embedding=args.positions,
    attention=attention,
    remat_policy=args.remat,
    # Freezing the bottom N blocks needs each block's own parameters: scanned blocks share one array per parameter.
    scan_layers=args.freeze in ("none", "embeddings"),
  )
  return config


def training_batches(rows: LMBatch, steps: int, batch_size: int, seed: int) -> list[LMBatch]:
  """``steps`` batches of ``batch_size`` rows: whole epochs of the rows, shuffled afresh each epoch."""
  epoch, train = 0, []
  while len(train) < steps:
    train += lm_batches(rows, batch_size, seed=seed, epoch=epoch)
    epoch += 1
  return train[:steps]


def machine() -> dict:
  """Where the run ran: device, CPU and its cores, and the allocator settings of this process."""
  return {
    "device": jax.devices()[0].device_kind,
    "cpu_count": os.cpu_count(),
    "cpu": cpu_description(),
    "hugepages": tunables_set(),
    "retain_freed": tunables_set(retain=True),
  }


def run(args) -> dict:
  out = Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  tok, train_rows, val_rows = load_corpus(Path(args.data), args.vocab, args.length, args.packing, out)
  config = gpt_config(args, tok)
  check_vocab(tok, config.vocab_size)
  _, params = init_gpt(config, jax.random.key(args.seed))
  params = jax.device_get(params)
  train = training_batches(train_rows, args.steps, args.batch_size, args.seed)
  val = lm_batches(val_rows, args.batch_size)[: max(1, args.eval_rows // args.batch_size)]
  sides = {}
  if "jfast" in args.sides:
    sides["jfast"] = JaxSide(config, params, args, args.steps)
  if "pytorch" in args.sides:
    if args.attention != "dense" or args.positions != "learned":
      raise ConfigError("GPT2LMHeadModel has dense attention and learned positions only: pass --sides jfast")
    folder = Path(tempfile.mkdtemp(prefix="lm-init-"))
    save_hf_gpt2(folder, config, params, tokenizer=tok)
    sides["pytorch"] = TorchSide(folder, args, args.steps, args.torch_threads)
  report, summary = race(sides, train, val, args.eval_every)
  if "jfast" in sides and args.export:  # the trained GPT with its tokenizer: transformers' Auto classes load it
    save_hf_gpt2(out / "model", config, sides["jfast"].state.params, tokenizer=tok)
    print(f"exported the jfast model to {out / 'model'}", flush=True)
  setup = {k: v for k, v in vars(args).items()}
  setup.update(
    train_rows=int(train_rows.input_ids.shape[0]),
    train_targets=train_rows.num_targets,
    val_rows_used=len(val) * args.batch_size,
    params=int(sum(np.size(x) for x in jax.tree.leaves(params))),
    **machine(),
  )
  return {"setup": setup, "sides": report, "summary": summary}


def race(sides: dict, train: list[LMBatch], val: list[LMBatch], eval_every: int) -> tuple[dict, dict]:
  """Trains the sides (`JaxSide` / `TorchSide` objects, any number) on ``train`` step by step in turns, evaluating
  on ``val`` after the first step and every ``eval_every`` steps.

  Returns ``(report, summary)``: per side its validation curve, step times, losses, first step (and a jfast side's
  compiled-step memory); with sides ``jfast`` and ``pytorch``, the summary holds the time each took to the worse of
  the two final validation losses.
  """
  inputs = {name: (side.inputs(train), side.inputs(val)) for name, side in sides.items()}
  report = {name: {"curve": [], "step_s": [], "losses": []} for name in sides}
  for name, side in sides.items():
    if isinstance(side, JaxSide):
      report[name]["memory"] = side.compile(train[0])
      side.start(train)
  # First step of each side, apart: it pays compilation (jfast) or allocator/thread warm-up (PyTorch).
  for name, side in sides.items():
    rss0 = _reset_peak_rss()
    t0 = time.perf_counter()
    loss = side.train_step(inputs[name][0][0])
    report[name]["first_step_s"] = time.perf_counter() - t0
    report[name]["first_step_peak_rss_growth_mib"] = (_rss_kib("VmHWM") - rss0) / 1024 if rss0 >= 0 else None
    report[name]["losses"].append(loss)
    report[name]["curve"].append({"step": 1, "train_s": 0.0, "val_loss": side.evaluate(inputs[name][1])})
  real_tokens = [b.num_real_tokens for b in train]
  names = list(sides)
  for start in range(1, len(train), eval_every):
    stop = min(start + eval_every, len(train))
    # Step by step, alternating which side goes first: load from other processes on the shared CPU lands on both.
    for i in range(start, stop):
      for name in names if i % 2 else names[::-1]:
        t0 = time.perf_counter()
        report[name]["losses"].append(sides[name].train_step(inputs[name][0][i]))
        report[name]["step_s"].append(time.perf_counter() - t0)
    for name, side in sides.items():
      val_loss = side.evaluate(inputs[name][1])
      report[name]["curve"].append({"step": stop, "train_s": float(sum(report[name]["step_s"])), "val_loss": val_loss})
      print(
        f"{name:8s} step {stop:5d}  train {report[name]['curve'][-1]['train_s']:7.1f}s  val {val_loss:.4f}", flush=True
      )
  for side in sides.values():
    if isinstance(side, JaxSide):
      side.loop.close()
  for name in sides:
    r = report[name]
    per_step = statistics.median(r["step_s"])
    r["median_step_s"] = per_step
    r["tokens_per_s"] = statistics.median(n / s for n, s in zip(real_tokens[1:], r["step_s"], strict=True))
    r["final_val_loss"] = r["curve"][-1]["val_loss"]
  summary = {"target": None}
  if set(sides) == {"jfast", "pytorch"}:
    target = max(report[n]["final_val_loss"] for n in sides)
    reached = {n: time_to(report[n]["curve"], target) for n in sides}
    summary = {
      "target_val_loss": target,
      **{f"{n}_time_to_target_s": reached[n]["train_s"] for n in sides},
      **{f"{n}_step_at_target": reached[n]["step"] for n in sides},
      "speedup_to_target": reached["pytorch"]["train_s"] / max(reached["jfast"]["train_s"], 1e-9),
      "speedup_median_step": report["pytorch"]["median_step_s"] / report["jfast"]["median_step_s"],
    }
  return report, summary


def markdown(result: dict) -> str:
  s, rep, summ = result["setup"], result["sides"], result["summary"]
  words = (
    f"precision {s['precision']}, remat {s['remat']}, micro-batches {s['micro_batches']}, freeze {s['freeze']}, "
    f"optimizer {s['optimizer']}, attention {s['attention']}, positions {s['positions']}, packing {s['packing']}"
  )
  lines = [
    f"GPT {s['layers']} layers, d={s['d_model']}, {s['heads']} heads, context {s['length']}, BPE vocab {s['vocab']} "
    f"({s['params']:,} parameters), tiny-shakespeare 90/10 split, {s['steps']} steps of {s['batch_size']} x "
    f"{s['length']} tokens, AdamW lr {s['lr']}; {words}. "
    f"Device: {s['device']} ({s.get('cpu', 'CPU not recorded')}, {s['cpu_count']} cores); "
    f"glibc huge pages (both sides, one process): {'on' if s.get('hugepages') else 'off'}"
    f"{', freed memory retained (jfast.cpu.hugepages.RETAIN)' if s.get('retain_freed') else ''}.",
    "",
  ]
  return "\n".join(lines + race_table(rep, summ)) + "\n"


def race_table(rep: dict, summ: dict) -> list[str]:
  """The markdown table of `race`'s report, one row per side, and the time-to-target sentence."""
  lines = [
    "| side | compile s | first step s | median step s | tokens/s | final val loss | time to target s | memory |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, r in rep.items():
    t = summ.get(f"{name}_time_to_target_s")
    if "memory" in r:
      m = r["memory"]
      mem = (
        f"compiled step: temp {m['temp_bytes'] / 2**20:.1f} MiB + state/batch args {m['argument_bytes'] / 2**20:.1f} "
        f"MiB (opt state {m['opt_state_bytes'] / 2**20:.1f} MiB)"
      )
    else:
      mem = "no compiled-step analysis"
    compile_s = f"{r['memory']['compile_s']:.1f}" if "memory" in r else "-"
    growth = r.get("first_step_peak_rss_growth_mib")
    if growth is not None:
      mem += f"; first-step peak RSS growth {growth:.0f} MiB"
    lines.append(
      f"| {name} | {compile_s} | {r['first_step_s']:.1f} | "
      f"{r['median_step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
      f"{r['final_val_loss']:.4f} | {'-' if t is None else f'{t:.1f}'} | {mem} |"
    )
  if summ.get("target_val_loss") is not None:
    lines += [
      "",
      f"Target validation loss (the worse of the two finals, reached by both): {summ['target_val_loss']:.4f}. "
      f"jfast reaches it {summ['speedup_to_target']:.2f}x sooner in training time "
      f"(steps {summ['jfast_step_at_target']} / {summ['pytorch_step_at_target']}); median step time ratio "
      f"{summ['speedup_median_step']:.2f}x.",
    ]
  return lines


def _plot(result: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4))
  plot_curves(ax, result["sides"], result["summary"].get("target_val_loss"))
  ax.set_title("GPT on tiny-shakespeare, same init, data and AdamW")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_curves(ax, sides: dict, target: float | None = None) -> None:
  """Validation loss against training time of each side's ``curve`` on ``ax``, with the target as a line."""
  for name, r in sides.items():
    xs = [p["train_s"] for p in r["curve"]]
    ax.plot(xs, [p["val_loss"] for p in r["curve"]], marker="o", ms=3, label=name)
  if target is not None:
    ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target:.3f}")
  ax.set_xlabel("training wall time, s (compilation and evaluation excluded)")
  ax.set_ylabel("validation loss (nats/token)")
  ax.legend()


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(DATA))
  p.add_argument("--vocab", type=int, default=2048)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--steps", type=int, default=120)
  p.add_argument("--eval-every", type=int, default=15)
  p.add_argument("--eval-rows", type=int, default=16)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--weight-decay", type=float, default=0.1)
  p.add_argument("--warmup", type=float, default=0.05)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "pure-bf16"])
  p.add_argument("--remat", default="none", help="a jfast.nn.remat policy name")
  p.add_argument("--micro-batches", type=int, default=1)
  p.add_argument("--freeze", default="none", help="none | embeddings | N (embeddings + bottom N blocks)")
  p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit"])
  p.add_argument("--attention", default="dense", choices=["dense", "sliding_window"])
  p.add_argument("--window", type=int, default=64)
  p.add_argument("--positions", default="learned", choices=["learned", "rotary"])
  p.add_argument("--packing", default="packed", choices=["packed", "padded"])
  p.add_argument("--sides", nargs="+", default=["jfast", "pytorch"], choices=["jfast", "pytorch"])
  p.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads (one per core by default)")
  p.add_argument("--output", default="results/lm")
  p.add_argument("--export", action="store_true", help="write the trained jfast GPT (and tokenizer) to OUTPUT/model")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  result = run(args)
  out = Path(args.output)
  (out / "lm.json").write_text(json.dumps(result, indent=2))
  (out / "lm.md").write_text(markdown(result))
  _plot(result, out / "lm.png")
  print(markdown(result))
  return result


if __name__ == "__main__":
  # Both sides run in this one process. Huge pages make both step faster, and keeping freed memory in the process
  # spares jfast's step re-faulting its 331 MiB of temporaries (and the slow-step tail that came with it); PyTorch
  # is level with it (jfast.cpu.hugepages; benchmarks.step_profile --config gpt_fp32 --ab hugepages).
  ensure_hugepages(retain=True)
  run_main(main)
