"""The house rules of the layout: no import cycles, the flat top-level API, a cheap ``import jfast``, packaging."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jfast", "experiments", "benchmarks")

# Every name `jfast.__all__` exported before the library was laid out by concern: each must still import from jfast.
TOP_LEVEL_NAMES = (
  "GPT", "REMAT_POLICIES", "AttentionConfig", "Batch", "BatchingConfig", "BertConfig", "BertForSequenceClassification",
  "BertModel", "Checkpointer", "CompiledStep", "DistillConfig", "DynamicLossScale", "FitResult", "GPTConfig",
  "LoopConfig", "NoOpLossScale", "OptimizerConfig", "Policy", "PruningSchedule", "QuantDense", "RowSparseEmbedding",
  "ShardingRules", "StaticLossScale", "TeacherBatch", "TrainState", "adamw_8bit", "all_finite", "blockwise_attention",
  "calibrate", "classification_loss", "clip_by_global_norm", "create_train_state", "evaluate",
  "extend_position_embeddings", "fit", "generate", "get_loss_scale", "get_policy", "gradual_pruning", "keep_pruned",
  "load_hf_bert", "load_hf_gpt2", "load_quantized", "magnitude_mask", "make_batches", "make_distill_step",
  "make_eval_step", "make_mesh", "make_optimizer", "make_train_step", "mixed_dot_general", "optim",
  "padding_efficiency", "quantize", "remat_policy", "resolve_loss_scale", "row_sparse_adamw", "row_sparse_embedding",
  "save_hf_bert", "save_hf_gpt2", "save_quantized", "select_tree", "shard_batch", "shrink", "sliding_window_attention",
  "state_bytes", "student_from_teacher", "tree_shardings",
)  # fmt: skip


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
  return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _with_parents(name: str, modules, importer: str) -> list[str]:
  """Importing ``a.b.c`` runs ``a/__init__``, ``a/b/__init__`` and ``a/b/c``: each a dependency, except the
  importer's own packages, which are already being initialised when it runs."""
  parts = name.split(".")
  own = {".".join(importer.split(".")[: i + 1]) for i in range(importer.count("."))}
  found = [m for m in (".".join(parts[: i + 1]) for i in range(len(parts))) if m in modules]
  return [m for m in found if m not in own or m == name]


def import_graph() -> dict[str, set[str]]:
  """module -> the project modules it imports, at the top or inside functions alike."""
  modules = _modules()
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    deps = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
          base = ".".join([*anchor, *([base] if base else [])])
        targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
      for target in targets:
        deps.update(_with_parents(target, modules, name))
    deps.discard(name)
    graph[name] = deps
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles_in_the_library_experiments_or_benchmarks():
  graph = import_graph()
  assert "jfast.training.step" in graph and "experiments.distill" in graph
  assert "jfast.optim.recipe" in graph["jfast.training.step"] or "jfast.optim" in graph["jfast.training.step"]
  assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle_through_function_local_imports():
  # The check above must be able to fail: a two-module cycle, one edge inside a function.
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]
  tree = ast.parse("def f():\n  from jfast.training import step\n")
  found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
  assert found and found[0].module == "jfast.training"


def test_data_flows_one_way():
  """data -> nn -> models -> training -> compress -> app: no package imports one to its right."""
  order = ["jfast.data", "jfast.cpu", "jfast.precision", "jfast.nn", "jfast.models", "jfast.parallel", "jfast.optim",
           "jfast.training", "jfast.compress", "jfast.app"]  # fmt: skip
  rank = {p: i for i, p in enumerate(order)}

  def package(module):
    return next((p for p in order if module == p or module.startswith(p + ".")), None)

  wrong = []
  for module, deps in import_graph().items():
    source = package(module)
    for dep in deps:
      target = package(dep)
      if source and target and rank[target] > rank[source]:
        wrong.append(f"{module} -> {dep}")
  assert wrong == []


def test_every_earlier_top_level_name_still_imports():
  import jfast

  missing = [name for name in TOP_LEVEL_NAMES if name not in jfast.__all__]
  assert missing == []
  for name in jfast.__all__:
    assert getattr(jfast, name) is not None, name
  assert jfast.optim.adamw_8bit is jfast.adamw_8bit
  assert jfast.make_train_step.__module__ == "jfast.training.step"
  with pytest.raises(AttributeError, match="no attribute 'train'"):
    jfast.train  # noqa: B018 - the old module name is gone, not aliased


def test_import_jfast_loads_no_jax():
  code = "import sys, jfast; print(sorted(m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
  assert out.stdout.strip() == "[]"


def test_the_package_installs_jfast_only_and_needs_no_pytorch():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["jfast", "jfast.*"]
  required = " ".join(project["project"]["dependencies"])
  for heavy in ("torch", "transformers", "matplotlib", "tensorboard", "datasets"):
    assert heavy not in required, heavy
  for script in project["project"]["scripts"].values():
    assert script.startswith("jfast."), script
  # jfast/ itself never imports the PyTorch stack or matplotlib (the extras are for benchmarks and experiments).
  for name, path in _modules().items():
    if name.startswith("jfast"):
      text = path.read_text()
      for heavy in ("import torch", "import transformers", "import matplotlib", "from transformers"):
        assert heavy not in text, (name, heavy)
