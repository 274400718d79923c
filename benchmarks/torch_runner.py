"""The PyTorch baseline: transformers' BertForSequenceClassification trained the way its users train it.

    python -m benchmarks.torch_runner --spec spec.json --data data.npz --out result.json

Reads a `RunSpec` and the shared examples/plans (`benchmarks.data`), trains, and writes one JSON result. The
techniques take their usual PyTorch forms: ``DataCollatorWithPadding`` (optionally ``pad_to_multiple_of``),
transformers' `LengthGroupedSampler`, ``torch.autocast`` with ``GradScaler`` for fp16, ``gradient_checkpointing_enable``,
gradient accumulation over micro-batches, ``requires_grad=False`` freezing, fused ``AdamW`` (transformers' default
``adamw_torch_fused``) or bitsandbytes ``AdamW8bit``, and ``torch.compile``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common, data
from benchmarks.configs import MODEL_SHAPES, RunSpec

_AMP = {"float32": None, "bfloat16": "bfloat16", "float16": "float16"}


@dataclasses.dataclass
class Micro:
  """One micro-batch as tensors on the host; moved to the device inside the timed step, as a DataLoader would."""

  input_ids: object
  attention_mask: object
  labels: object

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.input_ids.shape)


def build_model(spec: RunSpec, num_labels: int):
  import torch
  import transformers

  torch.manual_seed(spec.seed)
  if spec.model == "minilm":
    model = transformers.BertForSequenceClassification.from_pretrained(data.minilm_path(), num_labels=num_labels)
  else:
    config = transformers.BertConfig(**MODEL_SHAPES[spec.model], num_labels=num_labels)
    model = transformers.BertForSequenceClassification(config)
  if spec.remat != "none":
    # Non-reentrant is what transformers recommends and what torch.compile can trace.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  if spec.row_sparse == "exact":
    raise ValueError("PyTorch has no row-sparse form of AdamW's update; only row_sparse='lazy' (SparseAdam)")
  if spec.row_sparse == "lazy":
    # Sparse gradients for the word table, trained by SparseAdam (build_optimizer): jfast's lazy mode.
    model.bert.embeddings.word_embeddings.sparse = True
  if spec.freeze_layers >= 0:
    if spec.freeze_layers > len(model.bert.encoder.layer):
      raise ValueError(f"freeze_layers={spec.freeze_layers}, but the model has {len(model.bert.encoder.layer)} layers")
    frozen = [model.bert.embeddings, *model.bert.encoder.layer[: spec.freeze_layers]]
    for module in frozen:
      for p in module.parameters():
        p.requires_grad = False
  return model


def build_optimizer(spec: RunSpec, model, total_steps: int):
  import torch
  import transformers

  # Same split as jfast's optimizer: no weight decay on biases, LayerNorm weights and embeddings.
  decay, no_decay = [], []
  table = model.bert.embeddings.word_embeddings.weight
  lazy = spec.row_sparse == "lazy"
  for name, p in model.named_parameters():
    if p.requires_grad and not (lazy and p is table):
      (no_decay if name.endswith("bias") or "LayerNorm" in name or "embeddings" in name else decay).append(p)
  groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
  kwargs = {"lr": spec.lr, "betas": (0.9, 0.999), "eps": 1e-8}
  if spec.optimizer == "adamw8bit":
    import bitsandbytes as bnb

    opt = bnb.optim.AdamW8bit(groups, **kwargs)
  else:
    opt = torch.optim.AdamW(groups, **kwargs, fused=True)
  if not lazy:
    return opt, transformers.get_linear_schedule_with_warmup(opt, int(0.06 * total_steps), total_steps)
  if spec.dtype == "float16":
    raise ValueError("row_sparse='lazy' runs without a GradScaler here (bf16 or fp32 only)")
  opts = [opt, torch.optim.SparseAdam([table], **kwargs)]
  scheds = [transformers.get_linear_schedule_with_warmup(o, int(0.06 * total_steps), total_steps) for o in opts]
  return _Together(opts), _Together(scheds)


class _Together:
  """Several optimizers (or schedulers) stepped as one: AdamW for the dense parameters, SparseAdam for the table."""

  def __init__(self, parts):
    self.parts = parts

  def step(self):
    for part in self.parts:
      part.step()

  def zero_grad(self, set_to_none: bool = True):
    for part in self.parts:
      part.zero_grad(set_to_none=set_to_none)


def clip_grad_norm(params, max_norm: float) -> None:
  """`torch.nn.utils.clip_grad_norm_`, which fails on sparse gradients ("linalg_vector_norm ... SparseCPU"), extended
  to them: a sparse gradient is coalesced (repeated rows summed) and its values enter the global norm."""
  import torch

  grads = [p.grad for p in params if p.grad is not None]
  if not any(g.is_sparse for g in grads):
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    return
  norms = []
  for p in params:
    if p.grad is not None and p.grad.is_sparse:
      p.grad = p.grad.coalesce()
      norms.append(torch.linalg.vector_norm(p.grad._values()))
    elif p.grad is not None:
      norms.append(torch.linalg.vector_norm(p.grad))
  total = torch.linalg.vector_norm(torch.stack(norms))
  scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # clip_grad_norm_'s own formula
  for p in params:
    if p.grad is not None:
      p.grad.mul_(scale)


def _collator(spec: RunSpec):
  from transformers import AutoTokenizer, DataCollatorWithPadding

  tokenizer = AutoTokenizer.from_pretrained(data.minilm_path())
  return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=spec.pad_to_multiple_of, return_tensors="pt")


def _pad_as_is(rows: list[np.ndarray], labels: np.ndarray, length: int) -> Micro:
  import torch

  ids = np.zeros((len(rows), length), dtype=np.int64)
  for i, r in enumerate(rows):
    ids[i, : len(r)] = r
  ids_t = torch.from_numpy(ids)
  return Micro(ids_t, (ids_t != 0).long(), torch.from_numpy(labels.astype(np.int64)))


def make_steps(spec: RunSpec, train: data.Examples, plan: data.Plan | None) -> tuple[list[list[Micro]], int]:
  """Per optimizer step, its micro-batches (the shared plan's examples, or transformers' own sampler's).

  Returns:
    ``(steps, epoch_steps)``: the steps to run (the whole epoch with ``full``, else ``warmup + steps``) and the
    epoch's length, which sets the learning-rate schedule whether or not the run goes that far.
  """
  import torch

  if spec.sampler == "shared":
    if plan is None:
      raise ValueError(f"no shared batch plan for configuration {spec.config!r}")
    if plan.slots[0].shape[1] != 1:
      raise ValueError("packed rows hold several examples; PyTorch BERT has no packed form")
    batches = [(s[:, 0], n) for s, n in zip(plan.slots, plan.lengths, strict=True)]
  else:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    gen = torch.Generator().manual_seed(spec.seed)
    if spec.sampler == "hf_grouped":
      order = list(LengthGroupedSampler(spec.batch_size, lengths=train.lengths.tolist(), generator=gen))
    else:
      order = torch.randperm(len(train.ids), generator=gen).tolist()
    order = np.asarray(order, dtype=np.int64)
    batches = [(order[i : i + spec.batch_size], 0) for i in range(0, order.size, spec.batch_size)]
  epoch_steps = len(batches)
  batches = batches if spec.full else batches[: spec.warmup + spec.steps]
  collate = _collator(spec) if spec.collate == "longest" or spec.sampler != "shared" else None
  micro_rows = spec.batch_size // spec.accum
  steps = []
  for slots, length in batches:
    micros = []
    for k in range(0, max(len(slots), 1), micro_rows):
      idx = slots[k : k + micro_rows]
      idx = idx[idx >= 0]  # rows that only fill the last batch to its static shape
      if idx.size == 0:
        continue
      rows, labels = [train.ids[i] for i in idx], train.labels[idx]
      if collate is None:
        micros.append(_pad_as_is(rows, labels, length))
      else:
        out = collate([{"input_ids": r.tolist(), "label": int(y)} for r, y in zip(rows, labels, strict=True)])
        micros.append(Micro(out["input_ids"], out["attention_mask"], out["labels"]))
    steps.append(micros)
  return steps, epoch_steps


def make_train_step(forward, opt, sched, scaler, params, device, amp_dtype):
  """One optimizer step over a list of micro-batches: autocast forward, scaled backward, clip, step, schedule.

  Returns ``train_step(micros) -> (loss_sum, correct, examples)``; ``forward`` is the model or its compiled form.
  """
  import torch
  import torch.nn.functional as F

  def train_step(micros: list[Micro]):
    examples = sum(int(m.labels.shape[0]) for m in micros)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    for m in micros:
      ids, mask = m.input_ids.to(device, non_blocking=True), m.attention_mask.to(device, non_blocking=True)
      labels = m.labels.to(device, non_blocking=True)
      with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = forward(input_ids=ids, attention_mask=mask).logits
      # Summed over the micro-batch and divided by the whole step's examples: the mean over the step, as jfast's.
      nll = F.cross_entropy(logits.float(), labels, reduction="sum")
      scaler.scale(nll / examples).backward()
      loss_sum += nll.detach()
      correct += (logits.argmax(-1) == labels).sum()
    scaler.unscale_(opt)
    clip_grad_norm(params, 1.0)
    scaler.step(opt)
    scaler.update()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, correct, examples

  return train_step


def run(spec: RunSpec, train: data.Examples, dev: data.Examples | None, plan, dev_plan) -> dict:
  import torch
  import transformers

  torch.set_num_threads(spec.threads)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  t_setup = time.perf_counter()
  steps, epoch_steps = make_steps(spec, train, plan)
  model = build_model(spec, data.NUM_LABELS[spec.task]).to(device)
  model.train()
  opt, sched = build_optimizer(spec, model, total_steps=epoch_steps)
  params = [p for p in model.parameters() if p.requires_grad]
  amp_dtype = getattr(torch, _AMP[spec.dtype]) if _AMP[spec.dtype] else None
  scaler = torch.amp.GradScaler(device.type, enabled=spec.dtype == "float16")
  forward = torch.compile(model) if spec.compile else model
  setup_s = time.perf_counter() - t_setup
  rss_setup = common.rss_mb()
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()

  train_step = make_train_step(forward, opt, sched, scaler, params, device, amp_dtype)

  dims = model.config
  times, tokens, flops, computed, examples, compiled = [], [], [], [], [], []
  seen, loss_total, correct_total = set(), 0.0, 0.0
  step_cpu, load0 = [], os.getloadavg()[0]
  t_epoch = time.perf_counter()
  for micros in steps:
    seen.update(m.shape for m in micros)
    graphs = _dynamo_graphs()
    t0, c0 = time.perf_counter(), common.cpu_seconds()
    loss_sum, correct, n = train_step(micros)
    if device.type == "cuda":
      torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
    step_cpu.append(common.cpu_seconds() - c0)
    compiled.append(_dynamo_graphs() > graphs)
    loss_total += float(loss_sum)
    correct_total += float(correct)
    lengths = np.concatenate([m.attention_mask.sum(1).numpy() for m in micros]).tolist()
    tokens.append(sum(lengths))
    flops.append(common.train_flops(lengths, **_dims(dims)))
    computed.append(sum(m.input_ids.numel() for m in micros))
    examples.append(n)
  epoch_s = time.perf_counter() - t_epoch
  per_step = {
    "step_times": times,
    "step_tokens": tokens,
    "step_flops": flops,
    "step_cpu_s": step_cpu,
    # Eager PyTorch compiles nothing; under torch.compile a step in which dynamo built a new graph paid for a
    # (re)compilation, which is reported apart and left out of the median, as jfast's compilations are.
    "step_compiled": compiled,
    "step_computed_tokens": computed,
    "step_examples": examples,
  }
  threads = len(os.sched_getaffinity(0))
  summary = common.summarize_steps(per_step, spec.warmup if not spec.full else 0, threads)
  compile_s = sum(max(t - summary["median_step_s"], 0.0) for t, x in zip(times, compiled, strict=True) if x)
  result = {
    "side": "torch",
    "config": spec.config,
    "spec": dataclasses.asdict(spec),
    "framework": f"torch {torch.__version__}, transformers {transformers.__version__}",
    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    "threads": threads,
    "torch_threads": torch.get_num_threads(),
    "attention": getattr(model.config, "_attn_implementation", None),
    "steps": len(times),
    **per_step,
    "loadavg_start": load0,
    "loadavg_end": os.getloadavg()[0],
    "padding_efficiency": sum(tokens) / max(sum(computed), 1),
    "num_shapes": len(seen),
    "compile_s": compile_s,
    "num_compiles": sum(compiled),
    "setup_s": setup_s,
    "train_loss": loss_total / max(sum(examples), 1),
    "train_accuracy": correct_total / max(sum(examples), 1),
    "rss_setup_mb": rss_setup,
    "peak_rss_mb": common.peak_rss_mb(),
    "device_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    **summary,
  }
  if spec.full:
    result["epoch_s"] = epoch_s
    if dev is not None and dev_plan is not None:
      result.update(evaluate(spec, model, dev, dev_plan, device, amp_dtype))
  return result


def _dynamo_graphs() -> int:
  # torch.compile's count of graphs it has compiled; 0 when dynamo never ran (eager).
  from torch._dynamo.utils import counters

  return int(counters["stats"]["unique_graphs"])


def _dims(config) -> dict[str, int]:
  return {
    "hidden": config.hidden_size,
    "layers": config.num_hidden_layers,
    "intermediate": config.intermediate_size,
    "num_labels": config.num_labels,
  }


def evaluate(spec: RunSpec, model, dev: data.Examples, dev_plan: data.Plan, device, amp_dtype) -> dict:
  import torch

  model.eval()
  correct, loss, n = 0, 0.0, 0
  with torch.no_grad():
    for slots, length in zip(dev_plan.slots, dev_plan.lengths, strict=True):
      idx = slots[:, 0][slots[:, 0] >= 0]
      m = _pad_as_is([dev.ids[i] for i in idx], dev.labels[idx], length)
      with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(input_ids=m.input_ids.to(device), attention_mask=m.attention_mask.to(device)).logits.float()
      labels = m.labels.to(device)
      correct += int((logits.argmax(-1) == labels).sum())
      loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
      n += idx.size
  model.train()
  return {"dev_accuracy": correct / max(n, 1), "dev_loss": loss / max(n, 1), "dev_examples": n}


def measure_peak_tflops(n: int = 8192, iters: int = 50) -> float | None:
  """Dense bf16 matmul throughput of the GPU (None without one): a measured ceiling for MFU."""
  import torch

  if not torch.cuda.is_available():
    return None
  a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
  b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
  for _ in range(5):
    a @ b
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(iters):
    a @ b
  torch.cuda.synchronize()
  return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--spec", help="a RunSpec as a JSON file")
  p.add_argument("--data", help="examples and plans written by benchmarks.data.save")
  p.add_argument("--out", required=True, help="where to write the result JSON")
  p.add_argument("--measure-peak", action="store_true", help="only measure the GPU's bf16 matmul TFLOP/s")
  args = p.parse_args(argv)
  if args.measure_peak:
    Path(args.out).write_text(json.dumps({"peak_tflops": measure_peak_tflops()}))
    return
  if not args.spec or not args.data:
    p.error("--spec and --data are required")
  spec = RunSpec.from_json(Path(args.spec).read_text())
  if spec.side != "torch":
    sys.exit(f"spec is for side {spec.side!r}, not torch")
  common.pin_threads(spec.threads)
  train, dev, plans, dev_plan = data.load(Path(args.data))
  result = run(spec, train, dev, plans.get(spec.config), dev_plan)
  Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
  main()
