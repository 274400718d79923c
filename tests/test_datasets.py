"""Dataset loading from local TSV folders: the real files, and every bad input named clearly."""

from __future__ import annotations

import numpy as np
import pytest

from jfast.data import load_text_classification, load_tokenizer, tokenize


def test_sst2_and_agnews_load_with_fixed_label_ids(data_dir):
  dev = load_text_classification(data_dir / "sst2", "dev")
  assert len(dev) == 872 and dev.label_names == ("negative", "positive")
  assert np.bincount(dev.labels).tolist() == [428, 444]
  test = load_text_classification(data_dir / "agnews", "test")
  assert len(test) == 7600 and np.bincount(test.labels).tolist() == [1900] * 4
  assert test.label_names == ("World", "Sports", "Business", "Sci/Tech")
  assert load_text_classification(data_dir / "sst2", "validation").texts == dev.texts


def _write(folder, name, text):
  folder.mkdir(exist_ok=True)
  (folder / name).write_text(text, encoding="utf-8")
  return folder


def test_missing_split_and_folder(tmp_path):
  folder = _write(tmp_path / "ds", "train.tsv", "sentence\tlabel\ngood\t1\n")
  with pytest.raises(FileNotFoundError, match=r"no dev.tsv \(found: \['train.tsv'\]\)"):
    load_text_classification(folder, "dev")
  with pytest.raises(FileNotFoundError, match="no dataset folder"):
    load_text_classification(str(tmp_path / "missing"), "train")


def test_wrong_columns(tmp_path):
  folder = _write(tmp_path / "ds", "train.tsv", "index\tsentence\n0\tgood film\n")
  with pytest.raises(ValueError, match="expected a 'label' column"):
    load_text_classification(folder)
  folder = _write(tmp_path / "ds3", "train.tsv", "a\tb\tc\n1\t2\t3\n")
  with pytest.raises(ValueError, match="expected a header with 'sentence' or 'text'"):
    load_text_classification(folder)


def test_label_outside_label_set(tmp_path):
  folder = _write(tmp_path / "sst2", "train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\nodd\t2\n")
  with pytest.raises(ValueError, match=r"row 3 has label '2', outside the label set \('negative', 'positive'\)"):
    load_text_classification(folder)


def test_empty_dataset(tmp_path):
  folder = _write(tmp_path / "ds", "train.tsv", "sentence\tlabel\n")
  with pytest.raises(ValueError, match="has no examples"):
    load_text_classification(folder)
  _write(folder, "dev.tsv", "")
  with pytest.raises(ValueError, match="is empty"):
    load_text_classification(folder, "dev")


def test_inferred_labels_for_unknown_folder(tmp_path):
  folder = _write(tmp_path / "mine", "train.tsv", "text\tlabel\na\t2\nb\t0\nc\t1\n")
  ds = load_text_classification(folder)
  assert ds.label_names == ("0", "1", "2") and ds.labels.tolist() == [2, 0, 1]


def test_tokenize_has_no_padding_and_counts_truncation(minilm_path):
  tok = load_tokenizer(minilm_path)
  long_text = " ".join(["word"] * 300)
  ids, cut = tokenize(tok, ["a fine film", long_text], max_length=128)
  assert [len(i) for i in ids] == [5, 128] and cut == 1
  assert ids[1][0] == 101 and ids[1][-1] == 102  # [CLS] ... [SEP] kept
  with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
    load_tokenizer(minilm_path.parent)
