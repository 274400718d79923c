"""Row-sparse word-table training (`jfast.cpu.row_sparse`) against the dense step and a float64 AdamW.

One case trains the whole real MiniLM (the benchmark's configuration); the compositions run on a one-layer BERT
with a 2,000-row table and SST-2's token ids folded into it, which exercises the same code at a fraction of the
compile and step time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jfast.cpu import RowUpdate, row_sparse_adamw, row_sparse_embedding
from jfast.cpu.row_sparse import apply_updates, compact_rows, word_table_mask, word_table_path
from jfast.data import BatchingConfig, load_text_classification, make_batches, tokenize
from jfast.models import GPT, BertConfig, BertForSequenceClassification, GPTConfig, init_classifier, load_hf_bert
from jfast.optim import OptimizerConfig, freezing, make_optimizer
from jfast.training import classification_loss, create_train_state, make_train_step, multi_steps

WORD = ("bert", "embeddings", "word_embeddings", "embedding")


def _get(tree, path=WORD):
  for k in path:
    tree = tree[k]
  return tree


def test_compact_rows_covers_every_id_once():
  rng = np.random.default_rng(0)
  # Zipf-like ids as real text has: a few frequent ids, a long tail, id 0 (padding) included.
  ids = np.minimum(rng.zipf(1.3, (32, 66)) - 1, 30521).astype(np.int32)
  rows, local = compact_rows(jnp.asarray(ids), 30522)
  rows, local = np.asarray(rows), np.asarray(local)
  distinct = np.unique(ids)
  assert rows.shape == (32 * 66,) and local.dtype == np.int32
  np.testing.assert_array_equal(rows[: distinct.size], distinct)
  assert (rows[distinct.size :] == 30522).all()  # the out-of-range fill
  np.testing.assert_array_equal(rows[local], ids)
  # A batch with more tokens than the table has rows: T is the table size.
  rows, local = compact_rows(jnp.asarray(ids % 50), 50)
  assert rows.shape == (50,)
  np.testing.assert_array_equal(np.asarray(rows)[np.asarray(local)], ids % 50)


def _dense_adamw64(table, grads_by_step, lr, b1, b2, eps, wd):
  p = table.astype(np.float64)
  mu, nu = np.zeros_like(p), np.zeros_like(p)
  for t, (rows, g_rows) in enumerate(grads_by_step, start=1):
    g = np.zeros_like(p)
    g[rows] = g_rows  # rows are distinct
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g * g
    update = (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps) + wd * p
    p = p - lr(t - 1) * update
  return p


def _sparse_adam64(table, grads_by_step, lr, b1, b2, eps, wd):
  """torch.optim.SparseAdam's rule (plus decoupled decay), in float64: only the step's rows change."""
  p = table.astype(np.float64)
  mu, nu = np.zeros_like(p), np.zeros_like(p)
  for t, (rows, g) in enumerate(grads_by_step, start=1):
    mu[rows] = b1 * mu[rows] + (1 - b1) * g
    nu[rows] = b2 * nu[rows] + (1 - b2) * g * g
    update = (mu[rows] / (1 - b1**t)) / (np.sqrt(nu[rows] / (1 - b2**t)) + eps) + wd * p[rows]
    p[rows] -= lr(t - 1) * update
  return p


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_row_sparse_adamw_against_float64(wd, lazy):
  """Exact: dense AdamW on the scattered gradient. Lazy: SparseAdam's rule, which is not AdamW."""
  rng = np.random.default_rng(1)
  vocab, dim = 3000, 64
  table = (0.05 * rng.standard_normal((vocab, dim))).astype(np.float32)
  schedule = optax.linear_schedule(1e-3, 1e-4, 10)
  tx = row_sparse_adamw(schedule, weight_decay=wd, lazy=lazy)
  state, params = tx.init(jnp.asarray(table)), jnp.asarray(table)
  steps, seen = [], np.zeros(vocab, bool)
  for _ in range(6):
    # Different rows each step, overlapping, padded with the out-of-range fill as compact_rows pads.
    distinct = np.sort(rng.choice(vocab, 300, replace=False))
    rows = np.concatenate([distinct, np.full(40, vocab)]).astype(np.int32)
    g = (rng.standard_normal((340, dim)) * np.logspace(-4, -1, 340)[:, None]).astype(np.float32)
    g[300:] = 0.0
    steps.append((distinct, g[:300].astype(np.float64)))
    seen[distinct] = True
    updates, state = tx.update(jnp.asarray(g), state, params, rows=jnp.asarray(rows))
    assert isinstance(updates, RowUpdate) == lazy
    params = apply_updates(params, updates) if lazy else optax.apply_updates(params, updates)
  lr = lambda t: float(schedule(t))  # noqa: E731
  dense = _dense_adamw64(table, steps, lr, 0.9, 0.999, 1e-8, wd)
  sparse = _sparse_adam64(table, steps, lr, 0.9, 0.999, 1e-8, wd)
  np.testing.assert_allclose(np.asarray(params), sparse if lazy else dense, rtol=0, atol=2e-6)
  assert np.abs(dense - table).max() > 1e-3  # the rows did move
  assert np.abs(dense - sparse)[seen].max() > 1e-4  # and the two rules differ: a wrong mode cannot pass
  if lazy or not wd:  # never-seen rows have zero moments; only AdamW's decay would move them
    np.testing.assert_array_equal(np.asarray(params)[~seen], table[~seen])


def test_row_sparse_adamw_bad_inputs():
  tx = row_sparse_adamw(1e-3)
  table = jnp.asarray(np.random.default_rng(2).standard_normal((100, 8)), jnp.float32)
  state = tx.init(table)
  with pytest.raises(ValueError, match="rows="):
    tx.update(table, state, table)
  with pytest.raises(ValueError, match="one gradient row per id"):
    tx.update(jnp.ones((5, 8)), state, table, rows=jnp.arange(4))


@pytest.fixture(scope="module")
def minilm(minilm_path):
  config, encoder = load_hf_bert(minilm_path)
  return config, encoder


@pytest.fixture(scope="module")
def sst2_ids(data_dir, tokenizer):
  ds = load_text_classification(data_dir / "sst2", "dev")
  ids, _ = tokenize(tokenizer, ds.texts[:256], max_length=128)
  return ids, ds.labels[:256]


SMALL_VOCAB = 2000


def _batches(sst2_ids, strategy, n=3, vocab=None, **kwargs):
  ids, labels = sst2_ids
  if vocab is not None:
    ids = [np.where(x > 0, 1 + x % (vocab - 1), 0).astype(np.int32) for x in ids]  # padding id 0 stays 0
  cfg = BatchingConfig(strategy=strategy, batch_size=32, **kwargs)
  return make_batches(ids, labels, cfg, pad_id=0, seed=0, epoch=0).batches[:n]


def _small(sst2_ids, n=2, strategy="packed"):
  """Batches for the small model: packed rows (one shape, one compilation), or buckets (several shapes)."""
  extra = {"num_buckets": 4} if strategy == "bucket" else {"row_length": 64}
  return _batches(sst2_ids, strategy, n=n, vocab=SMALL_VOCAB, **extra)


def _train(
  model, params, batches, opt, *, row_sparse, policy=None, loss_scale=None, micro_batches=1, mask=None, wrap=None
):
  tx = make_optimizer(opt, total_steps=20)
  if mask is not None:
    tx = freezing.freeze(tx, mask)
  if wrap is not None:
    tx = wrap(tx)
  state = create_train_state(model, params, tx, seed=3, policy=policy, loss_scale=loss_scale)
  step = make_train_step(
    classification_loss(model),
    policy=policy,
    micro_batches=micro_batches,
    freeze_mask=mask,
    row_sparse=row_sparse_embedding(model, classification_loss) if row_sparse else None,
  )
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return state, np.array(losses)


def _close(a, b, start, rel=1e-2):
  """Every parameter's difference is under ``rel`` of the largest move any parameter made.

  Adam divides by the gradient's own scale, so where a gradient is a cancellation (an embedding row summed over
  tokens) its rounding shows up magnified: 0.4% of a move after three MiniLM steps. A wrong bias correction, clip
  scale or row mapping is off by 10% or more. Attention key biases are left out: softmax cancels them, their true
  gradient is zero and Adam turns its rounding noise into full steps either way.
  """

  def leaves(tree):
    return [
      np.asarray(x, np.float64)
      for path, x in jax.tree_util.tree_leaves_with_path(tree)
      if "['key']['bias']" not in jax.tree_util.keystr(path)
    ]

  a, b, start = leaves(a), leaves(b), leaves(start)
  moved = max(float(np.abs(x - s).max()) for x, s in zip(a, start, strict=True))
  diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
  assert moved > 1e-5 and diff <= rel * moved, (diff, moved)


@pytest.mark.slow
def test_step_trains_the_dense_steps_parameters_on_minilm(minilm, sst2_ids):
  config, encoder = minilm
  # The whole MiniLM for packed rows, the benchmark's best configuration.
  model, params = init_classifier(config, encoder, 2, jax.random.PRNGKey(0))  # dropout on: same keys both ways
  batches = _batches(sst2_ids, "packed", n=2, row_length=128)
  opt = OptimizerConfig(learning_rate=1e-3)  # clipping active: MiniLM's first gradients have norm > 1
  dense, dense_losses = _train(model, params, batches, opt, row_sparse=False)
  sparse, sparse_losses = _train(
    model, params, batches, dataclasses.replace(opt, row_sparse_embeddings="exact"), row_sparse=True
  )
  np.testing.assert_allclose(sparse_losses, dense_losses, rtol=1e-4)
  _close(dense.params, sparse.params, params)
  # Rows no batch has touched have zero moments, so AdamW leaves them exactly where they were, dense or not.
  table, start = np.asarray(_get(sparse.params)), np.asarray(_get(params))
  touched = np.unique(np.concatenate([np.asarray(b.input_ids).ravel() for b in batches]))
  assert np.abs(table[touched] - start[touched]).max() > 1e-4
  untouched = np.setdiff1d(np.arange(table.shape[0]), touched)
  np.testing.assert_array_equal(table[untouched], start[untouched])


@pytest.fixture(scope="module")
def small_bert():
  """One MiniLM-width layer and a 2,000-row table: the compositions' model."""
  config = BertConfig(
    vocab_size=SMALL_VOCAB, hidden_size=128, num_hidden_layers=1, num_attention_heads=4, intermediate_size=512
  )
  model = BertForSequenceClassification(config, num_labels=2)
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"])(jax.random.PRNGKey(1))
  return model, jax.device_get(params)


@pytest.mark.slow
def test_step_trains_the_dense_steps_parameters_with_buckets(small_bert, sst2_ids):
  model, params = small_bert
  batches = _small(sst2_ids, n=2, strategy="bucket")
  opt = OptimizerConfig(learning_rate=1e-3)
  dense, dense_losses = _train(model, params, batches, opt, row_sparse=False)
  sparse, sparse_losses = _train(
    model, params, batches, dataclasses.replace(opt, row_sparse_embeddings="exact"), row_sparse=True
  )
  np.testing.assert_allclose(sparse_losses, dense_losses, rtol=1e-4)
  _close(dense.params, sparse.params, params)


@pytest.mark.parametrize(
  "case",
  ["accumulation_and_freezing", "fp16_dynamic_loss_scale", "pure_bf16"],
)
@pytest.mark.slow
def test_composes_with_the_other_step_options(small_bert, sst2_ids, case):
  model, params = small_bert
  batches = _small(sst2_ids)
  kwargs = {}
  if case == "accumulation_and_freezing":
    kwargs = {"micro_batches": 4, "mask": freezing.freeze_mask(params, ["encoder_layer_0", "pooler"])}
  elif case == "fp16_dynamic_loss_scale":
    kwargs = {"policy": "fp16", "loss_scale": "dynamic"}
  else:
    kwargs = {"policy": "pure-bf16"}
  if "policy" in kwargs:
    from jfast.precision import get_policy

    model = model.clone(config=get_policy(kwargs["policy"]).configure(model.config))
  low = case == "pure_bf16"
  # bf16 parameters: moves well above their rounding step (2**-8 relative), so the comparison measures the update.
  opt = OptimizerConfig(learning_rate=1e-2 if low else 1e-3)
  dense, dense_losses = _train(model, params, batches, opt, row_sparse=False, **kwargs)
  sparse, sparse_losses = _train(
    model, params, batches, dataclasses.replace(opt, row_sparse_embeddings="exact"), row_sparse=True, **kwargs
  )
  np.testing.assert_allclose(sparse_losses, dense_losses, rtol=2e-2 if low else 1e-3)
  # bf16 parameters round each update to 8 bits, so one differently rounded gradient can flip a last bit.
  _close(dense.params, sparse.params, params, rel=0.3 if low else 1e-2)
  if "mask" in kwargs:
    assert all(jax.tree.leaves(kwargs["mask"]["bert"]["encoder_layer_0"]))
    np.testing.assert_array_equal(
      np.asarray(sparse.params["bert"]["encoder_layer_0"]["query"]["kernel"]),
      np.asarray(params["bert"]["encoder_layer_0"]["query"]["kernel"]),
    )


@pytest.mark.slow
def test_lazy_step_moves_only_the_batchs_rows(small_bert, sst2_ids):
  model, params = small_bert
  batches = _small(sst2_ids)
  opt = OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0)  # the first step moves
  lazy, _ = _train(model, params, batches[:1], dataclasses.replace(opt, row_sparse_embeddings="lazy"), row_sparse=True)
  dense, _ = _train(model, params, batches[:1], opt, row_sparse=False)
  # Step one: every moment starts at zero, so lazy Adam is AdamW.
  _close(dense.params, lazy.params, params)
  lazy2, _ = _train(model, params, batches, dataclasses.replace(opt, row_sparse_embeddings="lazy"), row_sparse=True)
  first, second = (np.unique(np.asarray(b.input_ids)) for b in batches)
  only_first = np.setdiff1d(first, second)
  assert only_first.size > 5
  np.testing.assert_array_equal(
    np.asarray(_get(lazy2.params))[only_first], np.asarray(_get(lazy.params))[only_first]
  )  # AdamW would have moved them again
  assert np.abs(np.asarray(_get(lazy2.params))[second] - np.asarray(_get(lazy.params))[second]).max() > 1e-4


@pytest.mark.slow
def test_adamw_8bit_keeps_the_table_float32(small_bert, sst2_ids):
  model, params = small_bert
  batches = _small(sst2_ids, n=1)
  opt8 = OptimizerConfig(learning_rate=1e-3, name="adamw_8bit", row_sparse_embeddings="exact")
  sparse8, _ = _train(model, params, batches, opt8, row_sparse=True)
  dense8, _ = _train(model, params, batches, OptimizerConfig(learning_rate=1e-3, name="adamw_8bit"), row_sparse=False)
  dense32, _ = _train(model, params, batches, OptimizerConfig(learning_rate=1e-3), row_sparse=False)
  # One step: the same gradients; the table follows float32 AdamW, everything else the 8-bit one.
  np.testing.assert_allclose(np.asarray(_get(sparse8.params)), np.asarray(_get(dense32.params)), atol=1e-6)
  rest = lambda p: jax.tree.leaves(p["bert"]["encoder_layer_0"]) + jax.tree.leaves(p["classifier"])  # noqa: E731
  for a, b in zip(rest(sparse8.params), rest(dense8.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_mismatched_halves_and_bad_models_fail_clearly(small_bert, sst2_ids):
  model, params = small_bert
  batch = _small(sst2_ids, n=1)[0]
  sparse_tx = make_optimizer(OptimizerConfig(row_sparse_embeddings="exact"), 10)
  dense_tx = make_optimizer(OptimizerConfig(), 10)
  spec = row_sparse_embedding(model, classification_loss)
  with pytest.raises(ValueError, match="row ids"):
    make_train_step(classification_loss(model), donate=False)(create_train_state(model, params, sparse_tx), batch)
  with pytest.raises(ValueError, match="disagree about row-sparse"):
    make_train_step(classification_loss(model), donate=False, row_sparse=spec)(
      create_train_state(model, params, dense_tx), batch
    )
  mask = freezing.freeze_mask(params, ["embeddings"])
  with pytest.raises(ValueError, match="word table is frozen"):
    create_train_state(model, params, freezing.freeze(sparse_tx, mask))
  # A dense optimizer under a row-sparse step fails at the first call.
  state = create_train_state(model, params, freezing.freeze(dense_tx, mask))
  with pytest.raises(ValueError, match="disagree"):
    make_train_step(classification_loss(model), freeze_mask=mask, donate=False, row_sparse=spec)(state, batch)
  gpt = GPT(GPTConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4))
  with pytest.raises(ValueError, match="tied"):
    row_sparse_embedding(gpt, classification_loss)
  assert word_table_path(params) == WORD
  with pytest.raises(ValueError, match="row_sparse_embeddings"):
    OptimizerConfig(row_sparse_embeddings="sparse")
  with pytest.raises(ValueError, match="exactly one trainable parameter"):
    word_table_mask({"dense": {"kernel": jnp.ones((4, 4))}})


@pytest.mark.slow
def test_multi_steps_is_refused_and_chain_composes(small_bert, sst2_ids):
  """optax.MultiSteps adds gradients up in table-shaped buffers: the row-sparse optimizer is refused under it with an
  error naming in-step accumulation (which composes: `test_composes_with_the_other_step_options`), while optax.chain
  passes the row ids through and trains as the bare optimizer does."""
  model, params = small_bert
  batches = _small(sst2_ids, n=2)
  exact = OptimizerConfig(learning_rate=1e-3, row_sparse_embeddings="exact")
  with pytest.raises(ValueError, match=r"MultiSteps.*micro_batches"):
    _train(model, params, batches, exact, row_sparse=True, wrap=lambda tx: multi_steps(tx, 2))
  bare, bare_losses = _train(model, params, batches, exact, row_sparse=True)
  chained, chained_losses = _train(
    model, params, batches, exact, row_sparse=True, wrap=lambda tx: optax.chain(optax.identity(), tx)
  )
  np.testing.assert_array_equal(chained_losses, bare_losses)
  for a, b in zip(jax.tree.leaves(chained.params), jax.tree.leaves(bare.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
