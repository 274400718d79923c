"""Text-classification datasets from a local folder of TSVs or from the Hugging Face hub.

Local folders follow the layout of ``../shared/data``: ``{split}.tsv`` with either a ``sentence``/``text`` +
``label`` header (GLUE style) or no header and ``text<TAB>label name`` rows (AG News style).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

# Label sets of the datasets jfast knows by folder name; they fix the id of each label across splits.
KNOWN_LABELS = {
  "sst2": ("negative", "positive"),
  "agnews": ("World", "Sports", "Business", "Sci/Tech"),
}
_HUB_NAMES = {"sst2": ("glue", "sst2"), "agnews": ("ag_news", None), "ag_news": ("ag_news", None)}
_TEXT_COLUMNS = ("sentence", "text")


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """Texts with integer labels.

  Attributes:
    texts: one string per example.
    labels: ``int32[N]`` label ids in ``range(len(label_names))``.
    label_names: the label set; the id of a label is its index here.
  """

  texts: tuple[str, ...]
  labels: np.ndarray
  label_names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.texts)

  def take(self, n: int) -> TextDataset:
    """The first ``n`` examples (for quick runs and tests)."""
    return TextDataset(self.texts[:n], self.labels[:n], self.label_names)


def _label_ids(raw: list[str], label_names: tuple[str, ...], where: str) -> np.ndarray:
  index = {name: i for i, name in enumerate(label_names)}
  # Integer labels ("0", "1") index the label set directly; names are looked up.
  index.update({str(i): i for i in range(len(label_names))})
  ids = np.empty(len(raw), dtype=np.int32)
  for row, value in enumerate(raw):
    if value not in index:
      raise ValueError(f"{where}: row {row + 1} has label {value!r}, outside the label set {label_names}")
    ids[row] = index[value]
  return ids


def _read_tsv(file: Path, label_names: tuple[str, ...] | None) -> TextDataset:
  with file.open(newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  if not rows:
    raise ValueError(f"{file} is empty")
  header = [c.strip().lower() for c in rows[0]]
  text_col = next((header.index(c) for c in _TEXT_COLUMNS if c in header), None)
  if text_col is not None:
    if "label" not in header:
      raise ValueError(f"{file} has columns {rows[0]}, expected a 'label' column beside {_TEXT_COLUMNS[text_col]!r}")
    label_col, body = header.index("label"), rows[1:]
  elif len(rows[0]) == 2 and header[0] not in ("index", "id"):
    text_col, label_col, body = 0, 1, rows
  else:
    raise ValueError(
      f"{file} has columns {rows[0]}: expected a header with 'sentence' or 'text' and 'label', "
      "or headerless 'text<TAB>label' rows"
    )
  body = [r for r in body if r and any(c.strip() for c in r)]
  if not body:
    raise ValueError(f"{file} has no examples")
  short = next((i for i, r in enumerate(body) if len(r) <= max(text_col, label_col)), None)
  if short is not None:
    raise ValueError(
      f"{file}: row {short + 1} has {len(body[short])} columns, expected {max(text_col, label_col) + 1}"
    )
  texts = tuple(r[text_col].strip() for r in body)
  raw = [r[label_col].strip() for r in body]
  if label_names is None:
    label_names = _infer_labels(raw)
  return TextDataset(texts, _label_ids(raw, label_names, str(file)), tuple(label_names))


def _infer_labels(raw: list[str]) -> tuple[str, ...]:
  values = sorted(set(raw))
  if all(v.isdigit() for v in values):
    return tuple(str(i) for i in range(max(int(v) for v in values) + 1))
  return tuple(values)


def load_text_classification(
  source: str | Path, split: str = "train", *, label_names: tuple[str, ...] | None = None
) -> TextDataset:
  """Loads one split of a text-classification dataset.

  Args:
    source: a local folder holding ``{split}.tsv`` (e.g. ``../shared/data/sst2``), or a hub name (``sst2``,
      ``agnews``/``ag_news``, or any ``datasets`` name with a ``sentence``/``text`` and a ``label`` column).
    split: ``train``, ``dev`` (alias ``validation``) or ``test``.
    label_names: the label set, fixing label ids across splits. Known folders (sst2, agnews) have theirs built in;
      otherwise it is inferred (integers ``0..max``, or sorted names), so pass it when splits could differ.

  Returns:
    A `TextDataset`.

  Example:
    >>> ds = load_text_classification("../shared/data/sst2", "dev")  # doctest: +SKIP
    >>> len(ds), ds.label_names  # doctest: +SKIP
    (872, ('negative', 'positive'))
  """
  path = Path(source)
  if path.is_dir():
    label_names = label_names or KNOWN_LABELS.get(path.name)
    candidates = [split] + (["dev"] if split == "validation" else ["validation"] if split == "dev" else [])
    for name in candidates:
      if (path / f"{name}.tsv").is_file():
        return _read_tsv(path / f"{name}.tsv", label_names)
    found = sorted(p.name for p in path.glob("*.tsv"))
    raise FileNotFoundError(f"{path} has no {split}.tsv (found: {found or 'no .tsv files'})")
  if path.exists() or str(source).startswith((".", "/", "~")):
    raise FileNotFoundError(f"no dataset folder at {source}")
  return _load_hub(str(source), split, label_names)


def _load_hub(name: str, split: str, label_names: tuple[str, ...] | None) -> TextDataset:
  import datasets  # imported lazily: loading it costs seconds and most runs read local folders

  hub_name, hub_config = _HUB_NAMES.get(name, (name, None))
  hub_split = "validation" if split == "dev" else split
  if hub_name == "ag_news" and hub_split == "validation":
    hub_split = "test"
  try:
    ds = datasets.load_dataset(hub_name, hub_config, split=hub_split)
  except Exception as e:  # the hub raises many types: connection, missing dataset, missing split
    raise FileNotFoundError(
      f"{name!r} is neither a local folder nor a loadable hub dataset ({type(e).__name__}: {e})"
    ) from None
  text_col = next((c for c in _TEXT_COLUMNS if c in ds.column_names), None)
  if text_col is None or "label" not in ds.column_names:
    raise ValueError(f"hub dataset {name!r} has columns {ds.column_names}, expected sentence/text and label")
  feature = ds.features["label"]
  names = label_names or tuple(getattr(feature, "names", None) or _infer_labels([str(v) for v in ds["label"]]))
  raw = [str(v) for v in ds["label"]]
  if not raw:
    raise ValueError(f"hub dataset {name!r} split {split!r} has no examples")
  return TextDataset(tuple(ds[text_col]), _label_ids(raw, names, f"{name}/{split}"), tuple(names))
