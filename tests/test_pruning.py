"""Pruning: exact mask sparsity, zeros that survive AdamW, the cubic schedule, shrink == masked, export to PyTorch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jfast.compress import (
  Importance,
  PruningSchedule,
  Structure,
  eligible,
  gradient_importance,
  gradual_pruning,
  keep_pruned,
  magnitude_importance,
  magnitude_mask,
  mask_structure,
  nm_mask,
  num_params,
  select,
  shrink,
  sparsity,
)
from jfast.data import batch_from_rows
from jfast.models import BertConfig, BertForSequenceClassification, save_hf_bert
from jfast.nn import unstack_layers
from jfast.optim import OptimizerConfig, make_optimizer
from jfast.training import classification_loss, create_train_state, make_train_step

SMALL = BertConfig(
  vocab_size=97,
  hidden_size=64,
  num_hidden_layers=3,
  num_attention_heads=4,
  intermediate_size=96,
  max_position_embeddings=40,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


def _perturbed(params, seed):
  # Random init leaves biases at 0 and norms at 1; perturb every leaf so a wrong gather or a missing bias shows.
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
    treedef, [np.asarray(x, np.float32) + rng.normal(0, 0.05, np.shape(x)).astype(np.float32) for x in leaves]
  )


@pytest.fixture(scope="module")
def small():
  model = BertForSequenceClassification(SMALL, num_labels=3)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = _perturbed(jax.jit(model.init)(jax.random.key(0), ids)["params"], seed=1)
  rng = np.random.default_rng(2)
  lengths = [17, 9, 23, 5, 12, 30]
  rows = [rng.integers(1, SMALL.vocab_size, n).astype(np.int32) for n in lengths]
  labels = rng.integers(0, 3, len(rows))
  return model, params, batch_from_rows(rows, labels, length=32, pad_id=0)


def _logits(config, params, batch, num_labels=3):
  model = BertForSequenceClassification(config, num_labels=num_labels)
  return np.asarray(model.apply({"params": params}, batch.input_ids, batch.segment_ids))


@pytest.mark.parametrize("scope", ["global", "layer", "tensor"])
def test_magnitude_mask_has_exact_sparsity_per_scope_and_drops_smallest(small, scope):
  _, params, _ = small
  mask = magnitude_mask(params, 0.37, scope=scope)
  # Scanned layers hold their parameters stacked; the mask must rank them per layer all the same.
  assert "encoder_layers" in params["bert"] and np.shape(mask["bert"]["encoder_layers"]["output"]["kernel"])[0] == 2
  params, mask = unstack_layers(params), unstack_layers(mask)
  flat_p = jax.tree_util.tree_leaves_with_path(params)
  flat_m = jax.tree.leaves(mask)
  groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
  for (path, w), m, ok in zip(flat_p, flat_m, eligible(params), strict=True):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if not ok:
      assert np.all(np.asarray(m)), f"{name} is not eligible but was pruned"
      continue
    key = {"global": "", "tensor": name}.get(scope, name.split("/")[1] if "encoder_layer" in name else name)
    groups.setdefault(key, []).append((np.abs(np.asarray(w, np.float64)).ravel(), np.asarray(m).ravel()))
  assert len(groups) == {"global": 1, "layer": 3, "tensor": 3 * 6}[scope]  # 3 layers of 6 kernels; pooler kept dense
  for key, items in groups.items():
    w = np.concatenate([a for a, _ in items])
    m = np.concatenate([b for _, b in items])
    assert (~m).sum() == round(0.37 * w.size), key
    assert w[~m].max() <= w[m].min(), key
  assert abs(sparsity(mask) - 0.37) < 1e-3


def test_nm_mask_keeps_two_largest_of_every_four(small):
  _, params, _ = small
  mask = nm_mask(params, 2, 4)
  params, mask = unstack_layers(params), unstack_layers(mask)
  w = np.abs(np.asarray(params["bert"]["encoder_layer_1"]["intermediate"]["kernel"]))
  m = np.asarray(mask["bert"]["encoder_layer_1"]["intermediate"]["kernel"])
  for g in range(0, w.shape[0], 4):
    for o in range(0, w.shape[1], 7):
      block, kept = w[g : g + 4, o], m[g : g + 4, o]
      assert kept.sum() == 2
      assert set(np.flatnonzero(kept)) == set(np.argsort(-block)[:2])
  assert sparsity(mask) == 0.5
  assert np.all(mask["bert"]["embeddings"]["word_embeddings"]["embedding"])


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_bad_sparsity_is_a_clear_error(small, value):
  _, params, _ = small
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    magnitude_mask(params, value)
  with pytest.raises(ValueError, match="sparsity must be in"):
    PruningSchedule(final_sparsity=value, begin_step=0, end_step=10)


def test_pattern_matching_nothing_and_bad_scope_are_clear_errors(small):
  _, params, _ = small
  with pytest.raises(ValueError, match="'attn_qkv' matches no parameter"):
    magnitude_mask(params, 0.5, include=("attn_qkv",))
  with pytest.raises(ValueError, match="unknown pruning scope"):
    magnitude_mask(params, 0.5, scope="row")
  with pytest.raises(TypeError, match="not the string"):
    magnitude_mask(params, 0.5, include="kernel")
  with pytest.raises(ValueError, match="N:M needs a 2-D kernel"):
    nm_mask(params, 2, 5)


def test_cubic_schedule_start_middle_end():
  s = PruningSchedule(final_sparsity=0.9, begin_step=100, end_step=300, initial_sparsity=0.1, update_every=30)
  assert float(s(0)) == 0.0  # before pruning begins
  assert float(s(100)) == pytest.approx(0.1)
  assert float(s(200)) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)  # 0.8: most pruning happens early
  assert float(s(300)) == pytest.approx(0.9)
  assert float(s(10_000)) == pytest.approx(0.9)
  updates = [t for t in range(400) if bool(s.is_update_step(t))]
  assert updates == [100, 130, 160, 190, 220, 250, 280, 300]


def _pushing_loss(params, target):
  # Pulls every weight towards a far-away target, so a pruned weight that the optimizer lets move shows up.
  return sum(jnp.sum((p - t) ** 2) for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(target), strict=True))


def _run(tx, params, steps, seed=0):
  target = jax.tree.map(lambda p: 3.0 + jnp.asarray(p), params)
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    grads = jax.grad(_pushing_loss)(params, target)
    noise = jax.tree.map(lambda g: jax.random.normal(key, g.shape) * 0.1, grads)
    updates, state = tx.update(jax.tree.map(jnp.add, grads, noise), state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for i in range(steps):
    params, state = step(params, state, jax.random.key(seed + i))
    history.append((params, state))
  return history


def test_keep_pruned_weights_stay_exactly_zero_through_adamw(small):
  _, params, _ = small
  mask = magnitude_mask(params, 0.6)
  tx = keep_pruned(make_optimizer(OptimizerConfig(learning_rate=1e-2, weight_decay=0.1, warmup_ratio=0.0), 150), mask)
  history = _run(tx, params, 150)
  final, state = history[-1]
  for p, m, p0 in zip(jax.tree.leaves(final), jax.tree.leaves(mask), jax.tree.leaves(params), strict=True):
    p, m = np.asarray(p), np.asarray(m)
    assert np.all(p[~m] == 0.0)
    assert np.all(p[m] != np.asarray(p0)[m])  # the kept weights did train
  assert sparsity(final) == pytest.approx(0.6, abs=1e-4)
  adam = state.inner_state[1][0]  # clip, then adamw's chain: scale_by_adam first
  assert all(
    np.all(np.asarray(mu)[~np.asarray(m)] == 0)
    for mu, m in zip(jax.tree.leaves(adam.mu), jax.tree.leaves(mask), strict=True)
  )


def test_gradual_pruning_is_monotone_reaches_target_and_keeps_zeros(small):
  _, params, _ = small
  schedule = PruningSchedule(final_sparsity=0.8, begin_step=5, end_step=105, update_every=10)
  tx = gradual_pruning(optax.adamw(1e-2, weight_decay=0.1), schedule, scope="layer")
  history = _run(tx, params, 160)
  previous = None
  for t, (p, state) in enumerate(history):
    masks = state.masks
    for w, m in zip(jax.tree.leaves(p), jax.tree.leaves(masks), strict=True):
      assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0), f"a pruned weight moved at step {t}"
    if previous is not None:
      for m, m0 in zip(jax.tree.leaves(masks), jax.tree.leaves(previous), strict=True):
        assert not np.any(np.asarray(m) & ~np.asarray(m0)), f"a weight revived at step {t}"
    previous = masks
    if t in (4, 55, 105, 159):
      # The mask set on step t (0-based count t) has the scheduled sparsity of the last update step <= t.
      last = max([u for u in range(t + 1) if bool(schedule.is_update_step(u))], default=None)
      expected = 0.0 if last is None else float(schedule(last))
      assert sparsity(masks) == pytest.approx(expected, abs=2e-4), t
  assert sparsity(history[-1][0]) == pytest.approx(0.8, abs=1e-4)


def test_gradual_pruning_inside_the_train_step(small):
  model, params, batch = small
  schedule = PruningSchedule(final_sparsity=0.5, begin_step=0, end_step=4, update_every=2)
  tx = gradual_pruning(make_optimizer(OptimizerConfig(learning_rate=1e-3), 6), schedule)
  state = create_train_state(model, params, tx)
  step = make_train_step(classification_loss(model))
  for _ in range(6):
    state, _ = step(state, batch)
  assert sparsity(state.params) == pytest.approx(0.5, abs=1e-4)
  assert sparsity(state.opt_state.masks) == pytest.approx(0.5, abs=1e-4)


def _structure(config, seed=3):
  rng = np.random.default_rng(seed)
  scores = Importance(
    tuple(rng.random(config.num_attention_heads) for _ in range(config.num_hidden_layers)),
    tuple(rng.random(config.intermediate_size) for _ in range(config.num_hidden_layers)),
  )
  return select(scores, heads=0.5, neurons=0.5)


@pytest.mark.slow
def test_shrunk_model_equals_masked_model(small):
  _, params, batch = small
  structure = _structure(SMALL)
  small_config, small_params = shrink(SMALL, params, structure)
  assert sum(small_config.layer_num_heads) == 6
  assert small_config.layer_intermediate_sizes == (48, 48, 48)
  masked = mask_structure(SMALL, params, structure)
  expected = _logits(SMALL, masked, batch)
  got = _logits(small_config, small_params, batch)
  np.testing.assert_allclose(got, expected, atol=2e-6, rtol=1e-5)
  assert np.abs(expected - _logits(SMALL, params, batch)).max() > 1e-3  # the pruning did change the function
  removed = num_params(params) - num_params(small_params)
  d, h = SMALL.hidden_size, SMALL.head_dim
  assert removed == 6 * h * (4 * d + 3) + 3 * 48 * (2 * d + 1)  # q/k/v/out (+3 biases) per head; in/out (+bias)
  # Shrinking again from the shrunk model works on its own layer sizes.
  again = select(magnitude_importance(small_config, small_params), heads=0.2, neurons=0.25, head_scope="layer")
  tiny_config, tiny_params = shrink(small_config, small_params, again)
  ref = _logits(small_config, mask_structure(small_config, small_params, again), batch)
  np.testing.assert_allclose(_logits(tiny_config, tiny_params, batch), ref, atol=2e-6, rtol=1e-5)


def test_gradient_importance_matches_weight_gradient_identity(small):
  # Independent reference: scaling head h's context by a gate g is scaling its rows of the output kernel by g, so
  # d loss / d g at g = 1 is sum(W_rows * dL/dW_rows). One example per batch makes |.| per example.
  model, params, batch = small
  singles = [jax.tree.map(lambda x, i=i: x[i : i + 1], batch) for i in range(3)]
  scores = gradient_importance(model, params, singles, normalize_layers=False)
  loss_fn = classification_loss(model)
  heads_ref = np.zeros((SMALL.num_hidden_layers, SMALL.num_attention_heads))
  neurons_ref = np.zeros((SMALL.num_hidden_layers, SMALL.intermediate_size))
  grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None, True)[1]["loss_sum"]))
  for b in singles:
    grads = unstack_layers(grad_fn(params, b))
    for i in range(SMALL.num_hidden_layers):
      layer, glayer = unstack_layers(params)["bert"][f"encoder_layer_{i}"], grads["bert"][f"encoder_layer_{i}"]
      wg = np.asarray(layer["attention_output"]["kernel"], np.float64) * np.asarray(
        glayer["attention_output"]["kernel"]
      )
      heads_ref[i] += np.abs(wg.reshape(SMALL.num_attention_heads, SMALL.head_dim, -1).sum((1, 2)))
      wg = np.asarray(layer["output"]["kernel"], np.float64) * np.asarray(glayer["output"]["kernel"])
      neurons_ref[i] += np.abs(wg.sum(1))
  np.testing.assert_allclose(np.stack(scores.heads), heads_ref, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.stack(scores.neurons), neurons_ref, rtol=1e-4, atol=1e-7)


def test_pruning_every_head_of_a_layer_is_a_clear_error(small):
  _, params, _ = small
  structure = _structure(SMALL)
  heads = list(structure.heads)
  heads[1] = np.zeros(SMALL.num_attention_heads, bool)
  with pytest.raises(ValueError, match="prunes every head of layer 1"):
    shrink(SMALL, params, Structure(tuple(heads), structure.neurons))
  scores = Importance(tuple(np.arange(4.0) + 10 * (i > 0) for i in range(3)), structure.neurons)
  kept = select(scores, heads=0.25, min_heads=1)  # the 3 lowest heads are all layer 0's: one must survive
  assert [int(h.sum()) for h in kept.heads] == [1, 4, 4]
  with pytest.raises(ValueError, match=r"heads must be in \[0, 1\)"):
    select(scores, heads=1.0)
  with pytest.raises(ValueError, match="layer_num_heads entries must be"):
    SMALL.replace(layer_num_heads=(2, 0, 4))


def test_shrunk_export_loads_in_pytorch_with_same_logits(small, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  _, params, batch = small
  structure = _structure(SMALL, seed=5)
  small_config, small_params = shrink(SMALL, params, structure)
  save_hf_bert(tmp_path, small_config, small_params)
  hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
  assert hf.config.intermediate_size == 48  # the FFN keeps its uniform, smaller width; heads come back as zeros
  with torch.no_grad():
    out = hf(
      input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
      attention_mask=torch.tensor(batch.segment_ids, dtype=torch.long),
    ).logits.numpy()
  np.testing.assert_allclose(out, _logits(small_config, small_params, batch), atol=1e-5, rtol=1e-4)
