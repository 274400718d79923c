"""One folder per run, so results can be found again and compared: ``runs/<name>-<timestamp>/``.

A run folder holds the resolved config (``config.yaml``), metrics as JSON lines (``metrics.jsonl``, one object per
logged step), the final ``summary.json``, the machine it ran on (``machine.json``), any plots, and TensorBoard
events under ``tb/`` when ``tensorboardX`` is installed (optional: ``pip install jfast[tensorboard]``).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Any

from jfast.app.config import save_config

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# Vector extensions that decide which precision is fastest on a CPU, strongest first. Machines of one cloud kind
# differ here: the same "AMD EPYC" VM has come with AVX512-BF16 (bf16 matmuls ~1.3x faster than
# float32) and with AVX2 only (no bf16 instructions: PyTorch's bf16 autocast ran 20x slower than float32).
_ISA_FLAGS = (
  ("amx_bf16", "AMX-BF16"),
  ("avx512_bf16", "AVX512-BF16"),
  ("avx512_vnni", "AVX512-VNNI"),
  ("avx512f", "AVX-512"),
  ("avx2", "AVX2"),
)


def describe_cpu(cpuinfo: str) -> str:
  r"""One line naming a Linux ``/proc/cpuinfo``'s CPU and the vector extensions its speed depends on.

  The model name alone ("AMD EPYC") does not tell two generations apart; family/model and the bf16 and AVX-512
  flags do, and they decide whether bf16 compute helps at all.

  Args:
    cpuinfo: the text of ``/proc/cpuinfo`` (the first processor's fields are read).

  Returns:
    e.g. ``"AMD EPYC (family 25, model 1; AVX2; no AVX-512, no bf16 instructions)"``.

  Example:
    >>> describe_cpu("model name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: avx2 avx512f avx512_bf16\n")
    'AMD EPYC (family 25, model 17; AVX512-BF16, AVX-512, AVX2)'
  """
  fields: dict[str, str] = {}
  for line in cpuinfo.splitlines():
    if not line.strip():
      if fields:
        break  # the first processor's block is enough
      continue
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  flags = set(fields.get("flags", "").split())
  name = fields.get("model name") or platform.machine() or "unknown CPU"
  found = [label for flag, label in _ISA_FLAGS if flag in flags]
  missing = []
  if "avx512f" not in flags:
    missing.append("no AVX-512")
  if not flags & {"avx512_bf16", "amx_bf16"}:
    missing.append("no bf16 instructions")
  ident = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields).replace("cpu family", "family")
  isa = "; ".join(x for x in (", ".join(found), ", ".join(missing)) if x)
  return f"{name} ({'; '.join(x for x in (ident, isa) if x)})" if ident or isa else name


def cpu_description() -> str:
  """`describe_cpu` of this machine (Linux), or the platform's processor name elsewhere."""
  try:
    with open("/proc/cpuinfo") as f:
      return describe_cpu(f.read())
  except OSError:
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict[str, Any]:
  """CPU model, core count, accelerators and library versions: what a reader needs to compare two runs."""
  info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
  info["cpu"] = cpu_description()
  try:
    import jax

    info["jax"] = jax.__version__
    info["jax_backend"] = jax.default_backend()
    info["devices"] = sorted({d.device_kind for d in jax.devices()})
  except Exception as e:  # a broken accelerator runtime should not stop the bookkeeping
    info["jax"] = f"unavailable: {e}"
  for lib in ("flax", "optax", "torch", "transformers"):
    try:
      info[lib] = __import__(lib).__version__
    except ImportError:
      info[lib] = None
  return info


def _jsonable(value):
  if hasattr(value, "item") and getattr(value, "size", 2) == 1:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class RunDir:
  """A run's folder and its writers.

  Args:
    name: the experiment's name (letters, digits, ``_.-``).
    root: parent folder (default ``runs``).
    config: the resolved config dataclass, written as ``config.yaml``.
    tensorboard: write TensorBoard events too, if ``tensorboardX`` is importable.
    timestamp: fixed timestamp (tests); default now, UTC.

  Example:
    >>> run = RunDir("finetune", config=cfg)
    >>> run.log(step=10, loss=0.41, tokens_per_second=5200.0)
    >>> run.finish({"dev_accuracy": 0.88})
  """

  def __init__(
    self,
    name: str,
    *,
    root: str | Path = "runs",
    config=None,
    tensorboard: bool = True,
    timestamp: str | None = None,
  ):
    if not _NAME.match(name):
      raise ValueError(f"run name {name!r} must be letters, digits, '_', '.' or '-'")
    stamp = timestamp or datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    self.path = Path(root) / f"{name}-{stamp}"
    suffix = 1
    while self.path.exists():  # two runs in the same second must not share a folder
      suffix += 1
      self.path = Path(root) / f"{name}-{stamp}-{suffix}"
    self.path.mkdir(parents=True)
    self.name = name
    if config is not None:
      save_config(config, self.path / "config.yaml")
    (self.path / "machine.json").write_text(json.dumps(machine_info(), indent=2))
    self._metrics = (self.path / "metrics.jsonl").open("a")
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.path / "tb"))
      except ImportError:
        pass

  @property
  def has_tensorboard(self) -> bool:
    return self._tb is not None

  def log(self, step: int, **metrics) -> None:
    """Appends one JSON line (and TensorBoard scalars) for ``step``."""
    row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._metrics.write(json.dumps(row) + "\n")
    self._metrics.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, int(step))

  def finish(self, summary: dict[str, Any]) -> Path:
    """Writes ``summary.json`` and closes the writers; returns the summary's path."""
    path = self.path / "summary.json"
    path.write_text(json.dumps({"name": self.name, **summary}, indent=2, default=str))
    self.close()
    return path

  def close(self) -> None:
    self._metrics.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if not self._metrics.closed:
      self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
  """The JSON lines of a run folder (or of a ``metrics.jsonl`` file), in order."""
  p = Path(path)
  if p.is_dir():
    p = p / "metrics.jsonl"
  return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def latest_runs(root: str | Path = "runs") -> dict[str, Path]:
  """Newest finished run folder (one with ``summary.json``) per run name."""
  latest: dict[str, tuple[float, Path]] = {}
  for summary in Path(root).glob("*/summary.json"):
    try:
      name = json.loads(summary.read_text()).get("name") or summary.parent.name
    except json.JSONDecodeError:
      continue
    mtime = summary.stat().st_mtime
    if name not in latest or mtime > latest[name][0]:
      latest[name] = (mtime, summary.parent)
  return {name: path for name, (_, path) in sorted(latest.items())}
