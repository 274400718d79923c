"""Layers and kernels the models are built from: attention behind one entry point (dense, sliding window,
blockwise, global tokens), the Dense/LayerNorm factory (`layers`), dropout, activations, fused projections, the int8
Dense layer, the table of remat policies, and scanned layers with their stacked parameter layout.

The functional kernels `jfast.nn.dropout.dropout` and `jfast.nn.sparse_attention.sparse_attention` are reached
through their modules, whose names they share."""

from jfast.nn.activations import ACTIVATIONS, gelu
from jfast.nn.attention import (
  Attention,
  blockwise_attention,
  dense_attention,
  explicit_mask,
  masked_attention,
  segment_mask,
  sliding_window_attention,
)
from jfast.nn.attention_config import ATTENTION_BACKENDS, ATTENTION_KINDS, AttentionConfig
from jfast.nn.dropout import Dropout, keep_mask
from jfast.nn.fused import fused_projections
from jfast.nn.int8 import (
  INT8_MAX,
  MAX_CONTRACTION,
  dequantize_weight,
  fake_quant,
  int8_matmul,
  quantize_per_token,
  quantize_weight,
)
from jfast.nn.layers import DTYPES, dense, layer_norm, rms_norm
from jfast.nn.lora import (
  LoRAConfig,
  LoRAModel,
  add_lora,
  lora_mask,
  merge_lora,
  split_lora,
  trainable_count,
  with_lora,
)
from jfast.nn.quant_dense import QUANTIZATION_MODES, QUANTIZED_LAYERS, QuantDense
from jfast.nn.remat import REMAT_POLICIES, TAGS, remat_policy
from jfast.nn.rotary import RopeScaling, apply_rotary, rope_frequencies, rotary
from jfast.nn.scan import STACKED_GROUPS, match_layout, scan_layers, stack_layers, unstack_layers

__all__ = [
  "ACTIVATIONS",
  "ATTENTION_BACKENDS",
  "ATTENTION_KINDS",
  "DTYPES",
  "INT8_MAX",
  "MAX_CONTRACTION",
  "QUANTIZATION_MODES",
  "QUANTIZED_LAYERS",
  "REMAT_POLICIES",
  "STACKED_GROUPS",
  "TAGS",
  "Attention",
  "AttentionConfig",
  "Dropout",
  "LoRAConfig",
  "LoRAModel",
  "QuantDense",
  "RopeScaling",
  "add_lora",
  "apply_rotary",
  "blockwise_attention",
  "dense",
  "dense_attention",
  "dequantize_weight",
  "explicit_mask",
  "fake_quant",
  "fused_projections",
  "gelu",
  "int8_matmul",
  "keep_mask",
  "layer_norm",
  "lora_mask",
  "masked_attention",
  "match_layout",
  "merge_lora",
  "quantize_per_token",
  "quantize_weight",
  "remat_policy",
  "rms_norm",
  "rope_frequencies",
  "rotary",
  "scan_layers",
  "segment_mask",
  "sliding_window_attention",
  "split_lora",
  "stack_layers",
  "trainable_count",
  "unstack_layers",
  "with_lora",
]
