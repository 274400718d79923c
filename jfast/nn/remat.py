"""Rematerialisation policies by name: one table from a config string to a `jax.checkpoint` policy.

Model code tags activations with `checkpoint_name`; a policy decides which tagged values the backward pass keeps
and which it recomputes. The tags (`TAGS`) are the same in every jfast model, so a policy means the same thing for
BERT, GPT and a user's own model that uses these names.
"""

from __future__ import annotations

import jax
from flax import linen as nn

# The activations jfast's models tag with `jax.ad_checkpoint.checkpoint_name`.
TAGS = ("query_proj", "key_proj", "value_proj", "attention_out", "mlp_hidden", "layer_out")

_cp = jax.checkpoint_policies

# None means "no remat": the layer is not wrapped at all, so XLA keeps every activation.
REMAT_POLICIES = {
  "none": None,
  "full": _cp.nothing_saveable,
  "dots": _cp.dots_saveable,
  "dots_no_batch": _cp.dots_with_no_batch_dims_saveable,
  "save_qkv": _cp.save_only_these_names("query_proj", "key_proj", "value_proj"),
  "save_attention_out": _cp.save_only_these_names("attention_out"),
  # jfast's models remat each layer on its own, whose output ("layer_out") is kept as the next layer's input anyway:
  # there this saves what "full" saves (tested). It differs for a model that remats several layers as one block.
  "save_layer_out": _cp.save_only_these_names("layer_out"),
  # Keeps the projection matmuls' outputs, but in pinned host memory instead of device memory.
  "offload": _cp.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def remat_policy(name: str):
  """Returns the `jax.checkpoint` policy for ``name`` (None for ``"none"``).

  Args:
    name: a key of `REMAT_POLICIES`.

  Returns:
    A policy callable, or None when the layer should not be rematerialised.

  Example:
    >>> remat_policy("save_qkv") is not None
    True
  """
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; expected one of {sorted(REMAT_POLICIES)}")
  if name == "offload" and jax.default_backend() == "cpu":
    raise ValueError("remat policy 'offload' moves activations to pinned host memory, which needs a GPU or TPU")
  return REMAT_POLICIES[name]


def remat_layer(layer_cls, name: str, *, static_argnum: int):
  """``layer_cls`` rematerialised by the policy ``name`` (a key of `REMAT_POLICIES`), or unchanged for ``none``.

  ``static_argnum`` is the position of the layer's ``deterministic`` flag among its call's arguments, counting the
  module as 0: it must stay a Python bool under remat. (Scanned layers get theirs from `jfast.nn.scan_layers`.)
  """
  policy = remat_policy(name)
  if policy is None:
    return layer_cls
  return nn.remat(layer_cls, policy=policy, static_argnums=(static_argnum,))
