"""Query, key and value as one product (`BertConfig.fuse_qkv`): the same parameters, logits and gradients as three
Dense layers (the default, tested against PyTorch in test_bert), on the real MiniLM and real sentences; and no
more communication under tensor parallelism (tests/test_sharding.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jfast.data import BatchingConfig, make_batches, tokenize
from jfast.models import BertForSequenceClassification, init_classifier, load_hf_bert
from jfast.nn import unstack_layers
from tests.test_pooled_last_layer import SMALL, _assert_grads_close, _loss_and_grads


def _apart(model):
  return model.clone(config=model.config.replace(fuse_qkv=False))


def _fused(model):
  return model.clone(config=model.config.replace(fuse_qkv=True))


def _sst2_batch(tokenizer, sentences, strategy, seed=1):
  picks = np.random.default_rng(seed).choice(len(sentences), size=40, replace=False)
  ids, _ = tokenize(tokenizer, [sentences[i] for i in picks], max_length=512)
  labels = np.random.default_rng(seed + 1).integers(0, 2, size=len(ids)).astype(np.int32)
  cfg = BatchingConfig(strategy=strategy, batch_size=4 if strategy == "packed" else 16, row_length=96, shuffle=False)
  return make_batches(ids, labels, cfg, pad_id=0).batches[0]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["packed", "dynamic"])
def test_minilm_logits_and_gradients_equal_three_products(minilm_path, tokenizer, sst2_dev_sentences, strategy):
  config, encoder = load_hf_bert(minilm_path)
  config = config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model, params = init_classifier(config, encoder, 2, jax.random.PRNGKey(0))
  fused = _fused(model)
  batch = _sst2_batch(tokenizer, sst2_dev_sentences, strategy)
  want_logits, want_grads = _loss_and_grads(_apart(fused), params, batch)
  got_logits, got_grads = _loss_and_grads(fused, params, batch)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)
  _assert_grads_close(got_grads, want_grads, rtol=1e-4)
  for name in ("query", "key", "value"):  # the split hands each kernel its own, non-zero slice
    assert np.abs(np.asarray(unstack_layers(got_grads)["bert"]["encoder_layer_2"][name]["kernel"])).max() > 0


def _relative_error(got, want) -> float:
  diff = sum(
    float(np.sum((np.asarray(g, np.float64) - np.asarray(w, np.float64)) ** 2))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  )
  return (diff / sum(float(np.sum(np.asarray(w, np.float64) ** 2)) for w in jax.tree.leaves(want))) ** 0.5


@pytest.mark.slow
def test_bf16_gradients_as_close_to_float32_as_three_products(minilm_path, tokenizer, sst2_dev_sentences):
  # Two bf16 computations round differently, so they are compared through their distance to the float32 gradient.
  config, encoder = load_hf_bert(minilm_path)
  config = config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  fp32, params = init_classifier(config, encoder, 2, jax.random.PRNGKey(0))
  bf16 = fp32.clone(config=config.replace(dtype="bfloat16"))
  batch = _sst2_batch(tokenizer, sst2_dev_sentences, "packed")
  _, want = _loss_and_grads(_apart(fp32), params, batch)
  err_apart = _relative_error(_loss_and_grads(_apart(bf16), params, batch)[1], want)
  err_fused = _relative_error(_loss_and_grads(_fused(bf16), params, batch)[1], want)
  assert 0 < err_fused < 0.05
  assert err_fused < 1.5 * err_apart, (err_fused, err_apart)


@pytest.mark.parametrize("scan", [False, True])
def test_same_parameters_and_fewer_products(scan):
  ids = np.random.default_rng(0).integers(1, SMALL.vocab_size, size=(3, 21)).astype(np.int32)
  fused = BertForSequenceClassification(SMALL.replace(fuse_qkv=True, scan_layers=scan), num_labels=3)
  apart = _apart(fused)
  p_fused = jax.jit(fused.init)(jax.random.PRNGKey(4), ids)["params"]
  p_apart = jax.jit(apart.init)(jax.random.PRNGKey(4), ids)["params"]
  assert jax.tree.structure(p_fused) == jax.tree.structure(p_apart)
  for a, b in zip(jax.tree.leaves(p_fused), jax.tree.leaves(p_apart), strict=True):
    np.testing.assert_array_equal(a, b)  # same paths, same initial values: checkpoints and HF folders interchange

  def dots(model):
    loss = lambda p: model.apply({"params": p}, ids).sum()  # noqa: E731
    return jax.jit(jax.grad(loss)).lower(p_fused).as_text().count("stablehlo.dot_general")

  # Per layer the forward has 2 products fewer (3 -> 1), and so has each of the input and weight gradients; the
  # last layer runs query apart from key + value (its query reads the [CLS] rows only): 1 fewer each there.
  # Scanned, layers 0..N-2 are one loop body: their products appear once in the program.
  bodies = 1 if scan else SMALL.num_hidden_layers - 1
  assert dots(apart) - dots(fused) == 3 * (2 * bodies + 1)


@pytest.mark.slow
def test_quantized_layers_stay_apart():
  ids = np.random.default_rng(0).integers(1, SMALL.vocab_size, size=(2, 9)).astype(np.int32)
  model = BertForSequenceClassification(SMALL.replace(quantization="qat", fuse_qkv=True), num_labels=2)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids)["params"]
  fused_logits = model.apply({"params": params}, ids)
  apart_logits = _apart(model).apply({"params": params}, ids)
  np.testing.assert_array_equal(fused_logits, apart_logits)


def test_calibration_and_distillation_read_each_projection_of_a_fused_model():
  # Both read the query/key/value layers' own inputs or outputs, which a fused model does not call one by one.
  from jfast import compress as quant
  from jfast.compress.distillation import _forward
  from jfast.data import batch_from_rows

  rng = np.random.default_rng(5)
  seqs = [rng.integers(1, SMALL.vocab_size, rng.integers(4, 25)) for _ in range(5)]
  batch = batch_from_rows(seqs, np.zeros(5, np.int32), 24, pad_id=0)
  fused = BertForSequenceClassification(SMALL.replace(fuse_qkv=True), num_labels=3)
  params = jax.jit(fused.init)(jax.random.PRNGKey(2), batch.input_ids[:1])["params"]
  scales = quant.calibrate(fused, params, [batch])
  assert scales == quant.calibrate(_apart(fused), params, [batch])
  assert any(path[-1] == "query" for path in scales)
  _, hidden, qk = _forward(fused, params, batch, internals=True, deterministic=True)
  _, want_hidden, want_qk = _forward(_apart(fused), params, batch, internals=True, deterministic=True)
  for got, want in zip(jax.tree.leaves((hidden, qk)), jax.tree.leaves((want_hidden, want_qk)), strict=True):
    np.testing.assert_array_equal(got, want)
  assert len(qk) == SMALL.num_hidden_layers
