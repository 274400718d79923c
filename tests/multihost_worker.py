"""One process of a simulated two-host run on CPU, launched twice by tests/test_sharding.py.

Each process has 2 CPU devices (4 in the run), joins through `jfast.parallel.distributed.initialize` (settings from the
``JFAST_*`` environment), loads only its shard of a synthetic dataset, and trains with `jfast.training.loop.fit` on a
``data=2 x tensor=2`` mesh spanning both processes. It then rebuilds every host's batches (the data and seeds are
shared, so it can), concatenates them into the global batches, replays them on one local device, and prints one
JSON line: the two runs' losses and largest parameter difference. With ``JFAST_TEST_CHECKPOINT_DIR`` set, both
processes also save the sharded state into one checkpoint and restore it onto a ``fsdp=4`` mesh.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import json
import sys

import jax
import numpy as np

from jfast.data import BatchingConfig, make_batches
from jfast.models import BertConfig, BertForSequenceClassification
from jfast.optim import OptimizerConfig, make_optimizer
from jfast.parallel import abstract_tree, distributed, make_mesh
from jfast.training import Checkpointer, LoopConfig, classification_loss, create_train_state, fit, make_train_step

CONFIG = BertConfig(
  vocab_size=512,
  hidden_size=32,
  num_hidden_layers=1,
  num_attention_heads=4,
  intermediate_size=64,
  max_position_embeddings=64,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)
GLOBAL_ROWS = 8


def main() -> dict:
  joined = distributed.initialize()
  rng = np.random.default_rng(0)  # the same dataset on every host; each keeps its own shard
  lengths = rng.integers(4, 30, 73)  # 73 examples: 37 and 36, so 10 and 9 batches of 4 rows
  seqs = [rng.integers(1, CONFIG.vocab_size, n).astype(np.int32) for n in lengths]
  labels = rng.integers(0, 2, len(seqs)).astype(np.int32)

  def host_data(index):
    keep = distributed.host_shard(len(seqs), index, jax.process_count())
    return [seqs[i] for i in keep], labels[keep]

  local_seqs, local_labels = host_data(jax.process_index())
  batching = BatchingConfig(strategy="fixed", batch_size=distributed.local_batch_size(GLOBAL_ROWS), shuffle=True)
  batching = distributed.agree_batching(batching, local_seqs, local_labels, pad_id=0)
  model = BertForSequenceClassification(CONFIG, num_labels=2)
  params = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"])
  opt = OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0)
  result = fit(
    model,
    params,
    lambda total: make_optimizer(opt, total),
    (local_seqs, local_labels),
    None,
    batching=batching,
    eval_batching=batching,
    loop=LoopConfig(epochs=1, log_every=1, progress=False),
    pad_id=0,
    mesh=make_mesh(data=2, tensor=2),
  )
  from jax.experimental import multihost_utils

  got = multihost_utils.process_allgather(result.state.params, tiled=True)
  # Every process writes its own shards into one checkpoint, then it comes back onto a differently shaped mesh.
  ckpt_dir = os.environ.get("JFAST_TEST_CHECKPOINT_DIR")
  restored_diff = None
  if ckpt_dir:
    ckpt = Checkpointer(ckpt_dir)
    ckpt.save(10, result.state, {"epoch": 1, "batch": 0})
    ckpt.close()
    target = abstract_tree(result.state, make_mesh(data=1, fsdp=4))
    restored, _ = Checkpointer(ckpt_dir).restore_latest(target)
    back = multihost_utils.process_allgather(restored.params, tiled=True)
    restored_diff = max(
      float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(got), strict=True)
    )

  # The reference: the same global batches (host 0's rows, then host 1's) on one device, no mesh.
  per_host = [make_batches(*host_data(j), batching, pad_id=0, seed=0, epoch=0).batches for j in range(2)]
  steps = max(len(b) for b in per_host)
  counts = [len(b) for b in per_host]
  per_host = [b + [distributed.empty_like(b[-1])] * (steps - len(b)) for b in per_host]
  tx = make_optimizer(opt, steps)
  local = jax.local_devices()[0]
  state = create_train_state(model, jax.device_put(params, local), tx)
  step = make_train_step(classification_loss(model))
  ref_losses = []
  for i in range(steps):
    batch = jax.tree.map(lambda *xs: np.concatenate(xs), *[host[i] for host in per_host])
    state, metrics = step(state, jax.device_put(batch, local))
    ref_losses.append(float(metrics["loss"]))
  ref = jax.device_get(state.params)
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True))
  return {
    "joined": joined,
    "process": jax.process_index(),
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
    "local_examples": len(local_seqs),
    "steps": result.stats["final_step"],
    "host_batches": counts,
    "losses": [h["loss"] for h in result.history],
    "reference_losses": ref_losses,
    "param_diff": diff,
    "restored_diff": restored_diff,
  }


if __name__ == "__main__":
  sys.stdout.write(json.dumps(main()) + "\n")
