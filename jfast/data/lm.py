"""Language-model data: raw text -> documents -> token stream -> packed rows, and the next-token loss.

Packing concatenates the documents and cuts the stream into rows of exactly L inputs (no padding except the tail of
the last row). Each row numbers the documents it holds 1..S in ``segment_ids``, so attention never crosses a
document boundary, positions restart at every document, and a target is real only when the next token belongs to
the same document. The loss divides by those real targets, never by row slots, so a batch's mean is the same however
its documents were cut.

An `LMBatch` fits `jfast.training.make_train_step` with `jfast.training.causal_lm_loss` unchanged: its
``example_mask`` marks real *targets*, so the step's "examples" count (and in-step gradient accumulation with
``normalize_by="examples"``) normalises by real targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class LMBatch(NamedTuple):
  """Rows of a causal language-model batch (numpy on the host, jax arrays inside the step).

  Attributes:
    input_ids: ``int32[B, L]`` tokens; padding holds the pad id.
    segment_ids: ``int32[B, L]``; 0 = padding, 1..S number the documents (or document pieces) in a row.
    position_ids: ``int32[B, L]``; restart at 0 at each segment.
    labels: ``int32[B, L]`` the next token of each position (0 where there is none).
    example_mask: ``bool[B, L]`` True where ``labels`` is a real target: the next token exists and is in the same
      document.
  """

  input_ids: np.ndarray
  segment_ids: np.ndarray
  position_ids: np.ndarray
  labels: np.ndarray
  example_mask: np.ndarray

  @property
  def shape(self) -> tuple[int, int]:
    return self.input_ids.shape

  @property
  def num_real_tokens(self) -> int:
    return int(np.count_nonzero(self.segment_ids))

  @property
  def num_targets(self) -> int:
    return int(np.count_nonzero(self.example_mask))


def split_documents(text: str, separator: str = "\n\n") -> list[str]:
  """Splits raw text into non-empty documents (tiny-shakespeare: one speech per blank-line-separated block).

  Raises:
    ValueError: when the text holds no non-whitespace document.
  """
  docs = [d.strip("\n") for d in text.split(separator)]
  docs = [d for d in docs if d.strip()]
  if not docs:
    raise ValueError("empty corpus: the text holds no document")
  return docs


def encode_documents(tokenizer, docs: Sequence[str], *, bos_id: int | None = None) -> list[np.ndarray]:
  """Tokenizes documents in one batched Rust call; ``bos_id`` (e.g. ``<|endoftext|>``) starts every document, so
  its first real token is a target too."""
  if not docs:
    raise ValueError("empty corpus: no documents to encode")
  out = []
  for enc in tokenizer.encode_batch(list(docs), add_special_tokens=False):
    ids = np.asarray(enc.ids, dtype=np.int32)
    out.append(ids if bos_id is None else np.concatenate([np.array([bos_id], np.int32), ids]))
  return out


def _check_docs(docs: Sequence[np.ndarray], row_length: int, vocab_size: int | None) -> list[np.ndarray]:
  if row_length < 1:
    raise ValueError(f"row_length must be positive, got {row_length}")
  arrays = [np.asarray(d, dtype=np.int64).reshape(-1) for d in docs]
  arrays = [a for a in arrays if a.size]
  if sum(a.size for a in arrays) < 2:
    raise ValueError("empty corpus: language-model rows need at least two tokens")
  if vocab_size is not None:
    top = max(int(a.max()) for a in arrays)
    low = min(int(a.min()) for a in arrays)
    if top >= vocab_size or low < 0:
      raise ValueError(f"token ids span [{low}, {top}] but the model's vocabulary has {vocab_size} entries")
  return arrays


def pack_documents(
  docs: Sequence[np.ndarray], row_length: int, *, pad_id: int = 0, vocab_size: int | None = None
) -> LMBatch:
  """Concatenates documents into one stream and cuts it into rows of ``row_length`` inputs.

  Row r holds stream tokens ``[r*L, r*L + L)`` as inputs and ``[r*L + 1, r*L + L + 1)`` as labels, so every stream
  token is an input once and a target once. A document cut by a row boundary continues as a new segment (position 0)
  in the next row.

  Args:
    docs: token id arrays, one per document.
    row_length: L.
    pad_id: fills the tail of the last row.
    vocab_size: when given, ids outside ``[0, vocab_size)`` raise (an embedding gather would clamp them silently).

  Returns:
    An `LMBatch` of all rows ``[R, L]``.

  Example:
    >>> rows = pack_documents([np.array([5, 6, 7]), np.array([8, 9])], 3)
    >>> rows.segment_ids.tolist(), rows.example_mask.astype(int).tolist()
    ([[1, 1, 1], [1, 0, 0]], [[1, 1, 0], [1, 0, 0]])
  """
  arrays = _check_docs(docs, row_length, vocab_size)
  lengths = np.array([a.size for a in arrays])
  stream = np.concatenate(arrays)
  doc = np.repeat(np.arange(len(arrays)), lengths)
  doc_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
  n = stream.size
  rows = -(-(n - 1) // row_length)
  idx_RxL = np.arange(rows * row_length).reshape(rows, row_length)
  real_RxL = idx_RxL < n - 1
  cur = np.minimum(idx_RxL, n - 2)
  nxt = cur + 1
  row_start_R = idx_RxL[:, :1]
  target_RxL = real_RxL & (doc[nxt] == doc[cur])
  return LMBatch(
    input_ids=np.where(real_RxL, stream[cur], pad_id).astype(np.int32),
    segment_ids=np.where(real_RxL, doc[cur] - doc[row_start_R] + 1, 0).astype(np.int32),
    position_ids=np.where(real_RxL, cur - np.maximum(doc_start[cur], row_start_R), 0).astype(np.int32),
    labels=np.where(target_RxL, stream[nxt], 0).astype(np.int32),
    example_mask=target_RxL,
  )


def pad_documents(
  docs: Sequence[np.ndarray], row_length: int, *, pad_id: int = 0, vocab_size: int | None = None
) -> LMBatch:
  """The unpacked baseline: one document per row, padded to ``row_length``; longer documents take several rows.

  Same targets as `pack_documents` within each document, more rows (the padding it costs is what packing saves).
  """
  arrays = _check_docs(docs, row_length, vocab_size)
  pieces = [a[s : s + row_length + 1] for a in arrays for s in range(0, a.size - 1, row_length)]
  if not pieces:
    raise ValueError("empty corpus: every document is a single token")
  rows = len(pieces)
  out = LMBatch(
    input_ids=np.full((rows, row_length), pad_id, np.int32),
    segment_ids=np.zeros((rows, row_length), np.int32),
    position_ids=np.zeros((rows, row_length), np.int32),
    labels=np.zeros((rows, row_length), np.int32),
    example_mask=np.zeros((rows, row_length), bool),
  )
  for r, piece in enumerate(pieces):
    k = piece.size - 1
    out.input_ids[r, :k] = piece[:-1]
    out.segment_ids[r, :k] = 1
    out.position_ids[r, :k] = np.arange(k)
    out.labels[r, :k] = piece[1:]
    out.example_mask[r, :k] = True
  return out


def lm_batches(rows: LMBatch, batch_size: int, *, seed: int | None = None, epoch: int = 0) -> list[LMBatch]:
  """Cuts rows into batches of ``batch_size`` rows (one static shape), the last filled with empty rows.

  Args:
    rows: from `pack_documents` or `pad_documents`.
    batch_size: rows per batch.
    seed: shuffles the row order (a fresh order per ``epoch``); None keeps it.
    epoch: selects the shuffle.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  num = rows.input_ids.shape[0]
  order = np.arange(num) if seed is None else np.random.default_rng([seed, epoch]).permutation(num)
  fill = -num % batch_size
  fields = []
  for field in rows:
    a = field[order]
    fields.append(np.concatenate([a, np.zeros((fill, *a.shape[1:]), a.dtype)]) if fill else a)
  return [LMBatch(*(f[b : b + batch_size] for f in fields)) for b in range(0, num + fill, batch_size)]
