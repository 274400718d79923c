"""jfast.optim.clipping.clip_by_global_norm against a float64 numpy reference and against optax's own clip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jfast.optim import clip_by_global_norm


def _tree(seed, scale):
  rng = np.random.default_rng(seed)
  return {
    "kernel": (rng.standard_normal((384, 1536)) * scale).astype(np.float32),
    "bias": (rng.standard_normal(1536) * scale).astype(np.float32),
    "nested": {"embedding": (rng.standard_normal((1000, 384)) * scale).astype(np.float32)},
  }


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 3.0])  # a norm below, near and far above max_norm
def test_matches_float64_reference_and_optax(scale):
  grads = _tree(0, scale)
  norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in jax.tree.leaves(grads)))
  factor = min(1.0, 1.0 / norm)
  ours, state = clip_by_global_norm(1.0).update(jax.tree.map(jnp.asarray, grads), optax.EmptyState())
  theirs, _ = optax.clip_by_global_norm(1.0).update(jax.tree.map(jnp.asarray, grads), optax.EmptyState())
  assert isinstance(state, optax.EmptyState)
  for o, t, g in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(np.asarray(o), g.astype(np.float64) * factor, rtol=2e-6, atol=0)
    np.testing.assert_allclose(np.asarray(o), np.asarray(t), rtol=2e-6, atol=0)


def test_zero_gradient_passes_and_nan_propagates():
  zeros = {"w": jnp.zeros((3, 4))}
  out, _ = clip_by_global_norm(1.0).update(zeros, optax.EmptyState())
  np.testing.assert_array_equal(out["w"], 0.0)
  bad = {"w": jnp.array([1.0, jnp.nan]), "b": jnp.array([2.0])}
  out, _ = clip_by_global_norm(1.0).update(bad, optax.EmptyState())
  assert not np.isfinite(np.asarray(out["b"])).any()


def test_chained_updates_match_optax_over_steps():
  params = jax.tree.map(jnp.asarray, _tree(1, 0.05))
  ours_tx = optax.chain(clip_by_global_norm(0.5), optax.adamw(1e-3, weight_decay=0.01))
  ref_tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-3, weight_decay=0.01))
  p1, p2 = params, params
  s1, s2 = ours_tx.init(p1), ref_tx.init(p2)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)  # checkpoints load either way
  for step in range(4):
    grads = jax.tree.map(jnp.asarray, _tree(10 + step, 0.5))
    u1, s1 = jax.jit(ours_tx.update)(grads, s1, p1)
    u2, s2 = jax.jit(ref_tx.update)(grads, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_non_positive_max_norm_is_an_error(bad):
  with pytest.raises(ValueError, match="max_norm must be positive"):
    clip_by_global_norm(bad)
