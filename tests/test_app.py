"""Your data in, a model out, through the real command line: a fine-tune on a user's own TSV folder exports a folder
that transformers' pipeline reads to the same predictions; evaluate, predict and export work on files and folders
outside the training data; every broken input ends with one line and exit status 2 before the model loads."""

from __future__ import annotations

import contextlib
import io
import json
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jfast.app import cli, finetune
from jfast.data import BatchingConfig, load_text_classification, make_batches, rows_for_examples
from jfast.data.datasets import read_split_file
from jfast.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("neg", "pos")


def _write_tsv(path: Path, texts, labels, *, header=("sentence", "label"), sep="\t") -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  rows = [sep.join(header)] + [f"{t}{sep}{label}" for t, label in zip(texts, labels, strict=True)]
  path.write_text("\n".join(rows) + "\n", encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def own_data(tmp_path_factory, data_dir):
  """A user's folder: SST-2 sentences with labels as names, in a folder jfast does not know by name."""
  root = tmp_path_factory.mktemp("own")
  train = load_text_classification(data_dir / "sst2", "train").take(1200)
  dev = load_text_classification(data_dir / "sst2", "dev")
  folder = root / "reviews"
  _write_tsv(folder / "train.tsv", train.texts, [NAMES[i] for i in train.labels])
  _write_tsv(folder / "dev.tsv", dev.texts[:200], [NAMES[i] for i in dev.labels[:200]])
  # Held-out texts in another layout: CSV, other column names, labels as names.
  held = root / "held_out.csv"
  texts = [t.replace('"', "'") for t in dev.texts[200:400]]
  rows = ["review,stars"] + [f'"{t}",{NAMES[i]}' for t, i in zip(texts, dev.labels[200:400], strict=True)]
  held.write_text("\n".join(rows) + "\n", encoding="utf-8")
  counts = {
    "train": dict(zip(NAMES, np.bincount(train.labels).tolist(), strict=True)),
    "dev": dict(zip(NAMES, np.bincount(dev.labels[:200]).tolist(), strict=True)),
  }
  return {
    "folder": folder,
    "held_out": held,
    "held_texts": texts,
    "held_labels": dev.labels[200:400],
    "counts": counts,
  }


def _run(argv, capsys=None) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(argv)
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, own_data, minilm_path):
  root = tmp_path_factory.mktemp("runs")
  ckpt = root / "ckpt"
  code, out, err = _run(
    [
      "--runs",
      str(root),
      "finetune",
      f"data.dataset={own_data['folder']}",
      "optimizer.learning_rate=3e-4",
      "loop.progress=false",
      "loop.log_every=5",
      f"loop.checkpoint_dir={ckpt}",
      "loop.checkpoint_every=7",
    ]
  )
  assert code == 0, err
  (run,) = [p for p in root.iterdir() if p.name.startswith("finetune-")]
  return {
    "run": run,
    "model": run / "model",
    "ckpt": ckpt,
    "stdout": out,
    "metrics": json.loads((run / "metrics.json").read_text()),
  }


@pytest.mark.slow
def test_the_export_is_complete_and_transformers_pipeline_predicts_exactly_as_jfast(trained, own_data, tmp_path):
  transformers = pytest.importorskip("transformers")
  model = trained["model"]
  config = json.loads((model / "config.json").read_text())
  assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
  for file in model.iterdir():  # ordinary permissions: group and others can read (not safetensors' 0600)
    assert file.stat().st_mode & stat.S_IRGRP and file.stat().st_mode & stat.S_IROTH, file
  texts = own_data["held_texts"]
  tok = transformers.AutoTokenizer.from_pretrained(model)
  assert tok.vocab_size == 30522 and tok.model_max_length == 512
  out = tmp_path / "pred.jsonl"
  text_file = tmp_path / "texts.txt"
  text_file.write_text("\n".join(texts) + "\n")
  assert _run(["predict", str(trained["run"]), str(text_file), "--output", str(out), "--no-progress"])[0] == 0
  ours = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["text"] for r in ours] == texts
  pipe = transformers.pipeline("text-classification", model=str(model), top_k=None)
  theirs = pipe(texts)
  hf = np.array([[next(d["score"] for d in row if d["label"] == n) for n in NAMES] for row in theirs])
  mine = np.array([[r["probabilities"][n] for n in NAMES] for r in ours])
  np.testing.assert_allclose(mine, hf, atol=2e-6)
  assert [r["label"] for r in ours] == [NAMES[i] for i in hf.argmax(1)]
  assert len({r["label"] for r in ours}) == 2  # a fine-tuned model: both classes predicted


@pytest.mark.slow
def test_evaluate_a_file_outside_the_training_folder_against_the_pipeline(trained, own_data, tmp_path):
  transformers = pytest.importorskip("transformers")
  report_file = tmp_path / "report.json"
  code, out, _ = _run(
    [
      "evaluate",
      str(trained["run"]),
      str(own_data["held_out"]),
      "--text-column",
      "review",
      "--label-column",
      "stars",
      "--output",
      str(report_file),
      "--no-progress",
    ]
  )
  assert code == 0
  report = json.loads(report_file.read_text())
  pipe = transformers.pipeline("text-classification", model=str(trained["model"]))
  predicted = np.array([NAMES.index(r["label"]) for r in pipe(own_data["held_texts"])])
  truth = np.asarray(own_data["held_labels"])
  confusion = [[int(np.sum((truth == t) & (predicted == p))) for p in range(2)] for t in range(2)]
  assert report["confusion_matrix"] == confusion and report["split"] == "held_out.csv"
  assert report["accuracy"] == pytest.approx(float(np.mean(predicted == truth)))
  recall = [confusion[c][c] / max(sum(confusion[c]), 1) for c in range(2)]
  assert [report["per_class"][n]["recall"] for n in NAMES] == pytest.approx(recall)
  assert "held_out.csv" in out and "macro-F1" in out and "true / predicted" in out
  # Integer ids into the model's label set read as the same labels.
  ids = _write_tsv(tmp_path / "ids.tsv", own_data["held_texts"], list(truth))
  code, _, _ = _run(
    ["evaluate", str(trained["model"]), str(ids), "--output", str(tmp_path / "r2.json"), "--no-progress"]
  )
  assert code == 0 and json.loads((tmp_path / "r2.json").read_text())["confusion_matrix"] == confusion


@pytest.mark.slow
def test_predict_from_stdin_as_tsv(trained, monkeypatch, capsys):
  monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a gripping, funny film\n\nutterly dull\n")))
  assert cli.main(["predict", str(trained["run"]), "-", "--format", "tsv", "--no-progress"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "text\tlabel\tneg\tpos" and [line.split("\t")[0] for line in lines[1:]] == [
    "a gripping, funny film",
    "utterly dull",
  ]
  assert all(abs(float(a) + float(b) - 1) < 1e-5 for *_, a, b in (line.split("\t") for line in lines[1:]))


@pytest.mark.slow
def test_export_after_the_fact_from_checkpoints_and_from_the_run(trained, tmp_path):
  code, _, err = _run(["export", str(trained["ckpt"]), str(tmp_path / "from_ckpt")])
  assert code == 0, err
  final = load_file(str(trained["model"] / "model.safetensors"))
  restored = load_file(str(tmp_path / "from_ckpt" / "model.safetensors"))  # the last checkpoint is the final step
  assert final.keys() == restored.keys() and all(np.array_equal(final[k], restored[k]) for k in final)
  assert (tmp_path / "from_ckpt" / "tokenizer.json").is_file()
  assert _run(["export", str(trained["run"]), str(tmp_path / "copy")])[0] == 0
  assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(p.name for p in trained["model"].iterdir())
  code, _, err = _run(["export", str(trained["run"]), str(tmp_path / "copy")])
  assert code == 2 and "exists and is not empty" in err


@pytest.mark.slow
def test_the_run_reports_its_labels_split_and_step_sizes(trained, own_data):
  m, out = trained["metrics"], trained["stdout"]
  assert m["eval_split"] == "dev" and m["eval_accuracy"] == m["evals"][-1]["accuracy"] and "dev_accuracy" not in m
  assert m["labels"] == {"names": ["neg", "pos"], **own_data["counts"]}
  counts = own_data["counts"]
  assert f"neg {counts['train']['neg']:>13,} {counts['dev']['neg']:>9,}".split() == next(
    line.split() for line in out.splitlines() if line.startswith("neg ")
  )
  assert m["train_examples"] == m["train_examples_available"] == 1200  # no silent cut by default
  assert m["batch_size"] == 16 and m["batch_size_counts"] == "rows"
  assert m["examples_per_step"] == pytest.approx(1200 / m["steps"])
  assert m["real_tokens_per_step"] > m["examples_per_step"] * 5
  assert "labels (2)" in out and "[train] step 5/" in out  # no terminal: log lines, not a bar
  assert "rows (" in out and "examples, " in out and "real tokens a step" in out


def _bad(tmp_path, name, text, encoding="utf-8"):
  folder = tmp_path / name
  folder.mkdir()
  (folder / "train.tsv").write_bytes(text.encode(encoding))
  (folder / "dev.tsv").write_text("sentence\tlabel\nfine\t0\ngood\t1\n")
  return folder


BROKEN = {
  "stray_tab": ("sentence\tlabel\na fine\tfilm\t1\nbad\t0\n", "train.tsv, line 2: 3 columns where the header has 2"),
  "label_7": ("sentence\tlabel\na\t0\nb\t1\nc\t7\n", "label '7' appears in"),
  "label_minus_1": ("sentence\tlabel\na\t0\nb\t-1\nc\t1\n", "label '-1' appears in"),
  "latin1": ("sentence\tlabel\nd\u00e9cor\t0\nb\t1\n", "line 2: bytes b'\\xe9' are not valid utf-8"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_data_ends_in_one_line_before_the_model_loads(tmp_path, monkeypatch, case):
  text, message = BROKEN[case]
  folder = _bad(tmp_path, case, text, "latin-1" if case == "latin1" else "utf-8")
  monkeypatch.setattr(finetune, "load_hf_bert", _no_model)
  code, _, err = _run(["--runs", str(tmp_path / "runs"), "finetune", f"data.dataset={folder}"])
  assert code == 2 and err.count("\n") == 1 and err.startswith("jfast: error: ") and message in err, err


def _no_model(*args, **kwargs):
  raise AssertionError("the model was loaded before the bad input was found")


class _DataRead(Exception):
  """Raised where the model would load: the data was read without an error."""


def test_the_encoding_option_reads_the_file_the_default_refuses(tmp_path, monkeypatch):
  folder = _bad(tmp_path, "latin", "sentence\tlabel\nd\u00e9cor\t0\nb\t1\n", "latin-1")
  (folder / "dev.tsv").write_bytes("sentence\tlabel\nna\u00efve\t1\nc\t0\n".encode("latin-1"))

  def reached(*args, **kwargs):
    raise _DataRead

  monkeypatch.setattr(finetune, "load_hf_bert", reached)
  with pytest.raises(_DataRead):
    _run(["--runs", str(tmp_path / "runs"), "finetune", f"data.dataset={folder}", "data.encoding=latin-1"])
  code, _, err = _run(["--runs", str(tmp_path / "runs"), "finetune", f"data.dataset={folder}"])
  assert code == 2 and "data.encoding" in err


@pytest.mark.parametrize(
  ("words", "message"),
  [
    (["batching.batch_size=0"], "batch_size must be a positive integer, got 0"),
    (["data.dataset=/nonexistent/data"], "no dataset folder or file at /nonexistent/data"),
    (["data.model=/nonexistent/model"], "--model /nonexistent/model: no such folder"),
    (["data.encoding=utf-99"], "unknown text encoding 'utf-99'"),
    (["batching.examples_per_step=0"], "--examples-per-step must be a positive integer"),
    (["memory.micro_batches=3"], "--micro-batches 3 must be positive and divide --batch-size 16"),
    (["data.labels=0,2"], "train.tsv: label(s) '1' on line(s) 4, 8, 9, 11, 17 and 37564 more are outside"),
  ],
)
def test_bad_options_end_in_one_line_before_the_model_loads(tmp_path, monkeypatch, data_dir, words, message):
  monkeypatch.setattr(finetune, "load_hf_bert", _no_model)
  code, _, err = _run(["--runs", str(tmp_path / "runs"), "finetune", f"data.dataset={data_dir / 'sst2'}", *words])
  assert code == 2 and err.count("\n") == 1 and message in err, err


def test_bad_model_folders_and_debug(tmp_path, own_data):
  (tmp_path / "empty").mkdir()
  code, _, err = _run(["evaluate", str(tmp_path / "empty"), str(own_data["held_out"])])
  assert code == 2 and "neither a model folder (config.json + model.safetensors) nor a run folder" in err
  with pytest.raises(UserError, match="batch_size must be a positive integer"):
    cli.main(["--runs", str(tmp_path / "runs"), "finetune", "batching.batch_size=0", "--debug"])


@pytest.mark.slow
def test_python_dash_m_entry_points_end_in_one_line(tmp_path):
  for argv, message in (
    (["-m", "jfast.app.finetune", "--batch-size", "0"], "batch_size must be a positive integer"),
    (["-m", "experiments.lm", "--data", str(tmp_path / "none.txt")], "--data: no corpus at"),
  ):
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


def test_defaults_train_on_everything_and_the_preset_says_what_it_cuts():
  options = finetune.check_options(finetune.parse_args([]))
  assert options.max_train_examples is None and options.preset_note == ""
  quick = finetune.check_options(finetune.parse_args(["--preset", "quick"]))
  assert quick.max_train_examples == 40000 and "preset 'quick': first 40,000" in quick.preset_note
  explicit = finetune.check_options(finetune.parse_args(["--preset", "quick", "--max-train-examples", "0"]))
  assert explicit.max_train_examples is None
  assert "--preset quick" in (ROOT / "Makefile").read_text()


def test_a_packed_run_sized_in_examples_holds_about_that_many(data_dir, minilm_path):
  from jfast.data import load_tokenizer, tokenize

  texts = read_split_file(data_dir / "sst2" / "train.tsv").texts[:4000]
  ids, _ = tokenize(load_tokenizer(minilm_path), texts, max_length=512)
  lengths = np.array([len(i) for i in ids])
  for wanted in (32, 128):
    rows = rows_for_examples(lengths, int(lengths.max()), wanted)
    epoch = make_batches(ids, np.zeros(len(ids), np.int32), BatchingConfig("packed", batch_size=rows), pad_id=0)
    per_step = epoch.num_examples / len(epoch.batches)
    assert abs(per_step - wanted) / wanted < 0.1, (wanted, rows, per_step)


def test_accelerator_defaults_and_the_accelerator_preset(monkeypatch):
  assert finetune.default_precision("cpu") == "fp32"
  assert finetune.default_precision("gpu") == finetune.default_precision("tpu") == "bf16"
  assert (
    finetune.default_fuse_qkv("gpu") and not finetune.default_fuse_qkv("tpu") and not finetune.default_fuse_qkv("cpu")
  )
  assert str(finetune.check_options(finetune.parse_args([])).policy) == str(finetune.get_policy("fp32"))
  assert finetune.default_attention_dropout("gpu", 0.1) == finetune.default_attention_dropout("tpu", 0.1) == 0.0
  assert finetune.default_attention_dropout("cpu", 0.1) == 0.1
  assert finetune.check_options(finetune.parse_args(["--attention-dropout", "0.05"])).attention_dropout == 0.05
  with pytest.raises(UserError, match="--attention-dropout must be auto or a rate"):
    finetune.check_options(finetune.parse_args(["--attention-dropout", "lots"]))
  monkeypatch.setattr(finetune.jax, "default_backend", lambda: "gpu")
  args = finetune.parse_args(["--preset", "accelerator", "--steps-per-call", "2"])
  options = finetune.check_options(args)
  assert str(options.policy) == str(finetune.get_policy("bf16"))
  assert args.tokens_per_step == 16384 and args.steps_per_call == 2  # the explicit option beats the preset
  budget = finetune.parse_args(["--strategy", "token_budget", "--tokens-per-step", "4096"])
  assert finetune.check_options(budget).batching.token_budget == 4096
  with pytest.raises(UserError, match="--tokens-per-step sizes packed or token_budget batches"):
    finetune.check_options(finetune.parse_args(["--strategy", "bucket", "--tokens-per-step", "4096"]))
