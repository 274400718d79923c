"""Packing at the model level: packed logits equal unpacked ones, no information crosses segments, and the
compile counter sees exactly one compilation per distinct batch shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jfast.data import BatchingConfig, make_batches, tokenize
from jfast.models import BertConfig, BertForSequenceClassification, init_classifier, load_hf_bert
from jfast.training import classification_loss, create_train_state, make_train_step

TINY = BertConfig(
  vocab_size=30522,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=64,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


def _logits(model, params, batch):
  return model.apply(
    {"params": params},
    batch.input_ids,
    segment_ids=batch.segment_ids,
    position_ids=batch.position_ids,
    cls_positions=batch.cls_positions,
  )


def test_packed_logits_equal_unpacked_on_minilm(minilm_path, tokenizer, sst2_dev_sentences):
  config, encoder = load_hf_bert(minilm_path)
  model, params = init_classifier(config, encoder, 2, jax.random.PRNGKey(0))
  picks = np.random.default_rng(0).choice(len(sst2_dev_sentences), size=48, replace=False)
  ids, _ = tokenize(tokenizer, [sst2_dev_sentences[i] for i in picks], max_length=512)
  labels = np.zeros(len(ids), np.int32)
  packed = make_batches(ids, labels, BatchingConfig(strategy="packed", batch_size=4, row_length=128), pad_id=0)
  alone = make_batches(ids, labels, BatchingConfig(strategy="dynamic", batch_size=8, shuffle=False), pad_id=0)
  assert packed.batches[0].labels.shape[1] > 2, "rows should hold several examples"
  apply = jax.jit(lambda p, b: _logits(model, p, b))
  want = np.zeros((len(ids), 2), np.float32)
  for batch, index in zip(alone.batches, alone.example_index, strict=True):
    out = np.asarray(apply(params, batch))[:, 0]
    want[index[index >= 0]] = out[index[:, 0] >= 0]
  seen = 0
  for batch, index in zip(packed.batches, packed.example_index, strict=True):
    out = np.asarray(apply(params, batch))
    real = index >= 0
    np.testing.assert_allclose(out[real], want[index[real]], atol=1e-5, rtol=0)
    seen += int(real.sum())
  assert seen == len(ids)


@pytest.mark.slow
def test_no_gradient_flows_between_segments():
  model = BertForSequenceClassification(TINY, num_labels=3)
  rng = np.random.default_rng(1)
  # Three segments in one row, each drawing token ids from its own disjoint range, so each embedding row belongs
  # to exactly one segment and its gradient says which logits it reached.
  ranges = [(1000, 2000), (2000, 3000), (3000, 4000)]
  lengths = [9, 14, 6]
  ids = np.concatenate([rng.integers(lo, hi, size=n) for (lo, hi), n in zip(ranges, lengths, strict=True)])
  segment_ids = np.repeat(np.arange(1, 4), lengths)
  position_ids = np.concatenate([np.arange(n) for n in lengths])
  row = lambda a: np.pad(a, (0, 32 - a.size))[None].astype(np.int32)  # noqa: E731
  ids_b, seg_b, pos_b = row(ids), row(segment_ids), row(position_ids)
  cls_b = np.array([[0, 9, 23]], np.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids_b)["params"]

  def logit_of(table, segment):
    p = jax.tree.map(lambda x: x, params)
    p["bert"]["embeddings"]["word_embeddings"]["embedding"] = table
    out = model.apply({"params": p}, ids_b, segment_ids=seg_b, position_ids=pos_b, cls_positions=cls_b)
    return out[0, segment].sum()

  table = params["bert"]["embeddings"]["word_embeddings"]["embedding"]
  for segment in range(3):
    grad = np.asarray(jax.grad(logit_of)(table, segment))
    touched = {r for r in range(len(ranges)) if np.abs(grad[ranges[r][0] : ranges[r][1]]).max() > 0}
    assert touched == {segment}, f"segment {segment} logits depend on segments {touched}"


@pytest.mark.slow
def test_compile_count_of_an_epoch_equals_distinct_shapes(tokenizer, sst2_dev_sentences):
  ids, _ = tokenize(tokenizer, sst2_dev_sentences[:200], max_length=512)
  labels = np.arange(len(ids)) % 2
  epoch = make_batches(ids, labels, BatchingConfig(strategy="bucket", batch_size=16, num_buckets=4), pad_id=0)
  assert len(epoch.shapes) == 4
  model = BertForSequenceClassification(TINY.replace(num_hidden_layers=1), num_labels=2)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
  state = create_train_state(model, params, optax.sgd(1e-3))
  step = make_train_step(classification_loss(model))
  for batch in epoch.batches:
    state, _ = step(state, batch)
  assert len(epoch.batches) > 4 and step.num_compiles == len(epoch.shapes)
