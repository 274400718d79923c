"""``jfast evaluate`` and ``jfast predict``: score or use a trained classifier on any text file.

    jfast evaluate runs/finetune-20261207-101500 ../shared/data/sst2 --split dev
    jfast evaluate my-model reviews.csv --text-column review --label-column stars
    jfast predict my-model texts.txt > predictions.jsonl
    echo "a gripping, funny film" | jfast predict my-model - --format tsv

A model is an exported folder (config.json with ``id2label``, model.safetensors, tokenizer.json: what
``jfast finetune`` writes to its run folder's ``model/`` and ``jfast export`` writes) or a run folder holding one.
Both commands batch with jfast's own packed batching and run one jit-compiled step per batch shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from jfast.app.config import ConfigError
from jfast.app.export import model_folder
from jfast.app.runs import RunDir
from jfast.data import BatchingConfig, load_tokenizer, tokenize
from jfast.data.datasets import check_encoding, load_text_classification
from jfast.errors import DataError, ModelFolderError
from jfast.models import BertForSequenceClassification, load_hf_bert
from jfast.models.hf_io import read_config
from jfast.training.metrics import classification_report, format_report
from jfast.training.predict import make_predict_step, predict_probabilities


@dataclasses.dataclass
class Classifier:
  """A loaded classifier: model, parameters, label names and tokenizer."""

  folder: Path
  model: BertForSequenceClassification
  params: dict
  label_names: tuple[str, ...]
  tokenizer: object

  @property
  def pad_id(self) -> int:
    return self.model.config.pad_token_id

  def probabilities(self, texts, *, batch_rows: int = 16, progress: bool = True) -> tuple[np.ndarray, int]:
    """``(float32[N, C] probabilities, texts cut to the model's length)``."""
    ids, cut = tokenize(self.tokenizer, texts, max_length=self.model.config.max_position_embeddings)
    batching = BatchingConfig(strategy="packed", batch_size=batch_rows, shuffle=False)
    step = make_predict_step(self.model)
    probs = predict_probabilities(step, self.params, ids, batching, pad_id=self.pad_id, progress=progress)
    return probs, cut


def classifier_labels(path: str | Path) -> tuple[Path, tuple[str, ...]]:
  """``(model folder, label names)`` from a model or run folder's config.json alone (cheap: no weights)."""
  folder = model_folder(path)
  hf = read_config(folder)
  if "id2label" not in hf:
    raise ModelFolderError(f"{folder}/config.json has no id2label: not a classifier export")
  try:
    names = tuple(hf["id2label"][str(i)] for i in range(len(hf["id2label"])))
  except KeyError:
    raise ModelFolderError(f"{folder}/config.json: id2label keys are not 0..{len(hf['id2label']) - 1}") from None
  return folder, names


def load_classifier(path: str | Path) -> Classifier:
  """Loads a model folder (or a run folder's ``model/``) for evaluation or prediction; an incomplete folder raises
  naming what is missing."""
  folder, names = classifier_labels(path)
  if not (folder / "tokenizer.json").is_file():
    raise ModelFolderError(
      f"{folder} has no tokenizer.json: export the model with jfast (jfast export RUN OUT) or copy the base model's "
      "tokenizer files into it"
    )
  config, params = load_hf_bert(folder, head="classifier")
  if params["classifier"]["bias"].shape[0] != len(names):
    raise ModelFolderError(f"{folder}: {len(names)} labels in id2label but the classifier has a different width")
  return Classifier(
    folder, BertForSequenceClassification(config, num_labels=len(names)), params, names, load_tokenizer(folder)
  )


def _common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--text-column", default=None, help="header name of the text column (default: sentence or text)")
  p.add_argument("--encoding", default="utf-8", help="the input's text encoding")
  p.add_argument("--batch-rows", type=int, default=16, help="packed rows per batch")
  p.add_argument("--no-progress", action="store_true")


def evaluate_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="jfast evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("model", help="model folder, or a run folder holding model/")
  p.add_argument("data", help="dataset folder (with --split) or a .tsv/.csv file with a label column")
  p.add_argument("--split", default="dev", help="the file's name in a dataset folder (dev, test, ...)")
  p.add_argument("--label-column", default=None, help="header name of the label column (default: label)")
  p.add_argument("--output", default=None, help="JSON file for the report (default: a run folder under --runs)")
  p.add_argument("--runs", default="runs", help="parent folder of run folders")
  _common(p)
  return p


def evaluate_main(argv=None) -> dict:
  args = evaluate_parser().parse_args(argv)
  check_encoding(args.encoding)
  if args.batch_rows < 1:
    raise ConfigError(f"--batch-rows must be a positive integer, got {args.batch_rows}")
  _, names = classifier_labels(args.model)  # the model's label set decides how the file's labels read
  dataset = load_text_classification(
    args.data,
    args.split,
    label_names=names,
    text_column=args.text_column,
    label_column=args.label_column,
    encoding=args.encoding,
  )
  classifier = load_classifier(args.model)
  t0 = time.perf_counter()
  probs, cut = classifier.probabilities(dataset.texts, batch_rows=args.batch_rows, progress=not args.no_progress)
  seconds = time.perf_counter() - t0
  report = classification_report(dataset.labels, probs.argmax(-1), classifier.label_names)
  split = args.split if Path(args.data).is_dir() else Path(args.data).name
  report = {"model": str(classifier.folder), "data": dataset.source, "split": split, **report}
  report.update(truncated_examples=cut, seconds=seconds)
  print(f"{split}: {dataset.source} | model {classifier.folder}")
  print(format_report(report))
  print(f"macro-F1 {report['macro_f1']:.4f} | {report['examples']:,} examples in {seconds:.1f}s")
  if args.output:
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
  else:
    run = RunDir("evaluate", root=args.runs, tensorboard=False)
    out = run.path / "metrics.json"
    out.write_text(json.dumps(report, indent=2))
    run.finish({k: report[k] for k in ("model", "data", "split", "accuracy", "macro_f1", "examples")})
  print(f"report: {out}")
  return report


def predict_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="jfast predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("model", help="model folder, or a run folder holding model/")
  p.add_argument(
    "input", nargs="?", default="-", help="a text file (one text per line), a .tsv/.csv file, or - (stdin)"
  )
  p.add_argument("--format", default="jsonl", choices=("jsonl", "tsv"), help="output format")
  p.add_argument("--output", default="-", help="output file (default: standard output)")
  _common(p)
  return p


def read_texts(source: str, *, encoding: str, text_column: str | None) -> tuple[list[str], str]:
  """Texts to predict: one per non-empty line of a text file or stdin, or a .tsv/.csv file's text column."""
  if source != "-" and Path(source).suffix.lower() in (".tsv", ".csv"):
    ds = load_text_classification(source, text_column=text_column, encoding=encoding, labels_required=False)
    return list(ds.texts), source
  if source == "-":
    data, name = sys.stdin.buffer.read(), "standard input"
  else:
    if not Path(source).is_file():
      raise FileNotFoundError(f"no input file at {source}")
    data, name = Path(source).read_bytes(), source
  try:
    text = data.decode(encoding)
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b"\n") + 1
    raise DataError(f"{name}, line {line}: not valid {encoding}; give its encoding with --encoding") from None
  texts = [line.strip() for line in text.splitlines() if line.strip()]
  if not texts:
    raise DataError(f"{name} holds no text")
  return texts, name


def predict_main(argv=None) -> int:
  args = predict_parser().parse_args(argv)
  check_encoding(args.encoding)
  texts, name = read_texts(args.input, encoding=args.encoding, text_column=args.text_column)
  classifier = load_classifier(args.model)
  probs, _ = classifier.probabilities(texts, batch_rows=args.batch_rows, progress=not args.no_progress)
  names = classifier.label_names
  out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
  try:
    if args.format == "tsv":
      out.write("\t".join(["text", "label", *names]) + "\n")
    for text, row in zip(texts, probs, strict=True):
      label = names[int(row.argmax())]
      if args.format == "jsonl":
        record = {
          "text": text,
          "label": label,
          "probabilities": {n: round(float(p), 6) for n, p in zip(names, row, strict=True)},
        }
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
      else:
        clean = text.replace("\t", " ")
        out.write("\t".join([clean, label, *(f"{float(p):.6f}" for p in row)]) + "\n")
  finally:
    if out is not sys.stdout:
      out.close()
  print(f"predicted {len(texts):,} texts from {name}", file=sys.stderr)
  return len(texts)
