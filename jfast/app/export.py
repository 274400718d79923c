"""``jfast export``: a complete Hugging Face folder (config with label names, weights, tokenizer) from a run folder
or a checkpoint folder, after the fact.

    jfast export runs/finetune-20261207-101500 my-model     # the run's model, copied
    jfast export runs/ckpt my-model                         # the newest checkpoint of a --checkpoint-dir

A checkpoint holds the train state only; the fine-tune writes what else an export needs beside it when it starts
(`write_export_info`: the model's config, the label names and the tokenizer), so a run stopped at any checkpoint
can still be exported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jfast.app.config import ConfigError
from jfast.errors import ModelFolderError
from jfast.models.bert_io import config_from_hf, config_to_hf, save_hf_bert
from jfast.models.hf_io import write_tokenizer
from jfast.training.checkpoint import Checkpointer

EXPORT_INFO = "export.json"
_TOKENIZER = "tokenizer"


def write_export_info(checkpoint_dir: str | Path, config, label_names, tokenizer_dir: str | Path) -> Path:
  """Writes ``export.json`` (config and label names) and the tokenizer beside a run's checkpoints."""
  folder = Path(checkpoint_dir)
  folder.mkdir(parents=True, exist_ok=True)
  write_tokenizer(folder / _TOKENIZER, tokenizer_dir, model_max_length=config.max_position_embeddings)
  info = {"model": "bert_classifier", "config": config_to_hf(config), "label_names": list(label_names)}
  (folder / EXPORT_INFO).write_text(json.dumps(info, indent=2))
  return folder / EXPORT_INFO


def is_model_folder(path: Path) -> bool:
  return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def model_folder(path: str | Path) -> Path:
  """The model folder a path names: itself (``config.json`` + ``model.safetensors``), or a run folder's ``model/``."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no model or run folder at {path}")
  for candidate in (path, path / "model"):
    if is_model_folder(candidate):
      return candidate
  hint = " (it holds checkpoints: jfast export it first)" if (path / EXPORT_INFO).is_file() else ""
  raise ModelFolderError(
    f"{path} is neither a model folder (config.json + model.safetensors) nor a run folder with model/{hint}"
  )


def _checkpoint_dir(path: Path) -> Path | None:
  if (path / EXPORT_INFO).is_file():
    return path
  metrics = path / "metrics.json"
  if metrics.is_file():
    ckpt = json.loads(metrics.read_text()).get("args", {}).get("checkpoint_dir")
    if ckpt and (Path(ckpt) / EXPORT_INFO).is_file():
      return Path(ckpt)
  return None


def export(source: str | Path, out: str | Path) -> Path:
  """Writes the model of ``source`` (a model folder, a run folder, or a checkpoint folder) to ``out``.

  Returns:
    ``out``, a folder that ``transformers.pipeline("text-classification", model=out)`` loads.

  Raises:
    ConfigError: ``out`` exists and is not empty.
    ModelFolderError: ``source`` holds no model and no checkpoint with its export information.
  """
  source, out = Path(source), Path(out)
  if out.exists() and any(out.iterdir()):
    raise ConfigError(f"{out} exists and is not empty: choose a new folder")
  if not source.exists():
    raise FileNotFoundError(f"no run, model or checkpoint folder at {source}")
  for candidate in (source, source / "model"):
    if is_model_folder(candidate):
      shutil.copytree(candidate, out, dirs_exist_ok=True)
      print(f"exported {candidate} -> {out}")
      return out
  ckpt = _checkpoint_dir(source)
  if ckpt is None:
    raise ModelFolderError(
      f"{source} holds no model (config.json + model.safetensors, or model/) and no checkpoints with {EXPORT_INFO}"
    )
  info = json.loads((ckpt / EXPORT_INFO).read_text())
  checkpointer = Checkpointer(ckpt)
  try:
    restored = checkpointer.restore_params()
  finally:
    checkpointer.close()
  if restored is None:
    raise ModelFolderError(f"{ckpt} has no checkpoint yet (the run stopped before its first save)")
  step, params = restored
  config = config_from_hf(info["config"])
  save_hf_bert(out, config, params, label_names=tuple(info["label_names"]), tokenizer=ckpt / _TOKENIZER)
  print(f"exported step {step} of {ckpt} -> {out}")
  return out
