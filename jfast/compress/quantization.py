"""Post-training quantization of a parameter tree, and activation calibration for static scales.

`quantize` walks a float parameter tree (``BertModel`` or ``BertForSequenceClassification``), replaces the kernel
of every layer named in ``QUANTIZED_LAYERS`` by ``{kernel: int8, kernel_scale: float32}`` (plus ``input_scale``
under static calibration) and leaves everything else (embeddings, norms, pooler, classifier, biases) as it is. The
result is what a model built with ``config.replace(quantization=mode)`` takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

import jfast.nn.int8 as numerics
from jfast.cpu.dots import MixedDense
from jfast.nn.quant_dense import QUANTIZED_LAYERS, QuantDense
from jfast.nn.scan import unrolled, unstack_layers
from jfast.training.losses import classifier_logits

Path = tuple[str, ...]


def _flat(params: Any) -> dict[Path, Any]:
  if not isinstance(params, Mapping):
    raise TypeError(f"params must be a nested dict of arrays, got {type(params).__name__}")
  return traverse_util.flatten_dict(dict(params))


def is_quantized(params: Any) -> bool:
  """True when any layer of ``params`` already holds an int8 kernel."""
  return any(path[-1] == "kernel_scale" or np.dtype(v.dtype) == np.int8 for path, v in _flat(params).items())


def quantizable_layers(params: Any, layers: Iterable[str] = QUANTIZED_LAYERS) -> list[Path]:
  """Module paths (e.g. ``('bert', 'encoder_layer_0', 'query')``) whose kernel `quantize` would convert; scanned
  layers' stacked parameters are named per layer (quantized models run their layers unrolled)."""
  names = set(layers)
  params = unstack_layers(params)
  return sorted(path[:-1] for path in _flat(params) if path[-1] == "kernel" and path[-2] in names)


def quantize(
  params: Any,
  *,
  mode: str = "int8",
  input_scales: Mapping[Path, float] | None = None,
  layers: Iterable[str] = QUANTIZED_LAYERS,
) -> dict:
  """Quantizes a float parameter tree for inference with int8 weights and activations.

  Args:
    params: float parameters of a `BertModel` / `BertForSequenceClassification` (``"none"`` or ``"qat"`` model),
      in either layout (scanned layers' stacks are split: a quantized model runs its layers unrolled).
    mode: ``"int8"`` (activation scales per token at run time) or ``"int8-static"`` (one activation scale per
      layer, from ``input_scales``).
    input_scales: for ``"int8-static"``: `calibrate`'s output, one scale per quantized layer.
    layers: module names to quantize; the default is the encoder's six projections.

  Returns:
    A new nested dict: each quantized layer holds ``kernel`` int8 ``[in, out]`` (per-output-channel symmetric),
    ``kernel_scale`` float32 ``[out]`` and its float ``bias``; other leaves are the inputs, unchanged.

  Raises:
    ValueError: the tree is already quantized, has none of ``layers``, a kernel is too wide for exact int32
      accumulation, or static scales are missing. TypeError: a kernel is not float32/bfloat16/float16.

  Example:
    >>> qparams = quantize(params)  # doctest: +SKIP
    >>> model = BertForSequenceClassification(config.replace(quantization="int8"))  # doctest: +SKIP
    >>> logits = model.apply({"params": qparams}, input_ids, attention_mask)  # doctest: +SKIP
  """
  if mode not in ("int8", "int8-static"):
    raise ValueError(f"quantize mode must be 'int8' or 'int8-static', got {mode!r}")
  params = unstack_layers(params)
  flat = _flat(params)
  if is_quantized(params):
    raise ValueError("params are already quantized (int8 kernels / kernel_scale found); quantize the float tree")
  targets = quantizable_layers(params, layers)
  if not targets:
    raise ValueError(f"no layer named {sorted(set(layers))} with a kernel in params; nothing to quantize")
  if mode == "int8-static":
    if input_scales is None:
      raise ValueError("mode 'int8-static' needs input_scales (from jfast.compress.calibrate)")
    missing = [path for path in targets if path not in input_scales]
    if missing:
      raise ValueError(f"input_scales has no scale for {len(missing)} layers, e.g. {'/'.join(missing[0])}")
  out = dict(flat)
  for path in targets:
    kernel = flat[(*path, "kernel")]
    numerics._check_float(kernel, "/".join((*path, "kernel")))
    if kernel.shape[0] > numerics.MAX_CONTRACTION:
      raise ValueError(
        f"{'/'.join(path)} contracts over {kernel.shape[0]} inputs; int32 accumulation is exact only up to "
        f"{numerics.MAX_CONTRACTION}"
      )
    out[(*path, "kernel")], out[(*path, "kernel_scale")] = numerics.quantize_weight(jnp.asarray(kernel))
    if mode == "int8-static":
      scale = float(input_scales[path])
      if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"input scale of {'/'.join(path)} must be positive and finite, got {scale}")
      out[(*path, "input_scale")] = jnp.asarray(scale, jnp.float32)
  return traverse_util.unflatten_dict(out)


def dequantize(qparams: Any) -> dict:
  """The float tree an int8 tree stands for (``kernel * kernel_scale``; ``input_scale`` dropped)."""
  flat = _flat(qparams)
  out = {}
  for path, value in flat.items():
    if path[-1] in ("kernel_scale", "input_scale"):
      continue
    if path[-1] == "kernel" and (*path[:-1], "kernel_scale") in flat:
      value = numerics.dequantize_weight(value, flat[(*path[:-1], "kernel_scale")])
    out[path] = value
  return traverse_util.unflatten_dict(out)


def calibrate(
  model: nn.Module,
  params: Any,
  batches: Iterable,
  *,
  percentile: float = 100.0,
  layers: Iterable[str] = QUANTIZED_LAYERS,
) -> dict[Path, float]:
  """Static activation scales: runs the float model on calibration batches and records each layer's input range.

  Args:
    model: the float (or ``"qat"``) model, e.g. ``BertForSequenceClassification(config)``.
    params: its parameters.
    batches: `jfast.data.Batch`es drawn from the training data (never the evaluation set); padding tokens are
      excluded from the statistics.
    percentile: of the per-token absolute maxima over all real calibration tokens; 100 is the absolute maximum,
      lower values clip rare outlier tokens in exchange for finer steps for the rest.
    layers: module names to calibrate (the same as `quantize`'s).

  Returns:
    ``{module_path: scale}`` for `quantize(..., mode="int8-static", input_scales=...)`.

  Example:
    >>> scales = calibrate(model, params, train_batches[:16])  # doctest: +SKIP
    >>> qparams = quantize(params, mode="int8-static", input_scales=scales)  # doctest: +SKIP
  """
  if not 0 < percentile <= 100:
    raise ValueError(f"percentile must be in (0, 100], got {percentile}")
  if is_quantized(params):
    raise ValueError("calibrate runs the float model; got already quantized params")
  names = set(layers)
  if getattr(model, "last_layer_pooled_only", False):
    # Every token's range, the last layer's included: the scales then serve the [CLS]-only form and the full one.
    model = model.clone(last_layer_pooled_only=False)
  if getattr(model.config, "fuse_qkv", False):
    model = model.clone(config=model.config.replace(fuse_qkv=False))  # each projection's input is its own Dense's
  model, params = unrolled(model, params)  # one scale per layer, named by the layer's own module path

  @jax.jit
  def token_absmax(params, batch):
    seen: dict[Path, jax.Array] = {}

    def record(next_fun, args, kwargs, context):
      module = context.module
      if (
        context.method_name == "__call__"
        and module.name in names
        and isinstance(module, nn.Dense | QuantDense | MixedDense)
      ):
        seen[tuple(module.scope.path)] = jnp.max(jnp.abs(args[0].astype(jnp.float32)), axis=-1)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      classifier_logits(model, params, batch)
    return seen

  stats: dict[Path, list[np.ndarray]] = {}
  for batch in batches:
    real = np.asarray(batch.segment_ids) > 0
    for path, absmax_BxL in jax.device_get(token_absmax(params, batch)).items():
      stats.setdefault(path, []).append(np.asarray(absmax_BxL)[real])
  if not stats:
    raise ValueError("the calibration set is empty (or holds no layer named " + ", ".join(sorted(names)) + ")")
  scales = {}
  for path, chunks in stats.items():
    values = np.concatenate(chunks)
    if values.size == 0:
      raise ValueError("the calibration batches hold no real tokens (all padding)")
    scales[path] = max(float(np.percentile(values, percentile)), 1e-12) / numerics.INT8_MAX
  return scales
