"""The classifier's last layer at the [CLS] rows only (`BertModel.last_layer_pooled_only`): the same logits and
gradients as running every row (itself tested against PyTorch in test_bert), on the real MiniLM and real sentences,
for packed and unpacked batches and every attention kind, with less compiled work."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfast.data import BatchingConfig, make_batches, tokenize
from jfast.models import BertConfig, BertForSequenceClassification, BertModel, init_classifier, load_hf_bert
from jfast.nn import AttentionConfig, explicit_mask
from jfast.training import classification_loss

SMALL = BertConfig(
  vocab_size=500,
  hidden_size=64,
  num_hidden_layers=3,
  num_attention_heads=4,
  intermediate_size=128,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


def _both(model):
  return model.clone(last_layer_pooled_only=False), model.clone(last_layer_pooled_only=True)


def _loss_and_grads(model, params, batch):
  """Logits and the gradient of the classification loss (the train step's), float32."""
  loss_fn = classification_loss(model)
  grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None, True)[0]))(params)
  apply = jax.jit(
    lambda p: model.apply(
      {"params": p},
      batch.input_ids,
      segment_ids=batch.segment_ids,
      position_ids=batch.position_ids,
      cls_positions=batch.cls_positions,
    )
  )
  return np.asarray(apply(params)), grads


def _assert_grads_close(got, want, rtol):
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    scale = np.abs(w).max()
    if scale < 1e-6:  # key biases: zero in exact arithmetic (softmax ignores them), rounding noise here
      continue
    np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["packed", "dynamic"])
def test_minilm_logits_and_gradients_equal_the_full_last_layer(minilm_path, tokenizer, sst2_dev_sentences, strategy):
  config, encoder = load_hf_bert(minilm_path)
  config = config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model, params = init_classifier(config, encoder, 2, jax.random.PRNGKey(0))
  picks = np.random.default_rng(1).choice(len(sst2_dev_sentences), size=40, replace=False)
  ids, _ = tokenize(tokenizer, [sst2_dev_sentences[i] for i in picks], max_length=512)
  labels = np.random.default_rng(2).integers(0, 2, size=len(ids)).astype(np.int32)
  cfg = BatchingConfig(strategy=strategy, batch_size=4 if strategy == "packed" else 16, row_length=96, shuffle=False)
  batch = make_batches(ids, labels, cfg, pad_id=0).batches[0]
  full, pooled = _both(model)
  want_logits, want_grads = _loss_and_grads(full, params, batch)
  got_logits, got_grads = _loss_and_grads(pooled, params, batch)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)
  _assert_grads_close(got_grads, want_grads, rtol=1e-4)
  assert np.abs(np.asarray(want_grads["bert"]["encoder_layer_5"]["intermediate"]["kernel"])).max() > 0


@pytest.mark.parametrize(
  "attention",
  [
    AttentionConfig(),
    AttentionConfig.sliding_window(4),
    AttentionConfig.sliding_window(3, global_tokens=1),
    AttentionConfig.blockwise(8),
    AttentionConfig.blockwise(8, global_tokens=2),
  ],
  ids=["dense", "window", "window_global", "blockwise", "blockwise_global2"],
)
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_attention_kind_and_dtype_gives_the_same_logits(attention, dtype):
  rng = np.random.default_rng(3)
  seg = np.zeros((3, 40), np.int32)
  seg[0, :14], seg[0, 14:31] = 1, 2
  seg[1, :40] = 1
  seg[2, :6], seg[2, 6:11], seg[2, 11:27] = 1, 2, 3
  pos = np.zeros_like(seg)
  for row, s in zip(pos, seg, strict=True):
    for k in np.unique(s[s > 0]):
      row[s == k] = np.arange((s == k).sum())
  cls = np.array([[0, 14, 0], [0, 0, 0], [0, 6, 11]], np.int32)
  ids = rng.integers(1, SMALL.vocab_size, size=seg.shape) * (seg > 0)
  model = BertForSequenceClassification(SMALL.replace(attention=attention, dtype=dtype), num_labels=3)
  params = jax.jit(model.init)(jax.random.PRNGKey(4), jnp.asarray(ids))["params"]
  full, pooled = _both(model)
  kwargs = dict(segment_ids=jnp.asarray(seg), position_ids=jnp.asarray(pos), cls_positions=jnp.asarray(cls))
  want = np.asarray(full.apply({"params": params}, jnp.asarray(ids), **kwargs))
  got = np.asarray(pooled.apply({"params": params}, jnp.asarray(ids), **kwargs))
  tol = 1e-5 if dtype == "float32" else 3e-2 * np.abs(want).max()
  np.testing.assert_allclose(got, want, atol=tol, rtol=0)
  # Unpacked rows (no cls_positions: row i's [CLS] is position 0).
  mask = jnp.asarray(seg > 0, jnp.int32)
  want = np.asarray(full.apply({"params": params}, jnp.asarray(ids), mask))
  got = np.asarray(pooled.apply({"params": params}, jnp.asarray(ids), mask))
  np.testing.assert_allclose(got, want, atol=tol, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_mask_rows_at_query_positions_are_the_full_masks_rows(causal):
  rng = np.random.default_rng(5)
  seg = np.sort(rng.integers(0, 4, size=(2, 33)), axis=1)[:, ::-1].copy()  # contiguous segments, padding last
  qpos = rng.integers(0, 33, size=(2, 7))
  for config in (AttentionConfig(), AttentionConfig.sliding_window(5, global_tokens=1), AttentionConfig.blockwise(8)):
    full = np.asarray(explicit_mask(jnp.asarray(seg), config, causal=causal))
    rows = np.asarray(explicit_mask(jnp.asarray(seg), config, causal=causal, query_positions_BxS=jnp.asarray(qpos)))
    np.testing.assert_array_equal(rows, np.take_along_axis(full, qpos[:, None, :, None], axis=2))


def test_the_pooled_last_layer_compiles_to_less_work():
  # A 6-layer MiniLM-shaped model on 8 rows of 64 tokens: the last layer's query, attention output, FFN and norms
  # shrink from 512 rows to 8, about a seventh of the forward FLOPs.
  config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
  model = BertForSequenceClassification(config, num_labels=2)
  ids = jnp.asarray(np.random.default_rng(6).integers(1, 30522, size=(8, 64)))
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"]
  flops = {}
  for pooled_only in (False, True):
    m = model.clone(last_layer_pooled_only=pooled_only)
    compiled = jax.jit(lambda p, m=m: m.apply({"params": p}, ids)).lower(params).compile()
    cost = compiled.cost_analysis()
    flops[pooled_only] = (cost[0] if isinstance(cost, list) else cost)["flops"]
  assert flops[True] < 0.88 * flops[False], flops


def test_pooled_only_needs_a_pooler():
  ids = jnp.ones((2, 8), jnp.int32)
  with pytest.raises(ValueError, match="last_layer_pooled_only needs add_pooling_layer"):
    BertModel(SMALL, add_pooling_layer=False, last_layer_pooled_only=True).init(jax.random.PRNGKey(0), ids)
  with pytest.raises(ValueError, match=r"query_positions must be \[B, S\]"):
    explicit_mask(jnp.ones((2, 8), jnp.int32), AttentionConfig(), query_positions_BxS=jnp.zeros((3, 1), jnp.int32))
