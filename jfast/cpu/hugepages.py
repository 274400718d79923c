"""Transparent huge pages for XLA:CPU's buffers, through glibc's ``glibc.malloc.hugetlb=1`` tunable; CPU only.

XLA:CPU allocates every temporary buffer of a step afresh. Big ones (MiniLM's 47 MB word-embedding gradient, the
optimizer's per-leaf temporaries) come from ``mmap`` in 4 KiB pages, so each step takes one page fault per 4 KiB
written: zero-filling the embedding gradient took 13-20 ms of a 160-220 ms step on a 2-core AVX512-BF16 EPYC, three
times numpy's time for the same fill (numpy asks the kernel for huge pages with ``madvise``). With glibc's tunable
set, malloc asks for transparent huge pages too: there the fill drops to 3.3 ms and a whole bf16 MiniLM train step
is 1.19x (32x9 tokens) to 1.24x (packed 8x57 rows) faster (``python -m benchmarks.step_profile --ab hugepages``),
the GPT of `experiments.lm` 1.34x in bf16 and 1.09x in fp32 (``--config gpt_bf16|gpt_fp32``). The tunable is read
when a process starts, so the command-line entry points re-execute themselves once with it set (`ensure_hugepages`),
and only when JAX's backend is the CPU (`cpu_backend`): on a GPU or TPU the step's buffers are not host memory.
Library users on a CPU set it in their own launcher (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py``).
``JFAST_HUGEPAGES=0`` turns the re-execution off. It needs Linux, glibc 2.35 or newer and transparent huge pages
not set to ``never``.

PyTorch's CPU step gains from the same tunables on the Zen 5 EPYC (1.09x from huge pages, 1.26x with `RETAIN`,
`docs/figures/allocator_ab_zen5_s12.md`) and lost from them on the AVX512-BF16 one (0.86x), so `benchmarks.compare`
takes each side's allocator setting as options (``--hugepages``, ``--retain-freed``, both on for both sides by
default) and says in its table which side had which. PyTorch's GPT-2 step in `experiments.lm` gained in bf16 and
was level in fp32, so that experiment, whose two sides share one process, runs with it on both.

Huge pages make each fault cheaper, but the faults remain: glibc returns every freed buffer above its mmap
threshold (at most 32 MiB) to the kernel, so XLA's 331 MiB of step temporaries for the GPT are mapped, zero-filled
and unmapped again every step. ``retain=True`` adds three more tunables (`RETAIN`): no ``mmap`` for large blocks
(they come from the heap), a heap top that is never trimmed, and one arena (the threads' own arenas are shrunk
with ``MADV_DONTNEED`` on their own schedule). Freed buffers then stay in the process for the next step. On a
2-core AVX2 EPYC (``python -m benchmarks.step_profile --config gpt_fp32 --ab hugepages``, three fresh processes
each) the fp32 GPT step of `experiments.lm` went 659 -> 576 ms (1.14x; 70 ms of kernel time and ~450 faults a step
-> none), and the slow-step tail of that experiment's one-process comparison went away (30 -> 3 of 118 steps over
1.3x the median); MiniLM's packed step, whose temporaries are small, was level (345 -> 337 ms, inside the spread
between processes), and level on the Zen 5 EPYC too (65.8 -> 67.2 ms). The price is that a process keeps its peak
memory until it exits, so only `experiments.lm` (and ``jfast experiment lm``) asks for it.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
# Freed memory stays in the process (see the module docstring): heap instead of mmap, no trimming, one arena.
RETAIN = ("glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={1 << 40}", "glibc.malloc.arena_max=1")
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def hugepage_env(
  environ: Mapping[str, str] | None = None, enabled: bool = True, retain: bool = False
) -> dict[str, str]:
  """A copy of ``environ`` (default: this process's) with the huge-page tunable added to ``GLIBC_TUNABLES``.

  Other tunables already there are kept (the variable is a colon-separated list). ``enabled=False`` removes the
  tunable instead (for a child process that should run without it, such as the PyTorch side of a benchmark), and
  the `RETAIN` settings with it (the same values only: a user's own ``arena_max=2`` stays). ``retain=True`` adds
  `RETAIN` as well (freed buffers stay in the process), replacing any other value of those three.

  Example:
    >>> hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
    'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  """
  env = dict(os.environ if environ is None else environ)
  names = [TUNABLE.split("=")[0]] + ([r.split("=")[0] for r in RETAIN] if retain else [])
  items = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t.split("=")[0] not in names]
  items = [t for t in items if enabled or t not in RETAIN]  # a user's own arena_max=2 stays
  items += ([TUNABLE] + (list(RETAIN) if retain else [])) if enabled else []
  if items:
    env["GLIBC_TUNABLES"] = ":".join(items)
  else:
    env.pop("GLIBC_TUNABLES", None)
  return env


def tunables_set(retain: bool = False, environ: Mapping[str, str] | None = None) -> bool:
  """Whether ``environ`` (default: this process's) already has the huge-page tunable (and `RETAIN`, if asked)."""
  have = set((os.environ if environ is None else environ).get("GLIBC_TUNABLES", "").split(":"))
  return TUNABLE in have and (not retain or set(RETAIN) <= have)


def hugepages_supported() -> bool:
  """Linux with glibc >= 2.35 (the tunable's first release) and transparent huge pages not disabled."""
  if sys.platform != "linux":
    return False
  lib, version = platform.libc_ver()
  try:
    major, minor = (int(v) for v in version.split(".")[:2])
  except ValueError:
    return False
  if lib != "glibc" or (major, minor) < (2, 35):
    return False
  try:
    return "[never]" not in _THP.read_text()
  except OSError:
    return False


def cpu_backend(environ: Mapping[str, str] | None = None) -> bool:
  """Whether JAX will run on the CPU in this process, decided without importing JAX (a re-executed process would
  pay for that twice): ``JAX_PLATFORMS`` when set, else whether an accelerator plugin (CUDA, ROCm, TPU) is installed.
  """
  import importlib.metadata
  import importlib.util

  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  # Accelerator plugins register as "jax_plugins" entry points (jax_cuda12_plugin: "xla_cuda12"); TPUs use libtpu.
  plugins = [ep.name.lower() for ep in importlib.metadata.entry_points(group="jax_plugins")]
  known = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")
  accelerator = any(("cuda" in p or "rocm" in p or "tpu" in p) for p in plugins)
  return not (accelerator or any(importlib.util.find_spec(name) is not None for name in known))


def ensure_hugepages(retain: bool = False) -> None:
  """Re-executes this process once with the tunable set, where it helps and is not set yet; otherwise returns.

  Only for a CPU backend (`cpu_backend`): the tunable shapes host allocations, which on a GPU or TPU hold no step's
  buffers. Call it first thing in a command-line entry point (never from library code: it replaces the process).
  The command is repeated as it was given (``sys.orig_argv``, so ``python -m ...`` stays a module run).
  ``retain=True`` also sets `RETAIN` (freed buffers stay in the process; for steps with large temporaries, such as
  the GPT's).
  """
  if os.environ.get("JFAST_HUGEPAGES", "1") == "0" or tunables_set(retain):
    return
  if not cpu_backend() or not hugepages_supported():
    return
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], hugepage_env(retain=retain))
  except OSError:
    return  # the process goes on without huge pages: slower, never wrong
