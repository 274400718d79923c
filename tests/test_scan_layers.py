"""Scanned layers (`jfast.nn.scan`): the same model as unrolled layers, in a stacked parameter layout that Hugging Face
folders, pruning, quantization and freezing all read."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jfast.compress import quantize
from jfast.data import BatchingConfig, make_batches, pack_documents, tokenize
from jfast.data.lm import lm_batches
from jfast.models import (
  GPT,
  BertConfig,
  BertForSequenceClassification,
  GPTConfig,
  init_classifier,
  load_hf_bert,
  save_hf_bert,
)
from jfast.nn import match_layout, stack_layers, unstack_layers
from jfast.training import causal_lm_loss, classification_loss


def _max_rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _grads(loss_fn, params, batch):
  return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None, True)[0]))(params)


@pytest.fixture(scope="module")
def minilm_sst2(minilm_path, tokenizer, sst2_dev_sentences):
  """The real all-MiniLM-L6-v2 under a classifier head, and one packed batch of real SST-2 sentences."""
  config, encoder = load_hf_bert(minilm_path)
  config = config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  _, params = init_classifier(config, encoder, 2, jax.random.key(0))
  ids, _ = tokenize(tokenizer, sst2_dev_sentences[:48], max_length=512)
  labels = np.random.default_rng(0).integers(0, 2, len(ids)).astype(np.int32)
  cfg = BatchingConfig(strategy="packed", batch_size=6, row_length=128, shuffle=False)
  return config, params, make_batches(ids, labels, cfg, pad_id=0).batches[0]


@pytest.mark.parametrize("remat", ["none", "full", "save_qkv"])
def test_scanned_bert_equals_unrolled_loss_and_gradients(minilm_sst2, remat):
  config, params, batch = minilm_sst2
  assert int(np.asarray(batch.example_mask).sum()) > 6  # several sentences share a row
  config = config.replace(remat_policy=remat)
  assert config.scanned and config.stacked_layers == 5
  assert np.shape(params["bert"]["encoder_layers"]["query"]["kernel"]) == (5, 384, 384)
  assert "encoder_layer_5" in params["bert"]  # the [CLS]-only last layer runs outside the scan
  scanned = BertForSequenceClassification(config, num_labels=2)
  unrolled = BertForSequenceClassification(config.replace(scan_layers=False), num_labels=2)
  loss_s, grads_s = _grads(classification_loss(scanned), params, batch)
  loss_u, grads_u = _grads(classification_loss(unrolled), unstack_layers(params), batch)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  flat_s, flat_u = dict(_leaves(unstack_layers(grads_s))), dict(_leaves(grads_u))
  assert flat_s.keys() == flat_u.keys()
  for name, g in flat_u.items():
    if name.endswith("key/bias"):  # 0 in exact arithmetic (softmax ignores a shared shift): rounding noise, 1e-12
      assert np.abs(flat_s[name]).max() < 1e-8
      continue
    assert _max_rel(flat_s[name], g) < 1e-4, name
  assert np.abs(flat_u["bert/encoder_layer_0/query/kernel"]).max() > 0  # the scan's first layer gets a gradient


def _leaves(tree):
  return [
    (jax.tree_util.keystr(p, simple=True, separator="/"), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
  ]


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_gpt_equals_unrolled_on_packed_documents(remat):
  config = GPTConfig(vocab_size=512, n_positions=128, n_embd=128, n_layer=4, n_head=4, remat_policy=remat)
  config = config.replace(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = GPT(config)
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda x: x + rng.normal(0, 0.05, x.shape).astype(np.float32), params)  # no zero biases
  assert np.shape(params["h"]["mlp"]["c_fc"]["kernel"]) == (4, 128, 512) and "h_0" not in params
  docs = [rng.integers(1, 512, size=n) for n in (70, 33, 90, 64, 41, 120, 57, 80)]
  batch = lm_batches(pack_documents(docs, 128, pad_id=0, vocab_size=512), 4)[0]
  loss_s, grads_s = _grads(causal_lm_loss(model), params, batch)
  unrolled = GPT(config.replace(scan_layers=False))
  loss_u, grads_u = _grads(causal_lm_loss(unrolled), unstack_layers(params), batch)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  for (name, a), (_, b) in zip(_leaves(unstack_layers(grads_s)), _leaves(grads_u), strict=True):
    if name.endswith("c_attn/bias"):  # its key third is 0 in exact arithmetic: compare query and value thirds
      d = config.n_embd
      a, b = np.delete(np.asarray(a), np.s_[d : 2 * d]), np.delete(np.asarray(b), np.s_[d : 2 * d])
    assert _max_rel(a, b) < 1e-4, name


def test_hugging_face_folders_load_into_and_save_from_the_stacked_layout(minilm_path, tmp_path):
  config, scanned = load_hf_bert(minilm_path)
  flat_config, unrolled = load_hf_bert(minilm_path, config=config.replace(scan_layers=False))
  assert "encoder_layers" in scanned and "encoder_layers" not in unrolled
  for (name, a), (other, b) in zip(_leaves(unstack_layers(scanned)), _leaves(unrolled), strict=True):
    assert name == other
    np.testing.assert_array_equal(a, b)
  save_hf_bert(tmp_path / "scanned", config, scanned, tokenizer=minilm_path)
  save_hf_bert(tmp_path / "unrolled", flat_config, unrolled, tokenizer=minilm_path)
  a, b = load_file(tmp_path / "scanned" / "model.safetensors"), load_file(tmp_path / "unrolled" / "model.safetensors")
  assert a.keys() == b.keys() and "encoder.layer.0.attention.self.query.weight" in a
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  config_text = (tmp_path / "scanned" / "config.json").read_text()
  assert "scan_layers" not in config_text  # a jfast switch, not a Hugging Face field


def test_stack_and_unstack_are_inverse_and_refuse_what_cannot_stack():
  rng = np.random.default_rng(0)
  layer = lambda: {"w": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)}}  # noqa: E731
  tree = {"bert": {"embeddings": {"x": rng.normal(size=2)}, **{f"encoder_layer_{i}": layer() for i in range(4)}}}
  stacked = stack_layers(tree, "encoder_layers", 3)
  assert sorted(stacked["bert"]) == ["embeddings", "encoder_layer_3", "encoder_layers"]
  np.testing.assert_array_equal(
    stacked["bert"]["encoder_layers"]["w"]["kernel"][2], tree["bert"]["encoder_layer_2"]["w"]["kernel"]
  )
  back = unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True))
  assert unstack_layers(tree) == tree  # nothing stacked: unchanged
  config = BertConfig(num_hidden_layers=4)
  assert sorted(match_layout(config, tree)["bert"]) == ["embeddings", "encoder_layer_3", "encoder_layers"]
  assert sorted(match_layout(config.replace(scan_layers=False), stacked)["bert"]) == sorted(tree["bert"])

  pruned = jax.tree.map(np.copy, tree)
  pruned["bert"]["encoder_layer_1"]["w"]["kernel"] = rng.normal(size=(3, 2))
  with pytest.raises(ValueError, match="encoder_layer_1 differs in parameters or shapes from encoder_layer_0"):
    stack_layers(pruned, "encoder_layers", 3)
  with pytest.raises(ValueError, match="the tree has no encoder_layer_1"):
    stack_layers({"encoder_layer_0": layer()}, "encoder_layers", 4)
  ambiguous = {**stacked["bert"], "encoder_layer_1": layer()}
  with pytest.raises(ValueError, match="ambiguous"):
    unstack_layers(ambiguous)


def test_layers_that_differ_unroll():
  base = BertConfig(num_hidden_layers=4)
  assert base.scanned and base.stacked_layers == 3
  assert not base.replace(layer_num_heads=(12, 6, 12, 12)).scanned  # structurally pruned
  assert not base.replace(quantization="int8").scanned  # int8 kernels and scales
  assert base.replace(quantization="qat").scanned  # float weights, the float model's tree
  assert not base.replace(num_hidden_layers=1).scanned
  assert not base.replace(scan_layers=False).scanned and base.replace(scan_layers=False).stacked_layers == 0
  assert GPTConfig(n_layer=3).stacked_layers == 3 and GPTConfig(n_layer=3, scan_layers=False).stacked_layers == 0


def test_quantizing_scanned_parameters_gives_the_unrolled_int8_model(minilm_sst2):
  _, params, _ = minilm_sst2
  qparams = quantize(params)  # stacked in, per layer out: an int8 model runs its layers unrolled
  assert (
    "encoder_layers" not in qparams["bert"] and qparams["bert"]["encoder_layer_0"]["query"]["kernel"].dtype == jnp.int8
  )
  want = quantize(unstack_layers(params))
  for (name, a), (_, b) in zip(_leaves(qparams), _leaves(want), strict=True):
    np.testing.assert_array_equal(a, b, err_msg=name)


def test_remat_policies_apply_to_each_scanned_layer():
  """Inside the scan, ``full`` keeps the layer boundaries only and ``save_qkv`` adds the projections, as unrolled."""
  from jax._src.ad_checkpoint import saved_residuals

  config = BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
  )
  ids = np.random.default_rng(0).integers(1, 100, size=(6, 16)).astype(np.int32)
  saved = {}
  for policy in ("none", "full", "save_qkv"):
    model = BertForSequenceClassification(config.replace(remat_policy=policy), num_labels=2)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    found = saved_residuals(lambda p, m=model: m.apply({"params": p}, ids).sum(), params)
    saved[policy] = [(tuple(aval.shape), src) for aval, src in found if "argument" not in src]
  stacked = 3  # layers 0-2 in the scan: their saved activations carry a leading axis of 3
  full_4d = [s for s, _ in saved["full"] if len(s) == 5 and s[0] == stacked]  # [3, B, L, H, D] projections
  qkv_4d = [s for s, _ in saved["save_qkv"] if len(s) == 5 and s[0] == stacked]
  assert not full_4d, saved["full"]
  assert len(qkv_4d) == 3, saved["save_qkv"]  # query, key and value of every scanned layer, stacked
  size = {k: sum(int(np.prod(s)) for s, _ in v) for k, v in saved.items()}
  assert size["full"] < size["save_qkv"] < size["none"], size
  assert any(re.search("while|scan", src) for _, src in saved["full"])
