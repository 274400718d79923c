"""A plain training loop over the library's pieces: batching, the jitted step, evaluation and checkpoints.

Experiments call `fit`; research code that wants its own loop uses the same pieces directly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jfast.checkpoint import Checkpointer
from jfast.data.batch import Batch
from jfast.data.batching import BatchingConfig, make_batches
from jfast.data.padding import padding_efficiency
from jfast.distributed import equalize_batches
from jfast.freezing import freeze
from jfast.loss_scale import LossScale
from jfast.precision import Policy, get_policy
from jfast.remat import compiler_options as remat_compiler_options
from jfast.row_sparse import row_sparse_embedding
from jfast.sharding import ShardingRules, shard_batch
from jfast.train import (
  CompiledStep,
  TrainState,
  classification_loss,
  create_train_state,
  make_eval_step,
  make_train_step,
)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long to train and how often to log, evaluate and checkpoint.

  Attributes:
    epochs: passes over the training data.
    max_steps: stop after this many optimizer steps (None: run all epochs); the schedule still spans the epochs.
    seed: seeds data order and dropout.
    log_every: steps between fetching metrics from the device (each fetch waits for the device).
    eval_every: steps between dev evaluations (None: only at the end).
    checkpoint_dir: where to checkpoint (None: no checkpoints).
    checkpoint_every: steps between checkpoints.
    keep_checkpoints: how many recent checkpoints to keep.
    progress: show a tqdm progress bar.
    time_steps: wait for every step and record its wall time and shape in ``stats["step_times"]``, so compile time
      (the first step of each shape) can be told apart from steady-state time; costs the host/device overlap.
  """

  epochs: int = 1
  max_steps: int | None = None
  seed: int = 0
  log_every: int = 50
  eval_every: int | None = None
  checkpoint_dir: str | None = None
  checkpoint_every: int = 200
  keep_checkpoints: int = 2
  progress: bool = True
  time_steps: bool = False

  def __post_init__(self):
    if self.epochs < 1:
      raise ValueError(f"epochs must be at least 1, got {self.epochs}")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclasses.dataclass
class FitResult:
  """What `fit` returns: the final state, per-log-step history, eval results and run statistics."""

  state: TrainState
  history: list[dict[str, float]]
  evals: list[dict[str, float]]
  stats: dict[str, Any]


def evaluate(eval_step: CompiledStep, params, batches: Sequence[Batch]) -> dict[str, float]:
  """Runs ``eval_step`` over ``batches`` and returns accuracy and mean loss over real examples."""
  totals = None
  for batch in batches:
    sums = eval_step(params, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  examples = max(float(totals["examples"]), 1.0)
  return {
    "accuracy": float(totals["correct"]) / examples,
    "loss": float(totals["loss_sum"]) / examples,
    "examples": int(totals["examples"]),
  }


def fit(
  model: nn.Module,
  params,
  tx_factory,
  train: tuple[Sequence[np.ndarray], np.ndarray],
  dev: tuple[Sequence[np.ndarray], np.ndarray] | None,
  *,
  batching: BatchingConfig,
  eval_batching: BatchingConfig,
  loop: LoopConfig,
  pad_id: int,
  policy: str | Policy | None = None,
  loss_scale: str | LossScale | None = None,
  on_log=None,
  micro_batches: int = 1,
  freeze_mask=None,
  mesh: Mesh | None = None,
  rules: ShardingRules | None = None,
  row_sparse: bool = False,
) -> FitResult:
  """Fine-tunes a classifier and evaluates it; resumes from ``loop.checkpoint_dir`` when it holds a checkpoint.

  Args:
    model: e.g. `BertForSequenceClassification`.
    params: its initial parameters.
    tx_factory: ``total_steps -> optax.GradientTransformation`` (the schedule needs the run length).
    train: ``(token id arrays, labels)``.
    dev: the same for evaluation, or None.
    batching: how training batches are cut (strategy by name).
    eval_batching: how dev batches are cut (use ``shuffle=False``).
    loop: length, logging, evaluation and checkpoint cadence.
    pad_id: the tokenizer's padding id.
    policy: a precision policy (`jfast.get_policy` spec: ``fp32``, ``bf16``, ``fp16``, ``pure-bf16`` or a
      ``params=..,compute=..,output=..`` string). It sets the model config's compute dtype, the parameters' dtype and
      the default loss scaling. None leaves the model and parameters as given.
    loss_scale: loss scaling (``none``, ``dynamic``, ``static:<scale>`` or an object); None: the policy's default.
    micro_batches: in-step gradient accumulation over this many row blocks of each batch (`make_train_step`).
    freeze_mask: from `jfast.freezing.freeze_mask` (True = frozen): those parameters get no gradient, no optimizer
      state and no update (the optimizer is wrapped with `jfast.freezing.freeze`).
    on_log: called with each history row (loss, accuracy, real tokens/s, compiles, ...) as it is logged, e.g.
      `jfast.runs.RunDir.log`-backed; evaluation rows are passed with an ``eval_`` prefix.
    mesh: a `jfast.sharding.make_mesh` mesh: state created sharded, steps compiled with the rules' shardings,
      batches placed with `jfast.sharding.shard_batch`. Across hosts (`jfast.distributed.initialize`), ``train`` and
      ``dev`` are this host's shard, ``batching.batch_size`` its rows of each global batch, and every host runs
      the same number of steps (`jfast.distributed.equalize_batches`). None: one device.
    rules: `jfast.sharding.ShardingRules` (default: the library's table).
    row_sparse: train the word table from the batch's rows (`jfast.row_sparse`); ``tx_factory`` must build its
      optimizer with ``OptimizerConfig(row_sparse_embeddings="exact")`` (or ``"lazy"``).

  Returns:
    A `FitResult`.
  """
  train_seqs, train_labels = train
  first_epoch = make_batches(train_seqs, train_labels, batching, pad_id=pad_id, seed=loop.seed, epoch=0)
  first_batches = equalize_batches(first_epoch.batches)
  steps_per_epoch = len(first_batches)
  schedule_steps = steps_per_epoch * loop.epochs
  # max_steps stops the run early but leaves the schedule alone, so a stopped run and a full one agree step by step.
  total_steps = schedule_steps if loop.max_steps is None else min(schedule_steps, loop.max_steps)
  tx: optax.GradientTransformation = tx_factory(schedule_steps)
  if freeze_mask is not None:
    tx = freeze(tx, freeze_mask)
  if policy is not None:
    policy = get_policy(policy)
    model = model.clone(config=policy.configure(model.config))
  state = create_train_state(
    model, params, tx, seed=loop.seed, policy=policy, loss_scale=loss_scale, mesh=mesh, rules=rules
  )
  loss_fn = classification_loss(model)
  options = remat_compiler_options(getattr(model.config, "remat_policy", "none"))
  train_step = make_train_step(
    loss_fn,
    policy=policy,
    compiler_options=options,
    mesh=mesh,
    rules=rules,
    micro_batches=micro_batches,
    freeze_mask=freeze_mask,
    row_sparse=row_sparse_embedding(model) if row_sparse else None,
  )
  eval_step = make_eval_step(loss_fn, mesh=mesh, rules=rules)
  place = (lambda b: b) if mesh is None else (lambda b: shard_batch(b, mesh))
  dev_batches = []
  if dev is not None:
    dev_batches = equalize_batches(make_batches(dev[0], dev[1], eval_batching, pad_id=pad_id, seed=0, epoch=0).batches)

  ckpt = Checkpointer(loop.checkpoint_dir, keep=loop.keep_checkpoints) if loop.checkpoint_dir else None
  start_epoch, start_batch = 0, 0
  if ckpt is not None:
    restored = ckpt.restore_latest(state)
    if restored is not None:
      state, position = restored
      start_epoch, start_batch = position["epoch"], position["batch"]

  history, evals = [], []
  step = int(state.step)
  stats = {
    "steps_per_epoch": steps_per_epoch,
    "total_steps": total_steps,
    "resumed_from_step": step,
    "num_truncated": first_epoch.num_truncated,
    "epoch_seconds": [],
    "train_tokens": 0,
    "computed_tokens": 0,
    "step_times": [],
  }
  quiet = not loop.progress or jax.process_index() != 0  # one progress bar for a multi-host run, process 0's
  bar = tqdm(total=total_steps, initial=step, disable=quiet, desc="train", unit="step")
  pending: list[dict] = []
  done = step >= total_steps
  for epoch in range(start_epoch, loop.epochs):
    if done:
      break
    batches = (
      first_batches
      if epoch == 0
      else equalize_batches(
        make_batches(train_seqs, train_labels, batching, pad_id=pad_id, seed=loop.seed, epoch=epoch).batches
      )
    )
    skip = start_batch if epoch == start_epoch else 0
    stats["padding_efficiency"] = padding_efficiency(batches)
    t0 = time.perf_counter()
    window_tokens, window_start = 0, t0
    for i in range(skip, len(batches)):
      batch = batches[i]
      t_step = time.perf_counter()
      state, metrics = train_step(state, place(batch))
      if loop.time_steps:
        jax.block_until_ready(metrics)
        stats["step_times"].append((batch.shape, time.perf_counter() - t_step))
      pending.append(metrics)
      step += 1
      stats["train_tokens"] += batch.num_real_tokens
      stats["computed_tokens"] += batch.input_ids.size
      bar.update(1)
      window_tokens += batch.num_real_tokens
      if step % loop.log_every == 0 or step == total_steps:
        row = _summarise(pending, step, epoch)
        now = time.perf_counter()
        row.update(tokens_per_second=window_tokens / max(now - window_start, 1e-9), compiles=train_step.num_compiles)
        window_tokens, window_start = 0, now
        history.append(row)
        bar.set_postfix(
          loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}", compiles=row["compiles"], refresh=False
        )
        if on_log is not None:
          on_log(row)
        pending = []
      if dev_batches and loop.eval_every and step % loop.eval_every == 0 and step != total_steps:
        evals.append({"step": step, **evaluate(eval_step, state.params, map(place, dev_batches))})
        if on_log is not None:
          on_log({"step": step, **{f"eval_{k}": v for k, v in evals[-1].items() if k != "step"}})
      if ckpt is not None and (step % loop.checkpoint_every == 0 or step == total_steps):
        ckpt.save(
          step, state, {"epoch": epoch, "batch": i + 1} if i + 1 < len(batches) else {"epoch": epoch + 1, "batch": 0}
        )
      if step >= total_steps:
        done = True
        break
    jax.block_until_ready(state)
    stats["epoch_seconds"].append(time.perf_counter() - t0)
  bar.close()
  if ckpt is not None:
    ckpt.close()
  if dev_batches:
    evals.append({"step": step, **evaluate(eval_step, state.params, map(place, dev_batches))})
    if on_log is not None:
      on_log({"step": step, **{f"eval_{k}": v for k, v in evals[-1].items() if k != "step"}})
  stats.update(train_compiles=train_step.num_compiles, eval_compiles=eval_step.num_compiles, final_step=step)
  stats.update(skipped_steps=sum(h["skipped"] for h in history), final_loss_scale=float(state.loss_scale.loss_scale))
  return FitResult(state=state, history=history, evals=evals, stats=stats)


def _summarise(pending: list[dict], step: int, epoch: int) -> dict[str, float]:
  fetched = jax.device_get(pending)
  examples = max(sum(float(m["examples"]) for m in fetched), 1.0)
  return {
    "step": step,
    "epoch": epoch,
    "loss": sum(float(m["loss_sum"]) for m in fetched) / examples,
    "accuracy": sum(float(m["correct"]) for m in fetched) / examples,
    "grad_norm": float(np.mean([float(m["grad_norm"]) for m in fetched])),
    "skipped": int(sum(float(m["skipped"]) for m in fetched)),
    "loss_scale": float(fetched[-1]["loss_scale"]),
  }
