"""Padding token sequences to static lengths, and choosing those lengths.

XLA compiles one program per input shape, so every padded length is a compilation. These helpers trade padded
(wasted) tokens against the number of distinct lengths: one fixed length, the batch's own longest, or a small set of
bucket lengths chosen to waste as little as possible on the data at hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from jfast.data.batch import Batch

OVERFLOW_POLICIES = ("error", "truncate")


class Padded(NamedTuple):
  """Sequences padded into one array.

  Attributes:
    ids: ``int32[B, L]`` token ids, padding holds the pad id.
    lengths: ``int64[B]`` real tokens per row (after any truncation).
    num_truncated: how many sequences were cut to fit ``L`` (only ever non-zero with ``overflow="truncate"``).
  """

  ids: np.ndarray
  lengths: np.ndarray
  num_truncated: int


def as_sequences(seqs: Iterable[Sequence[int] | np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
  """Checks token sequences and returns them as arrays with their lengths.

  Args:
    seqs: non-empty collection of non-empty 1-D integer sequences.

  Returns:
    ``(arrays, lengths)``: one 1-D integer array per sequence, and ``int64[N]`` lengths.

  Raises:
    ValueError: no sequences, an empty sequence, or a sequence that is not 1-D integers.

  Example:
    >>> arrays, lengths = as_sequences([[101, 7, 102], [101, 102]])
    >>> lengths.tolist()
    [3, 2]
  """
  arrays = [np.asarray(s) for s in seqs]
  if not arrays:
    raise ValueError("no sequences given: need at least one")
  lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
  empty = np.flatnonzero(lengths == 0)
  if empty.size:
    raise ValueError(
      f"{empty.size} empty sequence(s) (length 0), first at index {empty[0]}: every example needs at least one token"
    )
  bad = [i for i, a in enumerate(arrays) if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer)]
  if bad:
    a = arrays[bad[0]]
    raise ValueError(
      f"{len(bad)} sequence(s) are not 1-D integer token ids, first at index {bad[0]} (shape {a.shape}, {a.dtype})"
    )
  return arrays, lengths


def apply_overflow(
  seqs: list[np.ndarray], lengths: np.ndarray, limit: int, overflow: str, what: str = "the maximum length"
) -> tuple[list[np.ndarray], np.ndarray, int]:
  """Raises on, or truncates, sequences longer than ``limit``; never cuts anything silently.

  Args:
    seqs: 1-D token arrays (from `as_sequences`).
    lengths: their lengths.
    limit: the longest allowed length.
    overflow: ``"error"`` raises ValueError naming the count and the longest length; ``"truncate"`` keeps the first
      ``limit`` tokens and reports how many sequences were cut.
    what: names ``limit`` in the error message.

  Returns:
    ``(seqs, lengths, num_truncated)``; the inputs are not modified.

  Example:
    >>> seqs, lengths, n = apply_overflow([np.arange(1, 6)], np.array([5]), 3, "truncate")
    >>> seqs[0].tolist(), n
    ([1, 2, 3], 1)
  """
  if overflow not in OVERFLOW_POLICIES:
    raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
  over = np.flatnonzero(lengths > limit)
  if not over.size:
    return seqs, lengths, 0
  if overflow == "error":
    raise ValueError(
      f"{over.size} sequence(s) are longer than {what} {limit} (longest: {int(lengths.max())} tokens); raise the "
      "limit or pass overflow='truncate' to cut them"
    )
  seqs = list(seqs)
  for i in over:
    seqs[i] = seqs[i][:limit]
  return seqs, np.minimum(lengths, limit), int(over.size)


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
  """Checks that bucket lengths are positive integers in strictly increasing order.

  Args:
    buckets: candidate bucket lengths.

  Returns:
    The buckets as a tuple of Python ints.

  Example:
    >>> check_buckets([16, 32, 64])
    (16, 32, 64)
  """
  b = np.asarray(buckets)
  if b.ndim != 1 or b.size == 0:
    raise ValueError(f"buckets must be a non-empty 1-D sequence of lengths, got {buckets!r}")
  if not np.issubdtype(b.dtype, np.integer):
    raise ValueError(f"bucket lengths must be integers, got {buckets!r}")
  if b.min() < 1:
    raise ValueError(f"bucket lengths must be positive, got {tuple(b.tolist())}")
  if np.any(np.diff(b) <= 0):
    raise ValueError(f"buckets must be strictly increasing, got {tuple(b.tolist())}")
  return tuple(int(x) for x in b)


def round_up(n: int | np.ndarray, multiple: int | None) -> int | np.ndarray:
  """Rounds ``n`` up to a multiple of ``multiple`` (unchanged when ``multiple`` is None).

  Example:
    >>> round_up(13, 8)
    16
  """
  if multiple is None:
    return n
  return -(-n // multiple) * multiple


def bucket_of(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
  """Index of the smallest bucket that holds each length (``len(buckets)`` where none does).

  Example:
    >>> bucket_of(np.array([3, 16, 17]), (16, 32)).tolist()
    [0, 0, 1]
  """
  return np.searchsorted(np.asarray(buckets), lengths, side="left")


def _scatter(seqs: list[np.ndarray], lengths: np.ndarray, length: int, pad_id: int) -> np.ndarray:
  ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
  flat = np.concatenate(seqs).astype(np.int32)
  row = np.repeat(np.arange(len(seqs)), lengths)
  col = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  ids[row, col] = flat
  return ids


def fixed_pad(
  seqs: Iterable[Sequence[int] | np.ndarray], max_length: int, pad_id: int, *, overflow: str = "error"
) -> Padded:
  """Pads every sequence to one length.

  Args:
    seqs: non-empty 1-D integer sequences.
    max_length: the padded length L.
    pad_id: the id written into padding.
    overflow: what to do with sequences longer than ``max_length``: ``"error"`` or ``"truncate"`` (counted in
      ``num_truncated``).

  Returns:
    `Padded` with ``ids`` of shape ``[len(seqs), max_length]``.

  Example:
    >>> fixed_pad([[101, 7, 102]], 5, 0).ids.tolist()
    [[101, 7, 102, 0, 0]]
  """
  if max_length < 1:
    raise ValueError(f"max_length must be positive, got {max_length}")
  arrays, lengths = as_sequences(seqs)
  arrays, lengths, n = apply_overflow(arrays, lengths, max_length, overflow, "max_length")
  return Padded(_scatter(arrays, lengths, max_length, pad_id), lengths, n)


def dynamic_pad(
  seqs: Iterable[Sequence[int] | np.ndarray], pad_id: int, *, pad_to_multiple_of: int | None = None
) -> Padded:
  """Pads to the longest sequence given, optionally rounded up to a multiple; never truncates.

  Args:
    seqs: non-empty 1-D integer sequences.
    pad_id: the id written into padding.
    pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 for tensor-core tiles).

  Returns:
    `Padded` with ``ids`` of shape ``[len(seqs), L]``.

  Example:
    >>> dynamic_pad([[1, 2, 3], [4]], 0, pad_to_multiple_of=4).ids.shape
    (2, 4)
  """
  if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
    raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
  arrays, lengths = as_sequences(seqs)
  length = int(round_up(int(lengths.max()), pad_to_multiple_of))
  return Padded(_scatter(arrays, lengths, length, pad_id), lengths, 0)


def bucket_pad(
  seqs: Iterable[Sequence[int] | np.ndarray], buckets: Sequence[int], pad_id: int, *, overflow: str = "error"
) -> Padded:
  """Pads to the smallest bucket length that holds the longest sequence.

  Args:
    seqs: non-empty 1-D integer sequences.
    buckets: strictly increasing positive lengths (e.g. from `choose_buckets`).
    pad_id: the id written into padding.
    overflow: what to do with sequences longer than the largest bucket: ``"error"`` or ``"truncate"`` (counted in
      ``num_truncated``).

  Returns:
    `Padded` with ``ids`` of shape ``[len(seqs), bucket]``.

  Example:
    >>> bucket_pad([[1, 2, 3], [4]], (2, 4, 8), 0).ids.shape
    (2, 4)
  """
  buckets = check_buckets(buckets)
  arrays, lengths = as_sequences(seqs)
  arrays, lengths, n = apply_overflow(arrays, lengths, buckets[-1], overflow, "the largest bucket")
  length = buckets[int(bucket_of(lengths.max(), buckets))]
  return Padded(_scatter(arrays, lengths, length, pad_id), lengths, n)


def choose_buckets(lengths: Sequence[int] | np.ndarray, k: int, *, multiple_of: int | None = None) -> tuple[int, ...]:
  """Picks at most ``k`` bucket lengths that minimise the total padded tokens of the given lengths.

  Each sequence is charged the smallest bucket that holds it. The search is exact: dynamic programming over the
  distinct lengths (an optimal bucket always sits on a distinct length, since lowering it to the longest length it
  holds only saves tokens), ``O(k * n_distinct**2)`` vectorised.

  Args:
    lengths: positive sequence lengths (the whole dataset, or a sample of it).
    k: the most buckets (XLA compilations) allowed, at least 1.
    multiple_of: if given, every bucket is a multiple of this; lengths are rounded up first, which keeps the search
      exact over such buckets.

  Returns:
    Sorted bucket lengths, at most ``k`` of them; the last is the (rounded) maximum length, so every sequence fits.

  Example:
    >>> choose_buckets([3, 3, 4, 10, 11, 30], 3)
    (4, 11, 30)
  """
  if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
    raise ValueError(f"k (the number of buckets) must be an integer >= 1, got {k!r}")
  if multiple_of is not None and multiple_of < 1:
    raise ValueError(f"multiple_of must be positive, got {multiple_of}")
  lengths = np.asarray(lengths)
  if lengths.ndim != 1 or lengths.size == 0:
    raise ValueError(f"lengths must be a non-empty 1-D array, got shape {lengths.shape}")
  if not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f"lengths must be integers, got {lengths.dtype}")
  if lengths.min() < 1:
    raise ValueError(f"lengths must be positive (empty sequences cannot be bucketed), got a length {lengths.min()}")
  values, counts = np.unique(round_up(lengths.astype(np.int64), multiple_of), return_counts=True)
  m = values.size
  if k >= m:
    return tuple(int(v) for v in values)
  # cum[j]: how many sequences have one of the j smallest distinct lengths.
  cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
  # group[i, j]: cost of one bucket at values[j-1] holding distinct lengths i..j-1, i.e. prefix j minus prefix i.
  i_idx, j_idx = np.arange(m + 1)[:, None], np.arange(m + 1)[None, :]
  group = np.where(i_idx < j_idx, np.concatenate([[0], values])[None, :] * (cum[None, :] - cum[:, None]), np.inf)
  # best[j]: least cost covering the j smallest distinct lengths with the buckets used so far, the last at values[j-1].
  best = np.full(m + 1, np.inf)
  best[0] = 0.0
  parents = []
  for _ in range(k):
    total = best[:, None] + group
    parent = np.argmin(total, axis=0)
    best = total[parent, np.arange(m + 1)]
    best[0] = np.inf  # an empty prefix cannot end in a bucket
    parents.append(parent)
  # Exactly k buckets is optimal among <= k: splitting a bucket never adds padding, and k < m leaves room to split.
  chosen, j = [], m
  for parent in reversed(parents):
    chosen.append(int(values[j - 1]))
    j = int(parent[j])
  return tuple(reversed(chosen))


def padding_efficiency(batches: Iterable[Batch]) -> float:
  """Real tokens (``segment_ids != 0``) over computed tokens (``B * L`` summed) across batches.

  Args:
    batches: `Batch`es, e.g. ``make_batches(...).batches``.

  Returns:
    A fraction in ``(0, 1]``; 1 means no padding at all.

  Example:
    >>> from jfast.data.batch import batch_from_rows
    >>> padding_efficiency([batch_from_rows([np.array([5, 6, 7])], np.array([1]), 4, 0)])
    0.75
  """
  real = computed = 0
  for batch in batches:
    real += batch.num_real_tokens
    computed += batch.input_ids.size
  if computed == 0:
    raise ValueError("no batches (or only empty ones) to measure padding efficiency on")
  return real / computed
