"""What the bf16 policy's weight casts cost on their own: MiniLM's float32 encoder weights to bfloat16, one jitted call.

    python -m benchmarks.weight_cast

Under the ``bf16`` policy (float32 parameters, bf16 compute) every step casts each weight matrix to bf16 before its
product, and the backward casts the bf16 weight gradients back. The step profile charges these casts 12% of the
packed step's thread time (`docs/figures/step_profile_packed_bf16_lazyemb_zen5_s11.md`). This times the cast alone,
two ways: leaf by leaf, as the step does, and as one flat buffer, to tell a per-kernel cost from memory traffic. A
lead for #8, not a library path: keeping a bf16 copy of the weights written by the optimizer's own pass would drop
the forward casts.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks import common


def encoder_weights():
  """The real MiniLM's encoder weights (everything but the embeddings), float32."""
  from benchmarks.jax_runner import build_model
  from benchmarks.step_profile import _spec

  _, params = build_model(_spec("packed_bf16"), 2)
  return {k: v for k, v in params["bert"].items() if k != "embeddings"}


def cast_forms():
  """name -> jitted cast: of the weight tree, leaf by leaf, or of the same values as one flat buffer."""
  import jax
  import jax.numpy as jnp

  return {
    "leaf by leaf": jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)),
    "one flat buffer": jax.jit(lambda flat: flat.astype(jnp.bfloat16)),
  }


def run(steps: int) -> str:
  import jax

  weights = encoder_weights()
  flat = jax.device_put(np.concatenate([np.ravel(x) for x in jax.tree.leaves(weights)]))
  forms = cast_forms()
  inputs = {"leaf by leaf": weights, "one flat buffer": flat}
  calls = {name: (lambda fn=fn, x=inputs[name]: jax.block_until_ready(fn(x))) for name, fn in forms.items()}
  times = common.time_alternated(calls, steps)
  title = (
    f"MiniLM encoder weights, {flat.size / 1e6:.1f}M float32 values in {len(jax.tree.leaves(weights))} leaves, "
    f"cast to bf16; {steps} alternated calls each."
  )
  return common.median_table(title, "cast", times, "leaf by leaf")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--out", default=None, help="also write the markdown here")
  args = p.parse_args(argv)
  common.start_jfast_script()
  common.print_and_save(run(args.steps), args.out)


if __name__ == "__main__":
  main()
