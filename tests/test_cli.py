"""The command line at the edges: typed configs from YAML + overrides, run folders, scripts by name, the report."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from jfast.app import cli
from jfast.app.config import ConfigError, describe, field_names, load_config, save_config, to_dict
from jfast.app.report import build_report, markdown_to_html
from jfast.app.runs import RunDir, describe_cpu, latest_runs, read_metrics
from jfast.data import BatchingConfig
from jfast.optim import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class _Section:
  layers: tuple[int, ...] | None = None
  enabled: bool = False


@dataclasses.dataclass(frozen=True)
class _Config:
  name: str = "demo"
  batching: BatchingConfig = dataclasses.field(default_factory=BatchingConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  extra: _Section = dataclasses.field(default_factory=_Section)


def test_file_then_overrides_in_order(tmp_path):
  path = tmp_path / "cfg.yaml"
  path.write_text(yaml.safe_dump({"optimizer": {"learning_rate": 3e-5, "b2": 0.98}, "batching": {"batch_size": 8}}))
  cfg = load_config(_Config, path, ["optimizer.learning_rate=1e-4", "extra.layers=[0, 2]", "extra.enabled=true"])
  assert cfg.optimizer.learning_rate == 1e-4  # override beats file
  assert cfg.optimizer.b2 == 0.98  # file beats default
  assert cfg.batching.batch_size == 8
  assert cfg.batching.strategy == BatchingConfig().strategy
  assert cfg.extra == _Section(layers=(0, 2), enabled=True)


def test_save_and_load_round_trip(tmp_path):
  cfg = load_config(_Config, None, ["batching.buckets=64,128,256", "optimizer.eps=1e-6", "name=x"])
  again = load_config(_Config, save_config(cfg, tmp_path / "config.yaml"))
  assert again == cfg
  assert to_dict(again)["batching"]["buckets"] == [64, 128, 256]


def test_key_typo_names_the_nearest_key_and_lists_valid_ones():
  with pytest.raises(ConfigError, match=r"did you mean 'optimizer.learning_rate'.*Valid keys:.*batching.batch_size"):
    load_config(_Config, None, ["optimizer.learnig_rate=1e-4"])


def test_unknown_key_in_file_is_rejected(tmp_path):
  path = tmp_path / "cfg.yaml"
  path.write_text("batching:\n  batchsize: 8\n")
  with pytest.raises(ConfigError, match=r"did you mean 'batching\.batch_size'"):
    load_config(_Config, path)


@pytest.mark.parametrize(
  "override, message",
  [
    ("optimizer.learning_rate=fast", "expected a number"),
    ("batching.batch_size=2.5", "expected an integer"),
    ("extra.enabled=maybe", "expected true or false"),
    ("batching.batch_size=true", "expected an integer"),
    ("batching.strategy=padded", "unknown batching strategy"),  # the dataclass's own validation, as a ConfigError
    ("optimizer", "not of the form key=value"),
  ],
)
def test_wrong_types_are_rejected(override, message):
  with pytest.raises(ConfigError, match=message):
    load_config(_Config, None, [override])


def test_missing_and_malformed_files(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    load_config(_Config, tmp_path / "nope.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("- just\n- a list\n")
  with pytest.raises(ConfigError, match="must hold a mapping"):
    load_config(_Config, bad)


def test_describe_lists_every_key_with_its_default():
  text = describe(_Config)
  for key in field_names(_Config):
    assert f"{key}=" in text
  assert "optimizer.learning_rate=5e-05" in text


def test_run_folder_contents(tmp_path):
  cfg = _Config()
  with RunDir("demo", root=tmp_path, config=cfg, timestamp="20260101-000000") as run:
    for step, loss in [(1, 0.9), (2, 0.7), (3, float("nan"))]:
      run.log(step, loss=loss, tokens_per_second=1000.0 * step)
    run.finish({"dev_accuracy": 0.8})
  assert run.path.name == "demo-20260101-000000"
  assert load_config(_Config, run.path / "config.yaml") == cfg
  rows = read_metrics(run.path)
  assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] == 0.7 and rows[2]["loss"] == "nan"
  assert json.loads((run.path / "summary.json").read_text()) == {"name": "demo", "dev_accuracy": 0.8}
  assert json.loads((run.path / "machine.json").read_text())["cpus"] >= 1
  if run.has_tensorboard or (run.path / "tb").exists():
    assert any((run.path / "tb").iterdir())
  second = RunDir("demo", root=tmp_path, timestamp="20260101-000000")  # same second: a new folder, not a merge
  second.finish({"dev_accuracy": 0.9})
  assert second.path != run.path
  assert latest_runs(tmp_path)["demo"] == second.path


# Two processors' blocks of /proc/cpuinfo as the two EPYC generations this project's VMs have come with print them
# (flags trimmed to the ones that matter plus neighbours); only the first block is read.
_ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx fma avx2 sha_ni vaes vpclmulqdq rdpid fsrm

processor\t: 1
model name\t: Something Else
flags\t\t: avx512f avx512_bf16
"""
_ZEN4 = _ZEN3.replace("model\t\t: 1\n", "model\t\t: 17\n", 1).replace(
  "avx2 sha_ni", "avx2 avx512f avx512_vnni avx512_bf16 sha_ni", 1
)


def test_cpu_description_tells_epyc_generations_and_bf16_apart():
  zen3, zen4 = describe_cpu(_ZEN3), describe_cpu(_ZEN4)
  assert zen3 == "AMD EPYC (family 25, model 1; AVX2; no AVX-512, no bf16 instructions)"
  assert zen4 == "AMD EPYC (family 25, model 17; AVX512-BF16, AVX512-VNNI, AVX-512, AVX2)"
  assert "Something Else" not in zen3  # the second processor's block is not read
  assert describe_cpu("flags\t: amx_bf16 avx512f\n").endswith("(AMX-BF16, AVX-512)")


def test_unknown_script_lists_known_ones():
  with pytest.raises(ConfigError, match=r"did you mean 'padding'.*Known:.*tokenizers"):
    cli.run_script("experiment", "paddin", None, [])
  assert cli.main(["experiment", "no_such_thing"]) == 2


def test_script_option_typo_and_type_are_checked():
  parser = cli.script_parser("experiments.tokenizers")
  with pytest.raises(ConfigError, match="did you mean 'repeats'"):
    cli.resolve_script_args(parser, None, ["repeat=2"])
  with pytest.raises(ConfigError, match="repeats"):
    cli.resolve_script_args(parser, None, ["repeats=two"])
  argv = cli.resolve_script_args(parser, None, ["repeats=2", "max_texts=10", "--slow-examples", "5"])
  assert argv == ["--repeats", "2", "--max-texts", "10", "--slow-examples", "5"]


def test_two_small_runs_and_the_report(tmp_path, data_dir, minilm_path, capsys):
  runs, results = tmp_path / "runs", tmp_path / "results"
  for repeats in (1, 2):
    words = ["max_texts=40", "slow_examples=8", f"repeats={repeats}", f"output={results / f'tok{repeats}'}"]
    words += [f"data_root={data_dir}"]
    folder = cli.run_script("experiment", "tokenizers", None, words, runs_root=str(runs))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["result"]["repeats"] == repeats
    assert yaml.safe_load((folder / "config.yaml").read_text())["repeats"] == repeats
  assert len(list(runs.iterdir())) == 2
  report = build_report(results=results, runs=runs, out=tmp_path / "report")
  text = report.read_text()
  assert "## tok1" in text and "## tok2" in text and "## Runs" in text
  assert "rust_batch_parallel" in text and "machine: " in text
  assert (tmp_path / "report" / "figures" / "tok2-tokenizers.png").is_file()
  page = report.with_suffix(".html").read_text()
  assert page.count("<table>") >= 4 and "<img" in page


def test_markdown_to_html_tables_and_headings():
  page = markdown_to_html("# T\n\n| a | b |\n|---|--:|\n| 1 | `x` |\n\n- one\n- two\n\n![p](f.png)\n")
  assert "<h1>T</h1>" in page
  assert "<th>a</th><th>b</th>" in page and "<td>1</td><td><code>x</code></td>" in page
  assert "<li>one</li><li>two</li>" in page and '<img alt="p" src="f.png"' in page


def test_finetune_config_keys_map_to_the_scripts_flags_with_the_same_defaults():
  from jfast.app import finetune
  from jfast.app.finetune_config import FLAGS, FinetuneConfig, to_argv

  assert set(FLAGS) == set(field_names(FinetuneConfig)) - {"name"}
  defaults = vars(finetune.parse_args([]))
  parsed = vars(finetune.parse_args(to_argv(FinetuneConfig())))
  assert parsed == defaults  # jfast finetune passes the run folder as the output at run time
  cfg = load_config(
    FinetuneConfig,
    None,
    ["optimizer.name=adamw_8bit", "memory.micro_batches=2", "model.remat_policy=full", "loop.progress=false"],
  )
  args = finetune.parse_args(to_argv(cfg, output="x"))
  assert (args.optimizer, args.micro_batches, args.remat, args.no_progress, args.output) == (
    "adamw_8bit",
    2,
    "full",
    True,
    "x",
  )


def test_jfast_finetune_rejects_typos_before_loading(capsys):
  assert cli.main(["finetune", "optimizer.nme=adamw_8bit"]) == 2
  assert "did you mean 'optimizer.name'" in capsys.readouterr().err
  assert cli.main(["distill", "distill.alpha=0.3"]) == 2
  assert "needs distill.teacher" in capsys.readouterr().err
  assert cli.main(["finetune", "--config", "/nonexistent.yaml"]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_a_missing_model_folder_is_an_error_not_a_traceback(tmp_path, capsys):
  missing = tmp_path / "no_teacher"
  assert cli.main(["experiment", "quantize", f"model={missing}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jfast: error: no fine-tuned model at") and str(missing) in err


def test_the_default_teacher_is_made_only_when_it_is_the_default(tmp_path, monkeypatch):
  from experiments import teacher
  from jfast.app import finetune

  made = []
  monkeypatch.setattr(teacher, "DEFAULT_TEACHER", (tmp_path / "teacher" / "model").resolve())

  def fake_main(argv):  # stands in for the 7-minute fine-tune: records the call, writes the export
    made.append(argv)
    (tmp_path / "teacher" / "model").mkdir(parents=True)
    (tmp_path / "teacher" / "model" / "config.json").write_text("{}")

  monkeypatch.setattr(finetune, "main", fake_main)
  assert teacher.ensure_teacher(tmp_path / "teacher" / "model", "sst2") == tmp_path / "teacher" / "model"
  assert made == [["--preset", "quick", "--output", str(tmp_path / "teacher"), "--no-progress", "--data", "sst2"]]
  teacher.ensure_teacher(tmp_path / "teacher" / "model")  # present now: nothing is trained again
  assert len(made) == 1
  with pytest.raises(FileNotFoundError, match="no fine-tuned model"):
    teacher.ensure_teacher(tmp_path / "elsewhere")


def test_parallel_gets_its_simulated_devices_even_after_jax_started(tmp_path, monkeypatch):
  # jax is imported (the test process, like `jfast experiment parallel`, started it with one CPU device): the
  # experiment must rerun itself in a fresh process with the device-count flag rather than skip every strategy.
  from experiments import parallel

  calls = []

  def fake_run(cmd, env, check):
    calls.append((cmd, env["XLA_FLAGS"]))
    (tmp_path / "results.json").write_text(json.dumps({"meta": {"device_count": 8}, "rows": []}))

  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(parallel.subprocess, "run", fake_run)
  result = parallel.main(["--models", "bert-base", "--output", str(tmp_path)])
  assert result["meta"]["device_count"] == 8
  assert calls[0][0][1:] == ["-m", "experiments.parallel", "--models", "bert-base", "--output", str(tmp_path)]
  assert "--xla_force_host_platform_device_count=8" in calls[0][1]


def test_training_commands_and_the_lm_experiment_take_huge_pages():
  from jfast.app.cli import build_parser, wants_hugepages

  def wants(*words):
    return wants_hugepages(build_parser().parse_args(list(words)))

  assert wants("finetune") and wants("distill", "train.steps=3") and wants("experiment", "lm", "--steps", "5")
  assert not wants("experiment", "padding") and not wants("experiment") and not wants("bench", "compare")
  assert not wants("report")
