"""What every Hugging Face folder reader and writer shares: reading ``config.json`` + ``model.safetensors``, checking
the tensors against the shapes a config implies, and writing a folder back with ordinary file permissions.

Checking every tensor against the config's shapes makes a config that does not match its weights fail with the
offending names instead of a broadcasting error deep inside the first forward pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from jfast.errors import ModelFolderError

WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"

# Flax leaf name -> the PyTorch parameter name it is stored under.
LEAVES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def dotted_name(path: tuple[str, ...], layer_prefix: str) -> str:
  """A flattened Flax path as a PyTorch parameter name: per-layer modules ``{prefix}_i`` become ``{prefix}.i`` and
  the leaf its PyTorch name (``("h_3", "attn", "c_attn", "kernel")`` -> ``h.3.attn.c_attn.weight``)."""
  *module, leaf = path
  parts = [re.sub(rf"^{layer_prefix}_(\d+)$", rf"{layer_prefix}.\1", m) for m in module]
  return ".".join([*parts, LEAVES[leaf]])


def read_folder(path: str | Path) -> tuple[Path, dict, dict[str, np.ndarray]]:
  """``(folder, config.json as a dict, tensors by name)``; a missing or unreadable file raises naming it.

  Reads ``model.safetensors``, or the shards a ``model.safetensors.index.json`` lists (Hugging Face's layout for
  large models).
  """
  folder = Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f"no model folder at {folder}")
  config_file, weights_file, index_file = folder / "config.json", folder / WEIGHTS, folder / WEIGHTS_INDEX
  if not config_file.is_file():
    raise FileNotFoundError(f"{folder} has no config.json")
  if weights_file.is_file():
    return folder, read_config(folder), _load_safetensors(weights_file)
  if index_file.is_file():
    return folder, read_config(folder), _load_shards(folder, index_file)
  extra = (
    " (pytorch_model.bin is not read: convert it to safetensors)" if (folder / "pytorch_model.bin").exists() else ""
  )
  raise FileNotFoundError(f"{folder} has no {WEIGHTS} (nor a sharded {WEIGHTS_INDEX}){extra}")


def _load_safetensors(file: Path) -> dict[str, np.ndarray]:
  try:
    return load_file(str(file))
  except (SafetensorError, OSError, ValueError) as e:
    raise ModelFolderError(f"{file} is corrupt or not a safetensors file: {e}") from None


def _load_shards(folder: Path, index_file: Path) -> dict[str, np.ndarray]:
  try:
    weight_map = json.loads(index_file.read_text())["weight_map"]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise ModelFolderError(f"{index_file} is not a safetensors index (no weight_map): {e}") from None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise ModelFolderError(f"{index_file}: weight_map must map tensor names to shard file names")
  tensors: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    if Path(shard).name != shard:
      raise ModelFolderError(f"{index_file} names shard {shard!r}, which is not a file of the folder")
    if not (folder / shard).is_file():
      raise FileNotFoundError(f"{index_file} lists shard {shard}, which {folder} does not hold")
    held = _load_safetensors(folder / shard)
    # Each tensor from the shard the index names for it.
    tensors.update({name: value for name, value in held.items() if weight_map.get(name) == shard})
  missing = sorted(name for name in weight_map if name not in tensors)
  if missing:
    raise ModelFolderError(f"{index_file} lists tensors its shards do not hold: {', '.join(missing[:5])}")
  return tensors


def read_config(folder: str | Path) -> dict:
  """A model folder's ``config.json`` as a dict; missing or invalid raises naming the file."""
  config_file = Path(folder) / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{Path(folder)} has no config.json")
  try:
    hf_config = json.loads(config_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ModelFolderError(f"{config_file} is not valid JSON: {e}") from None
  if not isinstance(hf_config, dict):
    raise ModelFolderError(f"{config_file} holds {type(hf_config).__name__}, not a JSON object")
  return hf_config


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
    raise ModelFolderError(f"config does not match the weights in {folder}:\n  " + "\n  ".join(problems[:20]))
  return flat


def flat_tensors(params: dict, hf_name: Callable[[tuple[str, ...]], str], *, transpose_kernels: bool, prefix=""):
  """The inverse of `match_tensors`: Hugging Face name -> contiguous float32 array."""
  tensors = {}
  for flax_path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
    value = np.asarray(value, dtype=np.float32)
    value = value.T if transpose_kernels and flax_path[-1] == "kernel" else value
    tensors[prefix + hf_name(flax_path)] = np.ascontiguousarray(value)
  return tensors


def write_folder(
  path: str | Path, tensors: dict[str, np.ndarray], hf_config: dict, *, max_shard_bytes: int | None = None
) -> Path:
  """Writes ``model.safetensors`` and ``config.json`` into ``path`` (created with its parents), readable by all as
  any file the user writes (the umask's permissions, not safetensors' owner-only default).

  With ``max_shard_bytes``, tensors go into shards of at most that size (one tensor larger than it gets a shard of its
  own) named as Hugging Face names them, with ``model.safetensors.index.json``.
  """
  folder = Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  umask = os.umask(0)
  os.umask(umask)
  shards: list[dict[str, np.ndarray]] = [{}]
  if max_shard_bytes is not None:
    if max_shard_bytes <= 0:
      raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    size = 0
    for name, value in tensors.items():
      if shards[-1] and size + value.nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = value
      size += value.nbytes
  else:
    shards = [tensors]
  for stale in [folder / WEIGHTS, folder / WEIGHTS_INDEX, *folder.glob("model-*-of-*.safetensors")]:
    stale.unlink(missing_ok=True)
  names = (
    [WEIGHTS]
    if len(shards) == 1
    else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
  )
  for name, shard in zip(names, shards, strict=True):
    save_file(shard, str(folder / name), metadata={"format": "pt"})
    (folder / name).chmod(0o666 & ~umask)
  if len(shards) > 1:
    index = {
      "metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
      "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key in shard},
    }
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))
  (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
  return folder


# Tokenizer files copied from a source folder as they are (tokenizer.json is rewritten: see `write_tokenizer`).
_TOKENIZER_FILES = ("vocab.txt", "merges.txt", "vocab.json", "special_tokens_map.json")


def write_tokenizer(
  path: str | Path,
  tokenizer: Tokenizer | str | Path,
  *,
  model_max_length: int,
  tokenizer_config: dict | None = None,
) -> Path:
  """Writes the tokenizer files that make ``transformers.AutoTokenizer.from_pretrained(path)`` tokenize exactly as
  jfast did.

  ``tokenizer.json`` is written without built-in padding or truncation (all-MiniLM-L6-v2 ships with both set to
  128, which would silently cut texts jfast saw whole); ``tokenizer_config.json`` carries the model's position
  limit as ``model_max_length``.

  Args:
    path: the model folder.
    tokenizer: a folder holding ``tokenizer.json`` (its ``vocab.txt``, ``special_tokens_map.json`` and
      ``tokenizer_config.json`` are carried over), or a `tokenizers.Tokenizer` (a jfast-trained BPE).
    model_max_length: the longest input the model takes (its position table).
    tokenizer_config: entries for ``tokenizer_config.json`` (e.g. ``tokenizer_class`` and special tokens); they
      override the source folder's.
  """
  folder = Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  config: dict = {}
  if isinstance(tokenizer, Tokenizer):
    tok = Tokenizer.from_str(tokenizer.to_str())
  else:
    source = Path(tokenizer)
    if not (source / "tokenizer.json").is_file():
      raise FileNotFoundError(f"{source} has no tokenizer.json to export with the model")
    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    for name in _TOKENIZER_FILES:
      if (source / name).is_file() and source.resolve() != folder.resolve():
        shutil.copyfile(source / name, folder / name)
    if (source / "tokenizer_config.json").is_file():
      config = json.loads((source / "tokenizer_config.json").read_text())
  tok.no_padding()
  tok.no_truncation()
  tok.save(str(folder / "tokenizer.json"))
  config = {k: v for k, v in config.items() if k not in ("name_or_path", "auto_map")}
  config.update(tokenizer_config or {})
  config["model_max_length"] = int(model_max_length)
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
  return folder


def warn_without_tokenizer(path: str | Path) -> None:
  warnings.warn(
    f"{path} is written without tokenizer files: transformers cannot tokenize for it (pass tokenizer=...)",
    stacklevel=3,
  )
