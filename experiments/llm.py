"""A Llama-shaped decoder: pretrained on tiny-shakespeare by jfast and by PyTorch, then fine-tuned three ways.

    python -m experiments.llm                        # both parts at the defaults below (sized for ~20 min on 2 cores)
    python -m experiments.llm --skip-finetune        # part A only (~12 min)
    python -m experiments.llm --skip-pretrain        # part B only, from a fresh init (~8 min)
    python -m experiments.llm --layers 2 --d-model 128 --intermediate 344 --steps 20 --ft-steps 10   # quick look

Part A, the pretraining race: a Llama (8 layers, hidden 512, 8 query heads sharing 4 key/value heads, SwiGLU
1376, RoPE, RMSNorm, untied embeddings, byte-level BPE of 8,192 trained on the train split: 31.6M parameters)
trained on tiny-shakespeare by jfast and by ``transformers.LlamaForCausalLM`` (sdpa attention, fused AdamW), both
from the same weights (jfast's init written by `jfast.models.save_hf_llama`), on the same packed batches in the same
order, with the same AdamW (decay groups, warm-up/decay schedule, clipping), alternating step by step in one process
as `experiments.lm` runs its GPT (its sides, race, table and plot are reused here). Reported: the training time
each side takes to the worse of the two final validation losses, median step times, and compilation (jfast) and
the first step (PyTorch) apart. ``--precision`` sets both sides (PyTorch: bf16 autocast for bf16); its default is
fp32 because that is PyTorch's faster setting on a CPU without bf16 instructions: on the 2-core AVX2-only EPYC, a
4 x 256-token step of this model took about 46 s under bf16 autocast against about 1.5 s in fp32.

Part B, adapters: part A's jfast-trained model (with ``--sides pytorch``, PyTorch's, read back with
`jfast.models.load_hf_llama`; with ``--skip-pretrain``, the fresh init) is fine-tuned on a second text, SST-2's
sentences as plain text (train split for training, the whole dev split for validation loss), three ways, all with
jfast, on the same batches, alternated step by step:

- ``full``: every parameter trains (scanned layers);
- ``freeze``: the token table and the bottom half of the layers frozen (`jfast.optim.freeze_mask` / `freeze`),
  layers unrolled (``scan_layers=False``: a scan shares one array per parameter across its layers, so part of it
  cannot be frozen);
- ``lora``: rank-8 adapters (alpha 16) on all seven projections, everything else frozen (`jfast.nn.add_lora`,
  `with_lora`, `lora_mask`, `jfast.optim.lora_optimizer`; scanned layers);
- ``qlora``: the same adapters on an int8 base (`jfast.compress.quantize` of the seven projections,
  ``quantization="int8"``; quantized layers run unrolled), the frozen kernels dequantized inside each product.

Every mode trains with ``--ft-remat`` (default ``full``: gradient checkpointing, the usual recipe for adapters,
since with frozen weights the activations are most of what a step holds). The compiled memory of every mode is also
measured without remat (compilation only, no training), so the table shows both.

Each mode reports its trainable parameters, optimizer-state bytes, the compiled train step's memory
(`memory_analysis()`: arguments + outputs + temporaries - aliased, i.e. state, batch and the step's temporaries),
the validation loss after ``--ft-steps`` steps and the step time, and the table checks the issue's targets: LoRA's
optimizer state at most 3% of full fine-tuning's, its compiled step memory at most half of it.

Writes ``llm.json``, ``llm.md`` and ``llm.png`` (validation loss against training time, one panel per part) under
``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from experiments import lm
from jfast.app.config import ConfigError
from jfast.app.entry import run_main
from jfast.compress import quantize
from jfast.cpu.hugepages import ensure_hugepages
from jfast.data import LMBatch, check_vocab, encode_documents, lm_batches, pack_documents
from jfast.data.bpe import END_OF_TEXT
from jfast.data.datasets import load_classification_splits
from jfast.models import PROJECTIONS, Llama, LlamaConfig, init_llama, load_hf_llama, save_hf_llama
from jfast.nn import LoRAConfig, add_lora, lora_mask, trainable_count, with_lora
from jfast.nn.scan import match_layout
from jfast.optim import OptimizerConfig, freeze, freeze_mask, lora_optimizer, make_optimizer
from jfast.precision import get_policy

SST2 = lm.DATA.parent.parent / "sst2"
MODES = ("full", "freeze", "lora", "qlora")
# The issue's targets for LoRA against full fine-tuning.
LORA_OPT_STATE_MAX = 0.03
LORA_STEP_MEMORY_MAX = 0.5


class LlamaJaxSide(lm.JaxSide):
  """`experiments.lm`'s jfast side with a `Llama`; pretraining trains every parameter."""

  model_class = Llama

  @staticmethod
  def frozen(args, config) -> list[str]:
    return []


class LlamaTorchSide(lm.TorchSide):
  """`experiments.lm`'s PyTorch side with ``transformers.LlamaForCausalLM``; every parameter trains."""

  @staticmethod
  def load(folder: Path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa")

  def frozen(self, args) -> list[str]:
    return []

  @staticmethod
  def no_decay(name: str) -> bool:
    """jfast's decay mask: no decay on biases, RMSNorm scales and the token table (``lm_head`` decays)."""
    return name.endswith("bias") or "norm" in name or "embed_tokens" in name


class FineTune(lm.JaxSide):
  """One fine-tuning mode of part B (`MODES`) as a jfast side of `experiments.lm.race`: the model, optimizer and
  freeze mask the mode asks for, with that side's compiled-step memory, training loop and evaluation."""

  def __init__(self, mode: str, config: LlamaConfig, params, args, remat: str | None = None):
    self.name = mode
    policy = get_policy(args.precision)
    config = policy.configure(config).replace(remat_policy=remat or args.ft_remat)
    lr = args.lora_lr if mode in ("lora", "qlora") else args.ft_lr
    opt = OptimizerConfig(
      learning_rate=lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup, max_grad_norm=1.0
    )
    tx = make_optimizer(opt, args.ft_steps)
    mask = None
    if mode == "freeze":
      config = config.replace(scan_layers=False)
      params = match_layout(config, params)
      mask = freeze_mask(params, bottom_layers=config.num_hidden_layers // 2)  # token table + bottom half
      tx = freeze(tx, mask)
    if mode == "qlora":
      params, config = quantize(params, layers=PROJECTIONS), config.replace(quantization="int8")
    model = Llama(config)
    if mode in ("lora", "qlora"):
      lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=PROJECTIONS)
      params = add_lora(params, lora, jax.random.key(args.seed + 1))
      mask = lora_mask(params)
      tx, model = lora_optimizer(tx), with_lora(model, lora)
    self.config, self.lr = config, lr
    self.trainable = trainable_count(params, mask)
    self.total = trainable_count(params)
    self.build(model, params, tx, policy, mask)


def llama_config(args, tok) -> LlamaConfig:
  """The model the command line describes, reading its special token from the trained tokenizer."""
  eot = tok.token_to_id(END_OF_TEXT)
  try:
    return LlamaConfig(
      vocab_size=args.vocab,
      hidden_size=args.d_model,
      intermediate_size=args.intermediate,
      num_hidden_layers=args.layers,
      num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads,
      max_position_embeddings=max(args.length, args.ft_length),
      rope_theta=args.rope_theta,
      tie_word_embeddings=False,
      bos_token_id=eot,
      eos_token_id=eot,
      remat_policy=args.remat,
    )
  except ValueError as e:
    raise ConfigError(f"model flags (--d-model, --heads, --kv-heads, --remat ...): {e}") from None


def sst2_rows(path: str, tok, length: int, vocab: int) -> tuple[LMBatch, LMBatch]:
  """SST-2's train and dev sentences as documents (``<|endoftext|>`` first), packed into rows of ``length``.

  ``path`` is a folder with ``train.tsv`` and ``dev.tsv``, or the hub name ``sst2``.
  """
  train, dev = load_classification_splits([(path, "train"), (path, "dev")])
  bos = tok.token_to_id(END_OF_TEXT)

  def rows(texts):
    docs = encode_documents(tok, [t.strip() for t in texts], bos_id=bos)
    return pack_documents(docs, length, pad_id=bos, vocab_size=vocab)

  return rows(train.texts), rows(dev.texts)


def pretrain(args, config: LlamaConfig, params, tok, train_rows: LMBatch, val_rows: LMBatch) -> tuple[dict, dict]:
  """Part A: the race. Returns its report and the trained parameters part B starts from."""
  train = lm.training_batches(train_rows, args.steps, args.batch_size, args.seed)
  val = lm_batches(val_rows, args.batch_size)[: max(1, args.eval_rows // args.batch_size)]
  sides = {}
  if "jfast" in args.sides:
    sides["jfast"] = LlamaJaxSide(config, params, args, args.steps)
  if "pytorch" in args.sides:
    with tempfile.TemporaryDirectory(prefix="llm-init-") as folder:
      save_hf_llama(folder, config, params, tokenizer=tok)
      sides["pytorch"] = LlamaTorchSide(Path(folder), args, args.steps, args.torch_threads)
  report, summary = lm.race(sides, train, val, args.eval_every)
  if "jfast" in sides:
    trained, source = jax.device_get(sides["jfast"].state.params), "part A's jfast-trained model"
  else:  # PyTorch's trained weights, read back the way a user loads a Hugging Face folder
    with tempfile.TemporaryDirectory(prefix="llm-trained-") as folder:
      sides["pytorch"].model.save_pretrained(folder)
      _, trained = load_hf_llama(folder, config=config)
    source = "part A's PyTorch-trained model (load_hf_llama)"
  part = {
    "sides": report,
    "summary": summary,
    "train_rows": int(train_rows.input_ids.shape[0]),
    "train_targets": train_rows.num_targets,
    "val_rows_used": len(val) * args.batch_size,
    "torch_precision": "bf16 autocast" if args.precision in ("bf16", "pure-bf16") else "fp32",
    "torch_optimizer": "bitsandbytes AdamW8bit" if args.optimizer == "adamw_8bit" else "fused AdamW",
  }
  return part, {"params": trained, "source": source}


def finetune(args, config: LlamaConfig, start: dict, tok) -> dict:
  """Part B: the fine-tuning modes of ``args.modes`` raced on the same SST-2 batches."""
  train_rows, dev_rows = sst2_rows(args.sst2, tok, args.ft_length, config.vocab_size)
  train = lm.training_batches(train_rows, args.ft_steps, args.ft_batch_size, args.seed)
  dev = lm_batches(dev_rows, args.ft_batch_size)
  if args.ft_eval_rows:
    dev = dev[: max(1, args.ft_eval_rows // args.ft_batch_size)]
  modes = {mode: FineTune(mode, config, start["params"], args) for mode in args.modes}
  before = next(iter(modes.values())).evaluate(dev)  # every mode starts as the same function of its input
  report, _ = lm.race(modes, train, dev, args.ft_eval_every)
  for mode, side in modes.items():
    r, m = report[mode], report[mode]["memory"]
    r.update(
      layout="unrolled" if mode in ("freeze", "qlora") else "scanned",
      lr=side.lr,
      trainable_params=side.trainable,
      total_params=side.total,
      step_memory_bytes=m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] - m["alias_bytes"],
    )
  by_remat = {}
  for remat in dict.fromkeys(("none", args.ft_remat)):
    for mode in args.modes:
      m = FineTune(mode, config, start["params"], args, remat=remat).compile(train[0])
      by_remat[f"{mode}/{remat}"] = m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] - m["alias_bytes"]
  targets = []
  if "full" in report and "lora" in report:
    full, lora = report["full"], report["lora"]
    state = lora["memory"]["opt_state_bytes"] / full["memory"]["opt_state_bytes"]
    memory = lora["step_memory_bytes"] / full["step_memory_bytes"]
    targets = [
      {
        "target": f"LoRA optimizer state <= {LORA_OPT_STATE_MAX:.0%} of full fine-tuning's",
        "ratio": state,
        "measured": f"{state:.2%}",
      },
      {
        "target": f"LoRA compiled step memory <= {LORA_STEP_MEMORY_MAX}x full fine-tuning's",
        "ratio": memory,
        "measured": f"{memory:.2f}x",
      },
    ]
    for t, most in zip(targets, (LORA_OPT_STATE_MAX, LORA_STEP_MEMORY_MAX), strict=True):
      t["met"] = t["ratio"] <= most
  return {
    "start": start["source"],
    "modes": report,
    "targets": targets,
    "val_loss_before": before,
    "memory_by_remat": by_remat,
    "train_rows": int(train_rows.input_ids.shape[0]),
    "dev_rows_used": int(sum(np.any(b.segment_ids > 0, axis=1).sum() for b in dev)),
    "dev_targets": int(sum(b.num_targets for b in dev)),
  }


def run(args) -> dict:
  out = Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  if args.skip_pretrain and args.skip_finetune:
    raise ConfigError("--skip-pretrain and --skip-finetune together leave nothing to run")
  tok, train_rows, val_rows = lm.load_corpus(Path(args.data), args.vocab, args.length, "packed", out)
  config = llama_config(args, tok)
  check_vocab(tok, config.vocab_size)
  _, params = init_llama(config, jax.random.key(args.seed))
  params = jax.device_get(params)
  part_a, start = None, {"params": params, "source": "a fresh init (--skip-pretrain)"}
  if not args.skip_pretrain:
    part_a, start = pretrain(args, config, params, tok, train_rows, val_rows)
    if args.export and "jfast" in args.sides:  # the trained model with its tokenizer, for transformers' Auto classes
      save_hf_llama(out / "model", config, start["params"], tokenizer=tok)
      print(f"exported the jfast model to {out / 'model'}", flush=True)
  part_b = None if args.skip_finetune else finetune(args, config, start, tok)
  setup = {k: v for k, v in vars(args).items()}
  setup.update(params=int(sum(np.size(x) for x in jax.tree.leaves(params))), **lm.machine())
  return {"setup": setup, "pretrain": part_a, "finetune": part_b}


def _mib(n: float) -> str:
  return f"{n / 2**20:,.1f} MiB"


def curve_table(sides: dict) -> list[str]:
  """Each side's validation loss at each evaluation (step, cumulative training seconds, loss)."""
  names = list(sides)
  lines = ["| step | " + " | ".join(f"{n} train s | {n} val loss" for n in names) + " |"]
  lines.append("|---|" + "---|---|" * len(names))
  for i, point in enumerate(sides[names[0]]["curve"]):
    cells = [f"{sides[n]['curve'][i]['train_s']:.1f} | {sides[n]['curve'][i]['val_loss']:.4f}" for n in names]
    lines.append(f"| {point['step']} | " + " | ".join(cells) + " |")
  return lines


def markdown(result: dict) -> str:
  s, a, b = result["setup"], result["pretrain"], result["finetune"]
  lines = [
    "# Llama-family decoder: pretraining race and adapters",
    "",
    f"`{s.get('command', 'python -m experiments.llm')}`",
    "",
    f"Device: {s['device']} ({s['cpu']}, {s['cpu_count']} cores); glibc huge pages (one process): "
    f"{'on' if s['hugepages'] else 'off'}{', freed memory retained' if s['retain_freed'] else ''}. Model: Llama "
    f"{s['layers']} layers, hidden {s['d_model']}, {s['heads']} heads sharing {s['kv_heads']} key/value heads, "
    f"SwiGLU {s['intermediate']}, untied embeddings, BPE vocab {s['vocab']} trained on the train split "
    f"({s['params']:,} parameters); precision {s['precision']}.",
    "",
  ]
  if a is not None:
    lines += [
      "## Part A: pretraining on tiny-shakespeare, jfast vs PyTorch",
      "",
      f"90/10 split, {s['steps']} steps of {s['batch_size']} packed rows x {s['length']} tokens, the same batches "
      f"in the same order and the same init on both sides, alternating step by step; {s['optimizer']} lr {s['lr']}, "
      f"warm-up {s['warmup']:.0%} then linear decay, weight decay {s['weight_decay']}, clipping 1.0. PyTorch: "
      f"`LlamaForCausalLM`, sdpa attention, {a['torch_optimizer']}, {a['torch_precision']}. Training time excludes "
      "evaluation; jfast's compilation and each side's first step are apart.",
      "",
      *lm.race_table(a["sides"], a["summary"]),
      "",
      *curve_table(a["sides"]),
      "",
    ]
  if b is not None:
    lines += [
      "## Part B: fine-tuning on SST-2 sentences (jfast)",
      "",
      f"Start: {b['start']}. SST-2 train sentences as text, packed into rows of {s['ft_length']} tokens, "
      f"{s['ft_steps']} steps of {s['ft_batch_size']} rows, the same batches for every mode, alternated step by "
      f"step; validation loss on {b['dev_targets']:,} dev targets ({b['dev_rows_used']} rows), "
      f"{b['val_loss_before']:.4f} before fine-tuning. Compiled step memory: arguments + outputs + temporaries - "
      "aliased (donated state) of the compiled train step.",
      "",
      "| mode | layers | lr | trainable params | optimizer state | compiled step memory | vs full | compile s | "
      f"val loss after {s['ft_steps']} steps | median step s | tokens/s |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    full = b["modes"].get("full")
    for mode, r in b["modes"].items():
      m = r["memory"]
      vs = f"{r['step_memory_bytes'] / full['step_memory_bytes']:.2f}x" if full else "-"
      lines.append(
        f"| {mode} | {r['layout']} | {r['lr']:g} | {r['trainable_params']:,} "
        f"({r['trainable_params'] / r['total_params']:.1%}) | {_mib(m['opt_state_bytes'])} | "
        f"{_mib(r['step_memory_bytes'])} (temp {_mib(m['temp_bytes'])}) | {vs} | {m['compile_s']:.1f} | "
        f"{r['final_val_loss']:.4f} | {r['median_step_s']:.3f} | {r['tokens_per_s']:,.0f} |"
      )
    remats = list(dict.fromkeys(k.split("/")[1] for k in b["memory_by_remat"]))
    lines += [
      "",
      "Compiled step memory by remat policy (compilation only), and against full fine-tuning under the same policy:",
      "",
      "| mode | " + " | ".join(f"remat {r}" for r in remats) + " |",
      "|---|" + "---|" * len(remats),
    ]
    mem = b["memory_by_remat"]
    for mode in b["modes"]:
      cells = []
      for r in remats:
        ref = mem.get(f"full/{r}")
        ratio = f" ({mem[f'{mode}/{r}'] / ref:.2f}x)" if ref else ""
        cells.append(f"{_mib(mem[f'{mode}/{r}'])}{ratio}")
      lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if b["targets"]:
      lines += ["", "| target | measured | verdict |", "|---|---|---|"]
      for t in b["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'met' if t['met'] else 'missed'} |")
    lines += ["", *curve_table(b["modes"]), ""]
  return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  parts = [
    (result["pretrain"], "sides", "A: pretraining on tiny-shakespeare"),
    (result["finetune"], "modes", "B: fine-tuning on SST-2 sentences (jfast)"),
  ]
  parts = [p for p in parts if p[0] is not None]
  fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4), squeeze=False)
  for ax, (part, key, title) in zip(axes[0], parts, strict=True):
    lm.plot_curves(ax, part[key], part.get("summary", {}).get("target_val_loss"))
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(lm.DATA), help="tiny-shakespeare: input.txt or its folder")
  p.add_argument("--sst2", default=str(SST2), help="folder with SST-2's train.tsv and dev.tsv, or the hub name sst2")
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (grouped-query attention)")
  p.add_argument("--intermediate", type=int, default=1376, help="SwiGLU width")
  p.add_argument("--rope-theta", type=float, default=10000.0)
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--eval-every", type=int, default=15)
  p.add_argument("--eval-rows", type=int, default=16)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--weight-decay", type=float, default=0.1)
  p.add_argument("--warmup", type=float, default=0.1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "pure-bf16"])
  p.add_argument("--remat", default="none", help="a jfast.nn.remat policy name (PyTorch: gradient checkpointing)")
  p.add_argument("--micro-batches", type=int, default=1)
  p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit"], help="part A's optimizer")
  p.add_argument("--sides", nargs="+", default=["jfast", "pytorch"], choices=["jfast", "pytorch"])
  p.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads (one per core by default)")
  p.add_argument("--skip-pretrain", action="store_true", help="no part A: part B starts from a fresh init")
  p.add_argument("--skip-finetune", action="store_true", help="no part B")
  p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="part B's fine-tuning modes")
  p.add_argument("--ft-length", type=int, default=128, help="part B's packed row length")
  p.add_argument("--ft-batch-size", type=int, default=8)
  p.add_argument("--ft-steps", type=int, default=60)
  p.add_argument("--ft-eval-every", type=int, default=30)
  p.add_argument("--ft-eval-rows", type=int, default=0, help="dev rows evaluated (0: the whole dev split)")
  p.add_argument("--ft-lr", type=float, default=5e-4, help="full and freeze modes")
  p.add_argument("--ft-remat", default="full", help="part B's remat policy (its memory is also measured without)")
  p.add_argument("--lora-lr", type=float, default=2e-3)
  p.add_argument("--lora-rank", type=int, default=8)
  p.add_argument("--lora-alpha", type=float, default=16.0)
  p.add_argument("--output", default="results/llm")
  p.add_argument("--export", action="store_true", help="write part A's trained jfast model to OUTPUT/model")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  args.command = "python -m experiments.llm " + " ".join(sys.argv[1:] if argv is None else argv)
  result = run(args)
  out = Path(args.output)
  (out / "llm.json").write_text(json.dumps(result, indent=2))
  (out / "llm.md").write_text(markdown(result))
  _plot(result, out / "llm.png")
  print(markdown(result))
  return result


if __name__ == "__main__":
  # Both sides of part A run in this one process, as in experiments.lm: huge pages and retained freed memory for both.
  ensure_hugepages(retain=True)
  run_main(main)
