"""The optimizer side of LoRA: the wrapped transformation updates the adapters only and keeps state for them only.

Paired with ``make_train_step(freeze_mask=jfast.lora_mask(params))``, which takes gradients for the adapters only,
this is all LoRA changes in training: the base weights get no gradient, no update and no optimizer state.
"""

from __future__ import annotations

import jax
import optax

from jfast.nn.lora import ADAPTER_LEAVES, _leaf_name


def _labels(params):
  labels = jax.tree_util.tree_map_with_path(
    lambda path, _: "adapter" if _leaf_name(path) in ADAPTER_LEAVES else "frozen", params
  )
  if "adapter" not in jax.tree.leaves(labels):
    raise ValueError("params hold no LoRA adapters (add them with jfast.add_lora before building the optimizer state)")
  return labels


def lora_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` on the adapter leaves (``lora_a``, ``lora_b``), ``set_to_zero`` (no state) on every other leaf.

  Example:
    >>> tx = lora_optimizer(optax.adamw(2e-4))
    >>> opt_state = tx.init(params_with_adapters)  # doctest: +SKIP
  """
  return optax.multi_transform({"adapter": tx, "frozen": optax.set_to_zero()}, _labels)
