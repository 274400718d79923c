"""Text-classification datasets from local TSV/CSV files or folders, or from the Hugging Face hub, with labels by
explicit rules.

A source is a folder holding ``{split}.tsv`` or ``{split}.csv`` (the layout of ``../shared/data``), or one file.
A file has either a header naming its columns (``sentence``/``text`` and ``label`` by default; any others with
``text_column`` / ``label_column``) or no header and ``text<TAB>label`` rows (the AG News layout). TSV files are read
without quoting (sentences contain quotes); CSV files with standard quoting.

Labels never change the task silently:

- Integer labels are class ids only when the values form ``0..K-1``; any other set of values (``0, 1, 7`` or
  ``-1, 0, 1``, or words) is a set of names, and one file never mixes the two.
- A declared set (``labels=("neg", "pos")``, or a known folder's: SST-2, AG News) fixes the classes and their ids; a
  value outside it is an error. Integer values then index it when its names are not themselves integers.
- Without a declared set, a label present in one split but absent from another is an error naming the file, the
  lines and the label (declare the set to allow it).
- A row with more columns than the header (a stray tab inside a sentence) or fewer than the label's column is an
  error naming the file and line; so is an undecodable byte, naming the encoding option.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jfast.errors import DataError

# Label sets of the datasets jfast knows by folder name; they fix the id of each label across splits.
KNOWN_LABELS = {
  "sst2": ("negative", "positive"),
  "agnews": ("World", "Sports", "Business", "Sci/Tech"),
}
_HUB_NAMES = {"sst2": ("glue", "sst2"), "agnews": ("ag_news", None), "ag_news": ("ag_news", None)}
_TEXT_COLUMNS = ("sentence", "text")
_LABEL_COLUMN = "label"
_SUFFIXES = (".tsv", ".csv")
_SPLIT_ALIASES = {"validation": ["dev"], "dev": ["validation"]}


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """Texts with integer labels.

  Attributes:
    texts: one string per example.
    labels: ``int32[N]`` label ids in ``range(len(label_names))`` (all 0 for a file without labels).
    label_names: the label set; the id of a label is its index here (empty for a file without labels).
    source: the file the examples came from (or the hub name), for messages and reports.
    lines: the line of each example in ``source`` (1-based), for messages; empty where not known.
  """

  texts: tuple[str, ...]
  labels: np.ndarray
  label_names: tuple[str, ...]
  source: str = ""
  lines: tuple[int, ...] = ()

  def __len__(self) -> int:
    return len(self.texts)

  def take(self, n: int) -> TextDataset:
    """The first ``n`` examples (for quick runs and tests)."""
    return dataclasses.replace(self, texts=self.texts[:n], labels=self.labels[:n], lines=self.lines[:n])

  def counts(self) -> dict[str, int]:
    """Examples per label name, in label order."""
    bins = np.bincount(self.labels, minlength=len(self.label_names)) if self.label_names else []
    return {name: int(n) for name, n in zip(self.label_names, bins, strict=False)}


@dataclasses.dataclass(frozen=True)
class _RawSplit:
  """A file's texts and label strings before the label set is known."""

  file: str
  texts: tuple[str, ...]
  raw: tuple[str, ...] | None  # None: the file has no label column
  lines: tuple[int, ...]


# ---------------------------------------------------------------------------------------------------------- reading


def check_encoding(encoding: str) -> str:
  """The encoding's canonical name; an unknown one raises `DataError` naming the option."""
  try:
    return codecs.lookup(encoding).name
  except LookupError:
    raise DataError(f"unknown text encoding {encoding!r} (data.encoding / --encoding), e.g. utf-8, latin-1") from None


def _decode(file: Path, encoding: str) -> str:
  data = file.read_bytes()
  if codecs.lookup(encoding).name == "utf-8" and data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8) :]
  try:
    return data.decode(encoding)
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b"\n") + 1
    raise DataError(
      f"{file}, line {line}: bytes {data[e.start : e.end]!r} are not valid {encoding}; give the file's encoding "
      "with data.encoding=... (--encoding), e.g. latin-1 or cp1252"
    ) from None


def _column(header: list[str], wanted: str | None, defaults: Sequence[str], what: str, file: Path) -> int | None:
  lowered = [c.strip().lower() for c in header]
  if wanted is None:
    return next((lowered.index(c) for c in defaults if c in lowered), None)
  if wanted.strip().lower() in lowered:
    return lowered.index(wanted.strip().lower())
  raise DataError(f"{file} has columns {header}, none named {wanted!r} ({what})")


def _read_rows(file: Path, encoding: str) -> list[tuple[int, list[str]]]:
  """``(line, cells)`` of every non-blank row."""
  text = _decode(file, encoding)
  if file.suffix.lower() == ".csv":
    reader = csv.reader(io.StringIO(text, newline=""))
  else:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
  rows = []
  try:
    for cells in reader:
      if cells and any(c.strip() for c in cells):
        rows.append((reader.line_num, cells))
  except csv.Error as e:
    raise DataError(f"{file}, line {reader.line_num}: {e}") from None
  return rows


def read_split_file(
  file: str | Path,
  *,
  text_column: str | None = None,
  label_column: str | None = None,
  encoding: str = "utf-8",
  labels_required: bool = True,
) -> _RawSplit:
  """Reads one TSV/CSV file's texts and label strings (see the module docstring for the layouts)."""
  file = Path(file)
  if not file.is_file():
    raise FileNotFoundError(f"no data file at {file}")
  rows = _read_rows(file, encoding)
  if not rows:
    raise DataError(f"{file} is empty")
  header = rows[0][1]
  text_col = _column(header, text_column, _TEXT_COLUMNS, "data.text_column", file)
  if text_col is not None:
    label_col = _column(header, label_column, (_LABEL_COLUMN,), "data.label_column", file)
    if label_col is None and labels_required:
      raise DataError(
        f"{file} has columns {header}: no {_LABEL_COLUMN!r} column beside {header[text_col]!r} "
        "(name it with data.label_column; jfast predict reads files without labels)"
      )
    body, width, layout = rows[1:], len(header), "the header has"
  elif len(header) in (1, 2) and header[0].strip().lower() not in ("index", "id"):
    if text_column is not None or label_column is not None:
      raise DataError(f"{file} has no header row, so data.text_column / data.label_column cannot name its columns")
    if len(header) == 1 and labels_required:
      raise DataError(f"{file}, line {rows[0][0]}: one column; expected text<TAB>label rows or a header row")
    text_col, label_col, body, width = 0, (1 if len(header) == 2 else None), rows, len(header)
    layout = "the first row has"
  else:
    raise DataError(
      f"{file} has columns {header}: expected a header with 'sentence' or 'text' and 'label' (or name the columns "
      "with data.text_column / data.label_column), or headerless text<TAB>label rows"
    )
  if not body:
    raise DataError(f"{file} has no examples")
  need = max(text_col, label_col if label_col is not None else -1) + 1
  for line, cells in body:
    if len(cells) > width:
      raise DataError(
        f"{file}, line {line}: {len(cells)} columns where {layout} {width}; a tab (or comma) inside a text? "
        "Quote the text (CSV) or remove the extra separator"
      )
    if len(cells) < need:
      raise DataError(f"{file}, line {line}: {len(cells)} columns, expected {width}")
  texts = tuple(cells[text_col].strip() for _, cells in body)
  raw = None
  if label_col is not None:
    raw = tuple(cells[label_col].strip() for _, cells in body)
    empty = [line for (line, _), value in zip(body, raw, strict=True) if not value]
    if empty:
      raise DataError(f"{file}: empty label on line(s) {_lines(empty)}")
  return _RawSplit(str(file), texts, raw, tuple(line for line, _ in body))


def _lines(lines: Sequence[int], most: int = 5) -> str:
  shown = ", ".join(map(str, lines[:most]))
  return shown + (f" and {len(lines) - most} more" if len(lines) > most else "")


def split_file(source: str | Path, split: str) -> Path:
  """The file of ``split`` in a dataset folder (``{split}.tsv`` or ``.csv``; ``dev`` and ``validation`` alias)."""
  folder = Path(source)
  for name in [split, *_SPLIT_ALIASES.get(split, [])]:
    for suffix in _SUFFIXES:
      if (folder / f"{name}{suffix}").is_file():
        return folder / f"{name}{suffix}"
  found = sorted(p.name for p in folder.iterdir() if p.suffix in _SUFFIXES)
  raise FileNotFoundError(f"{folder} has no {split}.tsv or {split}.csv (found: {found or 'no .tsv/.csv files'})")


# ----------------------------------------------------------------------------------------------------------- labels


def _is_int(value: str) -> bool:
  return value.lstrip("-").isdigit() and value.count("-") <= 1


def _sort_key(values: Sequence[str]):
  return (lambda v: int(v)) if all(_is_int(v) for v in values) else (lambda v: v)


def infer_label_names(splits: Sequence[_RawSplit]) -> tuple[str, ...]:
  """The label set of splits without a declared one: ``0..K-1`` ids, or sorted names. A label that some split
  lacks is an error naming where it appears."""
  labelled = [s for s in splits if s.raw is not None]
  values = sorted({v for s in labelled for v in s.raw}, key=_sort_key({v for s in labelled for v in s.raw}))
  if len(labelled) > 1:
    for split in labelled:
      present = set(split.raw)
      for value in values:
        if value not in present:
          other = next(s for s in labelled if value in s.raw)
          where = [line for line, v in zip(other.lines, other.raw, strict=True) if v == value]
          raise DataError(
            f"label {value!r} appears in {other.file} (line(s) {_lines(where)}) but not in {split.file}; the label "
            f"sets are {_values_summary(labelled)}. Fix the data, or declare the classes with "
            "data.labels=a,b,c (--labels) if a split really lacks one"
          )
  return tuple(values)


def _values_summary(splits: Sequence[_RawSplit]) -> str:
  parts = []
  for s in splits:
    values = sorted(set(s.raw), key=_sort_key(set(s.raw)))
    parts.append(f"{Path(s.file).name}: {{{', '.join(values[:8])}{', ...' if len(values) > 8 else ''}}}")
  return "; ".join(parts)


def encode_labels(split: _RawSplit, label_names: Sequence[str]) -> np.ndarray:
  """Label ids of a split under ``label_names``: by name, or (when the names are not integers) by integer id; a
  value that is neither, or a file that mixes the two, raises naming the file, lines and labels."""
  label_names = tuple(label_names)
  by_name = {name: i for i, name in enumerate(label_names)}
  raw = split.raw
  if all(v in by_name for v in raw):
    return np.fromiter((by_name[v] for v in raw), dtype=np.int32, count=len(raw))
  rows = list(zip(split.lines, raw, strict=True))
  if not all(_is_int(n) for n in label_names) and any(_is_int(v) for v in raw):
    names = [(line, v) for line, v in rows if not _is_int(v)]
    if names:
      line, value = names[0]
      raise DataError(
        f"{split.file} mixes integer labels and label names (line {line}: {value!r}); use one or the other"
      )
    bad = [(line, v) for line, v in rows if not 0 <= int(v) < len(label_names)]
    if not bad:
      return np.asarray([int(v) for v in raw], dtype=np.int32)
  else:
    bad = [(line, v) for line, v in rows if v not in by_name]
  labels = sorted({v for _, v in bad})
  raise DataError(
    f"{split.file}: label(s) {', '.join(map(repr, labels[:5]))} on line(s) {_lines([line for line, _ in bad])} are "
    f"outside the label set {label_names}"
  )


def _dataset(split: _RawSplit, label_names: tuple[str, ...]) -> TextDataset:
  if split.raw is None:
    return TextDataset(split.texts, np.zeros(len(split.texts), np.int32), (), split.file, split.lines)
  return TextDataset(split.texts, encode_labels(split, label_names), label_names, split.file, split.lines)


def _check_declared(labels: Sequence[str] | None) -> tuple[str, ...] | None:
  if labels is None:
    return None
  labels = tuple(str(v).strip() for v in labels)
  if len(labels) < 2:
    raise DataError(f"data.labels needs at least two classes, got {labels}")
  if len(set(labels)) != len(labels):
    raise DataError(f"data.labels names a class twice: {labels}")
  return labels


# ---------------------------------------------------------------------------------------------------------- loading


def _source_file(source: str | Path, split: str) -> Path:
  path = Path(source)
  if path.is_dir():
    return split_file(path, split)
  if path.is_file():
    if path.suffix.lower() not in _SUFFIXES:
      raise DataError(f"{path}: data files are .tsv or .csv, got {path.suffix or 'no suffix'}")
    return path
  raise FileNotFoundError(f"no dataset folder or file at {source}")


def _is_local(source: str | Path) -> bool:
  text = str(source)
  return Path(text).exists() or text.startswith((".", "/", "~")) or text.endswith(_SUFFIXES)


def load_classification_splits(
  sources: Sequence[tuple[str | Path, str]],
  *,
  labels: Sequence[str] | None = None,
  text_column: str | None = None,
  label_column: str | None = None,
  encoding: str = "utf-8",
) -> list[TextDataset]:
  """Loads several splits under one label set, by the module's label rules.

  Args:
    sources: ``(folder or file, split)`` pairs, e.g. ``[("data/mr", "train"), ("data/mr/test.csv", "")]``; the
      split names the file in a folder and is ignored for a file. Hub names work too (``("sst2", "train")``).
    labels: the declared label set (names in id order), or None: a known folder's, else inferred from all splits.
    text_column, label_column: header names of the text and label columns (default ``sentence``/``text`` and
      ``label``).
    encoding: the files' text encoding.

  Returns:
    One `TextDataset` per source, all with the same ``label_names``.

  Raises:
    DataError: a file that breaks the rules (the message names the file, line and what to change).
    FileNotFoundError: a missing folder, split or file.
  """
  check_encoding(encoding)
  declared = _check_declared(labels)
  if all(not _is_local(src) for src, _ in sources):
    hub = [_load_hub(str(src), split, declared) for src, split in sources]
    return [dataclasses.replace(ds, label_names=hub[0].label_names) for ds in hub]
  raws = []
  for src, split in sources:
    if not _is_local(src):
      raise DataError(f"{src!r}: mix local files and hub datasets in separate runs")
    file = _source_file(src, split)
    raws.append(read_split_file(file, text_column=text_column, label_column=label_column, encoding=encoding))
    if declared is None and Path(src).is_dir():
      declared = KNOWN_LABELS.get(Path(src).resolve().name)
  names = declared if declared is not None else infer_label_names(raws)
  return [_dataset(raw, names) for raw in raws]


def load_text_classification(
  source: str | Path,
  split: str = "train",
  *,
  label_names: Sequence[str] | None = None,
  text_column: str | None = None,
  label_column: str | None = None,
  encoding: str = "utf-8",
  labels_required: bool = True,
) -> TextDataset:
  """Loads one split of a text-classification dataset.

  Args:
    source: a local folder holding ``{split}.tsv`` or ``{split}.csv`` (e.g. ``../shared/data/sst2``), a ``.tsv`` /
      ``.csv`` file, or a hub name (``sst2``, ``agnews``/``ag_news``, or any ``datasets`` name with a
      ``sentence``/``text`` and a ``label`` column).
    split: ``train``, ``dev`` (alias ``validation``) or ``test``; ignored for a file.
    label_names: the label set, fixing label ids. Known folders (sst2, agnews) have theirs built in; otherwise it
      is inferred from this split alone, so load splits together (`load_classification_splits`) or pass it.
    text_column, label_column, encoding: as in `load_classification_splits`.
    labels_required: False reads a file without a label column too (labels all 0, ``label_names`` empty).

  Returns:
    A `TextDataset`.

  Example:
    >>> ds = load_text_classification("../shared/data/sst2", "dev")  # doctest: +SKIP
    >>> len(ds), ds.label_names  # doctest: +SKIP
    (872, ('negative', 'positive'))
  """
  check_encoding(encoding)
  declared = _check_declared(label_names)
  if not _is_local(source):
    return _load_hub(str(source), split, declared)
  file = _source_file(source, split)
  raw = read_split_file(
    file, text_column=text_column, label_column=label_column, encoding=encoding, labels_required=labels_required
  )
  if declared is None and Path(source).is_dir():
    declared = KNOWN_LABELS.get(Path(source).resolve().name)
  if raw.raw is None:
    return _dataset(raw, ())
  return _dataset(raw, declared if declared is not None else infer_label_names([raw]))


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
      f"{name!r} is neither a local folder or file nor a loadable hub dataset ({type(e).__name__}: {e})"
    ) from None
  text_col = next((c for c in _TEXT_COLUMNS if c in ds.column_names), None)
  if text_col is None or _LABEL_COLUMN not in ds.column_names:
    raise DataError(f"hub dataset {name!r} has columns {ds.column_names}, expected sentence/text and label")
  feature = ds.features[_LABEL_COLUMN]
  raw = tuple(str(v) for v in ds[_LABEL_COLUMN])
  if not raw:
    raise DataError(f"hub dataset {name!r} split {split!r} has no examples")
  split_raw = _RawSplit(f"{name}/{split}", tuple(ds[text_col]), raw, tuple(range(1, len(raw) + 1)))
  names = label_names or tuple(getattr(feature, "names", None) or infer_label_names([split_raw]))
  return _dataset(split_raw, tuple(names))


def describe_labels(splits: dict[str, TextDataset]) -> str:
  """A table of the label set with counts per split, as every run prints it.

  Example:
    >>> print(describe_labels({"train": train, "dev": dev}))  # doctest: +SKIP
    labels (2)   train    dev
    negative     29,780   428
    positive     37,569   444
  """
  names = next(iter(splits.values())).label_names
  counts = {split: ds.counts() for split, ds in splits.items()}
  width = max([len(f"labels ({len(names)})"), *map(len, names)]) + 2
  cols = [max(len(split), 8) + 2 for split in splits]
  lines = [f"labels ({len(names)})".ljust(width) + "".join(s.rjust(c) for s, c in zip(splits, cols, strict=True))]
  for name in names:
    cells = "".join(f"{counts[s].get(name, 0):,}".rjust(c) for s, c in zip(splits, cols, strict=True))
    lines.append(name.ljust(width) + cells)
  return "\n".join(lines)
