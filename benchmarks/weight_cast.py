"""Per-leaf against flat-buffer kernels on MiniLM's float32 encoder weights: the bf16 cast, then the optimizer pass.

    python -m benchmarks.weight_cast            # both tables
    python -m benchmarks.weight_cast --part cast

Under the ``bf16`` policy (float32 parameters, bf16 compute) every step casts each weight matrix to bf16 before its
product, and the backward casts the bf16 weight gradients back. The step profile charges casts 12% of the packed
step's thread time (`docs/figures/step_profile_packed_bf16_lazyemb_zen5_s11.md`). The first table times the weight
cast alone, leaf by leaf as the step does it and as one flat buffer, to tell a per-kernel cost from memory traffic.
The second times the whole optimizer half of a bf16 step (gradients cast to float32, global-norm clip, AdamW with
its decay mask, the update applied, a bf16 copy of the new weights) four ways: leaf by leaf as the step runs it; on
a flat train state fed the step's per-leaf gradients (concatenated in, the bf16 copy sliced out); on a flat state
fed a flat gradient (the floor, with no concatenation or slicing); and leaf by leaf with each parameter and its two
moments stacked in one array that one expression writes (a one-pass update, as PyTorch's fused AdamW makes).

Why it exists: session 11 measured the cast 4.2x faster flat and proposed flat parameters and moments, as PyTorch's
fused optimizers and DeepSpeed keep them, as the next lead for #8. That figure handed the leaf-by-leaf form numpy
arrays, so each call copied 43 MB in; with both forms reading device arrays they are level, and the flat optimizer
half is no faster than the per-leaf one (`docs/figures/weight_cast_zen5_s12.md`). The lead is closed, and the
stacked one-pass form is slower still.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

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


class OptimizerForm(NamedTuple):
  """One way to run the optimizer half: ``step(params, opt_state, grads) -> (params, opt_state, bf16 copy)``, jitted
  and donating its first two arguments; its initial ``(params, opt_state)``; how to read the parameter tree and the
  bf16 copy back out of what it carries; whether it takes the gradients flat (`to_flat`) instead of as leaves."""

  step: Callable
  init: tuple
  params_of: Callable
  copy_of: Callable
  flat_grad: bool = False


def optimizer_forms(weights, lr: float = 3e-5, weight_decay: float = 0.01):
  """The optimizer half four ways over ``weights``, and the packing that makes leaves flat.

  Every form runs the same update: `jfast.clipping.clip_by_global_norm`, then AdamW whose weight decay skips biases
  and norm scales (`jfast.optimizer.decay_mask`). The flat forms keep two buffers, the decayed weights and the rest,
  as PyTorch's parameter groups do, so the decay needs no per-element mask. The stacked form keeps each leaf's
  parameter and moments as one ``[3, ...]`` array written by one expression, the nearest XLA:CPU gets to PyTorch's
  one-pass fused AdamW without multi-output fusion. Each form takes the gradients as bf16 leaves (what the bf16
  step's backward yields), except the flat-gradient floor, which takes them flat.

  Returns:
    ``(forms, to_flat)``: ``forms`` maps a name to its `OptimizerForm`; ``to_flat(leaves, dtype)`` packs a list of
    leaves (in ``weights``' order) into the two flat buffers.
  """
  import functools

  import jax
  import jax.numpy as jnp
  import optax

  from jfast.clipping import clip_by_global_norm
  from jfast.optimizer import decay_mask

  wd, b1, b2, eps = weight_decay, 0.9, 0.999, 1e-8
  by_leaf = optax.chain(clip_by_global_norm(1.0), optax.adamw(lr, b1, b2, eps, weight_decay=wd, mask=decay_mask))
  # Two flat buffers, as PyTorch's parameter groups: the decayed weights and the rest, so the decay needs no mask.
  leaves, treedef = jax.tree.flatten(weights)
  decays = jax.tree.leaves(decay_mask(weights))
  groups = {"decay": [i for i, d in enumerate(decays) if d], "no_decay": [i for i, d in enumerate(decays) if not d]}
  flat_tx = optax.chain(
    clip_by_global_norm(1.0), optax.adamw(lr, b1, b2, eps, weight_decay=wd, mask={"decay": True, "no_decay": False})
  )

  def to_flat(tree_leaves, dtype):
    return {k: jnp.concatenate([tree_leaves[i].ravel().astype(dtype) for i in idx]) for k, idx in groups.items()}

  def from_flat(flat):
    out, shapes = [None] * len(leaves), [x.shape for x in leaves]
    for k, idx in groups.items():
      start = 0
      for i in idx:
        size = int(np.prod(shapes[i]))
        out[i] = jax.lax.slice(flat[k], (start,), (start + size,)).reshape(shapes[i])
        start += size
    return jax.tree.unflatten(treedef, out)

  def flat_init():  # each form gets its own buffers: the steps donate them
    flat = to_flat(leaves, jnp.float32)
    return flat, flat_tx.init(flat)

  donate = functools.partial(jax.jit, donate_argnums=(0, 1))
  to_f32 = functools.partial(jax.tree.map, lambda g: g.astype(jnp.float32))
  to_bf16 = functools.partial(jax.tree.map, lambda p: p.astype(jnp.bfloat16))

  @donate
  def leaf_step(params, state, grads):
    updates, state = by_leaf.update(to_f32(grads), state, params)
    params = optax.apply_updates(params, updates)
    return params, state, to_bf16(params)

  def flat_update(params, state, grad):
    updates, state = flat_tx.update(to_f32(grad), state, params)
    return optax.apply_updates(params, updates), state

  @donate
  def flat_state_step(params, state, grads):
    params, state = flat_update(params, state, to_flat(jax.tree.leaves(grads), jnp.float32))
    return params, state, from_flat(to_bf16(params))

  @donate
  def flat_floor_step(params, state, grad):
    params, state = flat_update(params, state, grad)
    return params, state, to_bf16(params)

  @donate
  def stacked_step(stacks, count, grads):
    grads = to_f32(grads)
    scale = jnp.minimum(1.0, 1.0 / jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))))
    count = count + 1
    c1, c2 = 1 - b1**count, 1 - b2**count

    def update(s, g, decay):
      p, mu, nu, g = s[0], s[1], s[2], g * scale
      mu, nu = b1 * mu + (1 - b1) * g, b2 * nu + (1 - b2) * g * g
      p = p - lr * ((mu / c1) / (jnp.sqrt(nu / c2) + eps) + (wd * p if decay else 0.0))
      return jnp.stack([p, mu, nu])

    stacks = jax.tree.map(update, stacks, grads, decay_mask(grads))
    return stacks, count, jax.tree.map(lambda s: s[0].astype(jnp.bfloat16), stacks)

  same = lambda x: x  # noqa: E731
  first = functools.partial(jax.tree.map, lambda s: s[0])
  stacked = jax.tree.map(lambda p: jnp.stack([p, jnp.zeros_like(p), jnp.zeros_like(p)]), weights)
  return {
    "leaf by leaf": OptimizerForm(leaf_step, (jax.tree.map(jnp.copy, weights), by_leaf.init(weights)), same, same),
    "flat state, per-leaf gradients": OptimizerForm(flat_state_step, flat_init(), from_flat, same),
    "flat state, flat gradient (floor)": OptimizerForm(flat_floor_step, flat_init(), from_flat, from_flat, True),
    "leaf by leaf, [p, mu, nu] stacked": OptimizerForm(
      stacked_step, (stacked, jnp.zeros((), jnp.float32)), first, same
    ),
  }, to_flat


def run_optimizer(steps: int) -> str:
  import jax
  import jax.numpy as jnp

  weights = jax.device_put(encoder_weights())
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * 1e-3, jnp.bfloat16), weights)
  forms, to_flat = optimizer_forms(weights)
  flat_grad = to_flat(jax.tree.leaves(grads), jnp.bfloat16)
  carried = {name: form.init for name, form in forms.items()}

  def call(name):
    step = forms[name].step
    g = flat_grad if forms[name].flat_grad else grads

    def one():
      params, state, copy = step(*carried[name], g)
      carried[name] = (params, state)
      jax.block_until_ready(copy)

    return one

  times = common.time_alternated({name: call(name) for name in forms}, steps)
  title = (
    f"The optimizer half of a bf16 step on the same {len(jax.tree.leaves(weights))} leaves (clip, AdamW, apply, bf16 "
    f"copy; float32 state, donated); {steps} alternated calls each."
  )
  return common.median_table(title, "form", times, "leaf by leaf")


def run(steps: int) -> str:
  import jax

  # Both forms read arrays already on the device: handing the leaf-by-leaf form numpy arrays made every call copy
  # them in, which is what session 11's 4.2x measured.
  weights = jax.device_put(encoder_weights())
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
  p.add_argument("--part", choices=("cast", "optimizer", "both"), default="both")
  p.add_argument("--out", default=None, help="also write the markdown here")
  args = p.parse_args(argv)
  common.start_jfast_script()
  parts = {"cast": [run], "optimizer": [run_optimizer], "both": [run, run_optimizer]}[args.part]
  common.print_and_save("\n\n".join(part(args.steps) for part in parts), args.out)


if __name__ == "__main__":
  main()
