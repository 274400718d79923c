"""Data, FSDP and tensor parallelism against one device, sharded checkpoints across mesh shapes, and the rules table.

The 8-device checks run in one subprocess (`tests/sharding_worker.py`) because the simulated device count is fixed
when JAX starts; this process, and so the rest of the suite, stays on one device. A two-process `jax.distributed`
run (`tests/multihost_worker.py`) starts alongside it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jfast.parallel import DEFAULT_RULES, ShardingRules, make_mesh, partition_spec, tree_shardings

WORKER = Path(__file__).resolve().parent / "sharding_worker.py"
MULTIHOST_WORKER = Path(__file__).resolve().parent / "multihost_worker.py"
STRATEGIES = ("data8", "fsdp8", "tensor8", "data4_tensor2")
TOL = 1e-5


def _launch(script: Path, out_dir: Path, name: str, **env_extra: str) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_extra}
  env.pop("XLA_FLAGS", None)  # the workers set their own device counts
  # Files, not pipes: a worker blocked on a full pipe would stall its peer inside a collective.
  with (out_dir / f"{name}.out").open("w") as out, (out_dir / f"{name}.err").open("w") as err:
    return subprocess.Popen([sys.executable, str(script)], env=env, stdout=out, stderr=err, cwd=script.parent.parent)


@pytest.fixture(scope="module")
def subprocess_runs(tmp_path_factory) -> dict:
  """Starts the 8-device worker and the two-process run together (their compiles overlap on two cores).

  Returns each run's JSON, or the tail of its stderr when it failed.
  """
  out_dir = tmp_path_factory.mktemp("sharding_runs")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = {"eight": _launch(WORKER, out_dir, "eight")}
  for i in range(2):
    procs[f"host{i}"] = _launch(
      MULTIHOST_WORKER,
      out_dir,
      f"host{i}",
      JFAST_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JFAST_NUM_PROCESSES="2",
      JFAST_PROCESS_ID=str(i),
      JFAST_TEST_CHECKPOINT_DIR=str(out_dir / "ckpt"),
    )
  results = {}
  try:
    for name, proc in procs.items():
      proc.wait(timeout=900)
      if proc.returncode:
        results[name] = (out_dir / f"{name}.err").read_text()[-4000:]
      else:
        results[name] = json.loads((out_dir / f"{name}.out").read_text().strip().splitlines()[-1])
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
  return results


@pytest.fixture(scope="module")
def eight_devices(subprocess_runs) -> dict:
  got = subprocess_runs["eight"]
  if isinstance(got, str):
    pytest.fail(f"sharding worker failed:\n{got}")
  return got


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGIES)
def test_parallel_steps_match_one_device(eight_devices, name):
  assert eight_devices["devices"] == 8
  ref = eight_devices["reference_losses"]
  assert len(set(ref)) == len(ref)  # the reference really trains: every step's loss differs
  run = eight_devices["strategies"][name]
  assert run["loss_diff"] <= TOL, run
  assert run["param_diff"] <= TOL, run
  assert run["opt_state_diff"] <= TOL, run
  assert run["compiles"] == 1
  # Scanned layers 0..N-2 train from one stacked array per parameter, laid out per layer by the same rules.
  if "tensor" in name:
    assert run["stacked_spec"].startswith("P(None,") and "tensor" in run["stacked_spec"], run


@pytest.mark.slow
def test_8bit_optimizer_and_accumulation_shard_too(eight_devices):
  got = eight_devices["fsdp4_tensor2_8bit_accum"]
  assert got["loss_diff"] <= TOL, got
  # Not 1e-5: a last-bit difference in a sharded reduction can flip one 8-bit moment code (1/127 of its block's
  # scale), which moves that weight's update by a fraction of the learning rate (1e-3). Measured: 4.2e-5.
  assert got["param_diff"] <= 1e-4, got
  assert got["moment_dtype"] == "uint8" and got["moment_spec"] == "P('fsdp', 'tensor')"
  # Matrices split 8 ways (fsdp x tensor); [D] and position tables over one of the two axes only.
  assert got["params"]["fractions"] == [2, 4, 8] and got["compiles"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp8", "data4_tensor2"])
def test_row_sparse_word_table_trains_like_one_device(eight_devices, name):
  # The table's rows over tensor, its features over fsdp: fsdp8 splits it by columns, data4_tensor2 by rows.
  got = eight_devices["row_sparse"][name]
  assert got["loss_diff"] <= TOL and got["param_diff"] <= TOL, got
  assert got["table_spec"] == "P('tensor', 'fsdp')" and got["compiles"] == 1, got


@pytest.mark.slow
@pytest.mark.parametrize(("name", "shards"), [("data8", 1), ("fsdp8", 8), ("tensor8", 8), ("data4_tensor2", 2)])
def test_per_device_bytes_are_one_over_n(eight_devices, name, shards):
  run = eight_devices["strategies"][name]
  for part in ("params", "opt_state"):
    got = run[part]
    total = got["sharded_bytes"] + got["replicated_bytes"]
    if shards == 1:
      assert got["sharded_bytes"] == 0 and got["per_device_bytes"] == total
      continue
    assert got["fractions"] == [shards], got
    assert got["sharded_local_bytes"] * shards == got["sharded_bytes"]
    # Only norms, [D] biases and the optimizer's counters stay whole: under 4% even for this tiny model.
    assert got["replicated_bytes"] < 0.04 * total, got
    assert got["per_device_bytes"] == got["sharded_local_bytes"] + got["replicated_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize(("target", "devices"), [("fsdp8", 8), ("single", 1)])
def test_checkpoint_from_4x2_restores_on_other_meshes(eight_devices, target, devices):
  got = eight_devices["restore"][target]
  assert got["exact"], got
  assert got["position"] == {"epoch": 0, "batch": 3}
  assert got["devices"] == devices
  if devices == 8:
    assert got["spec"] == "P('fsdp', 'tensor')"  # laid out for the new mesh, not the saved one
  assert got["continue_diff"] <= TOL  # training continues as the one-device run does
  assert got["recompiled"] == 0  # lands in the step's compiled layout


@pytest.mark.slow
def test_fused_qkv_adds_no_communication_under_tensor_parallelism(eight_devices):
  got = eight_devices["collectives"]
  assert got["apart"]["all-reduce"] > 0, got  # the counts are real: tensor parallelism reduces partial sums
  assert got["fused"] == got["apart"], got


@pytest.mark.slow
def test_bad_meshes_and_batches_fail_clearly(eight_devices):
  errors = eight_devices["errors"]
  assert "does not divide the 8 devices" in errors["mesh_not_dividing"]
  assert "16 devices" in errors["mesh_too_large"]
  assert "uses only part of the 8 devices" in errors["mesh_partial"]
  assert re.search(r"bert/encoder_layers?(_\d+)?/intermediate/", errors["indivisible_dim"])
  assert "'mlp' dimension of 100" in errors["indivisible_dim"] and "mesh axis tensor" in errors["indivisible_dim"]
  assert "12 rows" in errors["indivisible_batch"] and "8 devices" in errors["indivisible_batch"]


MESH = {"data": 2, "fsdp": 4, "tensor": 2}


@pytest.mark.parametrize(
  ("path", "shape", "spec"),
  [
    ("bert/embeddings/word_embeddings/embedding", (1024, 64), P("tensor", "fsdp")),
    ("bert/embeddings/position_embeddings/embedding", (64, 64), P(None, "fsdp")),
    ("bert/encoder_layer_1/query/kernel", (64, 64), P("fsdp", "tensor")),  # column-parallel
    ("bert/encoder_layer_1/value/bias", (64,), P("tensor")),
    ("bert/encoder_layer_1/attention_output/kernel", (64, 64), P("tensor", "fsdp")),  # row-parallel
    ("bert/encoder_layer_1/intermediate/kernel", (64, 256), P("fsdp", "tensor")),
    ("bert/encoder_layer_1/output/kernel", (256, 64), P("tensor", "fsdp")),
    ("bert/encoder_layer_1/output/bias", (64,), P(None)),
    ("bert/encoder_layer_1/output_norm/scale", (64,), P(None)),
    ("classifier/kernel", (64, 3), P("fsdp", None)),
    # The same rules serve a parameter's optimizer moments and GPT-style names.
    ("opt_state/1/0/mu/bert/encoder_layer_1/query/kernel", (64, 64), P("fsdp", "tensor")),
    ("transformer/h_0/attn/c_attn/kernel", (64, 192), P("fsdp", "tensor")),
    ("transformer/h_0/attn/c_proj/kernel", (64, 64), P("tensor", "fsdp")),
    ("transformer/h_0/mlp/c_proj/kernel", (256, 64), P("tensor", "fsdp")),
    ("lm_head/kernel", (64, 1024), P("fsdp", "tensor")),
    # Scanned layers' stacks: the leading layer axis stays whole.
    ("bert/encoder_layers/query/kernel", (5, 64, 64), P(None, "fsdp", "tensor")),
    ("opt_state/1/0/mu/bert/encoder_layers/intermediate/bias", (5, 256), P(None, "tensor")),
    ("h/mlp/c_proj/kernel", (12, 256, 64), P(None, "tensor", "fsdp")),
  ],
)
def test_rules_table(path, shape, spec):
  assert partition_spec(path, shape, MESH) == spec


def test_unruled_leaves_fall_back_to_fsdp_or_replication():
  # An unknown large weight: its largest dimension that divides by fsdp; a small one: whole.
  assert partition_spec("my_model/adapter/w", (6, 4096), MESH) == P(None, "fsdp")
  assert partition_spec("my_model/adapter/w", (4097, 8), MESH) == P(None, "fsdp")
  assert partition_spec("my_model/adapter/w", (8, 8), MESH) == P()
  assert partition_spec("step", (), MESH) == P()
  # An optimizer-state leaf that resembles a parameter but does not fit its rule (8-bit blocks) falls back too.
  assert partition_spec("opt_state/0/mu/query/kernel", (63, 64), MESH, strict=False) == P()
  with pytest.raises(ValueError, match=r"query/kernel has shape \(63, 64\): its 'embed' dimension of 63"):
    partition_spec("query/kernel", (63, 64), MESH)


def test_tree_shardings_checks_params_strictly_and_opt_state_leniently():
  mesh = make_mesh()  # one device here: every axis has size 1, so anything divides
  tree = {"params": {"query": {"kernel": np.zeros((3, 5), np.float32)}}}
  assert tree_shardings(tree, mesh)["params"]["query"]["kernel"].spec == P("fsdp", "tensor")
  rules = ShardingRules(logical_axes={**DEFAULT_RULES.logical_axes, "heads": ("tensor", "data")})
  assert partition_spec("query/kernel", (64, 64), MESH, rules) == P("fsdp", ("tensor", "data"))
  clash = ShardingRules(logical_axes={**DEFAULT_RULES.logical_axes, "heads": ("fsdp",)})
  with pytest.raises(ValueError, match="put a mesh axis on two dimensions"):
    partition_spec("query/kernel", (64, 64), MESH, clash)
  with pytest.raises(ValueError, match="uses logical axis 'rows'"):
    ShardingRules(param_axes=((r"x$", ("rows",)),))


def test_make_mesh_validates_its_shape():
  assert dict(make_mesh().shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="devices"):
    make_mesh(data=jax.device_count() + 1)
  with pytest.raises(ValueError, match="positive integer"):
    make_mesh(data=0)
  with pytest.raises(ValueError, match="only one mesh axis can be -1"):
    make_mesh(data=-1, fsdp=-1)


def test_rules_serve_the_gpt_decoder_unchanged():
  from jfast.models import GPT, GPTConfig

  model = GPT(GPTConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), np.int32))["params"]
  specs = {
    "/".join(str(k.key) for k in path): partition_spec("/".join(str(k.key) for k in path), x.shape, MESH)
    for path, x in jax.tree_util.tree_leaves_with_path(shapes)
  }
  assert specs["wte/embedding"] == P("tensor", "fsdp")
  assert specs["wpe/embedding"] == P(None, "fsdp")
  # Scanned blocks: the stacked layer axis stays whole, each block is split as an unscanned one is.
  assert specs["h/attn/c_attn/kernel"] == P(None, "fsdp", "tensor")
  assert specs["h/attn/c_proj/kernel"] == P(None, "tensor", "fsdp")
  assert specs["h/mlp/c_fc/kernel"] == P(None, "fsdp", "tensor")
  assert specs["h/mlp/c_proj/kernel"] == P(None, "tensor", "fsdp")
  assert specs["h/attn/c_attn/bias"] == P(None, "tensor")
  # Every matrix is split by a rule (none falls through to replication); vectors (norms, biases) may stay whole.
  ndims = {"/".join(str(k.key) for k in path): x.ndim for path, x in jax.tree_util.tree_leaves_with_path(shapes)}
  matrices = [name for name in ndims if name.endswith(("kernel", "embedding"))]
  assert len(matrices) == 2 + 4
  assert all(any(axis is not None for axis in specs[name]) for name in matrices)


@pytest.mark.slow
def test_two_process_run_matches_one_device(subprocess_runs):
  """Two CPU processes (2 devices each) joined by jax.distributed, each loading half the data, train as one."""
  outs = [subprocess_runs[f"host{i}"] for i in range(2)]
  for got in outs:
    if isinstance(got, str):
      pytest.fail(f"multi-host worker failed:\n{got}")
  for i, got in enumerate(outs):
    assert got["joined"] and got["process"] == i and got["processes"] == 2
    assert got["devices"] == 4 and got["local_devices"] == 2
    # Each host loaded only its half; their batch counts differ (10 vs 9) and the shorter one was padded.
    assert got["local_examples"] == (37, 36)[i] and got["host_batches"] == [10, 9] and got["steps"] == 10
    np.testing.assert_allclose(got["losses"], got["reference_losses"], atol=TOL)
    assert got["param_diff"] <= TOL
    assert got["restored_diff"] == 0.0  # saved by both processes, restored onto a data=1 x fsdp=4 mesh, bit for bit
  assert outs[0]["losses"] == outs[1]["losses"]  # the metrics are global: every host sees the same numbers


def test_distributed_settings_are_checked_before_joining(monkeypatch):
  from jfast.parallel import distributed

  for var in ("JFAST_COORDINATOR_ADDRESS", "JFAST_NUM_PROCESSES", "JFAST_PROCESS_ID", "JFAST_DISTRIBUTED"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
  monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  assert distributed.initialize() is False  # one process: nothing to join
  assert distributed.initialize(num_processes=1) is False
  with pytest.raises(ValueError, match="needs all of coordinator address"):
    distributed.initialize("127.0.0.1:1234", num_processes=2)
  monkeypatch.setenv("JFAST_NUM_PROCESSES", "2")
  monkeypatch.setenv("JFAST_PROCESS_ID", "2")
  with pytest.raises(ValueError, match=r"process_id 2 is not in 0..1"):
    distributed.initialize("127.0.0.1:1234")
  # Host shards: strided, disjoint, covering every example once.
  shards = [distributed.host_shard(10, i, 3) for i in range(3)]
  assert sorted(np.concatenate(shards).tolist()) == list(range(10)) and shards[1].tolist() == [1, 4, 7]


def test_mesh_from_string():
  from jfast.parallel import mesh_from_string

  assert mesh_from_string(None) is None
  assert dict(mesh_from_string("fsdp=1,tensor=1").shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="unknown mesh axis 'pipe'"):
    mesh_from_string("pipe=2")
  with pytest.raises(ValueError, match="needs an integer size"):
    mesh_from_string("data=two")


@pytest.mark.slow
def test_distill_step_on_a_mesh_equals_one_device():
  out = subprocess.run(
    [sys.executable, str(Path(__file__).parent / "distill_mesh_worker.py")],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["finite"] and result["compiles"] == 1 and result["devices"] == 8
  assert result["loss_diff"] <= 1e-5 and result["param_diff"] <= 1e-5
