"""Classification metrics from labels and predictions: accuracy, macro-F1, per-class precision and recall, and the
confusion matrix, as `jfast evaluate` reports them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """``int64[C, C]``: row = true class, column = predicted class."""
  labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
  if labels.shape != predictions.shape:
    raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
  for name, ids in (("labels", labels), ("predictions", predictions)):
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
      raise ValueError(f"{name} hold ids outside 0..{num_classes - 1}")
  return np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes).reshape(
    num_classes, num_classes
  )


def classification_report(labels: np.ndarray, predictions: np.ndarray, label_names: Sequence[str]) -> dict:
  """Accuracy, macro-averaged precision/recall/F1, per-class scores and the confusion matrix.

  A class never predicted has precision 0, a class absent from ``labels`` recall 0 (scikit-learn's
  ``zero_division=0``); both still count in the macro averages.

  Returns:
    ``{"examples", "accuracy", "macro_precision", "macro_recall", "macro_f1", "per_class": {name: {"precision",
    "recall", "f1", "support"}}, "confusion_matrix": [[...]], "labels": [...]}``, JSON-ready.
  """
  names = list(label_names)
  matrix = confusion_matrix(labels, predictions, len(names))
  hits = np.diag(matrix).astype(np.float64)
  predicted, support = matrix.sum(0).astype(np.float64), matrix.sum(1).astype(np.float64)
  precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
  recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(hits), where=denom > 0)
  total = int(matrix.sum())
  return {
    "examples": total,
    "accuracy": float(hits.sum() / total) if total else 0.0,
    "macro_precision": float(precision.mean()),
    "macro_recall": float(recall.mean()),
    "macro_f1": float(f1.mean()),
    "per_class": {
      name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
      for name, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)
    },
    "confusion_matrix": matrix.tolist(),
    "labels": names,
  }


def format_report(report: dict) -> str:
  """The report as aligned text: per-class table, then the confusion matrix (rows true, columns predicted)."""
  names = report["labels"]
  w = max([len("true / predicted"), *map(len, names)]) + 2
  lines = [f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
  for name in names:
    c = report["per_class"][name]
    lines.append(f"{name:<{w}}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}{c['support']:>10,}")
  lines.append(
    f"{'macro':<{w}}{report['macro_precision']:>10.4f}{report['macro_recall']:>10.4f}{report['macro_f1']:>10.4f}"
    f"{report['examples']:>10,}"
  )
  lines.append(f"accuracy {report['accuracy']:.4f} on {report['examples']:,} examples")
  lines.append("")
  cw = max(8, *(len(n) + 2 for n in names))
  lines.append("true / predicted".ljust(w) + "".join(f"{n:>{cw}}" for n in names))
  for name, row in zip(names, report["confusion_matrix"], strict=True):
    lines.append(f"{name:<{w}}" + "".join(f"{v:>{cw},}" for v in row))
  return "\n".join(lines)
