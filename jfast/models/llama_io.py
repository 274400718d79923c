"""Weight interop with Hugging Face Llama, Mistral, Qwen2 and Qwen3 folders (``config.json`` + safetensors, sharded
or not).

PyTorch ``Linear`` weights are ``[out, in]`` and Flax kernels ``[in, out]``: every projection is transposed, all
else is a rename (``model.layers.3.self_attn.q_proj.weight`` <-> ``layers_3/self_attn/q_proj/kernel``). A folder
whose options jfast does not implement (another ``rope_scaling`` type, per-layer sliding windows, partial rotary
dimensions) is refused with the option named, never loaded into a model that would compute something else.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jfast.errors import ModelFolderError
from jfast.models.hf_io import (
  dotted_name,
  flat_tensors,
  match_tensors,
  param_shapes,
  read_folder,
  warn_without_tokenizer,
  write_folder,
  write_tokenizer,
)
from jfast.models.llama import MODEL_TYPES, Llama, LlamaConfig
from jfast.nn.rotary import RopeScaling
from jfast.nn.scan import match_layout, unstack_layers

ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
}
# Buffers a folder may hold that are not parameters (older exports saved RoPE's inverse frequencies).
_IGNORED = re.compile(r"^(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")
_CONFIG_KEYS = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "num_key_value_heads",
  "head_dim",
  "hidden_act",
  "max_position_embeddings",
  "rms_norm_eps",
  "tie_word_embeddings",
  "attention_dropout",
  "initializer_range",
  "bos_token_id",
  "eos_token_id",
  "pad_token_id",
)


def _hf_name(path: tuple[str, ...]) -> str:
  """Maps a flattened Flax path to its Hugging Face name (``model.`` prefix, except the output head)."""
  name = dotted_name(path, "layers")
  return name if path[0] == "lm_head" else f"model.{name}"


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
  """``(rope_theta, scaling)`` from either spelling: ``rope_theta`` + ``rope_scaling`` or ``rope_parameters``."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = hf.get("rope_scaling") or {}
  params = {**legacy, **params}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ModelFolderError("config.json sets partial_rotary_factor: RoPE on part of each head is not implemented")
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return float(theta), None
  if kind != "llama3":
    raise ModelFolderError(
      f"config.json asks for rope_scaling type {kind!r}; jfast implements 'default' and 'llama3' RoPE only"
    )
  try:
    scaling = RopeScaling(
      factor=float(params["factor"]),
      low_freq_factor=float(params["low_freq_factor"]),
      high_freq_factor=float(params["high_freq_factor"]),
      original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
  except KeyError as e:
    raise ModelFolderError(f"config.json's llama3 rope_scaling lacks {e.args[0]!r}") from None
  except ValueError as e:
    raise ModelFolderError(f"config.json's llama3 rope_scaling is invalid: {e}") from None
  return float(theta), scaling


def config_from_hf(hf: dict, **overrides) -> LlamaConfig:
  """The `LlamaConfig` of a Hugging Face ``config.json`` (as a dict) of type llama, mistral, qwen2 or qwen3.

  ``overrides`` set jfast's own fields (``dtype``, ``attention``, ``remat_policy``, ``scan_layers`` ...).
  """
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ModelFolderError(f"config.json has model_type {model_type!r}; jfast's decoder loads {MODEL_TYPES}")
  fields = {k: hf[k] for k in _CONFIG_KEYS if hf.get(k) is not None}
  if isinstance(fields.get("eos_token_id"), list):
    fields["eos_token_id"] = tuple(fields["eos_token_id"])
  fields["rope_theta"], fields["rope_scaling"] = _rope(hf)
  if hf.get("mlp_bias"):
    fields["mlp_bias"] = True
  if model_type in ("llama", "qwen3"):
    fields["attention_bias"] = bool(hf.get("attention_bias", False))
  if model_type == "qwen2":
    fields["qkv_bias"] = True
  if model_type == "qwen3":
    fields["qk_norm"] = True
  if model_type == "mistral":
    fields["sliding_window"] = hf.get("sliding_window")
  elif hf.get("use_sliding_window"):
    raise ModelFolderError(
      f"config.json sets use_sliding_window for {model_type}: per-layer sliding windows (max_window_layers) are "
      "not implemented"
    )
  layer_types = set(hf.get("layer_types") or ()) - {"full_attention"}
  if layer_types and model_type != "mistral":
    raise ModelFolderError(f"config.json has layer_types {sorted(layer_types)}: only full_attention layers load")
  try:
    return LlamaConfig(**{"model_type": model_type, **fields, **overrides})
  except (TypeError, ValueError) as e:
    raise ModelFolderError(f"config.json describes a model jfast cannot build: {e}") from None


def config_to_hf(config: LlamaConfig) -> dict:
  """The ``config.json`` of a `LlamaConfig`, for ``transformers.AutoConfig``."""
  hf = {k: getattr(config, k) for k in _CONFIG_KEYS}
  if isinstance(hf["eos_token_id"], tuple):
    hf["eos_token_id"] = list(hf["eos_token_id"])
  hf.update(
    model_type=config.model_type,
    architectures=[ARCHITECTURES[config.model_type]],
    rope_theta=config.rope_theta,
    mlp_bias=config.mlp_bias,
    torch_dtype="float32",
  )
  if config.rope_scaling is not None:
    s = config.rope_scaling
    hf["rope_scaling"] = {
      "rope_type": s.rope_type,
      "factor": s.factor,
      "low_freq_factor": s.low_freq_factor,
      "high_freq_factor": s.high_freq_factor,
      "original_max_position_embeddings": s.original_max_position_embeddings,
    }
  if config.model_type == "mistral":
    hf["sliding_window"] = config.sliding_window
  elif config.sliding_window is not None:
    raise ValueError(f"a {config.model_type} folder has no sliding window; export the model as model_type='mistral'")
  if config.model_type in ("llama", "qwen3"):
    hf["attention_bias"] = config.attention_bias
  elif config.attention_bias:
    raise ValueError(f"{config.model_type} has no o_proj bias; export as 'llama' or 'qwen3'")
  if (config.model_type == "qwen2") != config.qkv_bias:
    raise ValueError("q/k/v biases without an o_proj bias are Qwen2's layout: model_type must be 'qwen2'")
  if (config.model_type == "qwen3") != config.qk_norm:
    raise ValueError("RMSNorm on queries and keys is Qwen3's layout: model_type must be 'qwen3'")
  if config.model_type in ("qwen2", "qwen3"):
    hf["use_sliding_window"] = False
  return hf


def load_hf_llama(path: str | Path, *, config: LlamaConfig | None = None, **overrides) -> tuple[LlamaConfig, dict]:
  """Reads a Hugging Face Llama / Mistral / Qwen2 / Qwen3 folder into `Llama` parameters.

  Args:
    path: a folder with ``config.json`` and ``model.safetensors`` (or sharded ``model-0000x-of-0000n.safetensors``
      with ``model.safetensors.index.json``).
    config: replaces the folder's config (its sizes must match the weights).
    overrides: jfast fields set on the folder's config (``dtype="bfloat16"``, ``remat_policy="full"`` ...).

  Returns:
    ``(config, params)``: float32 numpy parameters in the layout ``Llama(config)`` runs (stacked when scanned).

  Example:
    >>> config, params = load_hf_llama("models/Qwen3-0.6B", dtype="bfloat16")  # doctest: +SKIP
    >>> logits = Llama(config).apply({"params": params}, input_ids)  # doctest: +SKIP
  """
  folder, hf_config, tensors = read_folder(path)
  if config is None:
    config = config_from_hf(hf_config, **overrides)
  elif overrides:
    config = config.replace(**overrides)
  ids = jnp.zeros((1, 1), jnp.int32)
  flat_config = config.replace(scan_layers=False, quantization="none")
  expected = param_shapes(lambda: Llama(flat_config).init(jax.random.key(0), ids)["params"])
  ignored = _IGNORED
  if config.tie_word_embeddings:
    head = tensors.get("lm_head.weight")
    table = tensors.get("model.embed_tokens.weight")
    if head is not None and table is not None and not np.array_equal(head, table):
      raise ModelFolderError(
        f"{folder}: tie_word_embeddings is set but lm_head.weight differs from model.embed_tokens.weight"
      )
    ignored = re.compile(f"{_IGNORED.pattern}|^lm_head\\.weight$")
  flat = match_tensors(folder, expected, tensors, _hf_name, ignored, transpose_kernels=True)
  return config, match_layout(config, traverse_util.unflatten_dict(flat))


def save_hf_llama(
  path: str | Path, config: LlamaConfig, params: dict, *, tokenizer=None, max_shard_bytes: int | None = None
) -> None:
  """Writes a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads as the same model.

  Args:
    path: the folder to create (parents too).
    config: the model's config; ``model_type`` picks the Hugging Face class.
    params: `Llama` parameters (either layout; float, not int8).
    tokenizer: a `tokenizers.Tokenizer` or a folder holding ``tokenizer.json``; None writes none (with a warning).
    max_shard_bytes: split the weights into shards of at most this size, with an index, as Hugging Face does.

  Example:
    >>> save_hf_llama("out/shakespeare-llama", config, state.params, tokenizer=tok)  # doctest: +SKIP
  """
  if config.quantization not in ("none", "qat"):
    raise ValueError("int8 parameters cannot be exported; save the float model (jfast.compress.dequantize)")
  if any(k.startswith("lora_") for p in traverse_util.flatten_dict(params) for k in p[-1:]):
    raise ValueError("params hold LoRA adapters: merge them first (jfast.merge_lora) or save them with save_peft")
  hf_config = config_to_hf(config)
  tensors = flat_tensors(unstack_layers(jax.device_get(params)), _hf_name, transpose_kernels=True)
  write_folder(path, tensors, hf_config, max_shard_bytes=max_shard_bytes)
  if tokenizer is None:
    warn_without_tokenizer(path)
  else:
    write_tokenizer(
      path,
      tokenizer,
      model_max_length=config.max_position_embeddings,
      tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast"},
    )
