"""The two examples (a user's own Linen model and NNX model) train with bf16, freezing, in-step accumulation and
8-bit AdamW: the loss falls, the frozen parameters stay bit for bit, and the optimizer keeps 8-bit moments."""

from __future__ import annotations

import importlib

import jax
import numpy as np
import pytest

EXAMPLES = ("examples.linen_model", "examples.nnx_model")


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_trains_and_keeps_frozen_parameters(name, data_dir, minilm_path, capsys):
  module = importlib.import_module(name)
  summary = module.main(["--data", str(data_dir / "sst2"), "--train-examples", "2400"])
  losses = summary["losses"]
  assert len(losses) >= 6
  # The first logged window against the last three: the model learns (SST-2 starts at ln 2 = 0.69).
  assert np.mean(losses[-3:]) < losses[0] - 0.05, losses
  assert summary["dev_accuracy"] > 0.6
  assert summary["frozen_unchanged"] is True
  assert "frozen" in capsys.readouterr().out


def test_nnx_split_trains_the_modules_own_parameters():
  """The adapter's apply is the module's call, and its gradient is the module's (against nnx.grad)."""
  import jax.numpy as jnp
  from flax import nnx

  from jfast.models import nnx_split

  module = nnx.Sequential(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(5, 3, rngs=nnx.Rngs(1)))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)), jnp.float32)
  apply, params = nnx_split(module)
  np.testing.assert_array_equal(np.asarray(apply(params, x)), np.asarray(module(x)))
  ours = jax.grad(lambda p: jnp.sum(apply(p, x) ** 2))(params)
  theirs = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(module)
  flat_ours = jax.tree.leaves(ours)
  flat_theirs = jax.tree.leaves(nnx.to_pure_dict(theirs))
  assert len(flat_ours) == 4
  for a, b in zip(flat_ours, flat_theirs, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  with pytest.raises(TypeError, match=r"nnx\.Module"):
    nnx_split(lambda v: v)
