"""What every Hugging Face folder reader and writer shares: reading ``config.json`` + ``model.safetensors``, checking
the tensors against the shapes a config implies, and writing a folder back with ordinary file permissions.

Checking every tensor against the config's shapes makes a config that does not match its weights fail with the
offending names instead of a broadcasting error deep inside the first forward pass.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

# Flax leaf name -> the PyTorch parameter name it is stored under.
LEAVES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def read_folder(path: str | Path) -> tuple[Path, dict, dict[str, np.ndarray]]:
  """``(folder, config.json as a dict, tensors by name)``; a missing or unreadable file raises naming it."""
  folder = Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f"no model folder at {folder}")
  config_file, weights_file = folder / "config.json", folder / "model.safetensors"
  if not config_file.is_file():
    raise FileNotFoundError(f"{folder} has no config.json")
  if not weights_file.is_file():
    extra = (
      " (pytorch_model.bin is not read: convert it to safetensors)" if (folder / "pytorch_model.bin").exists() else ""
    )
    raise FileNotFoundError(f"{folder} has no model.safetensors{extra}")
  try:
    hf_config = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_file} is not valid JSON: {e}") from None
  try:
    tensors = load_file(str(weights_file))
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{weights_file} is corrupt or not a safetensors file: {e}") from None
  return folder, hf_config, tensors


def param_shapes(init: Callable[[], dict]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened parameter path -> shape of what ``init()`` would create (`jax.eval_shape`: nothing is allocated)."""
  shapes = jax.eval_shape(init)
  return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(shapes).items()}


def match_tensors(
  folder: Path,
  expected: dict[tuple[str, ...], tuple[int, ...]],
  tensors: dict[str, np.ndarray],
  hf_name: Callable[[tuple[str, ...]], str],
  ignored: re.Pattern,
  *,
  transpose_kernels: bool,
) -> dict[tuple[str, ...], np.ndarray]:
  """Picks each expected parameter out of ``tensors`` by its Hugging Face name, as float32.

  Raises a `ValueError` listing every tensor that is missing, mis-shaped, or present but unused (and not
  ``ignored``). ``transpose_kernels``: PyTorch ``Linear`` weights are ``[out, in]`` (shapes are reported that way).
  """
  flat, problems = {}, []
  for flax_path, shape in expected.items():
    name = hf_name(flax_path)
    if name not in tensors:
      problems.append(f"{name}: missing")
      continue
    value = np.asarray(tensors[name], dtype=np.float32)
    flip = transpose_kernels and flax_path[-1] == "kernel"
    value = value.T if flip else value
    if value.shape != shape:
      problems.append(
        f"{name}: weights {value.shape[::-1] if flip else value.shape}, config expects "
        f"{shape[::-1] if flip else shape}"
      )
    flat[flax_path] = value
  used = {hf_name(p) for p in expected}
  unexpected = sorted(k for k in tensors if k not in used and not ignored.match(k))
  problems += [f"{name}: in the weights but not in the config" for name in unexpected[:10]]
  if problems:
    raise ValueError(f"config does not match the weights in {folder}:\n  " + "\n  ".join(problems[:20]))
  return flat


def flat_tensors(params: dict, hf_name: Callable[[tuple[str, ...]], str], *, transpose_kernels: bool, prefix=""):
  """The inverse of `match_tensors`: Hugging Face name -> contiguous float32 array."""
  tensors = {}
  for flax_path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
    value = np.asarray(value, dtype=np.float32)
    value = value.T if transpose_kernels and flax_path[-1] == "kernel" else value
    tensors[prefix + hf_name(flax_path)] = np.ascontiguousarray(value)
  return tensors


def write_folder(path: str | Path, tensors: dict[str, np.ndarray], hf_config: dict) -> Path:
  """Writes ``model.safetensors`` and ``config.json`` into ``path`` (created with its parents), readable by all as
  any file the user writes (the umask's permissions, not safetensors' owner-only default)."""
  folder = Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  weights = folder / "model.safetensors"
  save_file(tensors, str(weights), metadata={"format": "pt"})
  umask = os.umask(0)
  os.umask(umask)
  weights.chmod(0o666 & ~umask)
  (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
  return folder
