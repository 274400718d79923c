"""jfast's step with and without row-sparse word-table training (`jfast.row_sparse`), checked equal, then timed.

    python -m benchmarks.sparse_embedding_step --config packed_bf16

The dense step differentiates the whole word-embedding table: autodiff builds a 47 MB gradient of zeros plus the
batch's rows, the clip reads it, and AdamW reads it again for each moment. The row-sparse step differentiates the
batch's distinct rows only and scatters them into the decayed moments. Both come from `benchmarks.jax_runner`'s
``build_step`` (the spec's ``row_sparse`` switch), so this times exactly what ``benchmarks.compare`` runs. The
script first checks that the dense and the exact row-sparse step train the same parameters (same batches, same
dropout keys), then times them and the lazy variant (only the batch's rows move) alternated on the same batches,
with glibc huge pages on as `benchmarks.compare` runs jfast (`JFAST_HUGEPAGES=0` turns them off). (Session 10
timed a hand-written prototype of this step here; it is now the library's.)
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import numpy as np

from benchmarks import common, data
from benchmarks.step_profile import _chosen, _spec


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


def _stepper(run_: list, batches) -> Callable[[], None]:
  """A zero-argument call that runs ``run_ = [step, state]`` on the next of ``batches`` (its own counter)."""
  import jax

  count = iter(range(10**9))

  def once():
    run_[1], metrics = run_[0](run_[1], batches[next(count) % len(batches)])
    jax.block_until_ready((run_[1], metrics))

  return once


def run(config: str, steps: int, check_steps: int = 8) -> str:
  import jax

  from benchmarks.jax_runner import build_model, build_step

  spec = dataclasses.replace(_spec(config), row_sparse="off")
  batches, _, _ = _chosen(spec)
  model, params = build_model(spec, data.NUM_LABELS[spec.task])
  total = 1000
  dense_state, dense_step = build_step(spec, model, jax.tree.map(lambda x: x.copy(), params), total)
  sparse_state, sparse_step = build_step(
    dataclasses.replace(spec, row_sparse="exact"), model, jax.tree.map(lambda x: x.copy(), params), total
  )
  lazy_state, lazy_step = build_step(
    dataclasses.replace(spec, row_sparse="lazy"), model, jax.tree.map(lambda x: x.copy(), params), total
  )
  dense = dense_step.lower(dense_state, batches[0]).compile()
  sparse = sparse_step.lower(sparse_state, batches[0]).compile()
  lazy = lazy_step.lower(lazy_state, batches[0]).compile()

  # Same init, same batches, same dropout keys: the exact row-sparse step must train the same parameters.
  dense_state, sparse_state, diff, moved = check_same_training(
    dense, dense_state, sparse, sparse_state, batches[:check_steps], params
  )
  runs = {
    "jfast step": [dense, dense_state],
    "row-sparse word table (exact)": [sparse, sparse_state],
    "row-sparse word table (lazy)": [lazy, lazy_state],
  }
  times = common.time_alternated({name: _stepper(run_, batches) for name, run_ in runs.items()}, steps)
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
  common.start_jfast_script()
  common.print_and_save(run(args.config, args.steps), args.out)


if __name__ == "__main__":
  main()
