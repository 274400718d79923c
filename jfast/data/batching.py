"""One entry point, `make_batches`, that turns tokenized examples into an epoch of `Batch`es by a named strategy.

Strategies differ in how much padding they compute and how many distinct ``(rows, length)`` shapes (XLA
compilations) they produce; all of them emit the same `Batch` pytree, visit every example exactly once per epoch,
never drop the remainder (the last batch is filled to its static shape with masked-out rows), and derive their
order only from ``(seed, epoch)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from jfast.data.batch import Batch, batch_from_rows
from jfast.data.packing import batches_from_packed, pack_sequences
from jfast.data.padding import (
  OVERFLOW_POLICIES,
  apply_overflow,
  as_sequences,
  bucket_of,
  check_buckets,
  choose_buckets,
  padding_efficiency,
  round_up,
)

STRATEGIES = ("fixed", "dynamic", "bucket", "grouped", "token_budget", "packed")


def _is_int(value: object) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
  """How to cut an epoch into batches.

  Attributes:
    strategy: one of
      ``"fixed"``: every batch ``[batch_size, max_length]``; one shape.
      ``"dynamic"``: random batches padded to their own longest (rounded to ``pad_to_multiple_of``); many shapes.
      ``"bucket"``: examples grouped by bucket (the smallest bucket length that holds them), ``batch_size`` rows
      padded to that bucket (a bucket's last part-filled batch is topped up with examples of the next shorter
      buckets); batch order shuffled; at most ``len(buckets)`` shapes.
      ``"grouped"``: length-grouped batching (Hugging Face ``group_by_length``): shuffle, cut mega-batches of
      ``mega_batch_size * batch_size`` examples, sort each by length, cut batches, shuffle the batch order; each batch
      is padded to the smallest bucket that holds its longest, so shapes stay bounded by the number of buckets.
      ``"token_budget"``: like ``"bucket"`` but a batch of bucket length ``b`` has ``max(1, token_budget // b)`` rows
      (rounded down to a multiple of 8 when at least 8), so short batches are wide and long ones narrow.
      ``"packed"``: examples packed first-fit-decreasing into rows of ``row_length``, ``batch_size`` rows a batch;
      one shape.
    batch_size: rows per batch (all strategies but ``"token_budget"``).
    max_length: the longest sequence allowed; longer ones follow ``overflow``. Default: the dataset's longest. With
      ``"fixed"`` it is also the padded length; with bucketed strategies it caps the chosen buckets (give either it or
      ``buckets``, the largest bucket plays its role).
    num_buckets: how many bucket lengths `choose_buckets` may pick when ``buckets`` is None.
    buckets: explicit strictly increasing bucket lengths instead of choosing them from the data.
    token_budget: tokens per batch for ``"token_budget"`` (required there); must hold one row of the longest bucket.
    mega_batch_size: batches per mega-batch for ``"grouped"``; larger groups pad less but batches get less random.
    row_length: packed row length (default: ``max_length``, else the dataset's longest).
    max_segments: the most examples per packed row, the static slot count S. Default: no cap, and S is the most
      examples first-fit-decreasing puts in one row of this data; that packing depends only on the multiset of
      lengths, so S is the same in every epoch of the same data.
    pad_to_multiple_of: every padded length (dynamic batch lengths, chosen buckets, default lengths) is a multiple
      of this; explicit ``max_length``, ``buckets`` and ``row_length`` must already be multiples.
    overflow: ``"error"`` (raise on sequences over the limit) or ``"truncate"`` (cut them; counted in
      ``Epoch.num_truncated``).
    shuffle: shuffle by ``(seed, epoch)``; False gives a fixed order (input order for ``"fixed"`` and
      ``"dynamic"``), for evaluation.

  Example:
    >>> config = BatchingConfig(strategy="token_budget", token_budget=4096, num_buckets=4)
  """

  strategy: str = "bucket"
  batch_size: int = 32
  max_length: int | None = None
  num_buckets: int = 8
  buckets: tuple[int, ...] | None = None
  token_budget: int | None = None
  mega_batch_size: int = 50
  row_length: int | None = None
  max_segments: int | None = None
  pad_to_multiple_of: int | None = None
  overflow: str = "error"
  shuffle: bool = True

  def __post_init__(self) -> None:
    if self.strategy not in STRATEGIES:
      raise ValueError(f"unknown batching strategy {self.strategy!r}; choose one of {STRATEGIES}")
    for name in ("batch_size", "num_buckets", "mega_batch_size"):
      value = getattr(self, name)
      if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("max_length", "token_budget", "row_length", "max_segments", "pad_to_multiple_of"):
      value = getattr(self, name)
      if value is not None and (not _is_int(value) or value < 1):
        raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
    if self.overflow not in OVERFLOW_POLICIES:
      raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {self.overflow!r}")
    if self.buckets is not None:
      object.__setattr__(self, "buckets", check_buckets(self.buckets))
      if self.max_length is not None:
        raise ValueError("give buckets or max_length, not both: the largest bucket is the maximum length")
    if self.strategy == "token_budget" and self.token_budget is None:
      raise ValueError("strategy 'token_budget' needs token_budget (tokens per batch)")
    longest = self.buckets[-1] if self.buckets is not None else self.max_length
    if self.token_budget is not None and longest is not None and self.token_budget < longest:
      raise ValueError(f"token_budget {self.token_budget} is smaller than one row of the longest bucket ({longest})")
    if self.row_length is not None and self.max_length is not None and self.max_length > self.row_length:
      raise ValueError(f"max_length {self.max_length} does not fit in a packed row of row_length {self.row_length}")
    if self.pad_to_multiple_of is not None:
      m = self.pad_to_multiple_of
      for name in ("max_length", "row_length"):
        value = getattr(self, name)
        if value is not None and value % m:
          raise ValueError(f"{name} {value} is not a multiple of pad_to_multiple_of {m}")
      if self.buckets is not None and any(b % m for b in self.buckets):
        raise ValueError(f"buckets {self.buckets} are not all multiples of pad_to_multiple_of {m}")


@dataclasses.dataclass(frozen=True)
class Epoch:
  """One epoch of batches.

  Attributes:
    batches: the batches, in training order.
    num_truncated: sequences cut to fit (only with ``overflow="truncate"``).
    shapes: the distinct ``(rows, length)`` batch shapes, sorted; each costs one XLA compilation.
    example_index: per batch, ``int64[B, S]`` the input index of the example in each slot (-1 for empty slots), to
      map predictions back to examples.
  """

  batches: list[Batch]
  num_truncated: int
  shapes: tuple[tuple[int, int], ...]
  example_index: list[np.ndarray]

  @property
  def num_examples(self) -> int:
    return sum(b.num_examples for b in self.batches)

  @property
  def efficiency(self) -> float:
    """Real tokens over computed tokens, see `padding_efficiency`."""
    return padding_efficiency(self.batches)


def make_batches(
  seqs: Iterable[Sequence[int] | np.ndarray],
  labels: Sequence[int] | np.ndarray,
  config: BatchingConfig,
  *,
  pad_id: int,
  seed: int = 0,
  epoch: int = 0,
) -> Epoch:
  """Cuts tokenized examples into one epoch of `Batch`es by ``config.strategy``.

  Args:
    seqs: one non-empty 1-D array of token ids per example.
    labels: one integer label per example.
    config: the strategy and its settings.
    pad_id: the tokenizer's pad id.
    seed: with ``epoch``, the only source of randomness (``np.random.default_rng([seed, epoch])``).
    epoch: the epoch number; each gives a different order.

  Returns:
    `Epoch`: every example sits in exactly one slot of one batch; the last batch of each shape group is filled with
    masked-out rows instead of dropping or reshaping.

  Example:
    >>> config = BatchingConfig(strategy="packed", batch_size=2)
    >>> ep = make_batches([[101, 7, 102], [101, 8, 9, 102], [101, 102]], [0, 1, 1], config, pad_id=0)
    >>> ep.shapes, ep.num_examples
    (((2, 4),), 3)
  """
  arrays, lengths = as_sequences(seqs)
  labels = np.asarray(labels)
  if labels.shape != (len(arrays),) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"need one integer label per sequence ({len(arrays)}), got {labels.dtype} of shape {labels.shape}"
    )
  labels = labels.astype(np.int32)
  rng = np.random.default_rng([seed, epoch]) if config.shuffle else None
  order = rng.permutation(len(arrays)) if rng is not None else np.arange(len(arrays))
  m = config.pad_to_multiple_of

  if config.strategy == "packed":
    row_length = config.row_length or config.max_length or int(round_up(int(lengths.max()), m))
    limit = min(row_length, config.max_length or row_length)
    arrays, lengths, num_truncated = apply_overflow(arrays, lengths, limit, config.overflow, "the packed row length")
    return _packed_epoch(arrays, labels, order, rng, row_length, config, pad_id, num_truncated)

  limit = config.buckets[-1] if config.buckets is not None else config.max_length
  num_truncated = 0
  if limit is not None:
    what = "the largest bucket" if config.buckets is not None else "max_length"
    arrays, lengths, num_truncated = apply_overflow(arrays, lengths, limit, config.overflow, what)
  bs = config.batch_size
  if config.strategy == "fixed":
    length = config.max_length or int(round_up(int(lengths.max()), m))
    plan = [(chunk, length, bs) for chunk in _chunks(order, bs)]
  elif config.strategy == "dynamic":
    plan = [(chunk, int(round_up(int(lengths[chunk].max()), m)), bs) for chunk in _chunks(order, bs)]
  else:
    buckets = config.buckets or choose_buckets(lengths, config.num_buckets, multiple_of=m)
    if config.token_budget is not None and config.token_budget < buckets[-1]:
      raise ValueError(
        f"token_budget {config.token_budget} is smaller than one row of the longest bucket ({buckets[-1]})"
      )
    if config.strategy == "grouped":
      plan = _grouped_plan(order, lengths, buckets, bs, config.mega_batch_size)
    elif config.strategy == "bucket":
      plan = _bucketed_plan(order, lengths, buckets, [bs] * len(buckets))
    else:
      plan = _bucketed_plan(order, lengths, buckets, token_budget_rows(buckets, config.token_budget))
    if rng is not None:
      plan = [plan[i] for i in rng.permutation(len(plan))]

  batches, index = [], []
  for idx, length, rows in plan:
    batches.append(batch_from_rows([arrays[i] for i in idx], labels[idx], length, pad_id, rows))
    slots = np.full((rows, 1), -1, dtype=np.int64)
    slots[: idx.size, 0] = idx
    index.append(slots)
  return Epoch(batches, num_truncated, _shapes(batches), index)


def token_budget_rows(buckets: Sequence[int], token_budget: int) -> list[int]:
  """Rows per batch for each bucket under a token budget.

  Args:
    buckets: bucket lengths.
    token_budget: tokens per batch.

  Returns:
    ``max(1, token_budget // b)`` per bucket ``b``, rounded down to a multiple of 8 when at least 8 so batches
    split evenly over devices and matrix tiles.

  Example:
    >>> token_budget_rows((16, 48, 300), 1000)
    [56, 16, 3]
  """
  rows = [max(1, token_budget // b) for b in buckets]
  return [r - r % 8 if r >= 8 else r for r in rows]


def _chunks(order: np.ndarray, size: int) -> list[np.ndarray]:
  return [order[i : i + size] for i in range(0, order.size, size)]


def _shapes(batches: list[Batch]) -> tuple[tuple[int, int], ...]:
  return tuple(sorted({tuple(int(d) for d in b.shape) for b in batches}))


def _bucketed_plan(
  order: np.ndarray, lengths: np.ndarray, buckets: tuple[int, ...], rows: list[int]
) -> list[tuple[np.ndarray, int, int]]:
  # Examples run from the longest bucket down (shuffled order within a bucket), and batches are cut along that run:
  # a bucket's last part-filled batch is topped up with examples from the next smaller buckets, padded to its length,
  # so the only batch with empty rows comes last and holds the shortest examples (the cheapest place for padding).
  which = bucket_of(lengths, buckets)
  run = order[np.argsort(-which[order], kind="stable")]
  plan, i = [], 0
  while i < run.size:
    k = int(which[run[i]])
    plan.append((run[i : i + rows[k]], buckets[k], rows[k]))
    i += rows[k]
  return plan


def _grouped_plan(
  order: np.ndarray, lengths: np.ndarray, buckets: tuple[int, ...], batch_size: int, mega_batch_size: int
) -> list[tuple[np.ndarray, int, int]]:
  plan = []
  for mega in _chunks(order, mega_batch_size * batch_size):
    mega = mega[np.argsort(-lengths[mega], kind="stable")]
    for idx in _chunks(mega, batch_size):
      plan.append((idx, buckets[int(bucket_of(lengths[idx].max(), buckets))], batch_size))
  return plan


def _packed_epoch(
  arrays: list[np.ndarray],
  labels: np.ndarray,
  order: np.ndarray,
  rng: np.random.Generator | None,
  row_length: int,
  config: BatchingConfig,
  pad_id: int,
  num_truncated: int,
) -> Epoch:
  # Packing the shuffled order breaks length ties at random, so rows hold different examples each epoch while
  # first-fit-decreasing, which only sees lengths, yields the same rows-per-epoch and slots-per-row.
  packed = pack_sequences([arrays[i] for i in order], row_length, pad_id, max_segments=config.max_segments)
  row_order = rng.permutation(packed.num_rows) if rng is not None else np.arange(packed.num_rows)
  batches = batches_from_packed(packed, labels[order], config.batch_size, row_order=row_order)
  slots = packed.example_index[row_order]
  slots = np.where(slots >= 0, order[np.maximum(slots, 0)], -1)
  bs = config.batch_size
  fill = len(batches) * bs - slots.shape[0]
  slots = np.concatenate([slots, np.full((fill, slots.shape[1]), -1, dtype=slots.dtype)])
  index = [slots[i * bs : (i + 1) * bs] for i in range(len(batches))]
  return Epoch(batches, num_truncated, _shapes(batches), index)
