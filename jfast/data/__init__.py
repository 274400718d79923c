"""Data: loading, fast tokenization, and batching strategies that all yield one `Batch` pytree."""

from jfast.data.batch import Batch, batch_from_rows
from jfast.data.batching import STRATEGIES, BatchingConfig, Epoch, make_batches
from jfast.data.datasets import KNOWN_LABELS, TextDataset, load_text_classification
from jfast.data.packing import pack_sequences
from jfast.data.padding import bucket_pad, choose_buckets, dynamic_pad, fixed_pad, padding_efficiency
from jfast.data.tokenize import load_tokenizer, tokenize

__all__ = [
  "KNOWN_LABELS",
  "STRATEGIES",
  "Batch",
  "BatchingConfig",
  "Epoch",
  "TextDataset",
  "batch_from_rows",
  "bucket_pad",
  "choose_buckets",
  "dynamic_pad",
  "fixed_pad",
  "load_text_classification",
  "load_tokenizer",
  "make_batches",
  "pack_sequences",
  "padding_efficiency",
  "tokenize",
]
