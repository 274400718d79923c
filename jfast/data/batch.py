"""The one batch pytree every batching strategy produces and every step consumes."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Batch(NamedTuple):
  """A host-side batch of token rows, packed or not.

  Every strategy (fixed, dynamic, bucket, grouped, token_budget, packed) yields this one shape of pytree, so the
  train step never learns which strategy made it. An unpacked batch is the packed case with one segment per row.

  Attributes:
    input_ids: ``int32[B, L]`` token ids; padding holds the tokenizer's pad id.
    segment_ids: ``int32[B, L]``; 0 marks padding, ``1..S`` number the examples inside a row. The model builds its
      attention mask from these alone: tokens attend only within their own segment.
    position_ids: ``int32[B, L]``; positions restart at 0 at the start of every segment.
    labels: ``int32[B, S]`` one label per example slot.
    cls_positions: ``int32[B, S]`` the column of each example's first token ([CLS]) in its row.
    example_mask: ``bool[B, S]``; False for empty slots (a row holding fewer than S examples, or a padding row that
      fills the last batch of an epoch to its static shape). Losses and metrics average over True slots only.
  """

  input_ids: np.ndarray
  segment_ids: np.ndarray
  position_ids: np.ndarray
  labels: np.ndarray
  cls_positions: np.ndarray
  example_mask: np.ndarray

  @property
  def shape(self) -> tuple[int, int]:
    """(rows, length): the static shape that decides XLA compilation."""
    return self.input_ids.shape

  @property
  def num_examples(self) -> int:
    return int(np.sum(self.example_mask))

  @property
  def num_real_tokens(self) -> int:
    return int(np.count_nonzero(self.segment_ids))


def batch_from_rows(
  rows: list[np.ndarray], labels: np.ndarray, length: int, pad_id: int, num_rows: int | None = None
) -> Batch:
  """Builds an unpacked `Batch` (one example per row) from token rows that already fit in ``length``.

  Args:
    rows: token id arrays, each at most ``length`` long.
    labels: one label per row.
    length: the padded row length L.
    pad_id: the id written into padding.
    num_rows: the static row count B; rows past ``len(rows)`` are padding rows with ``example_mask`` False.

  Returns:
    A `Batch` with S = 1.
  """
  num_rows = len(rows) if num_rows is None else num_rows
  if len(rows) > num_rows:
    raise ValueError(f"{len(rows)} rows do not fit in a batch of {num_rows} rows")
  lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
  if lengths.size and lengths.max() > length:
    raise ValueError(f"a row of {lengths.max()} tokens does not fit in length {length}")
  input_ids = np.full((num_rows, length), pad_id, dtype=np.int32)
  if rows:
    flat = np.concatenate(rows).astype(np.int32)
    row_idx = np.repeat(np.arange(len(rows)), lengths)
    col_idx = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    input_ids[row_idx, col_idx] = flat
  cols = np.arange(length)[None, :]
  real = cols < np.pad(lengths, (0, num_rows - len(rows)))[:, None]
  segment_ids = real.astype(np.int32)
  position_ids = np.where(real, cols, 0).astype(np.int32)
  label_col = np.zeros((num_rows, 1), dtype=np.int32)
  label_col[: len(rows), 0] = labels
  example_mask = np.zeros((num_rows, 1), dtype=bool)
  example_mask[: len(rows), 0] = lengths > 0
  return Batch(
    input_ids=input_ids,
    segment_ids=segment_ids,
    position_ids=position_ids,
    labels=label_col,
    cls_positions=np.zeros((num_rows, 1), dtype=np.int32),
    example_mask=example_mask,
  )
