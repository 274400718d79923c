"""Memory and compute savers: remat policies, in-step gradient accumulation, layer freezing."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jfast.cpu import compiler_options as remat_compiler_options
from jfast.data import BatchingConfig, batch_from_rows, make_batches, tokenize
from jfast.models import BertConfig, BertForSequenceClassification
from jfast.nn import REMAT_POLICIES, unstack_layers
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
  @jax.jit
  def init(ids):  # one compile instead of an op-by-op init and a perturbation per leaf
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)

  return init(batch.input_ids[:1])


def _assert_trees_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def _loss_and_grads(config, params, batch):
  loss_fn = classification_loss(BertForSequenceClassification(config, num_labels=2))
  return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None, True)[0]))(params)


@pytest.fixture(scope="module")
def no_remat(real_batch):
  """The reference every policy is compared with: parameters, loss and gradients without remat."""
  params = _params(BertForSequenceClassification(SMALL, num_labels=2), real_batch)
  return params, *_loss_and_grads(SMALL, params, real_batch)


@pytest.mark.slow
@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p not in ("none", "offload")])
def test_every_remat_policy_matches_none(policy, real_batch, no_remat):
  params, want_loss, want_grads = no_remat
  got_loss, got_grads = _loss_and_grads(SMALL.replace(remat_policy=policy), params, real_batch)
  np.testing.assert_allclose(float(got_loss), float(want_loss), atol=1e-5)
  _assert_trees_close(got_grads, want_grads, atol=1e-5)


@pytest.mark.slow
def test_remat_full_recomputes(real_batch):
  """`full` must actually rematerialise: its backward holds fewer saved residuals than `none`."""
  params = _params(BertForSequenceClassification(SMALL, num_labels=2), real_batch)

  def residual_bytes(policy):
    loss_fn = classification_loss(BertForSequenceClassification(SMALL.replace(remat_policy=policy), num_labels=2))
    _, vjp = jax.vjp(lambda p: loss_fn(p, real_batch, None, True)[0], params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp))

  assert residual_bytes("full") < 0.5 * residual_bytes("none")


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_full_remat_cuts_compiled_step_memory_on_this_backend(scan):
  """The compiled train step, not just the jaxpr, must hold less: XLA:CPU undoes remat of unrolled layers without
  the options; inside a scan's loop it cannot."""
  config = SMALL.replace(vocab_size=1000, num_hidden_layers=4, max_position_embeddings=256, scan_layers=scan)
  rng = np.random.default_rng(0)
  batch = batch_from_rows(list(rng.integers(1, 1000, size=(8, 256))), rng.integers(0, 2, 8), 256, pad_id=0)
  model = BertForSequenceClassification(config, num_labels=2)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch.input_ids[:1])["params"]

  def temp_bytes(policy, options):
    m = BertForSequenceClassification(config.replace(remat_policy=policy), num_labels=2)
    state = create_train_state(m, params, optax.sgd(0.1), seed=0)
    step = make_train_step(classification_loss(m), compiler_options=options)
    return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

  none = temp_bytes("none", None)
  assert remat_compiler_options("none") is None
  assert temp_bytes("full", remat_compiler_options("full")) < 0.5 * none
  if jax.default_backend() == "cpu" and not scan:  # why the options exist: without them XLA:CPU saves nothing
    assert temp_bytes("full", None) > 0.8 * none
  if scan:  # the loop keeps the recomputation apart from the forward: remat holds without the options
    assert temp_bytes("full", None) < 0.5 * none


@pytest.mark.slow
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


@pytest.mark.slow
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
  scanned = _params(BertForSequenceClassification(SMALL, num_labels=2), real_batch)
  # Scanned layers share one array per parameter: freezing some of them fails naming the way out ...
  with pytest.raises(ValueError, match=r"selects layers stacked under 'encoder_layers'.*scan_layers=False"):
    freeze_mask(scanned, bottom_layers=2)
  # ... freezing the whole stack works, and so does freezing by layer once unrolled.
  whole = freeze_mask(scanned, ["encoder_layers"])
  assert all(jax.tree.leaves(whole["bert"]["encoder_layers"])) and not any(jax.tree.leaves(whole["classifier"]))
  params = unstack_layers(scanned)
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


@pytest.mark.slow
def test_frozen_parameters_keep_no_state_and_do_not_move(real_batch):
  model = BertForSequenceClassification(SMALL.replace(scan_layers=False), num_labels=2)  # freezing by layer
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_frozen_step_keeps_frozen_weights_and_drops_their_backward(real_batch):
  model = BertForSequenceClassification(SMALL.replace(scan_layers=False), num_labels=2)  # freezing by layer
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


# --------------------------------------------------------------- what each remat policy saves, read from the jaxpr

RESIDUAL_CONFIG = BertConfig(
  scan_layers=False,  # the residuals of each layer, one by one (scanned layers: tests/test_scan_layers.py)
  vocab_size=100,
  hidden_size=32,
  num_hidden_layers=3,
  num_attention_heads=4,
  intermediate_size=48,
  max_position_embeddings=32,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


@pytest.fixture(scope="module")
def residuals_by_policy():
  """``policy -> [(shape, dtype, what)]`` of the residuals autodiff saves for the classifier's loss (parameters
  excluded); ``what`` is the `checkpoint_name` tag of a tagged value, ``dot`` for other dot_general outputs, else ''."""
  import re

  from jax._src.ad_checkpoint import saved_residuals  # the function behind jax.ad_checkpoint.print_saved_residuals

  rng = np.random.default_rng(0)
  rows = [rng.integers(1, 100, size=n).astype(np.int32) for n in (12, 7, 16, 3, 9)]
  batch = batch_from_rows(rows, np.array([0, 1, 1, 0, 1]), 16, pad_id=0, num_rows=6)
  params = jax.jit(BertForSequenceClassification(RESIDUAL_CONFIG).init)(jax.random.key(0), batch.input_ids[:1])[
    "params"
  ]
  out = {}
  for policy in ("none", "full", "dots", "dots_no_batch", "save_qkv", "save_attention_out", "save_layer_out"):
    # Every layer on all rows (the last one too), so each layer saves the same shapes.
    model = BertForSequenceClassification(RESIDUAL_CONFIG.replace(remat_policy=policy), last_layer_pooled_only=False)
    loss_fn = classification_loss(model)
    found = []
    for aval, source in saved_residuals(lambda p, f=loss_fn: f(p, batch, None, True)[0], params):
      if "argument" in source:
        continue
      tag = re.search(r"named '(\w+)'", source)
      what = tag.group(1) if tag else ("dot" if "dot_general" in source else "")
      found.append((tuple(aval.shape), aval.dtype.name, what))
    out[policy] = found
  return out


def _bytes(residuals):
  return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype, _ in residuals)


def test_each_remat_policy_saves_exactly_its_tagged_activations(residuals_by_policy):
  from collections import Counter

  res = residuals_by_policy
  n = RESIDUAL_CONFIG.num_hidden_layers
  b, length, d, f = 6, 16, RESIDUAL_CONFIG.hidden_size, RESIDUAL_CONFIG.intermediate_size
  heads, head_dim = RESIDUAL_CONFIG.num_attention_heads, RESIDUAL_CONFIG.head_dim
  size = {policy: _bytes(r) for policy, r in res.items()}
  full = Counter(res["full"])
  extra = {policy: Counter(r) - full for policy, r in res.items()}

  # `full` keeps the layer boundaries only: each layer's input (the previous layer's tagged output), no projection.
  assert Counter(what for *_, what in res["full"] if what) == {"layer_out": n - 1}
  assert [s for s, _, what in res["full"] if what == "layer_out"] == [(b, length, d)] * (n - 1)
  assert not any(len(s) == 4 for s, _, _ in res["full"]), res["full"]
  # Without remat every projection output is kept, under its tag.
  tags = Counter(what for *_, what in res["none"])
  assert all(tags[t] == n for t in ("query_proj", "key_proj", "value_proj", "mlp_hidden")), tags
  assert [s for s, _, what in res["none"] if what == "query_proj"] == [(b, length, heads, head_dim)] * n

  for policy in ("dots", "dots_no_batch", "save_qkv", "save_attention_out", "save_layer_out"):
    assert not full - Counter(res[policy]), policy  # every policy keeps at least what `full` keeps
  # The named policies add exactly their tagged arrays: 3 [B, L, H, D] projections per layer, one [B, L, D] output.
  qkv = (b, length, heads, head_dim)
  assert extra["save_qkv"] == {
    (qkv, "float32", "query_proj"): n,
    (qkv, "float32", "key_proj"): n,
    (qkv, "float32", "value_proj"): n,
  }
  assert extra["save_attention_out"] == {((b, length, d), "float32", "attention_out"): n}
  # The six Dense outputs of each layer; `dots` also the two batched attention products (scores, context).
  dense = {((b, length, d), "float32", "dot"): 5 * n, ((b, length, f), "float32", "dot"): n}
  assert extra["dots_no_batch"] == dense
  batched = extra["dots"] - Counter(dense)
  assert sum(batched.values()) == 2 * n and all(len(s) == 4 and s[:2] == (b, heads) for s, *_ in batched), batched
  for policy in ("dots", "dots_no_batch", "save_qkv", "save_attention_out"):
    assert size["full"] < size[policy] < size["none"], (policy, size)
  assert size["dots_no_batch"] < size["dots"] and size["save_attention_out"] < size["save_qkv"]
  # A layer's output is where the per-layer remat block ends: `full` keeps it already, so `save_layer_out` saves
  # nothing more than `full` (the same measured temp memory and FLOPs in docs/memory.md).
  assert extra["save_layer_out"] == {} and size["save_layer_out"] == size["full"] < size["none"]


@pytest.mark.slow
def test_accumulation_with_dropout_uses_one_key_per_micro_batch(real_batch):
  from jfast.training import RNG_IMPL

  k = 4
  config = SMALL.replace(num_hidden_layers=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  model = BertForSequenceClassification(config, num_labels=2)
  params = jax.jit(model.init)(jax.random.key(0), real_batch.input_ids[:1])["params"]
  noise = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + np.float32(0.05) * noise.standard_normal(x.shape, np.float32), params)
  loss_fn = classification_loss(model)
  # SGD with rate 1: the update is minus the step's gradient.
  state = create_train_state(model, params, optax.sgd(1.0), seed=3)
  state = state.replace(step=state.step + 5)  # a later step: its key folds in the step number
  start = jax.device_get(state.params)
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=RNG_IMPL), state.step)
  new_state, metrics = make_train_step(loss_fn, micro_batches=k, donate=False)(state, real_batch)
  got = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), start, new_state.params)

  # By hand: each block of 4 consecutive rows with dropout key fold_in(step key, block index), its summed loss
  # divided by the whole batch's 12 real examples; the gradients added up.
  total = float(real_batch.example_mask.sum())
  assert total == 12

  @jax.jit
  def block_grad(p, block, key):
    return jax.grad(lambda q: loss_fn(q, block, key, False)[1]["loss_sum"] / total)(p)

  rows = real_batch.input_ids.shape[0] // k
  want = jax.tree.map(np.zeros_like, jax.tree.map(lambda x: np.asarray(x, np.float64), start))
  for i in range(k):
    block = jax.tree.map(lambda x, i=i: x[i * rows : (i + 1) * rows], real_batch)
    g = block_grad(start, block, jax.random.fold_in(step_key, i))
    want = jax.tree.map(lambda a, b: a + np.asarray(b, np.float64), want, g)
  _assert_trees_close(got, want, atol=2e-6)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(want)), rtol=1e-5)

  # Dropout really acted: the dropout-off gradient, and the gradient with one key for every block, are elsewhere.
  def distance(tree):
    diff = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, tree, want)
    return float(optax.tree.norm(diff)) / float(optax.tree.norm(want))

  off = jax.jit(jax.grad(lambda p: loss_fn(p, real_batch, None, True)[0]))(start)
  assert distance(off) > 0.05, distance(off)
  same_key = jax.tree.map(np.zeros_like, want)
  for i in range(k):
    block = jax.tree.map(lambda x, i=i: x[i * rows : (i + 1) * rows], real_batch)
    same_key = jax.tree.map(lambda a, b: a + np.asarray(b, np.float64), same_key, block_grad(start, block, step_key))
  assert distance(same_key) > 0.05, distance(same_key)
