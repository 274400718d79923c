"""Data: loading, fast tokenization, and batching strategies that all yield one `Batch` pytree."""

from jfast.data.batch import Batch, batch_from_rows
from jfast.data.batching import STRATEGIES, BatchingConfig, Epoch, make_batches
from jfast.data.bpe import check_vocab, save_tokenizer, train_bpe
from jfast.data.datasets import (
  KNOWN_LABELS,
  TextDataset,
  describe_labels,
  load_classification_splits,
  load_text_classification,
)
from jfast.data.lm import (
  LMBatch,
  encode_documents,
  lm_batches,
  pack_documents,
  pad_documents,
  split_documents,
)
from jfast.data.packing import pack_sequences, rows_for_examples
from jfast.data.padding import bucket_pad, choose_buckets, dynamic_pad, fixed_pad, padding_efficiency
from jfast.data.tokenize import load_tokenizer, tokenize

__all__ = [
  "KNOWN_LABELS",
  "STRATEGIES",
  "Batch",
  "BatchingConfig",
  "Epoch",
  "LMBatch",
  "TextDataset",
  "batch_from_rows",
  "bucket_pad",
  "check_vocab",
  "choose_buckets",
  "describe_labels",
  "dynamic_pad",
  "encode_documents",
  "fixed_pad",
  "lm_batches",
  "load_classification_splits",
  "load_text_classification",
  "load_tokenizer",
  "make_batches",
  "pack_documents",
  "pack_sequences",
  "pad_documents",
  "padding_efficiency",
  "rows_for_examples",
  "save_tokenizer",
  "split_documents",
  "tokenize",
  "train_bpe",
]
