"""Pieces both runners share: thread pinning, memory readings, step-time summaries and the FLOP count.

Nothing here imports JAX or PyTorch, so each child process loads only its own framework.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def pin_threads(threads: int) -> None:
  """Restricts this process to ``threads`` CPUs and tells the thread pools the same, before any framework loads.

  The affinity mask binds both frameworks equally whatever their pools think the core count is; the environment
  variables size OpenMP/MKL pools (PyTorch also gets ``torch.set_num_threads``).
  """
  cpus = sorted(os.sched_getaffinity(0))
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(threads)


def start_jfast_script(threads: int = 2) -> None:
  """A one-process jfast timing script's start: glibc huge pages as `benchmarks.compare` gives the jfast side
  (`jfast.cpu.hugepages`; on a CPU backend the process re-executes itself once; ``JFAST_HUGEPAGES=0``: without),
  then `pin_threads`."""
  from jfast.cpu.hugepages import ensure_hugepages

  ensure_hugepages()
  pin_threads(threads)


def rss_mb() -> float:
  """Resident memory of this process now, in MiB."""
  with open("/proc/self/statm") as f:
    pages = int(f.read().split()[1])
  return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
  """The high-water mark of this process's resident memory, in MiB (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def cpu_seconds() -> float:
  """User + system CPU time of this process so far."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def summarize_steps(
  steps: Mapping[str, Sequence], warmup: int, threads: int, *, min_share: float = 0.0
) -> dict[str, float]:
  """Step statistics over the timed steps: after ``warmup``, without compilations and contended steps.

  Args:
    steps: per-step lists ``step_times`` (seconds; jfast's compile time already taken out), ``step_tokens`` (real
      tokens), ``step_flops`` (`train_flops`), ``step_cpu_s`` (CPU seconds the process used) and optionally
      ``step_compiled`` (True where the step paid for a compilation, e.g. under ``torch.compile``).
    warmup: leading steps left out of every statistic.
    threads: the threads the process ran on.
    min_share: leave out steps whose CPU share (CPU seconds over wall seconds times threads) is below this. Both
      frameworks keep their threads busy through a compute-bound step, so a share well under 1 means another
      process took a core during that step and its time measures the neighbour. If no step is left, the
      statistics fall back to every candidate step (``contended_steps`` still counts them all).

  Returns:
    ``median_step_s``, ``mean_step_s``, ``real_tokens_per_s`` (timed tokens over timed seconds, so long and short
    batches weigh by their cost), ``model_tflops_per_s`` (the same for FLOPs), ``cpu_share`` (over the timed steps),
    ``timed_steps``, ``contended_steps`` (under ``min_share``), ``clean_fraction`` (of the steps after warm-up and
    compilation, those at or above ``min_share``), ``timed_tokens``, ``warmup_s``.
  """
  times, tokens, flops, cpu = (list(steps[k]) for k in ("step_times", "step_tokens", "step_flops", "step_cpu_s"))
  compiled = list(steps.get("step_compiled") or [False] * len(times))
  share = [c / max(t * threads, 1e-9) for c, t in zip(cpu, times, strict=True)]
  candidates = [i for i in range(warmup, len(times)) if not compiled[i]] or list(range(warmup, len(times)))
  if not candidates:
    raise ValueError(f"no timed steps: {len(times)} steps, {warmup} of them warm-up")
  clean = [i for i in candidates if share[i] >= min_share]
  timed = clean or candidates
  seconds = sum(times[i] for i in timed)
  return {
    "median_step_s": statistics.median(times[i] for i in timed),
    "mean_step_s": seconds / len(timed),
    "real_tokens_per_s": sum(tokens[i] for i in timed) / seconds,
    "model_tflops_per_s": sum(flops[i] for i in timed) / seconds / 1e12,
    "cpu_share": sum(cpu[i] for i in timed) / (seconds * threads),
    "timed_steps": len(timed),
    "contended_steps": len(candidates) - len(clean),
    "clean_fraction": len(clean) / len(candidates),
    "timed_tokens": sum(tokens[i] for i in timed),
    "warmup_s": sum(times[:warmup]),
  }


# all-MiniLM-L6-v2's width (its depth varies by benchmark): BertConfig fields.
MINILM_WIDTH = {"vocab_size": 30522, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536}


def layer_params(hidden: int, intermediate: int) -> int:
  """Parameters of one encoder layer that cost FLOPs per row: q/k/v/output projections, FFN, two LayerNorms."""
  return 4 * (hidden * hidden + hidden) + 2 * hidden * intermediate + intermediate + hidden + 4 * hidden


def train_flops(
  example_lengths: Sequence[int],
  *,
  hidden: int,
  layers: int,
  intermediate: int,
  num_labels: int,
  cls_only_last_layer: bool = False,
) -> float:
  """Model FLOPs of one training step (forward + backward) over the real tokens of the given examples, as the
  model runs them.

  A weight costs 2 FLOPs per row forward and 4 backward (6 in all) for each row it is applied to; attention's two
  products (``QK^T``, ``PV``) cost ``4 * queries * keys * hidden`` per layer forward, times 3 with the backward.
  Encoder layers run at every real token; the pooler and the classifier at one row per example. With
  ``cls_only_last_layer`` (jfast's classifier: `BertForSequenceClassification.last_layer_pooled_only`) the last
  layer's keys and values still cover every token, but its query, output projection, FFN and LayerNorms run at
  the [CLS] row alone, and its attention has one query per example. Padding and recomputation (remat) are not
  counted: this is useful work, so MFU is comparable across padding strategies.
  """
  tokens = sum(example_lengths)
  square = sum(n * n for n in example_lengths)
  examples = len(example_lengths)
  per_layer = layer_params(hidden, intermediate)
  full = layers - 1 if cls_only_last_layer else layers
  flops = 6.0 * per_layer * full * tokens + 12.0 * full * hidden * square
  if cls_only_last_layer:
    key_value = 2 * (hidden * hidden + hidden)
    flops += 6.0 * key_value * tokens + 6.0 * (per_layer - key_value) * examples + 12.0 * hidden * tokens
  head = hidden * hidden + hidden + hidden * num_labels + num_labels  # pooler and classifier
  return flops + 6.0 * head * examples


def print_and_save(text: str, out: str | None) -> None:
  """Prints a report and, with ``out``, also writes it there (folders created)."""
  print(text)
  if out:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text + "\n")


def time_alternated(calls: Mapping[str, Callable[[], Any]], steps: int, warmup: int = 3) -> dict[str, list[float]]:
  """Runs each zero-argument call in turn, ``warmup + steps`` rounds, and returns each one's last ``steps`` times.

  Alternating call by call makes drift of a shared machine hit every variant alike. A call must block until its
  work is done (``jax.block_until_ready``) and carry its own state (e.g. a donated train state) between rounds.
  """
  times: dict[str, list[float]] = {name: [] for name in calls}
  for i in range(warmup + steps):
    for name, call in calls.items():
      t0 = time.perf_counter()
      call()
      if i >= warmup:
        times[name].append(time.perf_counter() - t0)
  return times


def median_table(title: str, what: str, times: Mapping[str, Sequence[float]], base: str) -> str:
  """Markdown: ``title``, then each variant's median milliseconds and its speed against the ``base`` variant."""
  ref = statistics.median(times[base])
  lines = [title, "", f"| {what} | median ms | vs {base} |", "|---|---|---|"]
  for name, t in times.items():
    lines.append(f"| {name} | {statistics.median(t) * 1e3:.2f} | {ref / statistics.median(t):.3f}x |")
  return "\n".join(lines)
