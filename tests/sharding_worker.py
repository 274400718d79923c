"""Sharded-training checks on 8 simulated CPU devices, run by tests/test_sharding.py in a subprocess.

The device count is fixed when JAX starts, so these checks live in their own process (XLA_FLAGS set before jax is
imported) and leave the rest of the suite on one device. One process runs every check and prints one JSON object
(the last stdout line), keeping the subprocess count, and XLA's start-up cost, to one.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json
import re
import sys
import tempfile
import time

import jax
import numpy as np

from jfast.cpu import row_sparse_embedding
from jfast.data import Batch
from jfast.models import BertConfig, BertForSequenceClassification
from jfast.optim import OptimizerConfig, make_optimizer
from jfast.parallel import abstract_tree, make_mesh, per_device_bytes
from jfast.training import Checkpointer, classification_loss, create_train_state, make_train_step

STEPS = 3
CONFIG = BertConfig(
  vocab_size=1024,
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=8,
  intermediate_size=128,
  max_position_embeddings=64,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


def make_batch(rng: np.random.Generator, rows: int = 16, length: int = 24) -> Batch:
  lengths = rng.integers(6, length + 1, rows)
  cols = np.arange(length)[None, :]
  real = cols < lengths[:, None]
  return Batch(
    input_ids=np.where(real, rng.integers(1, CONFIG.vocab_size, (rows, length)), 0).astype(np.int32),
    segment_ids=real.astype(np.int32),
    position_ids=np.where(real, cols, 0).astype(np.int32),
    labels=rng.integers(0, 3, (rows, 1)).astype(np.int32),
    cls_positions=np.zeros((rows, 1), np.int32),
    example_mask=np.ones((rows, 1), bool),
  )


def max_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def shard_fractions(tree) -> dict:
  """Bytes one device really holds (its first addressable shard) against the full bytes, for sharded leaves."""
  sharded_full = sharded_local = replicated = 0
  fractions = set()
  for x in jax.tree.leaves(tree):
    local = x.addressable_shards[0].data.nbytes
    if local == x.nbytes:
      replicated += x.nbytes
    else:
      sharded_full += x.nbytes
      sharded_local += local
      fractions.add(round(x.nbytes / local, 6))
  return {
    "sharded_bytes": sharded_full,
    "sharded_local_bytes": sharded_local,
    "replicated_bytes": replicated,
    "fractions": sorted(fractions),
    "per_device_bytes": per_device_bytes(tree),
  }


def expect_error(fn) -> str:
  try:
    fn()
  except ValueError as e:
    return str(e)
  return ""


def main() -> dict:
  t_start = time.perf_counter()
  rng = np.random.default_rng(0)
  batches = [make_batch(rng) for _ in range(STEPS + 1)]
  model = BertForSequenceClassification(CONFIG, num_labels=3)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batches[0].input_ids[:1])["params"]
  params = jax.device_get(params)
  tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0), 20)
  loss_fn = classification_loss(model)
  out: dict = {"devices": jax.device_count(), "strategies": {}}

  def run(mesh, steps, tx=tx, micro_batches=1):
    state = create_train_state(model, params, tx, mesh=mesh)
    step = make_train_step(loss_fn, mesh=mesh, micro_batches=micro_batches)
    losses = []
    for batch in batches[:steps]:
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    return state, step, losses

  ref_state, ref_step, ref_losses = run(None, STEPS)
  ref_params, ref_opt = jax.device_get((ref_state.params, ref_state.opt_state))
  ref_next, _ = ref_step(ref_state, batches[STEPS])
  ref_next_params = jax.device_get(ref_next.params)
  out["reference_losses"] = ref_losses

  meshes = {
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "tensor8": dict(data=1, tensor=8),
    "data4_tensor2": dict(data=4, tensor=2),
  }
  steps = {}
  saved = None
  for name, axes in meshes.items():
    mesh = make_mesh(**axes)
    state, step, losses = run(mesh, STEPS)
    steps[name] = step
    out["strategies"][name] = {
      "mesh": dict(mesh.shape),
      "losses": losses,
      "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
      "param_diff": max_diff(jax.device_get(state.params), ref_params),
      "opt_state_diff": max_diff(jax.device_get(state.opt_state), ref_opt),
      "params": shard_fractions(state.params),
      "opt_state": shard_fractions(state.opt_state),
      "query_spec": str(state.params["bert"]["encoder_layer_1"]["query"]["kernel"].sharding.spec),
      "stacked_spec": str(state.params["bert"]["encoder_layers"]["query"]["kernel"].sharding.spec),
      "compiles": step.num_compiles,
    }
    if name == "data4_tensor2":
      saved = state

  # The other step features under a mesh: 8-bit optimizer state and in-step accumulation, on fsdp x tensor.
  tx8 = make_optimizer(
    OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0, name="adamw_8bit", min_8bit_size=1024), 20
  )
  ref8, _, ref8_losses = run(None, STEPS, tx=tx8, micro_batches=2)
  got8, step8, losses8 = run(make_mesh(data=1, fsdp=4, tensor=2), STEPS, tx=tx8, micro_batches=2)
  moment = got8.opt_state[1][0].mu["bert"]["encoder_layer_1"]["intermediate"]["kernel"]
  out["fsdp4_tensor2_8bit_accum"] = {
    "loss_diff": max(abs(a - b) for a, b in zip(losses8, ref8_losses, strict=True)),
    "param_diff": max_diff(jax.device_get(got8.params), jax.device_get(ref8.params)),
    "moment_dtype": str(moment.dtype),
    "moment_spec": str(moment.sharding.spec),
    "params": shard_fractions(got8.params),
    "compiles": step8.num_compiles,
  }

  # Row-sparse word-table training (jfast.cpu.row_sparse) with the table split over fsdp, then over tensor.
  tx_rows = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0, row_sparse_embeddings="exact"), 20)
  out["row_sparse"] = {}
  for name, axes in (("fsdp8", dict(data=1, fsdp=8)), ("data4_tensor2", dict(data=4, tensor=2))):
    mesh = make_mesh(**axes)
    state = create_train_state(model, params, tx_rows, mesh=mesh)
    step = make_train_step(loss_fn, mesh=mesh, row_sparse=row_sparse_embedding(model, classification_loss))
    losses = []
    for batch in batches[:STEPS]:
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    table = state.params["bert"]["embeddings"]["word_embeddings"]["embedding"]
    out["row_sparse"][name] = {
      "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
      "param_diff": max_diff(jax.device_get(state.params), ref_params),
      "table_spec": str(table.sharding.spec),
      "compiles": step.num_compiles,
    }

  # Save on the 4x2 mesh, restore onto 8x1 (fsdp) and onto one device; both continue training like the reference.
  with tempfile.TemporaryDirectory() as d:
    ckpt = Checkpointer(d)
    ckpt.save(STEPS, saved, {"epoch": 0, "batch": STEPS})
    ckpt.close()
    saved_host = jax.device_get(saved)
    restores = {}
    for name, mesh in (("fsdp8", make_mesh(data=1, fsdp=8)), ("single", None)):
      target = abstract_tree(saved, mesh)
      restored, position = Checkpointer(d).restore_latest(target)
      leaf = restored.params["bert"]["encoder_layer_1"]["intermediate"]["kernel"]
      restores[name] = {
        "exact": max_diff(jax.device_get(restored), saved_host) == 0.0,
        "position": position,
        "devices": len(leaf.sharding.device_set),
        "spec": str(getattr(leaf.sharding, "spec", None)),
      }
      # The step donates the restored state: everything read from it is read above.
      step = ref_step if mesh is None else steps["fsdp8"]
      compiles = step.num_compiles
      continued, _ = step(restored, batches[STEPS])
      restores[name]["continue_diff"] = max_diff(jax.device_get(continued.params), ref_next_params)
      restores[name]["recompiled"] = step.num_compiles - compiles
    out["restore"] = restores

  # Query, key and value as one product (BertConfig.fuse_qkv) add no communication under tensor parallelism.
  tp_mesh = make_mesh(data=4, tensor=2)
  out["collectives"] = {}
  for name, fuse in (("fused", True), ("apart", False)):
    variant = BertForSequenceClassification(CONFIG.replace(fuse_qkv=fuse), num_labels=3)
    state = create_train_state(variant, params, tx, mesh=tp_mesh)
    hlo = make_train_step(classification_loss(variant), mesh=tp_mesh).lower(state, batches[0]).compile().as_text()
    kinds = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    out["collectives"][name] = {k: len(re.findall(rf"= \S+ {k}(?:-start)?\(", hlo)) for k in kinds}

  # Bad input: clear ValueErrors before any compilation.
  bad_model = BertForSequenceClassification(CONFIG.replace(intermediate_size=100), num_labels=3)
  bad_params = jax.eval_shape(bad_model.init, jax.random.PRNGKey(0), batches[0].input_ids[:1])["params"]
  bad_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), bad_params)
  out["errors"] = {
    "mesh_not_dividing": expect_error(lambda: make_mesh(data=3)),
    "mesh_too_large": expect_error(lambda: make_mesh(data=4, tensor=4)),
    "mesh_partial": expect_error(lambda: make_mesh(data=2, tensor=2)),
    "indivisible_dim": expect_error(lambda: create_train_state(bad_model, bad_params, tx, mesh=make_mesh(tensor=8))),
    "indivisible_batch": expect_error(lambda: steps["data8"](saved, make_batch(rng, rows=12))),
  }
  out["seconds"] = time.perf_counter() - t_start
  return out


if __name__ == "__main__":
  result = main()
  sys.stdout.write(json.dumps(result) + "\n")
