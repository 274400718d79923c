"""The ``jfast`` command: fine-tune, evaluate, predict, export, and every experiment and benchmark of a checkout,
behind one entry point.

    jfast finetune optimizer.learning_rate=3e-5 batching.strategy=bucket
    jfast finetune --config sst2.yaml
    jfast evaluate runs/finetune-20261207-101500 my-data/test.tsv   # accuracy, macro-F1, per class, confusion
    jfast predict runs/finetune-20261207-101500 texts.txt           # label and probabilities per line (JSONL)
    jfast export runs/finetune-20261207-101500 my-model             # a Hugging Face folder (also from checkpoints)
    jfast distill distill.teacher=runs/teacher/model
    jfast experiment padding max_train=2000          # any script in the repository's experiments/
    jfast bench attention_scaling                    # any script in the repository's benchmarks/
    jfast report                                     # report/report.md and report.html from the latest runs

Experiments and benchmarks are plain ``argparse`` scripts (``python -m experiments.padding --help``) that live in
the repository, not in the installed package; this command reads their parser to offer the same options as
``key=value`` words and YAML files, with typo suggestions, and wraps each call in a run folder
(`jfast.app.runs.RunDir`) with the resolved options, the machine, and the script's summary.

A mistake in an option, a data file or a model folder ends the command with one line naming it and exit status 2;
``--debug`` anywhere on the command line shows the traceback instead. Compiled steps are kept in JAX's persistent
cache (``~/.cache/jfast/jax``; `jfast.training.compile_cache`), so a repeated run compiles from the cache;
``--no-compile-cache`` (or ``JFAST_COMPILATION_CACHE=off``) turns it off.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import pkgutil
import sys
from pathlib import Path
from typing import Any

import yaml

from jfast.app.config import ConfigError, parse_override
from jfast.app.entry import USER_ERRORS, debug_requested, quiet_broken_pipe, start, user_error_message
from jfast.app.runs import RunDir
from jfast.cpu.hugepages import ensure_hugepages

# The checkout that holds jfast/, experiments/ and benchmarks/ (an editable install points here).
_ROOT = Path(__file__).resolve().parents[2]
_PACKAGES = {"experiment": "experiments", "bench": "benchmarks"}
# Modules of those packages that are libraries for the scripts, not scripts.
_NOT_SCRIPTS = {
  "experiments": set(),
  "benchmarks": {"common", "configs", "data", "jax_runner", "torch_runner", "report"},
}


def _import_scripts_package(name: str):
  """The repository's ``experiments`` or ``benchmarks`` package (put on ``sys.path`` from the checkout)."""
  if not (_ROOT / name / "__init__.py").is_file():
    raise ConfigError(
      f"{name}/ is part of the jfast repository, not of the installed package: run jfast from a checkout "
      "(git clone, then pip install -e .)"
    )
  if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
  return importlib.import_module(name)


def scripts(kind: str) -> dict[str, str]:
  """Name -> module of every runnable script of ``experiments`` or ``benchmarks`` (a module with ``main``)."""
  package = _import_scripts_package(_PACKAGES[kind])
  names = {}
  for info in pkgutil.iter_modules(package.__path__):
    if info.name.startswith("_") or info.name in _NOT_SCRIPTS.get(package.__name__, ()):
      continue
    names[info.name] = f"{package.__name__}.{info.name}"
  return dict(sorted(names.items()))


class _Captured(Exception):
  def __init__(self, parser):
    self.parser = parser


@contextlib.contextmanager
def _capture_parser():
  """Makes the next ``parse_args`` raise with its parser, so a script's options can be read without running it."""
  original = argparse.ArgumentParser.parse_args

  def capture(self, *args, **kwargs):
    raise _Captured(self)

  argparse.ArgumentParser.parse_args = capture
  try:
    yield
  finally:
    argparse.ArgumentParser.parse_args = original


def script_parser(module_name: str) -> argparse.ArgumentParser:
  _import_scripts_package(module_name.split(".")[0])
  module = importlib.import_module(module_name)
  if not hasattr(module, "main"):
    raise SystemExit(f"{module_name} has no main(argv)")
  with _capture_parser():
    try:
      module.main([])
    except _Captured as captured:
      return captured.parser
  raise SystemExit(f"{module_name}.main does not parse its arguments with argparse")


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
  return {
    a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help",) and a.help != argparse.SUPPRESS
  }


def _flag(action: argparse.Action, value: Any) -> list[str]:
  flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
  if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
    if not isinstance(value, bool):
      raise ConfigError(f"{action.dest}: expected true or false, got {value!r}")
    on = isinstance(action, argparse._StoreTrueAction)
    return [flag] if value == on else []
  if value is None:
    return []
  if isinstance(value, (list, tuple)):
    return [flag, *map(str, value)] if action.nargs not in (None, "?") else [flag, ",".join(map(str, value))]
  return [flag, str(value)]


def _check_type(action: argparse.Action, value: Any) -> None:
  if action.type is None or value is None or isinstance(value, (bool, list, tuple)):
    return
  try:
    action.type(str(value))
  except (TypeError, ValueError) as e:
    raise ConfigError(
      f"{action.dest}: {value!r} is not a valid {getattr(action.type, '__name__', action.type)}"
    ) from e
  if action.choices is not None and action.type(str(value)) not in action.choices:
    raise ConfigError(f"{action.dest}: {value!r} is not one of {sorted(action.choices)}")


def resolve_script_args(parser: argparse.ArgumentParser, config_file: str | None, words: list[str]) -> list[str]:
  """YAML file + ``key=value`` words (and any raw ``--flags``) -> the script's argv, every key checked."""
  options = _options(parser)
  values: dict[str, Any] = {}
  if config_file:
    path = Path(config_file)
    if not path.is_file():
      raise ConfigError(f"config file {config_file!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
      raise ConfigError(f"config file {config_file!r} must hold a mapping of options")
    values.update(data)
  passthrough = []
  for word in words:
    if word.startswith("-"):
      passthrough.append(word)
      continue
    if "=" not in word:
      if not passthrough:
        raise ConfigError(f"{word!r} is not of the form key=value")
      passthrough.append(word)  # the value of a raw --flag
      continue
    path_parts, value = parse_override(word)
    values[".".join(path_parts)] = value
  argv = []
  for key, value in values.items():
    dest = key.replace("-", "_")
    if dest not in options:
      near = difflib.get_close_matches(dest, list(options), n=1, cutoff=0.5)
      hint = f"; did you mean {near[0]!r}?" if near else ""
      raise ConfigError(f"unknown option {key!r}{hint} Valid options: {', '.join(sorted(options))}")
    _check_type(options[dest], value)
    argv += _flag(options[dest], value)
  return argv + passthrough


def script_help(name: str, parser: argparse.ArgumentParser) -> str:
  lines = [f"options of {name} (key=value, or --key value; defaults shown):"]
  for dest, action in _options(parser).items():
    kind = getattr(action.type, "__name__", "flag" if action.nargs == 0 else "str")
    text = f"  {dest}={action.default!r} ({kind})"
    lines.append(f"{text:<48} {action.help or ''}".rstrip())
  return "\n".join(lines)


def _jsonable(result: Any) -> Any:
  try:
    return json.loads(json.dumps(result, default=str))
  except (TypeError, ValueError):
    return str(result)


def run_script(kind: str, name: str, config_file: str | None, words: list[str], runs_root: str = "runs") -> Path:
  """Runs one experiment or benchmark inside a run folder; returns the folder."""
  known = scripts(kind)
  if name not in known:
    near = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ConfigError(f"unknown {kind} {name!r}{hint} Known: {', '.join(known)}")
  parser = script_parser(known[name])
  if any(w in ("-h", "--help", "help") for w in words):
    parser.print_help()
    print()
    print(script_help(name, parser))
    return Path()
  argv = resolve_script_args(parser, config_file, words)
  resolved = vars(parser.parse_args(argv))
  run = RunDir(name, root=runs_root, tensorboard=False)
  (run.path / "config.yaml").write_text(yaml.safe_dump({"script": known[name], "argv": argv, **resolved}))
  outputs = [v for k, v in resolved.items() if k in ("output", "out", "output_dir") and isinstance(v, str)]
  for out in outputs:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "machine.json").write_text((run.path / "machine.json").read_text())
  print(f"[jfast] {kind} {name}: {' '.join(argv) or '(defaults)'} -> {run.path}", flush=True)
  result = importlib.import_module(known[name]).main(argv)
  run.finish({"kind": kind, "script": known[name], "outputs": outputs, "result": _jsonable(result)})
  return run.path


def _finetune(mode: str, config_file: str | None, words: list[str], runs_root: str) -> Path:
  from jfast.app.finetune_config import run_from_cli  # imports the whole library: only for these commands

  return run_from_cli(mode, config_file, words, runs_root=runs_root)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jfast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs", default="runs", help="parent folder of run folders")
  p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent compilation cache")
  p.add_argument("--debug", action="store_true", help="show tracebacks of errors in the input")
  sub = p.add_subparsers(dest="command")
  for mode in ("finetune", "distill"):
    s = sub.add_parser(mode, help=f"{mode} a BERT classifier (key=value overrides; 'jfast {mode} help' lists keys)")
    s.add_argument("--config", help="YAML file of config sections")
    s.add_argument("words", nargs=argparse.REMAINDER, help="section.key=value overrides")
  for kind, package in _PACKAGES.items():
    s = sub.add_parser(kind, help=f"run a script of {package}/ (key=value options; 'jfast {kind} NAME help')")
    s.add_argument("name", nargs="?", help=f"script name; omit to list {package}/")
    s.add_argument("--config", help="YAML file of options")
    s.add_argument("words", nargs=argparse.REMAINDER, help="key=value options (or the script's own --flags)")
  for name, what in (
    ("evaluate", "score a model on a dataset split or a TSV/CSV file ('jfast evaluate -h')"),
    ("predict", "label texts from a file or stdin as JSONL or TSV ('jfast predict -h')"),
    ("export", "write a Hugging Face folder from a run or checkpoint folder ('jfast export -h')"),
  ):
    s = sub.add_parser(name, help=what, add_help=False)
    s.add_argument("words", nargs=argparse.REMAINDER)
  s = sub.add_parser("report", help="gather the latest results into report.md and report.html")
  s.add_argument("--results", default="results", help="folder of experiment outputs")
  s.add_argument("--out", default="report", help="folder for report.md, report.html and figures")
  return p


def wants_hugepages(args: argparse.Namespace) -> bool:
  """Whether the command re-executes with huge pages for XLA's buffers (`jfast.cpu.hugepages`) before it starts,
  when its backend is the CPU (`jfast.cpu.hugepages.ensure_hugepages` checks that).

  Training runs are faster with them; so are both sides of ``experiment lm`` and ``experiment llm`` (one process holds both), which also
  keeps freed memory in the process (`jfast.cpu.hugepages.RETAIN`: its GPT step's 331 MiB of temporaries are
  reused, not re-faulted). The other experiments and benchmarks choose per child process themselves.
  """
  return args.command in ("finetune", "distill") or (args.command, getattr(args, "name", None)) in (
    ("experiment", "lm"),
    ("experiment", "llm"),
  )


def export_main(argv=None) -> None:
  p = argparse.ArgumentParser(
    prog="jfast export",
    description="Write a complete Hugging Face folder (config with "
    "label names, weights, tokenizer) from a run folder, a model folder, or a --checkpoint-dir's newest checkpoint.",
  )
  p.add_argument("source", help="run folder, model folder, or checkpoint folder")
  p.add_argument("out", help="the new folder")
  args = p.parse_args(argv)
  from jfast.app.export import export

  export(args.source, args.out)


def _tool(name: str):
  if name == "export":
    return export_main
  from jfast.app import evaluate  # loads the library: only for these commands

  return {"evaluate": evaluate.evaluate_main, "predict": evaluate.predict_main}[name]


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  debug, words = debug_requested(sys.argv[1:] if argv is None else argv)
  words = start(words)
  args = parser.parse_args(words)
  if args.command is None:
    parser.print_help()
    return 0
  if argv is None and wants_hugepages(args):
    ensure_hugepages(
      retain=(args.command, getattr(args, "name", None)) in (("experiment", "lm"), ("experiment", "llm"))
    )
  try:
    if args.command in ("evaluate", "predict", "export"):
      _tool(args.command)(args.words)
    elif args.command in ("finetune", "distill"):
      _finetune(args.command, args.config, args.words, args.runs)
    elif args.command in _PACKAGES:
      if not args.name:
        print("\n".join(scripts(args.command)))
        return 0
      run_script(args.command, args.name, args.config, args.words, runs_root=args.runs)
    elif args.command == "report":
      from jfast.app.report import build_report

      path = build_report(results=args.results, runs=args.runs, out=args.out)
      print(f"[jfast] report: {path} and {path.with_suffix('.html')}")
  except USER_ERRORS as e:
    # An option, a data file or a model folder the user can fix: its message, not a traceback.
    if debug:
      raise
    print(f"jfast: error: {user_error_message(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    if debug:
      raise
    print("jfast: interrupted", file=sys.stderr)
    return 130
  except BrokenPipeError:
    quiet_broken_pipe()
  return 0


if __name__ == "__main__":
  sys.exit(main())
