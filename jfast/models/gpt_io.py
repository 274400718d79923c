"""Weight interop with Hugging Face GPT-2 folders (``config.json`` + ``model.safetensors``).

GPT-2's ``Conv1D`` stores weights ``[in, out]``, as Flax ``Dense`` does, so the mapping is a rename: no transposes.
The language-model head is tied to ``wte``; a folder whose ``lm_head.weight`` differs from it is refused rather than
silently re-tied.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jfast.data.bpe import END_OF_TEXT
from jfast.errors import ModelFolderError
from jfast.models.gpt import GPT, GPTConfig
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
from jfast.nn.scan import match_layout, unstack_layers

# Buffers and heads a GPT-2 folder may hold that the decoder does not use as parameters.
_IGNORED = re.compile(r"^(h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)$")
_CONFIG_KEYS = (
  "vocab_size",
  "n_positions",
  "n_embd",
  "n_layer",
  "n_head",
  "n_inner",
  "activation_function",
  "resid_pdrop",
  "embd_pdrop",
  "attn_pdrop",
  "layer_norm_epsilon",
  "initializer_range",
  "bos_token_id",
  "eos_token_id",
)


def _hf_name(path: tuple[str, ...]) -> str:
  """Maps a flattened Flax path to its Hugging Face name without the ``transformer.`` prefix."""
  return dotted_name(path, "h")


def _config_from_hf(hf: dict) -> GPTConfig:
  if hf.get("model_type", "gpt2") != "gpt2":
    raise ModelFolderError(f"config.json describes a {hf.get('model_type')!r} model, not GPT-2")
  unsupported = {
    "scale_attn_weights": (True, "attention logits must be scaled by 1/sqrt(head_dim)"),
    "scale_attn_by_inverse_layer_idx": (False, "per-layer attention scaling is not implemented"),
    "add_cross_attention": (False, "cross-attention is not implemented"),
    "tie_word_embeddings": (True, "the language-model head must be tied to wte"),
  }
  for key, (want, why) in unsupported.items():
    if hf.get(key, want) != want:
      raise ModelFolderError(f"config.json sets {key}={hf[key]!r}: {why}")
  fields = {k: hf[k] for k in _CONFIG_KEYS if k in hf and hf[k] is not None}
  if "n_positions" not in fields and "n_ctx" in hf:
    fields["n_positions"] = hf["n_ctx"]
  return GPTConfig(**fields)


def load_hf_gpt2(path: str | Path, *, config: GPTConfig | None = None) -> tuple[GPTConfig, dict]:
  """Reads a Hugging Face GPT-2 folder (``GPT2LMHeadModel`` or ``GPT2Model``) into `GPT` parameters.

  Args:
    path: a folder with ``config.json`` and ``model.safetensors``; names with or without ``transformer.``.
    config: overrides the folder's config (dtype, attention kind, remat); its sizes must match the weights.

  Returns:
    ``(config, params)`` with float32 numpy parameters in the tree ``GPT(config).init`` makes.

  Example:
    >>> config, params = load_hf_gpt2("runs/gpt2-small")  # doctest: +SKIP
    >>> logits = GPT(config).apply({"params": params}, input_ids)  # doctest: +SKIP
  """
  folder, hf_config, tensors = read_folder(path)
  file_config = _config_from_hf(hf_config)
  config = file_config if config is None else config
  if config.position_embedding != "learned":
    raise ValueError("GPT-2 folders hold learned positions; a rotary config cannot load them")
  tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
  ids = jnp.zeros((1, 1), jnp.int32)
  expected = param_shapes(lambda: GPT(config.replace(scan_layers=False)).init(jax.random.key(0), ids)["params"])
  flat = match_tensors(folder, expected, tensors, _hf_name, _IGNORED, transpose_kernels=False)
  head = tensors.get("lm_head.weight")
  if head is not None and not np.array_equal(np.asarray(head, np.float32), flat[("wte", "embedding")]):
    raise ModelFolderError(f"{folder}: lm_head.weight differs from wte.weight; untied heads are not supported")
  return config, match_layout(config, traverse_util.unflatten_dict(flat))


def save_hf_gpt2(path: str | Path, config: GPTConfig, params: dict, *, tokenizer=None) -> None:
  """Writes a complete folder (config, weights, tokenizer) that ``transformers.GPT2LMHeadModel.from_pretrained`` and
  ``AutoTokenizer.from_pretrained`` (PyTorch) load.

  Args:
    path: the folder to create (parents too).
    config: the model's config (learned positions only: GPT-2 has no rotary variant).
    params: `GPT` parameters.
    tokenizer: the `tokenizers.Tokenizer` the model was trained with (e.g. `jfast.data.train_bpe`'s), or a folder
      holding its ``tokenizer.json``; None writes no tokenizer files (with a warning).

  Example:
    >>> save_hf_gpt2("out/shakespeare-gpt", config, state.params, tokenizer=tok)  # doctest: +SKIP
  """
  if config.position_embedding != "learned":
    raise ValueError("the GPT-2 layout has learned positions only; a rotary model cannot be exported to it")
  tensors = flat_tensors(
    unstack_layers(jax.device_get(params)), _hf_name, transpose_kernels=False, prefix="transformer."
  )
  hf_config = {k: getattr(config, k) for k in _CONFIG_KEYS}
  hf_config.update(
    model_type="gpt2",
    architectures=["GPT2LMHeadModel"],
    n_ctx=config.n_positions,
    scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False,
    reorder_and_upcast_attn=False,
    tie_word_embeddings=True,
    torch_dtype="float32",
  )
  write_folder(path, tensors, hf_config)
  if tokenizer is None:
    warn_without_tokenizer(path)
  else:
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
    write_tokenizer(
      path,
      tokenizer,
      model_max_length=config.n_positions,
      tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", **special},
    )
