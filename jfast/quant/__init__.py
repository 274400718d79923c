"""Int8 quantization for inference: post-training (dynamic or calibrated static), quantization-aware fine-tuning,
and quantized checkpoints. See docs/quantization.md."""

from jfast.quant.dense import QUANTIZATION_MODES, QUANTIZED_LAYERS, QuantDense
from jfast.quant.io import load_quantized, save_quantized
from jfast.quant.numerics import (
  INT8_MAX,
  MAX_CONTRACTION,
  dequantize_weight,
  fake_quant,
  int8_matmul,
  quantize_per_token,
  quantize_weight,
)
from jfast.quant.ptq import calibrate, dequantize, is_quantized, quantizable_layers, quantize, tree_bytes

__all__ = [
  "INT8_MAX",
  "MAX_CONTRACTION",
  "QUANTIZATION_MODES",
  "QUANTIZED_LAYERS",
  "QuantDense",
  "calibrate",
  "dequantize",
  "dequantize_weight",
  "fake_quant",
  "int8_matmul",
  "is_quantized",
  "load_quantized",
  "quantizable_layers",
  "quantize",
  "quantize_per_token",
  "quantize_weight",
  "save_quantized",
  "tree_bytes",
]
