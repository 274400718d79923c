"""Memory and compute savers: remat policies, in-step gradient accumulation, layer freezing."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jfast.cpu import compiler_options as remat_compiler_options
from jfast.data import BatchingConfig, batch_from_rows, make_batches, tokenize
from jfast.models import BertConfig, BertForSequenceClassification
from jfast.nn import REMAT_POLICIES
from jfast.optim import freeze, freeze_mask
from jfast.optim.freezing import merge, split
from jfast.training import (
  accumulate_gradients,
  classification_loss,
  create_train_state,
  make_train_step,
  multi_steps,
  split_micro_batches,
)

SMALL = BertConfig(
  vocab_size=30522,
  hidden_size=64,
  num_hidden_layers=3,
  num_attention_heads=4,
  intermediate_size=128,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


@pytest.fixture(scope="module")
def real_batch(tokenizer, sst2_dev_sentences):
  ids, _ = tokenize(tokenizer, sst2_dev_sentences[40:52], max_length=512)
  labels = np.random.default_rng(0).integers(0, 2, size=len(ids))
  # 12 real rows of mixed lengths and 4 padding rows, so micro-batches hold different numbers of real examples.
  return batch_from_rows(ids, labels, max(len(r) for r in ids), pad_id=0, num_rows=16)


def _params(model, batch):
  params = model.init(jax.random.PRNGKey(0), batch.input_ids[:1])["params"]
  return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)


def _assert_trees_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p not in ("none", "offload")])
def test_every_remat_policy_matches_none(policy, real_batch):
  base = BertForSequenceClassification(SMALL, num_labels=2)
  params = _params(base, real_batch)

  def loss_and_grads(config):
    loss_fn = classification_loss(BertForSequenceClassification(config, num_labels=2))
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, real_batch, None, True)[0]))(params)

  want_loss, want_grads = loss_and_grads(SMALL)
  got_loss, got_grads = loss_and_grads(SMALL.replace(remat_policy=policy))
  np.testing.assert_allclose(float(got_loss), float(want_loss), atol=1e-5)
  _assert_trees_close(got_grads, want_grads, atol=1e-5)


def test_remat_full_recomputes(real_batch):
  """`full` must actually rematerialise: its backward holds fewer saved residuals than `none`."""
  params = _params(BertForSequenceClassification(SMALL, num_labels=2), real_batch)

  def residual_bytes(policy):
    loss_fn = classification_loss(BertForSequenceClassification(SMALL.replace(remat_policy=policy), num_labels=2))
    _, vjp = jax.vjp(lambda p: loss_fn(p, real_batch, None, True)[0], params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp))

  assert residual_bytes("full") < 0.5 * residual_bytes("none")


def test_full_remat_cuts_compiled_step_memory_on_this_backend():
  """The compiled train step, not just the jaxpr, must hold less: XLA:CPU undoes remat without the options."""
  config = SMALL.replace(vocab_size=1000, num_hidden_layers=4, max_position_embeddings=256)
  rng = np.random.default_rng(0)
  batch = batch_from_rows(list(rng.integers(1, 1000, size=(8, 256))), rng.integers(0, 2, 8), 256, pad_id=0)
  model = BertForSequenceClassification(config, num_labels=2)
  params = model.init(jax.random.PRNGKey(0), batch.input_ids[:1])["params"]

  def temp_bytes(policy, options):
    m = BertForSequenceClassification(config.replace(remat_policy=policy), num_labels=2)
    state = create_train_state(m, params, optax.sgd(0.1), seed=0)
    step = make_train_step(classification_loss(m), compiler_options=options)
    return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

  none = temp_bytes("none", None)
  assert remat_compiler_options("none") is None
  assert temp_bytes("full", remat_compiler_options("full")) < 0.5 * none
  if jax.default_backend() == "cpu":  # documents why the options exist: without them XLA:CPU saves nothing
    assert temp_bytes("full", None) > 0.8 * none


@pytest.mark.parametrize("k", [2, 4, 8])
def test_accumulated_gradient_equals_full_batch(k, real_batch):
  model = BertForSequenceClassification(SMALL, num_labels=2)
  params = _params(model, real_batch)
  loss_fn = classification_loss(model)
  want_loss, want_grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, real_batch, None, True)[0]))(params)
  micro_real = split_micro_batches(real_batch, k).example_mask.sum(axis=(1, 2))
  assert k == 2 or len(set(micro_real.tolist())) > 1, "micro-batches should hold different real counts"
  loss, aux, grads = jax.jit(lambda p: accumulate_gradients(loss_fn, p, real_batch, jax.random.PRNGKey(1), k))(params)
  np.testing.assert_allclose(float(loss), float(want_loss), atol=1e-6)
  assert float(aux["examples"]) == 12
  _assert_trees_close(grads, want_grads, atol=1e-6)


def test_accumulation_on_packed_rows_normalises_by_real_examples(tokenizer, sst2_dev_sentences):
  ids, _ = tokenize(tokenizer, sst2_dev_sentences[:60], max_length=512)
  labels = np.arange(len(ids)) % 2
  batch = make_batches(ids, labels, BatchingConfig(strategy="packed", batch_size=8, row_length=96), pad_id=0).batches[
    0
  ]
  model = BertForSequenceClassification(SMALL, num_labels=2)
  params = _params(model, batch)
  loss_fn = classification_loss(model)
  want = jax.grad(lambda p: loss_fn(p, batch, None, True)[0])(params)
  _, _, got = accumulate_gradients(loss_fn, params, batch, jax.random.PRNGKey(1), 4)
  _assert_trees_close(got, want, atol=1e-6)


def test_accumulation_rejects_indivisible_batches(real_batch):
  with pytest.raises(ValueError, match="16 rows does not divide into 3 micro-batches"):
    split_micro_batches(real_batch, 3)


def test_freeze_mask_patterns_and_errors(real_batch):
  params = _params(BertForSequenceClassification(SMALL, num_labels=2), real_batch)
  mask = freeze_mask(params, bottom_layers=2)
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert all(m for k, m in flat.items() if "embeddings" in k or "encoder_layer_0" in k or "encoder_layer_1" in k)
  assert not any(m for k, m in flat.items() if "encoder_layer_2" in k or "classifier" in k or "pooler" in k)
  same = freeze_mask(params, ["embeddings", "encoder_layer_[0-1]"])
  assert jax.tree.leaves(same) == jax.tree.leaves(mask)
  with pytest.raises(ValueError, match=r"'encoder/layer_9' matches no parameter; module paths are: \['bert/emb"):
    freeze_mask(params, ["encoder/layer_9"])
  with pytest.raises(ValueError, match="nothing would train"):
    freeze_mask(params, [".*"])


def test_frozen_parameters_keep_no_state_and_do_not_move(real_batch):
  model = BertForSequenceClassification(SMALL, num_labels=2)
  params = _params(model, real_batch)
  mask = freeze_mask(params, bottom_layers=1)
  tx = freeze(optax.adamw(1e-2, weight_decay=0.1), mask)
  state = tx.init(params)
  # Adam's moments exist only for trainable leaves.
  moments = sum(x.size for x in jax.tree.leaves(state))
  trainable = sum(x.size for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if not m)
  assert moments == 2 * trainable + 1  # mu, nu, and Adam's step count
  loss_fn = classification_loss(model)
  new = params
  for _ in range(3):
    grads = jax.grad(lambda p: loss_fn(p, real_batch, None, True)[0])(new)
    updates, state = tx.update(grads, state, new)
    new = optax.apply_updates(new, updates)
  for p0, p1, m in zip(jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(mask), strict=True):
    assert np.array_equal(np.asarray(p0), np.asarray(p1)) == m
  trainable_tree, frozen_tree = split(params, mask)
  assert jax.tree.leaves(merge(trainable_tree, frozen_tree, mask)) == jax.tree.leaves(params)


def _state_and_step(model, params, tx, **step_kwargs):
  from jfast.training import create_train_state, make_train_step

  return create_train_state(model, params, tx), make_train_step(classification_loss(model), **step_kwargs)


def test_step_with_micro_batches_equals_one_big_step(real_batch):
  model = BertForSequenceClassification(SMALL, num_labels=2)
  params = _params(model, real_batch)
  state, step = _state_and_step(model, params, optax.sgd(0.3))
  want, want_metrics = step(state, real_batch)
  state, step4 = _state_and_step(model, params, optax.sgd(0.3), micro_batches=4)
  got, got_metrics = step4(state, real_batch)
  _assert_trees_close(got.params, want.params, atol=1e-6)
  np.testing.assert_allclose(float(got_metrics["loss"]), float(want_metrics["loss"]), atol=1e-6)
  assert float(got_metrics["examples"]) == float(want_metrics["examples"]) == 12
  state, step3 = _state_and_step(model, params, optax.sgd(0.3), micro_batches=3)
  with pytest.raises(ValueError, match="16 rows does not divide into 3 micro-batches"):
    step3(state, real_batch)


def test_multi_steps_over_equal_micro_batches_equals_one_big_step(real_batch):
  model = BertForSequenceClassification(SMALL, num_labels=2)
  params = _params(model, real_batch)
  rows = lambda a, b: jax.tree.map(lambda x: x[a:b], real_batch)  # noqa: E731
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.3, momentum=0.9))
  state, step = _state_and_step(model, params, tx)
  want, _ = step(state, rows(0, 12))  # 12 real examples
  state, step = _state_and_step(model, params, multi_steps(tx, every_k=3))
  for i in range(3):  # 3 calls of 4 real examples each
    before = jax.tree.map(np.asarray, state.params)  # the step donates the state
    state, _ = step(state, rows(4 * i, 4 * i + 4))
    if i < 2:
      _assert_trees_close(state.params, before, atol=0)
  _assert_trees_close(state.params, want.params, atol=1e-6)
  with pytest.raises(ValueError, match="every_k must be a positive integer"):
    multi_steps(tx, every_k=0)


def test_frozen_step_keeps_frozen_weights_and_drops_their_backward(real_batch):
  model = BertForSequenceClassification(SMALL, num_labels=2)
  params = _params(model, real_batch)
  mask = freeze_mask(params, bottom_layers=2)
  tx = optax.adamw(1e-2, weight_decay=0.1)
  state, step = _state_and_step(model, params, freeze(tx, mask), freeze_mask=mask)
  full_state, full_step = _state_and_step(model, params, tx)
  flops = lambda s, st: s.lower(st, real_batch).compile().cost_analysis()["flops"]  # noqa: E731
  frozen_flops, full_flops = flops(step, state), flops(full_step, full_state)
  # Embeddings + 2 of 3 layers frozen: no weight gradients there and no backward below layer 2.
  assert frozen_flops < 0.75 * full_flops, (frozen_flops, full_flops)
  for _ in range(2):
    state, _ = step(state, real_batch)
  new = jax.device_get(state.params)
  for p0, p1, m in zip(jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(mask), strict=True):
    assert np.array_equal(np.asarray(p0), p1) == m
