"""The Llama decoder (and LoRA on it) trained on 8 simulated CPU devices under FSDP and tensor parallelism, against
one device; run by tests/test_llama_techniques.py in its own process (the device count is fixed when JAX starts).
Prints one JSON object as the last stdout line."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json

import jax
import numpy as np
import optax

from jfast.data import lm_batches, pack_documents
from jfast.models import LlamaConfig, init_llama
from jfast.nn import LoRAConfig, add_lora, lora_mask, with_lora
from jfast.optim import lora_optimizer
from jfast.parallel import make_mesh
from jfast.training import causal_lm_loss, create_train_state, make_train_step

STEPS = 3
CONFIG = LlamaConfig(
  vocab_size=512,
  hidden_size=128,
  intermediate_size=256,
  num_hidden_layers=2,
  num_attention_heads=8,
  num_key_value_heads=2,
  max_position_embeddings=128,
)
MESHES = {
  "fsdp8": dict(data=1, fsdp=8),
  "tensor8": dict(data=1, tensor=8),
  "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


def max_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def main() -> dict:
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, CONFIG.vocab_size, size=n) for n in rng.integers(5, 90, size=120)]
  batches = lm_batches(pack_documents(docs, 64), 8, seed=0)[:STEPS]
  model, params = init_llama(CONFIG, jax.random.key(0))
  params = jax.device_get(params)
  lora = LoRAConfig(rank=4, alpha=8.0)
  adapted = jax.device_get(add_lora(params, lora, jax.random.key(1)))
  # eps 1e-6 rather than 1e-8: at init the SwiGLU kernels' gradients hold entries near 1e-9, whose float rounding
  # (which differs with the reduction order of each layout) Adam would blow up into learning-rate-sized steps.
  runs = {
    "full": (model, params, optax.adamw(1e-3, eps=1e-6), None),
    "lora": (with_lora(model, lora), adapted, lora_optimizer(optax.adamw(1e-2, eps=1e-6)), lora_mask(adapted)),
  }

  def train(kind, mesh):
    mdl, p, tx, mask = runs[kind]
    state = create_train_state(mdl, p, tx, mesh=mesh)
    step = make_train_step(causal_lm_loss(mdl), mesh=mesh, freeze_mask=mask)
    losses = []
    for batch in batches:
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    return losses, state

  out: dict = {"devices": jax.device_count(), "runs": {}}
  for kind in runs:
    ref_losses, ref_state = train(kind, None)
    ref_params = jax.device_get(ref_state.params)
    out["runs"][kind] = {"reference_losses": ref_losses}
    for name, axes in MESHES.items():
      losses, state = train(kind, make_mesh(**axes))
      attn = state.params["layers"]["self_attn"]
      out["runs"][kind][name] = {
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
        "param_diff": max_diff(jax.device_get(state.params), ref_params),
        "q_spec": str(attn["q_proj"]["kernel"].sharding.spec),
        "k_spec": str(attn["k_proj"]["kernel"].sharding.spec),
        "down_spec": str(state.params["layers"]["mlp"]["down_proj"]["kernel"].sharding.spec),
      }
  return out


if __name__ == "__main__":
  print(json.dumps(main()))
