"""The word-embedding table's gradient and first Adam moment, four ways, alone on this CPU.

    python -m benchmarks.embedding_update

MiniLM's word-embedding gradient is a 30,522 x 384 float32 table (47 MB) that autodiff builds as zeros plus a
scatter-add of the batch's token rows; AdamW then reads it in full. XLA:CPU runs that zero fill as one
single-threaded kernel (3-4 ms of a packed step, with occasional 8-31 ms page-fault spikes, in a profiler trace).
This times ``mu <- b1 * mu + (1 - b1) * grad`` for a packed batch's 456 token rows, ``mu`` donated:

- ``zeros + scatter`` (what the train step does now),
- ``table * 0 + scatter`` and ``broadcast of an opaque 0 + scatter`` (zero fills XLA cannot fold away, to see if a
  computed fill is split across threads),
- ``scatter into b1 * mu`` (no gradient table at all: the batch's rows added straight into the decayed moment),
each checked against the first.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import common


def variants():
  import jax.numpy as jnp
  from jax import lax

  def zeros(table, mu, ids, g):
    return 0.9 * mu + 0.1 * jnp.zeros_like(table).at[ids].add(g)

  def times_zero(table, mu, ids, g):
    return 0.9 * mu + 0.1 * (table * 0.0).at[ids].add(g)

  def opaque_zero(table, mu, ids, g):
    z = lax.optimization_barrier(jnp.zeros((), table.dtype))
    return 0.9 * mu + 0.1 * jnp.broadcast_to(z, table.shape).at[ids].add(g)

  def into_moment(table, mu, ids, g):
    return (0.9 * mu).at[ids].add(0.1 * g)

  return {
    "zeros + scatter": zeros,
    "table * 0 + scatter": times_zero,
    "opaque 0 + scatter": opaque_zero,
    "scatter into b1 * mu": into_moment,
  }


def run(steps: int, vocab: int = 30522, dim: int = 384, tokens: int = 456) -> str:
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.standard_normal((vocab, dim)), jnp.float32)
  mu0 = rng.standard_normal((vocab, dim)).astype(np.float32)
  ids = jnp.asarray(rng.integers(0, vocab, tokens), jnp.int32)  # repeats included, as in real batches
  g = jnp.asarray(rng.standard_normal((tokens, dim)), jnp.float32)
  fns = {name: jax.jit(f, donate_argnums=(1,)) for name, f in variants().items()}
  want = None
  for name, fn in fns.items():
    got = np.asarray(fn(table, jnp.asarray(mu0), ids, g))
    want = got if want is None else want
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)
  moments = {name: jnp.asarray(mu0) for name in fns}
  times = {name: [] for name in fns}
  for i in range(5 + steps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      moments[name] = fn(table, moments[name], ids, g)
      moments[name].block_until_ready()
      if i >= 5:
        times[name].append(time.perf_counter() - t0)
  title = (
    f"Word-embedding gradient + first moment, {vocab} x {dim} float32, {tokens} token rows, {steps} alternated calls"
  )
  return common.median_table(title, "form", times, "zeros + scatter")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--out", default=None, help="also write the markdown here")
  args = p.parse_args(argv)
  common.pin_threads(args.threads)
  common.print_and_save(run(args.steps), args.out)


if __name__ == "__main__":
  main()
