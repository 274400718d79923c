"""LoRA: low-rank adapters on chosen projections, chosen by parameter-path patterns, for any Flax Linen model.

An adapted Dense layer computes ``y = x W + b + (alpha / r) * dropout(x) A B`` with ``A: [in, r]`` and
``B: [r, out]``; ``B`` starts at zero, so an adapted float model starts as its base (an int8 one as its
weight-only dequantized form: see below). The adapters are two more leaves
beside the kernel they adapt (``.../q_proj/{kernel, lora_a, lora_b}``; on scanned layers they carry the leading
layer axis like the kernel), so the parameter tree stays one tree and everything that works on trees (sharding,
checkpoints, the train step) works on it unchanged:

- `add_lora` inserts the adapters; `LoRAModel` (from `with_lora`) runs a model with them: its ``apply`` wraps the
  model's in ``flax.linen.intercept_methods``, which adds the low-rank term to every Dense layer holding adapters
  (``nn.Dense``, jfast's CPU `MixedDense`, int8 `QuantDense`, a user's own model's ``nn.Dense``, and any layer that
  sets ``lora_compatible = True``, as the Llama output head does). A model applied
  without the wrapper ignores the adapters, which is why `jfast.models.save_hf_llama` and friends refuse a tree
  that holds them.
- `lora_mask` freezes everything but the adapters: passed to ``make_train_step(freeze_mask=...)``, only the
  adapters get gradients; `jfast.optim.lora_optimizer` gives only them optimizer state.
- `merge_lora` folds ``(alpha / r) A B`` into the kernels for export; `jfast.models.save_peft` /
  `jfast.models.load_peft` write and read the adapters alone in the ``peft`` library's format.

On an int8 base (`jfast.compress.quantize` and ``quantization="int8"``) the adapted layers run QLoRA-style: the
frozen int8 kernel is dequantized inside the matmul (weight-only, as QLoRA dequantizes its 4-bit weights; the int8
activation quantization of inference, and ``int8-static``'s input scales, do not apply there), so the gradient
reaches the activations below, while the parameters stay int8 in memory.

Why not a library: ``peft`` is PyTorch-only; qwix's LoRA targets its own quantized ops and parameter names, while
here the adapters must sit on jfast's scanned stacks and int8 layers and export to the PEFT layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

import jfast.nn.int8 as numerics
from jfast.cpu.dots import MixedDense
from jfast.nn.dropout import dropout
from jfast.nn.quant_dense import QuantDense
from jfast.paths import match_paths

ADAPTER_LEAVES = ("lora_a", "lora_b")
# The layers an adapter attaches to: Flax's Dense, the CPU layer's half-precision Dense, the int8 Dense.
DENSE_LAYERS = (nn.Dense, MixedDense, QuantDense)
# The attention and MLP projections of jfast's Llama, BERT and GPT models.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Which projections get adapters and how they are scaled.

  Attributes:
    rank: r, the adapters' inner width.
    alpha: the scale numerator: the adapter term is multiplied by ``alpha / rank`` (peft's ``lora_alpha``).
    dropout: dropout on the adapter's input while training (peft's ``lora_dropout``).
    targets: path patterns (`jfast.paths`) selecting Dense modules by their path: ``q_proj`` any module of that
      name, ``self_attn/.*`` every attention projection, ``layers/mlp/up_proj`` one stack's. Each must select at
      least one Dense kernel.

  Example:
    >>> LoRAConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")).scaling
    2.0
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = DEFAULT_TARGETS

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
    if not self.alpha > 0:
      raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    if isinstance(self.targets, str) or not self.targets:
      raise ValueError(f"LoRA targets must be a non-empty tuple of path patterns, got {self.targets!r}")
    object.__setattr__(self, "targets", tuple(self.targets))

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank


def _flat(params) -> dict[tuple[str, ...], object]:
  if not isinstance(params, Mapping):
    raise TypeError(f"params must be a nested dict of arrays, got {type(params).__name__}")
  return traverse_util.flatten_dict(dict(params))


def adapted_modules(params) -> list[tuple[str, ...]]:
  """Module paths that hold adapters."""
  return sorted(path[:-1] for path in _flat(params) if path[-1] == "lora_a")


def has_lora(params) -> bool:
  return any(path[-1] in ADAPTER_LEAVES for path in _flat(params))


def add_lora(params, config: LoRAConfig, rng: jax.Array) -> dict:
  """``params`` with rank-r adapters beside the kernel of every Dense module the targets select.

  ``lora_a`` is drawn as peft draws it (Kaiming-uniform, bound ``1 / sqrt(in)``), ``lora_b`` is zero. A kernel of
  ``[..., in, out]`` (a stack of scanned layers has a leading layer axis) gets ``lora_a: [..., in, r]`` and
  ``lora_b: [..., r, out]`` in float32.

  Raises:
    ValueError: a target selecting no Dense kernel (its pattern is named), or a tree that already has adapters.

  Example:
    >>> params = add_lora(params, LoRAConfig(rank=8, targets=("q_proj", "v_proj")), jax.random.key(0))  # doctest: +SKIP
  """
  flat = _flat(params)
  if has_lora(params):
    raise ValueError("params already hold LoRA adapters")
  kernels = sorted(path[:-1] for path, v in flat.items() if path[-1] == "kernel" and np.ndim(v) >= 2)
  names = ["/".join(path) for path in kernels]
  chosen = match_paths(names, config.targets, "LoRA target") if kernels else []
  if not any(chosen):
    raise ValueError(f"LoRA targets {config.targets} select no Dense kernel")
  out = dict(flat)
  keys = jax.random.split(rng, len(kernels))
  for key, module, pick in zip(keys, kernels, chosen, strict=True):
    if not pick:
      continue
    *lead, width, features = np.shape(flat[(*module, "kernel")])
    bound = 1.0 / math.sqrt(width)
    out[(*module, "lora_a")] = jax.random.uniform(key, (*lead, width, config.rank), jnp.float32, -bound, bound)
    out[(*module, "lora_b")] = jnp.zeros((*lead, config.rank, features), jnp.float32)
  return traverse_util.unflatten_dict(out)


def lora_mask(params):
  """The freeze mask (True = frozen) that trains the adapters only: for ``make_train_step(freeze_mask=...)``."""
  if not has_lora(params):
    raise ValueError("params hold no LoRA adapters (add them with jfast.add_lora)")
  return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) not in ADAPTER_LEAVES, params)


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def split_lora(params) -> tuple[dict, dict]:
  """``(base, adapters)``: two trees; ``adapters`` holds only the adapter leaves (what `jfast.models.save_peft`
  writes)."""
  flat = _flat(params)
  base = {p: v for p, v in flat.items() if p[-1] not in ADAPTER_LEAVES}
  adapters = {p: v for p, v in flat.items() if p[-1] in ADAPTER_LEAVES}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def merge_lora(params, config: LoRAConfig) -> dict:
  """The base tree with ``(alpha / r) A B`` added to each adapted kernel and the adapters removed: a plain model's
  parameters, for export or for inference without the wrapper.

  Every int8 kernel (with ``kernel_scale``), adapted or not, is dequantized: the merged tree is float, for a model
  with ``quantization="none"``. When every int8 layer carries adapters it computes what the adapted int8 model
  computes under `with_lora` (whose adapted layers run weight-only); layers without adapters lose their int8
  activation rounding.

  Example:
    >>> merged = merge_lora(state.params, lora_config)  # doctest: +SKIP
    >>> save_hf_llama("out/merged", config, merged)  # doctest: +SKIP
  """
  flat = _flat(params)
  modules = adapted_modules(params)
  if not modules:
    raise ValueError("params hold no LoRA adapters to merge")
  out = {p: v for p, v in flat.items() if p[-1] not in ADAPTER_LEAVES}
  # Every int8 layer is dequantized, adapted or not: the merged tree is one float model's.
  for module in sorted(p[:-1] for p in flat if p[-1] == "kernel_scale"):
    kernel = jnp.asarray(flat[(*module, "kernel")], jnp.float32)
    out[(*module, "kernel")] = kernel * jnp.asarray(flat[(*module, "kernel_scale")], jnp.float32)[..., None, :]
    del out[(*module, "kernel_scale")]
    out.pop((*module, "input_scale"), None)
  for module in modules:
    a, b = jnp.asarray(flat[(*module, "lora_a")]), jnp.asarray(flat[(*module, "lora_b")])
    delta = jnp.einsum("...ir,...ro->...io", a, b, precision=jax.lax.Precision.HIGHEST)
    out[(*module, "kernel")] = jnp.asarray(out[(*module, "kernel")], jnp.float32) + config.scaling * delta
  return traverse_util.unflatten_dict(out)


def _adapted_call(config: LoRAConfig, next_fun, args, kwargs, context):
  """The interceptor: the adapter term added to a Dense-like layer's output when the layer holds adapters."""
  module = context.module
  if (
    context.method_name != "__call__"
    or not (isinstance(module, DENSE_LAYERS) or getattr(module, "lora_compatible", False))
    or not module.has_variable("params", "lora_a")
  ):
    return next_fun(*args, **kwargs)
  x = args[0]
  dtype = getattr(module, "dtype", None) or x.dtype
  if isinstance(module, QuantDense) and module.mode in ("int8", "int8-static"):
    # QLoRA-style: the frozen int8 kernel is dequantized inside the product, so gradients reach x.
    kernel = numerics.dequantize_weight(
      module.get_variable("params", "kernel"), module.get_variable("params", "kernel_scale")
    )
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if module.has_variable("params", "bias"):
      bias = module.get_variable("params", "bias").astype(y.dtype)
      y = y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)
  else:
    y = next_fun(*args, **kwargs)
  a = module.get_variable("params", "lora_a").astype(dtype)
  b = module.get_variable("params", "lora_b").astype(dtype)
  h = x.astype(dtype)
  if config.dropout > 0.0 and module.has_rng("dropout"):
    h = dropout(h, config.dropout, module.make_rng("dropout")).astype(dtype)
  delta = jnp.dot(jnp.dot(h, a), b) * jnp.asarray(config.scaling, dtype)
  return (y + delta.astype(y.dtype)).astype(y.dtype)


class LoRAModel:
  """A model run with its LoRA adapters: ``apply`` and ``init`` as the wrapped model's, under an interceptor that
  adds the adapter term to every Dense layer holding ``lora_a`` / ``lora_b``. Other attributes (``config``,
  ``clone`` ...) are the wrapped model's, so train steps, losses and generation take it as they take the model.

  Adapter dropout is active when the call has a ``dropout`` rng (jfast's losses pass one only while training).
  """

  def __init__(self, model: nn.Module, config: LoRAConfig):
    if isinstance(model, LoRAModel):
      raise TypeError("the model is already wrapped with LoRA")
    config_ = getattr(model, "config", None)
    if getattr(config_, "fuse_qkv", False):
      # Fused projections multiply by the kernels without calling their Dense layers, where adapters attach; the
      # unfused layers compute the same thing from the same tree.
      model = model.clone(config=config_.replace(fuse_qkv=False))
    self.model, self.lora = model, config

  def _intercept(self):
    return nn.intercept_methods(functools.partial(_adapted_call, self.lora))

  def apply(self, variables, *args, **kwargs):
    with self._intercept():
      return self.model.apply(variables, *args, **kwargs)

  def init(self, *args, **kwargs):
    with self._intercept():
      return self.model.init(*args, **kwargs)

  def clone(self, **changes) -> LoRAModel:
    return LoRAModel(self.model.clone(**changes), self.lora)

  def __getattr__(self, name):
    return getattr(self.model, name)

  def __hash__(self):
    return hash((self.model, self.lora))

  def __eq__(self, other):
    return isinstance(other, LoRAModel) and (self.model, self.lora) == (other.model, other.lora)

  def __repr__(self):
    return f"LoRAModel({self.model!r}, {self.lora!r})"


def with_lora(model: nn.Module, config: LoRAConfig) -> LoRAModel:
  """``model`` run with the adapters `add_lora` put in its parameters.

  Example:
    >>> lora = LoRAConfig(rank=8, alpha=16)
    >>> params = add_lora(params, lora, jax.random.key(1))  # doctest: +SKIP
    >>> logits = with_lora(model, lora).apply({"params": params}, ids)  # doctest: +SKIP
  """
  return LoRAModel(model, config)


def trainable_count(params, mask: Sequence | None = None) -> int:
  """Parameters a freeze mask leaves trainable (all of them without a mask)."""
  leaves = jax.tree.leaves(params)
  frozen = [False] * len(leaves) if mask is None else jax.tree.leaves(mask)
  return int(sum(np.size(x) for x, f in zip(leaves, frozen, strict=True) if not f))
