"""Rematerialisation policies by name: one table from a config string to a `jax.checkpoint` policy.

Model code tags activations with `checkpoint_name`; a policy decides which tagged values the backward pass keeps
and which it recomputes. Names used by the models: ``query_proj``, ``key_proj``, ``value_proj``,
``attention_out``, ``mlp_hidden``, ``layer_out``.
"""

from __future__ import annotations

import jax

_cp = jax.checkpoint_policies

# None means "no remat": the layer is not wrapped at all, so XLA keeps every activation.
POLICIES = {
  "none": None,
  "full": _cp.nothing_saveable,
  "dots": _cp.dots_saveable,
  "dots_no_batch": _cp.dots_with_no_batch_dims_saveable,
  "save_qkv": _cp.save_only_these_names("query_proj", "key_proj", "value_proj"),
  "save_attention_out": _cp.save_only_these_names("attention_out"),
  "save_layer_out": _cp.save_only_these_names("layer_out"),
  # Keeps the projection matmuls' outputs, but in pinned host memory instead of device memory.
  "offload": _cp.offload_dot_with_no_batch_dims("device", "pinned_host"),
}
REMAT_POLICIES = POLICIES  # the name the first releases exported

# XLA:CPU expands the optimization barriers that `jax.checkpoint` places around recomputed values
# (`cse_barrier_expander`) before its own common-subexpression elimination runs, so CSE merges the backward pass's
# recomputation back into the forward pass and remat silently saves nothing (measured on BERT and on a plain
# `jax.checkpoint` MLP: same dot count, same temp memory). Keeping the barriers makes remat work on CPU as it does
# on GPU and TPU, whose pipelines do not expand them early.
_CPU_REMAT_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def remat_policy(name: str):
  """Returns the `jax.checkpoint` policy for ``name`` (None for ``"none"``).

  Args:
    name: a key of `POLICIES`.

  Returns:
    A policy callable, or None when the layer should not be rematerialised.

  Example:
    >>> remat_policy("save_qkv") is not None
    True
  """
  if name not in POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; expected one of {sorted(POLICIES)}")
  if name == "offload" and jax.default_backend() == "cpu":
    raise ValueError("remat policy 'offload' moves activations to pinned host memory, which needs a GPU or TPU")
  return POLICIES[name]


def compiler_options(name: str, backend: str | None = None) -> dict[str, str] | None:
  """XLA options a step needs for remat policy ``name`` to take effect on ``backend`` (default: JAX's).

  Pass them to `jfast.train.make_train_step(..., compiler_options=...)`; `jfast.loop.fit` does so from the model
  config. None when nothing is needed (no remat, or a GPU/TPU backend).

  Example:
    >>> compiler_options("none") is None
    True
  """
  if remat_policy(name) is None:
    return None
  backend = backend or jax.default_backend()
  return dict(_CPU_REMAT_OPTIONS) if backend == "cpu" else None
