"""A prototype train step whose word-embedding update works from the batch's rows, timed against jfast's step.

    python -m benchmarks.sparse_embedding_step --config packed_bf16

jfast's step (`make_train_step` + `make_optimizer`) differentiates the whole word-embedding table: autodiff builds a
47 MB gradient of zeros plus the batch's rows, the clip reads it, and AdamW reads it again for each moment. Here the
step instead gathers the batch's distinct token rows (`jnp.unique` with a static size) into a compact table,
differentiates that ([T, D]), and updates the big table's moments by scattering the compact rows into ``b1 * mu``
and ``b2 * nu``; the parameter pass stays dense (every row with a moment moves). Clipping sees the same global norm
(the rows no token touches contribute zeros), and embeddings take no weight decay on either path, so the update
is AdamW's, to rounding: the script checks the parameters after a few steps against jfast's own step, with the
same dropout keys, before it times the two alternated on the same batches. A measurement for #8, not a library
path: it handles one config (no freezing, accumulation, loss scaling, 8-bit state or sharding).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, NamedTuple

import numpy as np

from benchmarks import common, data
from benchmarks.step_profile import _chosen, _spec


class SparseState(NamedTuple):
  step: Any
  params: Any
  rest_opt: Any
  mu: Any
  nu: Any
  rng: Any


def _split(params):
  """(params without the word table, the word table)."""
  emb = dict(params["bert"]["embeddings"])
  table = emb.pop("word_embeddings")["embedding"]
  return {**params, "bert": {**params["bert"], "embeddings": emb}}, table


def _join(rest, table):
  emb = {**rest["bert"]["embeddings"], "word_embeddings": {"embedding": table}}
  return {**rest, "bert": {**rest["bert"], "embeddings": emb}}


def make_sparse_step(model, schedule, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, max_norm=1.0):
  """``(init(train_state) -> SparseState, step(state, batch) -> (state, loss))``, jitted, state donated."""
  import jax
  import jax.numpy as jnp
  import optax

  from jfast.optimizer import decay_mask
  from jfast.train import RNG_IMPL, classification_loss

  rest_tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)

  def init(train_state):
    rest, table = _split(train_state.params)
    mu, nu = jnp.zeros_like(table), jnp.zeros_like(table)  # two buffers: the step donates both
    return SparseState(train_state.step, train_state.params, rest_tx.init(rest), mu, nu, train_state.rng)

  def step(state, batch):
    rest, table = _split(state.params)
    ids = batch.input_ids.reshape(-1)
    uid, inv = jnp.unique(ids, size=ids.size, fill_value=0, return_inverse=True)
    compact_batch = batch._replace(input_ids=inv.reshape(batch.input_ids.shape).astype(batch.input_ids.dtype))
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=RNG_IMPL), state.step)

    # A model whose table is the compact one (flax checks the parameter's shape against the config).
    loss_fn = classification_loss(model.clone(config=model.config.replace(vocab_size=ids.size)))

    def loss(rest, rows):
      return loss_fn(_join(rest, rows), compact_batch, key, False)

    (value, _), (g_rest, g_rows) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(rest, table[uid])
    norm = optax.tree.norm((g_rest, g_rows))  # rows no token touches would add zeros
    scale = jnp.minimum(1.0, max_norm / norm)
    g_rest = jax.tree.map(lambda g: g * scale, g_rest)
    g_rows = g_rows * scale
    updates, rest_opt = rest_tx.update(g_rest, state.rest_opt, rest)
    rest = optax.apply_updates(rest, updates)
    # Padding slots of uid repeat id 0 with zero rows: adding zeros leaves row 0 exact.
    mu = (b1 * state.mu).at[uid].add((1 - b1) * g_rows)
    nu = (b2 * state.nu).at[uid].add((1 - b2) * g_rows * g_rows)
    count = state.rest_opt[0].count  # optax's adam count before this update
    t = (count + 1).astype(jnp.float32)
    update = (mu / (1 - b1**t)) / (jnp.sqrt(nu / (1 - b2**t)) + eps)
    table = table - schedule(count) * update
    new = SparseState(state.step + 1, _join(rest, table), rest_opt, mu, nu, state.rng)
    return new, value

  return init, jax.jit(step, donate_argnums=0)


def check_same_training(dense, dense_state, sparse, sparse_state, batches, params):
  """Runs both steps over ``batches``; raises unless their parameter updates agree. Returns the states and the
  largest difference and largest move of any parameter."""
  import jax

  for batch in batches:
    dense_state, _ = dense(dense_state, batch)
    sparse_state, _ = sparse(sparse_state, batch)
  flat = lambda p: np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(p))])  # noqa: E731
  start, a, b = flat(params), flat(dense_state.params), flat(sparse_state.params)
  moved, diff = float(np.abs(a - start).max()), float(np.abs(a - b).max())
  # 1% of the largest update: float rounding is far below it, a wrong bias correction or clip scale far above.
  if not (moved > 0 and diff <= 1e-2 * moved):
    raise AssertionError(f"row-sparse step diverges from jfast's: max |diff| {diff:.3g}, max move {moved:.3g}")
  return dense_state, sparse_state, diff, moved


def run(config: str, steps: int, check_steps: int = 8) -> str:
  import jax

  from benchmarks.jax_runner import build_model, build_step
  from jfast.optimizer import learning_rate_schedule
  from jfast.train import OptimizerConfig

  spec = _spec(config)
  batches, _, _ = _chosen(spec)
  model, params = build_model(spec, data.NUM_LABELS[spec.task])
  total = 1000
  cfg = OptimizerConfig(learning_rate=spec.lr)
  schedule = learning_rate_schedule(cfg, total)  # the schedule jfast's step gets from make_optimizer
  init, sparse_step = make_sparse_step(model, schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, max_norm=cfg.max_grad_norm)
  dense_state, dense_step = build_step(spec, model, jax.tree.map(lambda x: x.copy(), params), total)
  sparse_state = init(jax.tree.map(lambda x: x.copy(), dense_state))
  dense = dense_step.lower(dense_state, batches[0]).compile()
  sparse = sparse_step.lower(sparse_state, batches[0]).compile()

  # Same init, same batches, same dropout keys: the two steps must train the same parameters.
  dense_state, sparse_state, diff, moved = check_same_training(
    dense, dense_state, sparse, sparse_state, batches[:check_steps], params
  )

  times = {"jfast step": [], "row-sparse word table": []}
  for i in range(3 + steps):
    batch = batches[i % len(batches)]
    for name in times:
      t0 = time.perf_counter()
      if name == "jfast step":
        dense_state, m = dense(dense_state, batch)
        jax.block_until_ready((dense_state, m))
      else:
        sparse_state, m = sparse(sparse_state, batch)
        jax.block_until_ready((sparse_state, m))
      if i >= 3:
        times[name].append(time.perf_counter() - t0)
  title = (
    f"`{config}` step, batches {'x'.join(map(str, batches[0].input_ids.shape))}; after {check_steps} steps the"
    f" parameters agree to {diff:.2g} (largest move {moved:.2g}); {steps} alternated steps each."
  )
  return common.median_table(title, "step", times, "jfast step")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="packed_bf16")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--out", default=None, help="also write the markdown here")
  args = p.parse_args(argv)
  common.pin_threads(2)
  common.print_and_save(run(args.config, args.steps), args.out)


if __name__ == "__main__":
  main()
