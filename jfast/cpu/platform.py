"""Which platform a trace is for: the CPU layer's forms are used when it is the CPU, and nowhere else.

The choice is made while tracing, in Python, so a step lowered for a GPU or TPU holds stock XLA operations only (no
platform switch, no CPU-shaped products). By default the platform is JAX's default backend. `target` names another
one for the traces inside it, which is how a step is lowered for an accelerator on a CPU-only machine:

    with jfast.cpu.target("cuda"):
      lowered = jax.jit(step).trace(state, batch).lower(lowering_platforms=("cuda",))

`jfast.training.make_train_step(..., platform="cuda")` does the same for its own step. jit caches traces by function
and argument types, not by this setting: trace a fresh `jax.jit` inside the block.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import numpy as np

# The platforms `jax.jit(...).lower(lowering_platforms=...)` takes, by the backend kind each compiles for.
_KINDS = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu"}
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("jfast_target_platform", default=None)
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("jfast_cpu_layer", default=True)
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


@contextlib.contextmanager
def use_layer(enabled: bool) -> Iterator[None]:
  """Traces inside this block use the CPU layer (``True``, the default) or stock XLA forms even for the CPU
  (``False``), e.g. to measure what the layer buys (``python -m benchmarks.step_profile --ab cpulayer``)."""
  token = _ENABLED.set(bool(enabled))
  try:
    yield
  finally:
    _ENABLED.reset(token)


def active(dtype) -> bool:
  """Whether the CPU layer's products apply: a bfloat16 or float16 compute dtype, traced for the CPU, with the layer
  not turned off by `use_layer`.

  Example:
    >>> with target("cuda"):
    ...   active(jax.numpy.bfloat16)
    False
  """
  return _ENABLED.get() and np.dtype(dtype) in _HALF and current_platform() == "cpu"
