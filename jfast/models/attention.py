"""Re-export of `jfast.attention`, where the attention kernels live; kept so existing imports keep working."""

from jfast.attention import (
  ATTENTION_BACKENDS,
  ATTENTION_KINDS,
  Attention,
  AttentionConfig,
  blockwise_attention,
  dense_attention,
  explicit_mask,
  segment_mask,
  sliding_window_attention,
  sparse_attention,
)

__all__ = [
  "ATTENTION_BACKENDS",
  "ATTENTION_KINDS",
  "Attention",
  "AttentionConfig",
  "blockwise_attention",
  "dense_attention",
  "explicit_mask",
  "segment_mask",
  "sliding_window_attention",
  "sparse_attention",
]
