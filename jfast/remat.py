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
