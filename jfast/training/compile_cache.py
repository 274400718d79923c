"""JAX's persistent compilation cache, on by default at jfast's entry points, and a count of its hits.

A compiled step is keyed by its program, shapes, shardings, compiler options and backend; a later run of the same
step (any process) loads it from the cache folder instead of compiling. On GPUs the folder also keeps XLA's
per-fusion autotuning results (JAX's ``jax_persistent_cache_enable_xla_caches`` default), which are much of a GPU
compile. Every entry point (`jfast`, ``python -m jfast.app.finetune``, ``python -m experiments.*`` /
``benchmarks.*``) calls `enable_compilation_cache`; library users call it themselves or set JAX's own options.

Where: ``$JFAST_COMPILATION_CACHE`` if it names a folder, else ``$XDG_CACHE_HOME/jfast/jax`` (``~/.cache/jfast/jax``).
``JFAST_COMPILATION_CACHE=off`` (or ``jfast --no-compile-cache``) turns it off; a cache folder already set through
JAX (``JAX_COMPILATION_CACHE_DIR``) is left as it is.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

ENV = "JFAST_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no", "none")


def default_cache_dir() -> Path:
  """``$XDG_CACHE_HOME/jfast/jax``, or ``~/.cache/jfast/jax``."""
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "jfast" / "jax"


def cache_disabled() -> bool:
  return os.environ.get(ENV, "").strip().lower() in _OFF


def enable_compilation_cache(directory: str | Path | None = None) -> Path | None:
  """Points JAX's persistent compilation cache at a folder (created if needed); returns it, or None when off.

  Args:
    directory: the folder; default ``$JFAST_COMPILATION_CACHE`` or `default_cache_dir`.

  Every compiled program is kept, however quick its compile (``jax_persistent_cache_min_compile_time_secs=0``): a
  train step's eval step and small shapes recompile in a second each, which adds up over a run's shapes. Before
  JAX is imported this sets JAX's environment variables, which child processes (benchmark runners) inherit; after,
  it updates ``jax.config``.
  """
  if cache_disabled():
    return None
  jax = sys.modules.get("jax")
  current = jax.config.jax_compilation_cache_dir if jax is not None else os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if current and directory is None:
    return Path(current)  # the user's own JAX setting
  setting = os.environ.get(ENV, "").strip()
  path = Path(directory or setting or default_cache_dir()).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  options = {"jax_compilation_cache_dir": str(path), "jax_persistent_cache_min_compile_time_secs": 0.0}
  for name, value in options.items():
    os.environ[name.upper()] = str(value)
    if jax is not None:
      jax.config.update(name, value)
  return path


def disable_compilation_cache() -> None:
  """Turns the persistent cache off for this process and its children: for measurements of cold compiles."""
  os.environ[ENV] = "off"
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  jax = sys.modules.get("jax")
  if jax is not None:
    jax.config.update("jax_compilation_cache_dir", None)


class CacheEvents:
  """Counts of the persistent cache's hits and misses in this process (JAX's monitoring events)."""

  HIT = "/jax/compilation_cache/cache_hits"
  MISS = "/jax/compilation_cache/cache_misses"

  def __init__(self):
    self.hits = 0
    self.misses = 0
    self._lock = threading.Lock()

  def __call__(self, event: str, **kwargs) -> None:
    if event in (self.HIT, self.MISS):
      with self._lock:
        if event == self.HIT:
          self.hits += 1
        else:
          self.misses += 1


_EVENTS: CacheEvents | None = None


def cache_events() -> CacheEvents:
  """The process's `CacheEvents`, registered with ``jax.monitoring`` on first use."""
  global _EVENTS
  if _EVENTS is None:
    import jax

    _EVENTS = CacheEvents()
    jax.monitoring.register_event_listener(_EVENTS)
  return _EVENTS
