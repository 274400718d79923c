"""The side-by-side benchmark: a smoke run of both sides, and the pieces the table's figures rest on."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common, data, report
from benchmarks.configs import CONFIGS, DEFAULT_CONFIGS, RunSpec, specs_for

RESULT_FIELDS = (
  "real_tokens_per_s",
  "median_step_s",
  "compile_s",
  "warmup_s",
  "peak_rss_mb",
  "padding_efficiency",
  "timed_tokens",
  "step_times",
  "step_tokens",
  "model_tflops_per_s",
  "cpu_share",
  "step_cpu_s",
)


@pytest.mark.slow
def test_compare_runs_both_sides_on_the_same_tokens(tmp_path, minilm_path, data_dir):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from benchmarks import compare

  argv = ["--task", "sst2", "--model", "tiny", "--steps", "2", "--warmup", "1", "--configs", "dynamic"]
  argv += ["--max-train-examples", "256", "--data-dir", str(data_dir), "--out", str(tmp_path), "--name", "smoke"]
  summary = compare.main(argv)

  for suffix in ("json", "md", "png"):
    assert (tmp_path / f"smoke.{suffix}").stat().st_size > 0
  assert json.loads((tmp_path / "smoke.json").read_text())["rows"][0]["config"] == "dynamic"
  sides = summary["results"]["dynamic"]
  for side in ("jax", "torch"):
    result = sides[side]
    assert "error" not in result, result.get("error")
    assert all(field in result for field in RESULT_FIELDS), sorted(set(RESULT_FIELDS) - set(result))
    assert result["steps"] == 3 and result["timed_steps"] == 2
    assert result["real_tokens_per_s"] > 0 and result["peak_rss_mb"] > 0
  # The same batches on both sides: the same real tokens and examples in every step, and the same padding.
  assert sides["jax"]["step_tokens"] == sides["torch"]["step_tokens"]
  assert sides["jax"]["step_examples"] == sides["torch"]["step_examples"]
  assert sides["jax"]["step_computed_tokens"] == sides["torch"]["step_computed_tokens"]
  assert summary["rows"][0]["speedup"] > 0


def test_every_config_builds_valid_specs_and_one_batching_per_row():
  base = {"task": "sst2", "model": "tiny", "steps": 2}
  for config in CONFIGS.values():
    specs = specs_for(config, base)
    assert specs and all(isinstance(s, RunSpec) for s in specs.values())
    shared = {repr(s.batching_kwargs()) for s in specs.values() if s.sampler == "shared"}
    assert len(shared) <= 1, config.name
  assert set(DEFAULT_CONFIGS) <= set(CONFIGS)


def test_examples_and_plans_round_trip(tmp_path):
  train = data.Examples([np.array([101, 5, 102]), np.array([101, 102]), np.array([101, 7, 8, 9, 102])], np.arange(3))
  plan = data.Plan([np.array([[2], [0]]), np.array([[1], [-1]])], [5, 2])
  data.save(tmp_path / "d.npz", train, None, {"x": plan}, None)
  train2, dev2, plans, dev_plan = data.load(tmp_path / "d.npz")
  assert dev2 is None and dev_plan is None
  assert all(np.array_equal(a, b) for a, b in zip(train.ids, train2.ids, strict=True))
  assert [s.tolist() for s in plans["x"].slots] == [s.tolist() for s in plan.slots]
  assert plans["x"].lengths == [5, 2] and plans["x"].real_tokens(train.lengths) == [8, 2]


def _enumerated_flops(lengths, hidden, layers, inter, labels, cls_only):
  """Every product of the step, one by one: 2 FLOPs per multiply-add forward, twice that backward."""
  h, total = hidden, 0
  for length in lengths:
    for layer in range(layers):
      queries = 1 if cls_only and layer == layers - 1 else length
      total += 3 * 2 * length * 2 * (h * h + h)  # key and value projections: every token
      rows_weights = 2 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * (2 * h)  # q, out, FFN, 2 LNs
      total += 3 * 2 * queries * rows_weights
      total += 3 * 2 * (queries * length * h) * 2  # QK^T and PV
    total += 3 * 2 * (h * h + h + h * labels + labels)  # pooler and classifier, one row per example
  return total


def test_flop_count_matches_the_enumerated_products():
  lengths = np.random.default_rng(0).integers(3, 70, size=9).tolist()
  for cls_only in (False, True):
    dims = {"hidden": 48, "layers": 3, "intermediate": 96, "num_labels": 4, "cls_only_last_layer": cls_only}
    assert common.train_flops(lengths, **dims) == _enumerated_flops(lengths, 48, 3, 96, 4, cls_only)
  full = common.train_flops(lengths, hidden=48, layers=3, intermediate=96, num_labels=4)
  cls = common.train_flops(lengths, hidden=48, layers=3, intermediate=96, num_labels=4, cls_only_last_layer=True)
  assert 0.6 * full < cls < full  # a third of the layers, minus most of the last one's work


def test_step_summary_leaves_out_warmup_and_compile_steps():
  steps = {
    "step_times": [9.0, 1.0, 5.0, 2.0, 4.0],
    "step_tokens": [10, 10, 10, 30, 10],
    "step_flops": [1.0] * 5,
    "step_cpu_s": [18.0, 2.0, 10.0, 4.0, 4.0],  # the last step got half its 2 threads: a neighbour took a core
    "step_compiled": [False, False, True, False, False],
  }
  s = common.summarize_steps(steps, warmup=1, threads=2, min_share=0.9)
  assert s["median_step_s"] == 1.5 and s["real_tokens_per_s"] == 40 / 3 and s["warmup_s"] == 9.0
  assert (s["timed_steps"], s["contended_steps"], s["cpu_share"]) == (2, 1, 1.0)
  assert common.summarize_steps(steps, warmup=1, threads=2)["timed_steps"] == 3
  everything_contended = common.summarize_steps(steps, warmup=1, threads=2, min_share=1.5)
  assert everything_contended["timed_steps"] == 3 and everything_contended["clean_fraction"] == 0.0


def test_best_vs_best_compares_each_sides_fastest_epoch():
  def fig(epoch_s):
    return {"est_epoch_s": epoch_s}

  rows = [
    {"config": "a", "jax": fig(100.0), "torch": fig(300.0)},
    {"config": "b", "jax": fig(80.0)},
    {"config": "c", "torch": fig(200.0)},
    {"config": "frozen", "jax": fig(1.0), "torch": fig(1.0), "in_best": False},
  ]
  verdict = report.best_vs_best(rows)
  assert (verdict["jax_config"], verdict["torch_config"], verdict["speedup"]) == ("b", "c", 2.5)
  assert verdict["meets_target"]


def test_each_side_gets_its_own_hugepage_setting(tmp_path, monkeypatch):
  from benchmarks import compare
  from jfast.cpu.hugepages import TUNABLE

  seen = {}

  def fake_run(cmd, env, **kwargs):
    seen[cmd[2]] = env.get("GLIBC_TUNABLES", "")
    raise compare.subprocess.TimeoutExpired(cmd, 1)

  monkeypatch.setattr(compare.subprocess, "run", fake_run)
  monkeypatch.setenv("GLIBC_TUNABLES", TUNABLE)  # inherited from a re-executed parent: must not leak to PyTorch
  for side, huge in (("jax", True), ("torch", False)):
    spec = RunSpec(side=side, config="grouped_bf16")
    result = compare.run_side(spec, tmp_path / "d.npz", tmp_path, tmp_path, timeout=1, hugepages=huge)
    assert "timed out" in result["error"]
  assert TUNABLE in seen["benchmarks.jax_runner"]
  assert TUNABLE not in seen["benchmarks.torch_runner"]


@pytest.mark.parametrize("huge, retain", [(True, True), (False, True), (True, False), (False, False)])
def test_allocator_env_sets_exactly_the_tunables_asked_for(huge, retain):
  from benchmarks.compare import allocator_env
  from jfast.cpu.hugepages import RETAIN, TUNABLE

  inherited = {"GLIBC_TUNABLES": ":".join([TUNABLE, *RETAIN, "glibc.malloc.tcache_count=0"]), "PATH": "/bin"}
  env = allocator_env(dict(inherited), huge, retain)
  items = env["GLIBC_TUNABLES"].split(":")
  assert (TUNABLE in items) == huge
  assert all((r in items) == retain for r in RETAIN)
  assert "glibc.malloc.tcache_count=0" in items and env["PATH"] == "/bin"  # a user's own tunable and the rest stay
  assert len(items) == len(set(items))


@pytest.mark.parametrize("causal, pad", [(True, 0), (False, 5)])
def test_attention_vs_sdpa_times_the_same_gradients(causal, pad):
  # The benchmark is only a comparison if both sides compute the same thing: equal gradients in float32.
  from benchmarks.attention_vs_sdpa import _inputs, _jax_call, _torch_call

  arrays = _inputs(2, 24, 3, 16, pad, seed=3)
  ours = _jax_call(arrays, causal, "float32")()
  theirs = _torch_call(arrays, causal, "float32")()
  for g, t in zip(ours, theirs, strict=True):
    np.testing.assert_allclose(np.asarray(g), t.numpy().transpose(0, 2, 1, 3), rtol=1e-4, atol=1e-5)


def test_gemm_forms_agree_with_pytorch_and_with_float64():
  pytest.importorskip("torch")
  from benchmarks import gemm

  rows = gemm.measure([(96, 40, 72)], "float32", seed=3)
  assert [r["form"] for r in rows] == list(gemm.FORMS)
  for r in rows:
    assert r["max_rel_diff"] < 1e-5, r  # XLA's and PyTorch's products of the same operands
    assert r["jax_gflops"] > 0 and r["torch_gflops"] > 0
  # The forms are the products they are named after: check one XLA result against float64 numpy.
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(3)
  g, w = rng.standard_normal((96, 72)), rng.standard_normal((40, 72))
  ours = jax.lax.dot_general(jnp.asarray(g, jnp.float32), jnp.asarray(w, jnp.float32), (((1,), (1,)), ((), ())))
  np.testing.assert_allclose(np.asarray(ours), g @ w.T, rtol=1e-4, atol=1e-4)
  with pytest.raises(SystemExit, match="unknown model"):
    gemm.main(["--models", "minilm,bert-huge"])


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_jfast_runner_builds_the_spec_optimizer(optimizer):
  import jax

  from benchmarks import jax_runner

  spec = RunSpec(side="jax", config="grouped_adam8bit", model="tiny", optimizer=optimizer)
  model, params = jax_runner.build_model(spec, num_labels=2)
  state, _ = jax_runner.build_step(spec, model, params, epoch_steps=10)
  dtypes = {leaf.dtype.name for leaf in jax.tree.leaves(state.opt_state) if hasattr(leaf, "dtype")}
  # bitsandbytes' AdamW8bit on the other side keeps uint8 moments: the jfast side must not quietly run float32 Adam.
  assert ("uint8" in dtypes) == (optimizer == "adamw8bit"), dtypes


def test_packed_rows_follow_the_batch_size():
  # A packed row holds about four SST-2 sentences: a quarter of the rows keeps a step near the unpacked batch.
  for base, rows in (({}, 8), ({"batch_size": 64}, 16), ({"batch_size": 128}, 32), ({"batch_size": 2}, 1)):
    assert specs_for(CONFIGS["packed_bf16"], base)["jax"].batch_size == rows
  assert specs_for(CONFIGS["grouped_bf16"], {"batch_size": 64})["torch"].batch_size == 64


def test_compile_time_option_sets_are_options_this_xla_knows():
  import jax
  import jax.numpy as jnp

  from benchmarks.compile_time import OPTION_SETS

  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 16)), jnp.float32)
  lowered = jax.jit(lambda a: jnp.tanh(a @ a.T)).lower(x)
  want = np.tanh(np.asarray(x, np.float64) @ np.asarray(x, np.float64).T)
  for name, options in OPTION_SETS.items():
    # XLA rejects an unknown option name; each set must also still compute the same function.
    got = lowered.compile(compiler_options=options)(x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_row_sparse_config_trains_like_the_dense_one(data_dir):
  # The packed_bf16_rowsparse row must train what packed_bf16 trains, or its timing means nothing.
  import jax

  from benchmarks import jax_runner
  from jfast.cpu.row_sparse import find_row_sparse_state

  spec = RunSpec(side="jax", config="packed", model="tiny", strategy="packed", batch_size=4, max_train_examples=512)
  train, _ = data.load_task("sst2", data_dir=data_dir, max_train_examples=512)
  batches = data.make_epoch(train, spec).batches[:6]
  model, params = jax_runner.build_model(spec, num_labels=2)
  copy = lambda: jax.tree.map(lambda x: x.copy(), params)  # noqa: E731
  dense_state, dense_step = jax_runner.build_step(spec, model, copy(), 6)
  sparse_state, sparse_step = jax_runner.build_step(dataclasses.replace(spec, row_sparse="exact"), model, copy(), 6)
  assert find_row_sparse_state(sparse_state.opt_state) and not find_row_sparse_state(dense_state.opt_state)
  for batch in batches:
    dense_state, _ = dense_step(dense_state, batch)
    sparse_state, _ = sparse_step(sparse_state, batch)
  flat = lambda p: np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(p))])  # noqa: E731
  start, a, b = flat(params), flat(dense_state.params), flat(sparse_state.params)
  moved, diff = float(np.abs(a - start).max()), float(np.abs(a - b).max())
  assert moved > 1e-5 and diff < 1e-3 * moved


def test_torch_lazy_side_clips_like_clip_grad_norm_and_steps_like_sparse_adam():
  # The PyTorch form of jfast's lazy row-sparse mode: a sparse table gradient, clipped over the same global norm as
  # torch's own clip_grad_norm_ gives the dense gradient, then SparseAdam for the table and AdamW for the rest.
  torch = pytest.importorskip("torch")
  from benchmarks import torch_runner

  def model_and_grads(sparse):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(500, 16, sparse=sparse)
    head = torch.nn.Linear(16, 3)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 500, (8, 20)))  # repeated ids: coalescing matters
    loss = (head(emb(ids)).sin() * 40).sum()
    loss.backward()
    return [emb.weight, head.weight, head.bias]

  dense, sparse = model_and_grads(False), model_and_grads(True)
  assert sparse[0].grad.is_sparse
  norm = float(torch.nn.utils.clip_grad_norm_(dense, 1.0))
  assert norm > 1.0  # the clip is active
  torch_runner.clip_grad_norm(sparse, 1.0)
  for d, s in zip(dense, sparse, strict=True):
    np.testing.assert_allclose(s.grad.to_dense().numpy(), d.grad.numpy(), rtol=1e-5, atol=1e-7)
  spec = RunSpec(side="torch", config="grouped_bf16_lazyemb", model="tiny", dtype="bfloat16", row_sparse="lazy")
  model = torch_runner.build_model(spec, num_labels=2)
  assert model.bert.embeddings.word_embeddings.sparse
  opt, sched = torch_runner.build_optimizer(spec, model, total_steps=10)
  kinds = sorted(type(o).__name__ for o in opt.parts)
  assert kinds == ["AdamW", "SparseAdam"] and len(sched.parts) == 2
  with pytest.raises(ValueError, match="no row-sparse form"):
    torch_runner.build_model(dataclasses.replace(spec, row_sparse="exact"), num_labels=2)


def test_mfu_preset_builds_bert_base_512_bf16_and_divides_by_the_peak():
  """The GPU half of #8 has never run (no device lent); this checks its preset and its MFU arithmetic."""
  from benchmarks import compare, report
  from benchmarks.configs import CONFIGS, MFU_CONFIGS, MODEL_SHAPES, specs_for

  args = compare.parse_args(["--mfu"])
  assert (args.model, args.seq_len, args.task, tuple(args.configs)) == ("bert-base", 512, "synthetic", MFU_CONFIGS)
  specs = specs_for(CONFIGS["mfu_bf16"], compare._base(args))
  assert set(specs) == {"jax", "torch"}
  assert all(
    (s.model, s.seq_len, s.dtype, s.strategy) == ("bert-base", 512, "bfloat16", "fixed") for s in specs.values()
  )
  assert MODEL_SHAPES["bert-base"]["hidden_size"] == 768 and MODEL_SHAPES["bert-base"]["num_hidden_layers"] == 12

  def result(side, device, tflops):
    return {
      "side": side,
      "device": device,
      "real_tokens_per_s": 1000.0,
      "median_step_s": 0.1,
      "compile_s": 1.0,
      "warmup_s": 0.0,
      "num_shapes": 1,
      "device_peak_mb": 2048.0 if device != "cpu" else None,
      "peak_rss_mb": 900.0,
      "padding_efficiency": 1.0,
      "step_examples": [32, 32],
      "model_tflops_per_s": tflops,
      "train_loss": 0.5,
      "timed_tokens": 1000,
      "timed_steps": 2,
    }

  meta = {"techniques": {"mfu_bf16": "x"}, "in_best": {"mfu_bf16": True}, "epoch_tokens": 1000, "epoch_shapes": {}}
  gpu = report.build_rows(
    {"mfu_bf16": {"jax": result("jax", "gpu", 617.3), "torch": result("torch", "gpu", 380.0)}}, meta, 989.4
  )
  assert gpu[0]["jax"]["mfu"] == pytest.approx(617.3 / 989.4) and gpu[0]["torch"]["mfu"] == pytest.approx(380 / 989.4)
  assert gpu[0]["jax"]["peak_kind"] == "device"
  cpu = report.build_rows({"mfu_bf16": {"jax": result("jax", "cpu", 0.3)}}, meta, 989.4)
  assert cpu[0]["jax"]["mfu"] is None and cpu[0]["jax"]["peak_kind"] == "host RSS"


@pytest.mark.slow
def test_compile_depth_reports_growth_with_depth(tmp_path, monkeypatch):
  from benchmarks import compile_depth

  monkeypatch.setattr(compile_depth, "disable_compilation_cache", lambda: None)  # keep the session's cache settings
  results = compile_depth.main(["--layers", "2,5", "--repeats", "2", "--out", str(tmp_path / "depth.md")])
  got = {(r["layout"], r["layers"]): r for r in results}
  # Unrolled, the program grows with the layers; scanned, one layer's program sits in a loop whatever the depth.
  assert got["unrolled", 5]["cuda_hlo_chars"] > 1.8 * got["unrolled", 2]["cuda_hlo_chars"]
  assert got["scanned", 5]["cuda_hlo_chars"] < 1.1 * got["scanned", 2]["cuda_hlo_chars"]
  assert all(r["compile_s"] > 0 and r["lower_s"] > 0 for r in results)
  text = (tmp_path / "depth.md").read_text()
  assert "| 2 | unrolled |" in text and "| 5 | scanned |" in text and "scanned / unrolled" in text
  assert (tmp_path / "depth.json").is_file()


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_section(tmp_path, data_dir, minilm_path):
  """`python -m benchmarks.gpu --smoke`: the GPU suite's code paths, both sides, at tiny sizes on this CPU."""
  out = tmp_path / "gpu"
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(out), "--data-dir", str(data_dir)],
    cwd=Path(__file__).resolve().parent.parent,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads((out / "gpu.json").read_text())
  results = summary["results"]
  assert set(results) == {"minilm", "bert_base", "gpt2", "llm", "sliding"}
  assert not [name for name, r in results.items() if "error" in r], {k: r.get("error") for k, r in results.items()}
  jfast_runs = results["minilm"]["jfast"]
  # The second run loads the first one's program from the persistent cache, the first compiles it.
  assert (
    jfast_runs["recipe_cold"]["compiles_from_cache"] == 0 and jfast_runs["recipe_warm"]["compiles_from_cache"] >= 1
  )
  assert jfast_runs["preset"]["real_tokens_per_step"] <= 1024 < jfast_runs["preset"]["real_tokens_per_step"] * 2
  for run in (*jfast_runs.values(), *results["minilm"]["torch"].values()):
    assert 0.0 <= run["dev_accuracy"] <= 1.0 and run["end_to_end_tokens_per_s"] > 0
  assert {k.split("/")[1] for k in results["bert_base"]["runs"]} == {"jax", "torch"}
  assert all(r["tokens_per_s"] > 0 for r in results["gpt2"].values())
  # The same Llama on both sides (grouped-query attention, tied embeddings): the same parameter count.
  assert all(r["tokens_per_s"] > 0 for r in results["llm"].values())
  assert results["llm"]["jfast"]["params"] == results["llm"]["torch"]["params"]
  assert set(results["sliding"]["rows"]) == {"dense @ 512", "window 32 @ 512"}
  text = (out / "gpu.md").read_text()
  assert "## Llama, 2 layers, hidden 64, 4 heads sharing 2 key/value heads" in text
  assert "## GPT-2 small" in text and "PyTorch grouped_bf16" in text and (out / "gpu.png").stat().st_size > 0
