"""LoRA adapters alone, in the ``peft`` library's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``peft.PeftModel.from_pretrained(base, folder)`` loads what `save_peft` writes onto the Hugging Face export of the
same base (`save_hf_llama`, `save_hf_gpt2`, `save_hf_bert`), and `load_peft` reads a peft folder back onto jfast
parameters. Tensor names are the base model's Hugging Face module names under ``base_model.model.``, with
``lora_A.weight: [r, in]`` and ``lora_B.weight: [out, r]`` (PyTorch's ``[out, in]``, transposed from jfast's
``lora_a: [in, r]`` and ``lora_b: [r, out]``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from jfast.errors import ModelFolderError
from jfast.models.bert import BertConfig
from jfast.models.bert_io import _hf_name as _bert_name
from jfast.models.gpt import GPTConfig
from jfast.models.gpt_io import _hf_name as _gpt_name
from jfast.models.llama import LlamaConfig
from jfast.models.llama_io import _hf_name as _llama_name
from jfast.nn.lora import LoRAConfig, adapted_modules
from jfast.nn.scan import restack_like, unstack_layers

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _module_namer(model_config) -> tuple[Callable[[tuple[str, ...]], str], str]:
  """``(flax module path -> Hugging Face module name, peft task type)`` for a jfast model family."""
  if isinstance(model_config, LlamaConfig):
    return (lambda m: _llama_name((*m, "kernel")).removesuffix(".weight")), "CAUSAL_LM"
  if isinstance(model_config, GPTConfig):
    return (lambda m: "transformer." + _gpt_name((*m, "kernel")).removesuffix(".weight")), "CAUSAL_LM"
  if isinstance(model_config, BertConfig):

    def bert(m):
      inner = m[1:] if m[0] == "bert" else m
      return ("bert." if m[0] == "bert" else "") + _bert_name((*inner, "kernel")).removesuffix(".weight")

    return bert, "SEQ_CLS"
  raise TypeError(f"no Hugging Face names for a {type(model_config).__name__}: PEFT export needs Llama, GPT or BERT")


def _hf_module(namer, module: tuple[str, ...]) -> str:
  try:
    return namer(module)
  except (KeyError, IndexError):
    raise ValueError(f"module {'/'.join(module)} has no Hugging Face name; peft cannot hold its adapter") from None


def _named(namer, path) -> bool:
  try:
    namer(path[:-1])
  except (KeyError, IndexError):
    return False
  return True


def save_peft(path: str | Path, lora: LoRAConfig, params, model_config, *, base_model: str | None = None) -> Path:
  """Writes the adapters of ``params`` as a peft LoRA folder.

  Args:
    path: the folder (created with its parents).
    lora: the `LoRAConfig` the adapters were trained with (rank, alpha, dropout).
    params: parameters holding adapters (either layout).
    model_config: the base model's config (`LlamaConfig`, `GPTConfig` or `BertConfig`): it fixes the names.
    base_model: written as ``base_model_name_or_path`` (where peft users find the base).

  Example:
    >>> save_peft("out/lora", lora_config, state.params, config, base_model="out/base")  # doctest: +SKIP
  """
  namer, task = _module_namer(model_config)
  flat = traverse_util.flatten_dict(unstack_layers(jax.device_get(params)))
  modules = adapted_modules(unstack_layers(params))
  if not modules:
    raise ValueError("params hold no LoRA adapters to save")
  tensors, names = {}, []
  for module in modules:
    name = _hf_module(namer, module)
    names.append(name)
    tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(
      np.asarray(flat[(*module, "lora_a")], np.float32).T
    )
    tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(
      np.asarray(flat[(*module, "lora_b")], np.float32).T
    )
  # Module names when every module of those names is adapted; otherwise the exact set as a regex.
  leaf_names = sorted({m[-1] for m in modules})
  all_with_names = {m for m in (p[:-1] for p in flat if p[-1] == "kernel") if m[-1] in leaf_names}
  if all_with_names == set(modules):
    targets: list[str] | str = leaf_names
  else:
    targets = "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"
  adapter_config = {
    "peft_type": "LORA",
    "task_type": task,
    "base_model_name_or_path": base_model,
    "r": lora.rank,
    "lora_alpha": lora.alpha,
    "lora_dropout": lora.dropout,
    "target_modules": targets,
    "bias": "none",
    "fan_in_fan_out": isinstance(model_config, GPTConfig),
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "inference_mode": True,
    "modules_to_save": None,
  }
  folder = Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
  (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
  return folder


def load_peft(path: str | Path, params, model_config) -> tuple[LoRAConfig, dict]:
  """Reads a peft LoRA folder onto jfast base parameters.

  Args:
    path: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
    params: the base model's parameters (either layout, no adapters).
    model_config: its config (names the modules).

  Returns:
    ``(lora_config, params)`` with the adapters inserted in ``params``' layout; run them with `jfast.with_lora`.

  Raises:
    ModelFolderError: a non-LoRA or unsupported adapter (DoRA, rsLoRA, trained biases), tensors the base has no
      module for, or mis-shaped tensors.
  """
  folder = Path(path)
  for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
    if not (folder / name).is_file():
      raise FileNotFoundError(f"{folder} has no {name}")
  try:
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ModelFolderError(f"{folder / ADAPTER_CONFIG} is not valid JSON: {e}") from None
  if cfg.get("peft_type") != "LORA":
    raise ModelFolderError(f"{folder} holds a {cfg.get('peft_type')!r} adapter; jfast reads LORA only")
  for key, why in (("use_dora", "DoRA"), ("use_rslora", "rank-stabilised scaling")):
    if cfg.get(key):
      raise ModelFolderError(f"{folder} sets {key}: {why} is not implemented")
  if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
    raise ModelFolderError(f"{folder} trains biases or whole modules (bias / modules_to_save): not supported")
  if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
    raise ModelFolderError(f"{folder} sets per-module ranks (rank_pattern / alpha_pattern): not supported")
  if cfg.get("lora_bias"):
    raise ModelFolderError(f"{folder} sets lora_bias: biases on the adapters are not supported")
  if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
    raise ModelFolderError(f"{folder / ADAPTER_CONFIG} has no valid rank r (got {cfg.get('r')!r})")
  namer, _ = _module_namer(model_config)
  tensors = load_file(str(folder / ADAPTER_WEIGHTS))
  tensors = {re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1.weight", k): v for k, v in tensors.items()}
  flat = traverse_util.flatten_dict(unstack_layers(jax.device_get(params)))
  if any(p[-1] in ("lora_a", "lora_b") for p in flat):
    raise ValueError("params already hold LoRA adapters")
  rank, used, problems = int(cfg["r"]), set(), []
  for module in sorted(p[:-1] for p in flat if p[-1] == "kernel"):
    try:
      name = namer(module)
    except (KeyError, IndexError):
      continue
    key_a, key_b = f"{_PREFIX}{name}.lora_A.weight", f"{_PREFIX}{name}.lora_B.weight"
    if key_a not in tensors and key_b not in tensors:
      continue
    if key_a not in tensors or key_b not in tensors:
      problems.append(f"{name}: has only one of lora_A / lora_B")
      continue
    a, b = np.asarray(tensors[key_a], np.float32).T, np.asarray(tensors[key_b], np.float32).T
    width, features = np.shape(flat[(*module, "kernel")])
    if a.shape != (width, rank) or b.shape != (rank, features):
      problems.append(
        f"{name}: lora_A {a.T.shape}, lora_B {b.T.shape}; the base wants ({rank}, {width}), ({features}, {rank})"
      )
      continue
    flat[(*module, "lora_a")], flat[(*module, "lora_b")] = a, b
    used |= {key_a, key_b}
  # peft saves the whole base layer beside adapters on embedding-like layers (lm_head): it must be the base's own.
  kernels = {_PREFIX + namer(p[:-1]) + ".base_layer.weight": p for p in flat if p[-1] == "kernel" and _named(namer, p)}
  for key in sorted(k for k in set(tensors) - used if k.endswith(".base_layer.weight")):
    path = kernels.get(key)
    if path is not None and np.array_equal(np.asarray(tensors[key], np.float32).T, np.asarray(flat[path], np.float32)):
      used.add(key)
    elif path is not None:
      problems.append(f"{key}: the adapter folder holds its own base weights, which differ from the model's")
  problems += [f"{k}: no module of the base model has this name" for k in sorted(set(tensors) - used)[:10]]
  if problems:
    raise ModelFolderError(f"{folder} does not fit the base model:\n  " + "\n  ".join(problems[:20]))
  if not used:
    raise ModelFolderError(f"{folder} holds no LoRA tensors")
  targets = cfg.get("target_modules") or ()
  targets = (targets,) if isinstance(targets, str) else tuple(targets)
  lora = LoRAConfig(
    rank=rank,
    alpha=float(cfg.get("lora_alpha", 8)),  # peft's default
    dropout=float(cfg.get("lora_dropout", 0.0)),
    targets=tuple(sorted({m[-1] for m in (p[:-1] for p in flat if p[-1] == "lora_a")})) or targets,
  )
  return lora, restack_like(traverse_util.unflatten_dict(flat), params)
