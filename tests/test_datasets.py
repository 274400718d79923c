"""Dataset loading from local TSV/CSV folders and files: the real files, the label rules, and every bad input named
with its file and line."""

from __future__ import annotations

import numpy as np
import pytest

from jfast.data import describe_labels, load_classification_splits, load_text_classification, load_tokenizer, tokenize
from jfast.errors import DataError


def test_sst2_and_agnews_load_with_fixed_label_ids(data_dir):
  dev = load_text_classification(data_dir / "sst2", "dev")
  assert len(dev) == 872 and dev.label_names == ("negative", "positive")
  assert np.bincount(dev.labels).tolist() == [428, 444]
  assert dev.lines[:2] == (2, 3)  # line 1 is the header
  test = load_text_classification(data_dir / "agnews", "test")
  assert len(test) == 7600 and np.bincount(test.labels).tolist() == [1900] * 4
  assert test.label_names == ("World", "Sports", "Business", "Sci/Tech")
  assert load_text_classification(data_dir / "sst2", "validation").texts == dev.texts
  unlabelled = load_text_classification(data_dir / "sst2", "test", labels_required=False)
  assert len(unlabelled) == 1821 and unlabelled.label_names == ()


def _write(folder, name, text, encoding="utf-8"):
  folder.mkdir(exist_ok=True, parents=True)
  (folder / name).write_bytes(text.encode(encoding))
  return folder


def _splits(folder, **kwargs):
  return load_classification_splits([(folder, "train"), (folder, "dev")], **kwargs)


def test_missing_split_and_folder(tmp_path):
  folder = _write(tmp_path / "ds", "train.tsv", "sentence\tlabel\ngood\t1\n")
  with pytest.raises(FileNotFoundError, match=r"no dev.tsv or dev.csv \(found: \['train.tsv'\]\)"):
    load_text_classification(folder, "dev")
  with pytest.raises(FileNotFoundError, match="no dataset folder or file"):
    load_text_classification(str(tmp_path / "missing"), "train")


def test_wrong_columns(tmp_path):
  folder = _write(tmp_path / "ds", "train.tsv", "index\tsentence\n0\tgood film\n")
  with pytest.raises(DataError, match="no 'label' column beside 'sentence'"):
    load_text_classification(folder)
  folder = _write(tmp_path / "ds3", "train.tsv", "a\tb\tc\n1\t2\t3\n")
  with pytest.raises(DataError, match="expected a header with 'sentence' or 'text'"):
    load_text_classification(folder)
  with pytest.raises(DataError, match=r"none named 'review' \(data.text_column\)"):
    load_text_classification(folder, text_column="review")


def test_named_columns_and_csv_quoting(tmp_path):
  folder = _write(tmp_path / "mr", "train.csv", 'id,review,stars\n1,"good, really",pos\n2,"bad ""film""",neg\n')
  ds = load_text_classification(folder, text_column="review", label_column="stars")
  assert ds.texts == ("good, really", 'bad "film"') and ds.label_names == ("neg", "pos")
  assert ds.labels.tolist() == [1, 0] and ds.lines == (2, 3)


def test_a_stray_tab_is_an_error_naming_file_and_line(tmp_path):
  folder = _write(tmp_path / "ds", "train.tsv", "sentence\tlabel\ngood film\t1\nbad\tfilm\t0\n")
  with pytest.raises(DataError, match=r"train.tsv, line 3: 3 columns where the header has 2"):
    load_text_classification(folder)
  headerless = _write(tmp_path / "news", "train.tsv", "a story\tWorld\nanother\tstory\tSports\n")
  with pytest.raises(DataError, match=r"line 2: 3 columns where the first row has 2"):
    load_text_classification(headerless)


def test_integer_labels_are_ids_only_when_they_form_0_to_k_minus_1(tmp_path):
  ids = _write(tmp_path / "ids", "train.tsv", "text\tlabel\na\t2\nb\t0\nc\t1\n")
  _write(ids, "dev.tsv", "text\tlabel\nd\t1\ne\t0\nf\t2\n")
  train, dev = _splits(ids)
  assert (
    train.label_names == ("0", "1", "2") and train.labels.tolist() == [2, 0, 1] and dev.labels.tolist() == [1, 0, 2]
  )
  names = _write(tmp_path / "names", "train.tsv", "text\tlabel\na\t10\nb\t-1\nc\t2\n")
  _write(names, "dev.tsv", "text\tlabel\nd\t2\ne\t10\nf\t-1\n")
  train, dev = _splits(names)
  assert train.label_names == ("-1", "2", "10")  # a set of names, in numeric order
  assert train.labels.tolist() == [2, 0, 1] and dev.labels.tolist() == [1, 2, 0]


@pytest.mark.parametrize("odd", ["7", "-1"])
def test_a_label_in_one_split_only_is_an_error_naming_file_lines_and_label(tmp_path, odd):
  folder = _write(tmp_path / "ds", "train.tsv", f"sentence\tlabel\na\t0\nb\t1\nc\t{odd}\nd\t0\n")
  _write(folder, "dev.tsv", "sentence\tlabel\ne\t0\nf\t1\n")
  with pytest.raises(DataError, match=rf"label '{odd}' appears in .*train.tsv \(line\(s\) 4\) but not in .*dev.tsv"):
    _splits(folder)
  train, dev = _splits(folder, labels=("0", "1", odd))  # declared: a class may be absent from a split
  assert (
    train.label_names == ("0", "1", odd) and train.labels.tolist() == [0, 1, 2, 0] and dev.labels.tolist() == [0, 1]
  )


def test_declared_and_known_label_sets(tmp_path):
  folder = _write(tmp_path / "sst2", "train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\nodd\t2\n")
  with pytest.raises(DataError, match=r"label\(s\) '2' on line\(s\) 4 are outside the label set \('negative', 'pos"):
    load_text_classification(folder)
  mine = _write(tmp_path / "mine", "train.tsv", "text\tlabel\na\t1\nb\t0\n")
  ds = load_text_classification(mine, label_names=("bad", "good"))  # integer ids into declared names
  assert ds.label_names == ("bad", "good") and ds.labels.tolist() == [1, 0]
  mixed = _write(tmp_path / "mixed", "train.tsv", "text\tlabel\na\t1\nb\tgood\n")
  with pytest.raises(DataError, match=r"mixes integer labels and label names \(line 3: 'good'\)"):
    load_text_classification(mixed, label_names=("bad", "good"))
  with pytest.raises(DataError, match="at least two classes"):
    load_text_classification(mine, label_names=("only",))


def test_encoding_errors_name_file_line_and_option(tmp_path):
  folder = _write(tmp_path / "fr", "train.tsv", "text\tlabel\nbon\tpos\nmauvais d\u00e9cor\tneg\n", encoding="latin-1")
  with pytest.raises(DataError, match=r"train.tsv, line 3: bytes b'\\xe9' are not valid utf-8; .*data.encoding"):
    load_text_classification(folder)
  ds = load_text_classification(folder, encoding="latin-1")
  assert ds.texts[1] == "mauvais d\u00e9cor"
  with pytest.raises(DataError, match="unknown text encoding 'latin-9x'"):
    load_text_classification(folder, encoding="latin-9x")
  bom = _write(tmp_path / "bom", "train.tsv", "\ufefftext\tlabel\na\tx\nb\ty\n")
  assert load_text_classification(bom).texts == ("a", "b")  # a UTF-8 byte-order mark is not part of the header


def test_empty_dataset(tmp_path):
  folder = _write(tmp_path / "ds", "train.tsv", "sentence\tlabel\n")
  with pytest.raises(DataError, match="has no examples"):
    load_text_classification(folder)
  _write(folder, "dev.tsv", "")
  with pytest.raises(DataError, match="is empty"):
    load_text_classification(folder, "dev")
  _write(folder, "test.tsv", "sentence\tlabel\na\t\nb\t1\n")
  with pytest.raises(DataError, match=r"empty label on line\(s\) 2"):
    load_text_classification(folder, "test")


def test_the_label_table_counts_every_split(data_dir):
  train, dev = load_classification_splits([(data_dir / "agnews", "dev"), (data_dir / "agnews", "test")])
  table = describe_labels({"train": train, "test": dev}).splitlines()
  assert table[0].split() == ["labels", "(4)", "train", "test"]
  assert [line.split()[-1] for line in table[1:]] == ["1,900"] * 4
  assert sum(int(line.split()[-2].replace(",", "")) for line in table[1:]) == len(train) == 10001


def test_tokenize_has_no_padding_and_counts_truncation(minilm_path):
  tok = load_tokenizer(minilm_path)
  long_text = " ".join(["word"] * 300)
  ids, cut = tokenize(tok, ["a fine film", long_text], max_length=128)
  assert [len(i) for i in ids] == [5, 128] and cut == 1
  assert ids[1][0] == 101 and ids[1][-1] == 102  # [CLS] ... [SEP] kept
  with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
    load_tokenizer(minilm_path.parent)
