"""The training loop: epochs of batches through a step, with a progress bar, logging, evaluation, checkpoints and
exact resume. Every jfast entry point and experiment trains through it.

Two layers:

- `training_loop(state, train_step, batches, ...)` runs any step over any batches: a jfast step from
  `make_train_step` (classification, causal LM, distillation with its teacher as a step input) or a user's. It is a
  generator that yields after every step and returns a `FitResult`, so several runs can take turns step by step
  (`run_together`, for side-by-side timing on one machine) and `run` drives one to its end.
- `fit(model, params, tx_factory, train, dev, ...)` builds the state and steps from a model, a loss factory and the
  library's switches (precision, freezing, accumulation, remat, mesh), then runs `training_loop`.

Research code that wants its own loop uses the same pieces (`create_train_state`, `make_train_step`, `evaluate`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jfast.cpu.remat import compiler_options as remat_compiler_options
from jfast.cpu.row_sparse import row_sparse_embedding
from jfast.data.batching import BatchingConfig, make_batches
from jfast.optim.freezing import freeze
from jfast.parallel.distributed import equalize_batches
from jfast.parallel.sharding import ShardingRules, shard_batch
from jfast.precision.loss_scale import LossScale
from jfast.precision.policy import Policy, get_policy
from jfast.training.checkpoint import Checkpointer
from jfast.training.losses import classification_loss
from jfast.training.state import TrainState, create_train_state
from jfast.training.step import make_eval_step, make_train_step, stack_batches


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long to train and how often to log, evaluate and checkpoint.

  Attributes:
    epochs: passes over the training data.
    max_steps: stop after this many optimizer steps (None: run all epochs); the schedule still spans the epochs.
    seed: seeds data order and dropout.
    log_every: steps between fetching metrics from the device (each fetch waits for the device); without a progress
      bar (``progress=False``, or no terminal on stderr) each fetch also prints one log line.
    eval_every: steps between dev evaluations (None: only at the end).
    checkpoint_dir: where to checkpoint (None: no checkpoints).
    checkpoint_every: steps between checkpoints.
    keep_checkpoints: how many recent checkpoints to keep.
    progress: show a tqdm progress bar when stderr is a terminal, else a log line every ``log_every`` steps; False
      prints the log lines only.
    quiet: print neither bar nor log lines (runs driven side by side by an experiment that reports itself).
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
  quiet: bool = False
  time_steps: bool = False

  def __post_init__(self):
    if self.epochs < 1:
      raise ValueError(f"epochs must be at least 1, got {self.epochs}")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
    if self.max_steps is not None and self.max_steps < 1:
      raise ValueError(f"max_steps must be at least 1 (or None), got {self.max_steps}")
    if self.eval_every is not None and self.eval_every < 1:
      raise ValueError(f"eval_every must be at least 1 (or None), got {self.eval_every}")


@dataclasses.dataclass
class FitResult:
  """What a training run returns: the final state, per-log-step history, eval results and run statistics."""

  state: TrainState
  history: list[dict[str, float]]
  evals: list[dict[str, float]]
  stats: dict[str, Any]


def evaluate(eval_step: Callable, params, batches: Iterable, *inputs) -> dict[str, float]:
  """Runs ``eval_step(params, *inputs, batch)`` over ``batches``; accuracy and mean loss over what the loss counts.

  Returns:
    ``{"accuracy": correct / examples, "loss": loss_sum / examples, "examples": examples}``, from the sums the
    loss returns (`jfast.training.losses`), added up across batches before dividing.
  """
  totals = None
  for batch in batches:
    sums = eval_step(params, *inputs, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  if totals is None:
    raise ValueError("evaluate got no batches")
  totals = jax.device_get(totals)
  examples = max(float(totals["examples"]), 1.0)
  return {
    "accuracy": float(totals["correct"]) / examples,
    "loss": float(totals["loss_sum"]) / examples,
    "examples": int(totals["examples"]),
  }


def _token_counts(batch) -> tuple[int, int, int]:
  """(real tokens, computed token slots, examples) of a batch with ``segment_ids`` (0 = padding) and
  ``example_mask``; zeros for what it lacks."""
  segment_ids = getattr(batch, "segment_ids", None)
  mask = getattr(batch, "example_mask", None)
  examples = int(np.count_nonzero(mask)) if mask is not None else 0
  if segment_ids is None:
    return 0, 0, examples
  real = getattr(batch, "num_real_tokens", None)
  return (int(np.count_nonzero(segment_ids)) if real is None else int(real)), int(np.size(segment_ids)), examples


def _crossed(before: int, after: int, every: int) -> bool:
  """Whether a multiple of ``every`` lies in ``(before, after]``: a cadence kept when calls advance several steps."""
  return after // every > before // every


def _calls(batches: Sequence, start: int, remaining: int, k: int) -> list[tuple[int, int]]:
  """``[first, last)`` batch ranges of the calls of one epoch: ``k`` batches of one shape per call where they exist
  (a ``steps_per_call`` step), single batches elsewhere; at most ``remaining`` batches in all."""
  end = min(len(batches), start + max(remaining, 0))
  calls, i = [], start
  while i < end:
    j = i + k
    if k > 1 and j <= end and len({_shape(b) for b in batches[i:j]}) == 1:
      calls.append((i, j))
    else:
      calls.append((i, i + 1))
      j = i + 1
    i = j
  return calls


def _shape(batch) -> tuple:
  return tuple(np.shape(leaf) for leaf in jax.tree.leaves(batch))


def _inputs(batches: Sequence, call: tuple[int, int]):
  first, last = call
  return batches[first] if last - first == 1 else stack_batches(batches[first:last])


def _log_line(row: dict, total_steps: int, elapsed: float, desc: str) -> str:
  parts = [f"[{desc}] step {row['step']:,}/{total_steps:,}", f"epoch {row['epoch']}", f"loss {row['loss']:.4f}"]
  if "accuracy" in row:
    parts.append(f"acc {row['accuracy']:.4f}")
  parts += [f"{row['tokens_per_second']:,.0f} real tokens/s", f"{elapsed:,.0f}s"]
  return " | ".join(parts)


def _epochs(batches) -> Callable[[int], list]:
  if callable(batches):
    return lambda epoch: equalize_batches(batches(epoch))
  fixed = equalize_batches(batches)
  return lambda epoch: fixed


def training_loop(
  state: TrainState,
  train_step: Callable,
  batches: Sequence | Callable[[int], Sequence],
  *,
  loop: LoopConfig = LoopConfig(),
  eval_step: Callable | None = None,
  dev_batches: Sequence = (),
  inputs: tuple = (),
  place: Callable | None = None,
  on_log: Callable[[dict], None] | None = None,
  total_steps: int | None = None,
  desc: str = "train",
) -> Generator[dict, None, FitResult]:
  """Trains ``state`` with ``train_step`` over ``batches``, one step per ``next()``; returns a `FitResult`.

  Resumes from ``loop.checkpoint_dir`` when it holds a checkpoint (state and data position), reproducing the
  uninterrupted run bit for bit. Metrics stay on the device until a log step, when the pending steps' sums are
  fetched at once.

  Args:
    state: the `TrainState` to train (donated to the step).
    train_step: ``(state, *inputs, batch) -> (state, metrics)``, e.g. from `make_train_step`; ``metrics`` holds
      ``loss_sum``, ``correct``, ``examples``, ``grad_norm``, ``skipped`` and ``loss_scale``.
    batches: the batches of every epoch, or ``epoch -> batches`` (a fresh order per epoch).
    loop: length, logging, evaluation and checkpoint cadence.
    eval_step: ``(params, batch) -> sums`` (`make_eval_step`), run over ``dev_batches`` every ``loop.eval_every``
      steps and at the end.
    dev_batches: batches to evaluate on.
    inputs: further arguments of ``train_step`` before the batch (a teacher's parameters).
    place: applied to each batch before the step (`jfast.parallel.shard_batch` on a mesh).
    on_log: called with each history row (loss, accuracy, real tokens/s, compiles, ...) as it is logged;
      evaluation rows are passed with an ``eval_`` prefix.
    total_steps: steps to run (default: all epochs, capped by ``loop.max_steps``).
    desc: the progress bar's label.

  Yields:
    ``{"step", "epoch", "batch", "state", "metrics"}`` after each step: the state after it (donated to the next
    step: read it before advancing the loop) and the step's metrics, still on the device.

  Example:
    >>> result = run(training_loop(state, step, batches, loop=LoopConfig(epochs=2)))  # doctest: +SKIP
  """
  batches_of = _epochs(batches)
  first = batches_of(0)
  steps_per_epoch = len(first)
  if steps_per_epoch == 0:
    raise ValueError("no training batches: the training data is empty")
  if total_steps is None:
    total_steps = steps_per_epoch * loop.epochs
    total_steps = total_steps if loop.max_steps is None else min(total_steps, loop.max_steps)
  place = place or (lambda b: b)
  dev_batches = list(dev_batches)
  ckpt = Checkpointer(loop.checkpoint_dir, keep=loop.keep_checkpoints) if loop.checkpoint_dir else None
  start_epoch, start_batch = 0, 0
  if ckpt is not None:
    restored = ckpt.restore_latest(state)
    if restored is not None:
      state, position = restored
      start_epoch, start_batch = position["epoch"], position["batch"]

  history, evals = [], []
  step = int(jax.device_get(state.step))
  stats: dict[str, Any] = {
    "steps_per_epoch": steps_per_epoch,
    "total_steps": total_steps,
    "resumed_from_step": step,
    "epoch_seconds": [],
    "train_tokens": 0,
    "computed_tokens": 0,
    "train_examples": 0,
    "steps_run": 0,
    "step_times": [],
    "eval_seconds": 0.0,
    "compile_steps": 0,
    "compile_step_tokens": 0,
  }

  def run_eval():
    if eval_step is None or not dev_batches:
      return
    t_eval = time.perf_counter()
    evals.append({"step": step, **evaluate(eval_step, state.params, map(place, dev_batches))})
    stats["eval_seconds"] += time.perf_counter() - t_eval
    if on_log is not None:
      on_log({"step": step, **{f"eval_{k}": v for k, v in evals[-1].items() if k != "step"}})

  # One progress bar (or log) for a multi-host run, process 0's; a bar only where a terminal shows it.
  talk = not loop.quiet and jax.process_index() == 0
  use_bar = talk and loop.progress and sys.stderr.isatty()
  bar = tqdm(total=total_steps, initial=step, disable=not use_bar, desc=desc, unit="step")
  log_lines, t_start = talk and not use_bar, time.perf_counter()
  compiles = getattr(train_step, "num_compiles", None)
  steps_per_call = getattr(train_step, "steps_per_call", 1)
  single_step = getattr(train_step, "single", None) or train_step
  earlier_compiles = list(getattr(train_step, "compile_log", None) or [])
  pending: list[dict] = []
  epoch = start_epoch
  try:
    while step < total_steps and epoch < loop.epochs:
      epoch_batches = first if epoch == 0 else batches_of(epoch)
      skip = start_batch if epoch == start_epoch else 0
      real, computed, examples = zip(*map(_token_counts, epoch_batches), strict=True)
      stats["padding_efficiency"] = sum(real) / max(sum(computed), 1)
      t0 = time.perf_counter()
      window_tokens, window_start = 0, t0
      # One batch ahead on the device: the next batch's host-to-device copy runs while this step computes.
      calls = _calls(epoch_batches, skip, total_steps - step, steps_per_call)
      # One call ahead on the device: the next call's host-to-device copy runs while this one computes.
      placed = place(_inputs(epoch_batches, calls[0])) if calls else None
      for n, (first_i, last_i) in enumerate(calls):
        k = last_i - first_i
        call = train_step if k == steps_per_call else single_step
        t_step = time.perf_counter()
        before = None if compiles is None else train_step.num_compiles
        state, metrics = call(state, *inputs, placed)
        if n + 1 < len(calls):
          placed = place(_inputs(epoch_batches, calls[n + 1]))
        span = range(first_i, last_i)
        if compiles is not None and train_step.num_compiles != before:
          stats["compile_steps"] += k
          stats["compile_step_tokens"] += sum(real[j] for j in span)
        if loop.time_steps:
          jax.block_until_ready(metrics)
          shape = tuple(np.shape(getattr(epoch_batches[first_i], "input_ids", ())))
          stats["step_times"].append((shape, (time.perf_counter() - t_step) / k))
        pending.append(metrics)
        prev, step = step, step + k
        tokens = sum(real[j] for j in span)
        stats["train_tokens"] += tokens
        stats["computed_tokens"] += sum(computed[j] for j in span)
        stats["train_examples"] += sum(examples[j] for j in span)
        stats["steps_run"] += k
        window_tokens += tokens
        bar.update(k)
        if _crossed(prev, step, loop.log_every) or step == total_steps:
          row = _summarise(pending, step, epoch)
          now = time.perf_counter()
          row["tokens_per_second"] = window_tokens / max(now - window_start, 1e-9)
          if compiles is not None:
            row["compiles"] = train_step.num_compiles
          window_tokens, window_start = 0, now
          history.append(row)
          bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}", refresh=False)
          if log_lines:
            print(_log_line(row, total_steps, now - t_start, desc), flush=True)
          if on_log is not None:
            on_log(row)
          pending = []
        if loop.eval_every and _crossed(prev, step, loop.eval_every) and step != total_steps:
          run_eval()
        if ckpt is not None and (_crossed(prev, step, loop.checkpoint_every) or step == total_steps):
          done = last_i == len(epoch_batches)
          ckpt.save(step, state, {"epoch": epoch + 1, "batch": 0} if done else {"epoch": epoch, "batch": last_i})
        yield {"step": step, "epoch": epoch, "batch": last_i - 1, "state": state, "metrics": metrics}
        if step >= total_steps:
          break
      jax.block_until_ready(state)
      stats["epoch_seconds"].append(time.perf_counter() - t0)
      epoch += 1
  finally:
    bar.close()
    if ckpt is not None:
      ckpt.close()
  log = getattr(train_step, "compile_log", None) or []
  _throughput(stats, [c for c in log if not any(c is e for e in earlier_compiles)])
  run_eval()
  stats.update(final_step=step, skipped_steps=sum(h["skipped"] for h in history))
  stats["final_loss_scale"] = float(jax.device_get(state.loss_scale.loss_scale))
  if getattr(eval_step, "compile_log", None):
    stats["eval_compile_seconds"] = eval_step.compile_seconds
  if compiles is not None:
    stats["train_compiles"] = train_step.num_compiles
  if eval_step is not None and hasattr(eval_step, "num_compiles"):
    stats["eval_compiles"] = eval_step.num_compiles
  return FitResult(state=state, history=history, evals=evals, stats=stats)


def _throughput(stats: dict[str, Any], compiled: list[dict]) -> None:
  """Real tokens/s two ways: end to end (all training time, compiles included) and steady (the steps that did not
  compile, over the training time less compiles and evaluations); compile time and cache hits apart."""
  seconds = sum(stats["epoch_seconds"])
  compile_s = float(sum(c["seconds"] for c in compiled))
  stats["compile_seconds"] = compile_s
  stats["cached_compiles"] = sum(1 for c in compiled if c["cached"])
  stats["train_seconds"] = seconds
  stats["end_to_end_tokens_per_second"] = stats["train_tokens"] / max(seconds, 1e-9)
  steady_s = seconds - compile_s - stats["eval_seconds"]
  steady_tokens = stats["train_tokens"] - stats["compile_step_tokens"]
  stats["steady_tokens_per_second"] = steady_tokens / steady_s if steady_s > 0 and steady_tokens > 0 else None


def run(loop: Generator[dict, None, FitResult]) -> FitResult:
  """Drives a `training_loop` to its end and returns its `FitResult`."""
  while True:
    try:
      next(loop)
    except StopIteration as stop:
      return stop.value


def run_together(*loops: Generator[dict, None, FitResult]) -> list[FitResult]:
  """Drives several `training_loop`s one step each in turn until all end; their `FitResult`s in order.

  Runs that take turns share whatever else the machine is doing alike, which is what side-by-side timings need.
  """
  results: list[FitResult | None] = [None] * len(loops)
  live = dict(enumerate(loops))
  while live:
    for index, gen in list(live.items()):
      try:
        next(gen)
      except StopIteration as stop:
        results[index] = stop.value
        del live[index]
  return results


# Step metrics that are not per-example sums (the others, a loss's extra ``*_sum`` terms included, are averaged
# per example when logged).
_NOT_SUMS = {"loss", "accuracy", "grad_norm", "loss_scale", "skipped", "loss_sum", "correct", "examples", "tokens"}


def _summarise(pending: list[dict], step: int, epoch: int) -> dict[str, float]:
  """One history row from the metrics of the calls since the last log (each a step's scalars, or ``[K]`` stacked by
  a ``steps_per_call`` step): sums added up, then divided by examples; fetched from the device in one transfer."""
  fetched = jax.device_get(pending)

  def values(key):
    return np.concatenate([np.ravel(np.asarray(m[key], np.float64)) for m in fetched])

  examples = float(values("examples").sum())
  per_example = max(examples, 1.0)
  row = {
    "step": step,
    "epoch": epoch,
    "loss": float(values("loss_sum").sum()) / per_example,
    "accuracy": float(values("correct").sum()) / per_example,
    "examples": examples,
    "grad_norm": float(values("grad_norm").mean()),
    "skipped": int(values("skipped").sum()),
    "loss_scale": float(values("loss_scale")[-1]),
  }
  for key in fetched[-1]:
    if key not in _NOT_SUMS:
      row[key.removesuffix("_sum")] = float(values(key).sum()) / per_example
  return row


def _batches(data, batching: BatchingConfig | None, pad_id: int, seed: int, what: str):
  """``epoch -> batches`` from ``(token id arrays, labels)`` (cut by ``batching``), a callable, or fixed batches."""
  if data is None:
    return None
  if callable(data):
    return data
  if isinstance(data, tuple) and len(data) == 2 and not hasattr(data, "_fields"):
    if batching is None:
      raise ValueError(f"{what} is (token ids, labels): give its BatchingConfig ({what}_batching=...)")
    seqs, labels = data
    return lambda epoch: make_batches(seqs, labels, batching, pad_id=pad_id, seed=seed, epoch=epoch).batches
  fixed = list(data)
  return lambda epoch: fixed


def fit(
  model,
  params,
  tx_factory: Callable[[int], optax.GradientTransformation],
  train,
  dev=None,
  *,
  loss: Callable = classification_loss,
  eval_loss: Callable | None = None,
  inputs: tuple = (),
  batching: BatchingConfig | None = None,
  eval_batching: BatchingConfig | None = None,
  loop: LoopConfig = LoopConfig(),
  pad_id: int = 0,
  policy: str | Policy | None = None,
  loss_scale: str | LossScale | None = None,
  on_log=None,
  micro_batches: int = 1,
  normalize_by: str = "examples",
  freeze_mask=None,
  mesh: Mesh | None = None,
  rules: ShardingRules | None = None,
  row_sparse: bool = False,
  steps_per_call: int = 1,
) -> FitResult:
  """Trains ``model`` on ``train`` with any loss, evaluates on ``dev``; resumes from ``loop.checkpoint_dir``.

  Args:
    model: what ``loss`` is built from: a jfast model (`jfast.models.BertForSequenceClassification`, `GPT`), a
      user's Flax Linen module, or anything else a custom loss factory reads (an NNX module's apply function).
    params: its initial parameters (any pytree of arrays).
    tx_factory: ``total_steps -> optax.GradientTransformation`` (the schedule needs the run length).
    train: ``(token id arrays, labels)`` cut into batches by ``batching`` each epoch (shuffled per epoch), a
      sequence of batches (the same every epoch), or ``epoch -> batches`` (e.g. `jfast.data.lm_batches`).
    dev: the same forms for evaluation (``eval_batching`` for token ids), or None.
    loss: the loss factory ``model -> loss_fn``: `classification_loss` (default), `causal_lm_loss`,
      ``lambda m: distillation_loss(m, teacher, config)``, or a user's.
    eval_loss: the factory for evaluation (default ``loss``); a distillation run evaluates the student alone with
      `classification_loss`.
    inputs: further train-step arguments the loss reads (``(teacher_params,)``); not given to evaluation.
    batching: how training batches are cut from token ids (strategy by name).
    eval_batching: how dev batches are cut (use ``shuffle=False``).
    loop: length, logging, evaluation and checkpoint cadence.
    pad_id: the tokenizer's padding id.
    policy: a precision policy (`jfast.precision.get_policy` spec: ``fp32``, ``bf16``, ``fp16``, ``pure-bf16`` or a
      ``params=..,compute=..,output=..`` string). It sets the compute dtype of a model whose ``config`` has a
      ``dtype`` field, the parameters' dtype and the default loss scaling. None leaves model and parameters as given.
    loss_scale: loss scaling (``none``, ``dynamic``, ``static:<scale>`` or an object); None: the policy's default.
    on_log: called with each history row as it is logged (`training_loop`).
    micro_batches: in-step gradient accumulation over this many row blocks of each batch (`make_train_step`).
    normalize_by: what accumulated losses average over, ``examples`` or ``tokens``.
    freeze_mask: from `jfast.optim.freeze_mask` (True = frozen): those parameters get no gradient, no optimizer
      state and no update (the optimizer is wrapped with `jfast.optim.freeze`).
    mesh: a `jfast.parallel.make_mesh` mesh: state created sharded, steps compiled with the rules' shardings,
      batches placed with `jfast.parallel.shard_batch`. Across hosts (`jfast.parallel.distributed.initialize`),
      ``train`` and ``dev`` are this host's shard, ``batching.batch_size`` its rows of each global batch, and every
      host runs the same number of steps (`jfast.parallel.distributed.equalize_batches`). None: one device.
    rules: `jfast.parallel.ShardingRules` (default: the library's table).
    steps_per_call: run this many steps per jitted call (`make_train_step`'s ``lax.scan``; consecutive batches of
      one shape), against per-step dispatch overhead on small models and TPUs. Logging, evaluation and checkpoint
      cadences are kept at the first call boundary at or after each multiple.
    row_sparse: train the word table from the batch's rows (`jfast.cpu.row_sparse`, an opt-in CPU technique);
      ``tx_factory`` must build its optimizer with ``OptimizerConfig(row_sparse_embeddings="exact")`` (or ``"lazy"``).

  Returns:
    A `FitResult`.

  Example:
    >>> result = fit(model, params, lambda n: make_optimizer(OptimizerConfig(), n), (ids, labels), None,
    ...              batching=BatchingConfig(strategy="packed", batch_size=16))  # doctest: +SKIP
  """
  train_batches = _batches(train, batching, pad_id, loop.seed, "train")
  dev_batches = _batches(dev, eval_batching, pad_id, 0, "dev")
  batches_of = _epochs(train_batches)
  first = batches_of(0)
  schedule_steps = len(first) * loop.epochs
  tx: optax.GradientTransformation = tx_factory(schedule_steps)
  if freeze_mask is not None:
    tx = freeze(tx, freeze_mask)
  config = getattr(model, "config", None)
  if policy is not None:
    policy = get_policy(policy)
    if config is not None and hasattr(config, "dtype") and hasattr(model, "clone"):
      model = model.clone(config=policy.configure(config))
  state = create_train_state(
    model, params, tx, seed=loop.seed, policy=policy, loss_scale=loss_scale, mesh=mesh, rules=rules
  )
  train_step = make_train_step(
    loss(model),
    policy=policy,
    compiler_options=remat_compiler_options(getattr(config, "remat_policy", "none")),
    mesh=mesh,
    rules=rules,
    micro_batches=micro_batches,
    normalize_by=normalize_by,
    freeze_mask=freeze_mask,
    row_sparse=row_sparse_embedding(model, loss) if row_sparse else None,
    steps_per_call=steps_per_call,
  )
  eval_step = make_eval_step((eval_loss or loss)(model), mesh=mesh, rules=rules) if dev_batches else None
  # Batches go to the device one step ahead (`training_loop`): sharded over the mesh, or onto the default device.
  place = jax.device_put if mesh is None else (lambda b: shard_batch(b, mesh))
  loop_steps = training_loop(
    state,
    train_step,
    lambda epoch: first if epoch == 0 else batches_of(epoch),
    loop=loop,
    eval_step=eval_step,
    dev_batches=equalize_batches(dev_batches(0)) if dev_batches else (),
    inputs=inputs,
    place=place,
    on_log=on_log,
  )
  return run(loop_steps)
