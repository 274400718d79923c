"""The jfast side: the same model and batches through the library's own pieces.

    python -m benchmarks.jax_runner --spec spec.json --data data.npz --out result.json

Batches come from `jfast.data.make_batches` (checked against the shared plan), the model from
`jfast.models.load_hf_bert` + `init_classifier`, the step from `jfast.training.make_train_step` with the library's
precision policy, in-step gradient accumulation (``micro_batches``), freezing (`jfast.optim.freezing`), the 8-bit AdamW
(`jfast.optim.adamw_8bit`) and row-sparse word-table training (`jfast.cpu.row_sparse`). Each new batch shape is compiled ahead of time with ``step.lower(...).compile()`` and
timed apart, so step times are execution only and compile time is its own column.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common, data
from benchmarks.configs import MODEL_SHAPES, RunSpec


def build_model(spec: RunSpec, num_labels: int):
  import jax
  import jax.numpy as jnp

  from jfast.models import BertConfig, BertForSequenceClassification, init_classifier, load_hf_bert

  rng = jax.random.PRNGKey(spec.seed)
  if spec.model == "minilm":
    config, encoder = load_hf_bert(data.minilm_path())
    config = config.replace(dtype=spec.dtype, remat_policy=spec.remat)
    return init_classifier(config, encoder, num_labels, rng)
  config = BertConfig(**MODEL_SHAPES[spec.model], dtype=spec.dtype, remat_policy=spec.remat)
  model = BertForSequenceClassification(config, num_labels=num_labels)
  params = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])(rng)
  return model, params


# jfast's precision policy for each compute dtype: fp32 params throughout; fp16 brings dynamic loss scaling.
_POLICIES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def build_step(spec: RunSpec, model, params, epoch_steps: int):
  """The train state and jitted step: precision policy, in-step accumulation and freezing from the library."""
  from jfast.cpu import row_sparse_embedding
  from jfast.optim import OptimizerConfig, freeze, freeze_mask, make_optimizer
  from jfast.training import classification_loss, create_train_state, make_train_step

  policy = _POLICIES[spec.dtype]
  # bitsandbytes' AdamW8bit defaults on the other side: blocks of 256, tensors under 4096 elements kept in float32.
  name = {"adamw": "adamw", "adamw8bit": "adamw_8bit"}[spec.optimizer]
  opt = OptimizerConfig(learning_rate=spec.lr, name=name, row_sparse_embeddings=spec.row_sparse)
  tx = make_optimizer(opt, total_steps=epoch_steps)
  mask = None
  if spec.freeze_layers >= 0:
    # The same modules as the PyTorch side: the embeddings and the bottom freeze_layers encoder layers.
    mask = freeze_mask(params, bottom_layers=spec.freeze_layers)
    tx = freeze(tx, mask)
  state = create_train_state(model, params, tx, seed=spec.seed, policy=policy)
  step = make_train_step(
    classification_loss(model),
    policy=policy,
    micro_batches=spec.accum,
    freeze_mask=mask,
    row_sparse=row_sparse_embedding(model, classification_loss) if spec.row_sparse != "off" else None,
  )
  return state, step


def check_plan(epoch, plan: data.Plan | None, what: str) -> None:
  """Fails loudly if jfast cut different batches from the ones the PyTorch side reads."""
  if plan is None:
    return
  ours = data.plan_of(epoch)
  same = len(ours.slots) == len(plan.slots) and all(
    np.array_equal(a, b) for a, b in zip(ours.slots, plan.slots, strict=True)
  )
  if not same or ours.lengths != plan.lengths:
    raise RuntimeError(f"jfast's {what} batches differ from the shared plan: the sides would not see the same data")


def run(spec: RunSpec, train: data.Examples, dev: data.Examples | None, plan, dev_plan) -> dict:
  import jax

  import jfast
  from jfast.training import classification_loss, evaluate, make_eval_step
  from jfast.training.compile_cache import cache_events

  device = jax.devices()[0]
  t_setup = time.perf_counter()
  epoch = data.make_epoch(train, spec)
  check_plan(epoch, plan, "training")
  batches = epoch.batches if spec.full else epoch.batches[: spec.warmup + spec.steps]
  model, params = build_model(spec, data.NUM_LABELS[spec.task])
  state, step = build_step(spec, model, params, len(epoch.batches))
  jax.block_until_ready(state)
  setup_s = time.perf_counter() - t_setup
  rss_setup = common.rss_mb()

  compiled, compile_s = {}, 0.0
  events = cache_events()
  hits_before = events.hits
  dims = {
    "hidden": model.config.hidden_size,
    "layers": model.config.num_hidden_layers,
    "intermediate": model.config.intermediate_size,
    "num_labels": model.num_labels,
    "cls_only_last_layer": model.last_layer_pooled_only,  # the FLOPs this model runs
  }
  example_lengths = train.lengths
  times, tokens, flops, computed, examples, metrics = [], [], [], [], [], []
  step_cpu, load0 = [], os.getloadavg()[0]
  t_epoch = time.perf_counter()
  for batch, slots in zip(batches, epoch.example_index, strict=False):
    key = tuple(a.shape for a in batch)
    if key not in compiled:
      t0 = time.perf_counter()
      compiled[key] = step.lower(state, batch).compile()
      compile_s += time.perf_counter() - t0
    t0, c0 = time.perf_counter(), common.cpu_seconds()
    state, m = compiled[key](state, batch)
    metrics.append(m)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
    step_cpu.append(common.cpu_seconds() - c0)
    tokens.append(batch.num_real_tokens)
    flops.append(common.train_flops(example_lengths[slots[slots >= 0]].tolist(), **dims))
    computed.append(int(batch.input_ids.size))
    examples.append(batch.num_examples)
  epoch_s = time.perf_counter() - t_epoch
  per_step = {
    "step_times": times,
    "step_tokens": tokens,
    "step_flops": flops,
    "step_cpu_s": step_cpu,
    "step_computed_tokens": computed,
    "step_examples": examples,
  }
  threads = len(os.sched_getaffinity(0))
  summary = common.summarize_steps(per_step, spec.warmup if not spec.full else 0, threads)
  fetched = jax.device_get(metrics)
  seen = max(sum(float(m["examples"]) for m in fetched), 1.0)
  stats = device.memory_stats() if device.platform != "cpu" else None
  result = {
    "side": "jax",
    "config": spec.config,
    "spec": dataclasses.asdict(spec),
    "framework": f"jfast {jfast.__version__}, jax {jax.__version__}",
    "device": device.device_kind if device.platform != "cpu" else "cpu",
    "threads": threads,
    "attention": model.config.attention.kind,
    "steps": len(times),
    **per_step,
    "loadavg_start": load0,
    "loadavg_end": os.getloadavg()[0],
    "padding_efficiency": sum(tokens) / max(sum(computed), 1),
    "num_shapes": len(compiled),
    "compile_s": compile_s,
    "compiles_from_cache": events.hits - hits_before,  # warm: loaded from JAX's persistent cache
    "num_compiles": step.num_compiles,
    "setup_s": setup_s,
    "train_loss": sum(float(m["loss_sum"]) for m in fetched) / seen,
    "train_accuracy": sum(float(m["correct"]) for m in fetched) / seen,
    "rss_setup_mb": rss_setup,
    "peak_rss_mb": common.peak_rss_mb(),
    "device_peak_mb": stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None,
    **summary,
  }
  if spec.full:
    # Wall time of the epoch including every compilation: what a user waits for.
    result["epoch_s"] = epoch_s
    if dev is not None:
      dev_ep = data.dev_epoch(dev, spec)
      check_plan(dev_ep, dev_plan, "dev")
      scores = evaluate(make_eval_step(classification_loss(model)), state.params, dev_ep.batches)
      result.update(dev_accuracy=scores["accuracy"], dev_loss=scores["loss"], dev_examples=scores["examples"])
  return result


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--spec", required=True, help="a RunSpec as a JSON file")
  p.add_argument("--data", required=True, help="examples and plans written by benchmarks.data.save")
  p.add_argument("--out", required=True, help="where to write the result JSON")
  args = p.parse_args(argv)
  spec = RunSpec.from_json(Path(args.spec).read_text())
  if spec.side != "jax":
    sys.exit(f"spec is for side {spec.side!r}, not jax")
  common.pin_threads(spec.threads)
  train, dev, plans, dev_plan = data.load(Path(args.data))
  result = run(spec, train, dev, plans.get(spec.config), dev_plan)
  Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
  main()
