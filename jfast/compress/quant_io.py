"""Quantized checkpoints: one safetensors file holding int8 kernels, float scales and the model config.

safetensors (already a dependency, through the Hugging Face weight interop) stores int8 tensors natively and
bit-exactly, is a single file whose size on disk is the model's size, and loads without executing code. Orbax
(`jfast.training.Checkpointer`) stays the format for training state; an inference artefact wants one small file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file, safe_open, save_file

from jfast.models.bert import BertConfig
from jfast.nn.attention_config import AttentionConfig
from jfast.nn.int8 import quantize_weight

FORMAT = "jfast-int8"
_INT8_SUFFIX, _SCALE_SUFFIX = ":int8", ":row_scale"


def save_quantized(path: str | Path, params: Any, *, config: Any = None, embeddings: str = "float32") -> int:
  """Writes a (quantized or float) parameter tree, and optionally its `BertConfig`, to one safetensors file.

  Args:
    path: the file to write (parents are created).
    params: a nested dict of arrays, e.g. `jfast.compress.quantize`'s output.
    config: a `BertConfig` (frozen dataclass) stored as JSON metadata, so `load_quantized` rebuilds the model.
    embeddings: ``"float32"`` stores embedding tables as they are (the file round-trips bit for bit);
      ``"int8"`` stores each table row as int8 with one float32 scale per row, which `load_quantized` turns back
      into float32 rows (each entry within half a step of its row's scale). For a small BERT the word-embedding
      table is most of the file (MiniLM: 47 of 91 MB), so this is where the remaining size goes.

  Returns:
    The file's size on disk in bytes.

  Example:
    >>> nbytes = save_quantized("runs/minilm-int8.safetensors", qparams, config=qconfig)  # doctest: +SKIP
    >>> config, qparams = load_quantized("runs/minilm-int8.safetensors")  # doctest: +SKIP
  """
  file = Path(path)
  file.parent.mkdir(parents=True, exist_ok=True)
  flat = traverse_util.flatten_dict(jax.device_get(dict(params)), sep="/")
  if embeddings not in ("float32", "int8"):
    raise ValueError(f"embeddings must be 'float32' or 'int8', got {embeddings!r}")
  tensors = {}
  for name, value in flat.items():
    value = np.asarray(value)
    if embeddings == "int8" and name.endswith("/embedding") and value.ndim == 2:
      # Per-row scales: a row is one token's vector, the unit the lookup reads.
      q_VxD, scale_D = quantize_weight(jnp.asarray(value.T, jnp.float32))
      tensors[name + _INT8_SUFFIX], tensors[name + _SCALE_SUFFIX] = np.asarray(q_VxD).T, np.asarray(scale_D)
      continue
    tensors[name] = np.ascontiguousarray(value)
  tensors = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
  # safetensors gives 0-d arrays back as shape (1,): the names of scalars (input_scale) travel in the metadata.
  metadata = {
    "format": FORMAT,
    "embeddings": embeddings,
    "scalars": json.dumps(sorted(n for n, v in flat.items() if np.ndim(v) == 0)),
  }
  if config is not None:
    metadata["config"] = json.dumps(dataclasses.asdict(config))
  save_file(tensors, str(file), metadata=metadata)
  return file.stat().st_size


def load_quantized(path: str | Path) -> tuple[Any, dict]:
  """Reads what `save_quantized` wrote.

  Returns:
    ``(config or None, params)``; arrays come back with the dtypes and values they were saved with, bit for bit.
  """
  file = Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"no quantized checkpoint at {file}")
  try:
    with safe_open(str(file), framework="numpy") as f:
      metadata = f.metadata() or {}
    tensors = load_file(str(file))
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{file} is corrupt or not a safetensors file: {e}") from None
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{file} was not written by jfast.compress.save_quantized (format {metadata.get('format')!r})")
  for name in [n for n in tensors if n.endswith(_INT8_SUFFIX)]:
    base = name.removesuffix(_INT8_SUFFIX)
    q, scale = tensors.pop(name), tensors.pop(base + _SCALE_SUFFIX)
    tensors[base] = q.astype(np.float32) * scale[:, None]
  for name in json.loads(metadata.get("scalars", "[]")):
    tensors[name] = tensors[name].reshape(())
  params = traverse_util.unflatten_dict(tensors, sep="/")
  config = None
  if "config" in metadata:
    fields = json.loads(metadata["config"])
    fields["attention"] = AttentionConfig(**fields.get("attention", {}))
    known = {f.name for f in dataclasses.fields(BertConfig)}
    config = BertConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known})
  return config, params
