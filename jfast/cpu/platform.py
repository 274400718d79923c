"""Which platform a trace is for: the CPU layer's forms are used when it is a CPU with bf16 instructions, and
nowhere else.

The choice is made while tracing, in Python, so a step lowered for a GPU or TPU holds stock XLA operations only (no
platform switch, no CPU-shaped products). By default the platform is JAX's default backend. `target` names another
one for the traces inside it, which is how a step is lowered for an accelerator on a CPU-only machine:

    with jfast.cpu.target("cuda"):
      lowered = jax.jit(step).trace(state, batch).lower(lowering_platforms=("cuda",))

`jfast.training.make_train_step(..., platform="cuda")` does the same for its own step. jit caches traces by function
and argument types, not by this setting: trace a fresh `jax.jit` inside the block.

Even on a CPU the layer pays only where XLA:CPU has a bf16 kernel to feed: with AVX512-BF16 (or AMX) the bf16
MiniLM step ran 1.04-1.16x faster with it than with stock ``nn.Dense``; on an AVX2-only EPYC it ran 0.82-0.89x as fast
(``python -m benchmarks.step_profile --config packed_bf16 --ab cpulayer``). So by default it is on for CPUs whose
instruction set has bf16 (`cpu_has_bf16`), off elsewhere; ``JFAST_CPU_LAYER=on|off`` or `use_layer` decide
otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

# The platforms `jax.jit(...).lower(lowering_platforms=...)` takes, by the backend kind each compiles for.
_KINDS = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu"}
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("jfast_target_platform", default=None)
_ENABLED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("jfast_cpu_layer", default=None)
ENV_LAYER = "JFAST_CPU_LAYER"
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_HALF = (np.dtype(jax.numpy.bfloat16), np.dtype(jax.numpy.float16))


def platform_kind(name: str) -> str:
  """``cpu``, ``gpu`` or ``tpu`` for a platform or backend name (``cuda`` and ``rocm`` are ``gpu``)."""
  kind = _KINDS.get(str(name).lower())
  if kind is None:
    raise ValueError(f"unknown platform {name!r}; expected one of {sorted(_KINDS)}")
  return kind


def current_platform() -> str:
  """The kind (``cpu``, ``gpu``, ``tpu``) of the platform being traced for: `target`'s, else JAX's default backend."""
  target = _TARGET.get()
  return platform_kind(target if target is not None else jax.default_backend())


@contextlib.contextmanager
def target(platform: str | None) -> Iterator[None]:
  """Traces inside this block choose their forms for ``platform`` (``cpu``, ``cuda``, ``rocm``, ``tpu``; None: the
  default backend).

  Example:
    >>> with target("tpu"):
    ...   current_platform()
    'tpu'
  """
  if platform is not None:
    platform_kind(platform)
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


@functools.cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether this machine's CPU has bf16 instructions (AVX512-BF16 or AMX-BF16), read from Linux's ``cpuinfo``;
  False where it cannot be read."""
  try:
    text = Path(cpuinfo).read_text()
  except OSError:
    return False
  flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
  return any(flag in flags for flag in _BF16_FLAGS)


def layer_enabled() -> bool:
  """Whether the CPU layer is on for CPU traces: `use_layer`'s setting, else ``JFAST_CPU_LAYER`` (``on``/``off``),
  else whether the CPU has bf16 instructions."""
  enabled = _ENABLED.get()
  if enabled is not None:
    return enabled
  word = os.environ.get(ENV_LAYER, "auto").strip().lower()
  if word not in ("auto", "on", "off"):
    raise ValueError(f"{ENV_LAYER}={word!r}: expected on, off or auto")
  return cpu_has_bf16() if word == "auto" else word == "on"


@contextlib.contextmanager
def use_layer(enabled: bool | None) -> Iterator[None]:
  """Traces inside this block use the CPU layer (``True``), stock XLA forms even for the CPU (``False``, e.g. to
  measure what the layer buys: ``python -m benchmarks.step_profile --ab cpulayer``), or the default (``None``)."""
  token = _ENABLED.set(None if enabled is None else bool(enabled))
  try:
    yield
  finally:
    _ENABLED.reset(token)


def active(dtype) -> bool:
  """Whether the CPU layer's products apply: a bfloat16 or float16 compute dtype, traced for the CPU, with the layer
  on (`layer_enabled`).

  Example:
    >>> with target("cuda"):
    ...   active(jax.numpy.bfloat16)
    False
  """
  return np.dtype(dtype) in _HALF and current_platform() == "cpu" and layer_enabled()
