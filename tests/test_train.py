"""The train step against PyTorch gradients, the compile counter, and bit-exact resume from checkpoints."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import optax
import pytest

from jfast.data import BatchingConfig, batch_from_rows, load_text_classification, tokenize
from jfast.models import BertConfig, BertForSequenceClassification
from jfast.nn import unstack_layers
from jfast.optim import OptimizerConfig, make_optimizer
from jfast.training import LoopConfig, classification_loss, create_train_state, fit, make_train_step

NO_DROPOUT = BertConfig(
  vocab_size=30522,
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=128,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


def _real_batch(tokenizer, sentences, rows, num_rows):
  ids, _ = tokenize(tokenizer, sentences[:rows], max_length=512)
  labels = np.random.default_rng(0).integers(0, 3, size=rows)
  return batch_from_rows(ids, labels, max(len(r) for r in ids), pad_id=0, num_rows=num_rows), ids, labels


def test_sgd_step_matches_pytorch_gradients(tokenizer, sst2_dev_sentences):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  # Two padding rows at the end: the loss must average over the 6 real examples only.
  batch, _, labels = _real_batch(tokenizer, sst2_dev_sentences, rows=6, num_rows=8)
  model = BertForSequenceClassification(NO_DROPOUT, num_labels=3)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch.input_ids[:1])["params"]
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)

  import tempfile

  from jfast.models import save_hf_bert

  with tempfile.TemporaryDirectory() as d:
    save_hf_bert(d, NO_DROPOUT, params)
    ref = transformers.BertForSequenceClassification.from_pretrained(d).train()
  ref_ids, ref_mask = batch.input_ids[:6], batch.segment_ids[:6]
  logits = ref(input_ids=torch.tensor(ref_ids, dtype=torch.long), attention_mask=torch.tensor(ref_mask)).logits
  loss = torch.nn.functional.cross_entropy(logits.double(), torch.tensor(labels, dtype=torch.long))
  loss.backward()

  lr = 0.5
  state = create_train_state(model, params, optax.sgd(lr))
  step = make_train_step(classification_loss(model))
  new_state, metrics = step(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
  assert float(metrics["examples"]) == 6
  params, got = unstack_layers(params), unstack_layers(jax.device_get(new_state.params))
  torch_grads = dict(ref.named_parameters())
  checks = {
    ("classifier", "kernel"): "classifier.weight",
    ("bert", "encoder_layer_1", "intermediate", "kernel"): "bert.encoder.layer.1.intermediate.dense.weight",
    ("bert", "encoder_layer_0", "query", "bias"): "bert.encoder.layer.0.attention.self.query.bias",
    ("bert", "embeddings", "LayerNorm", "scale"): "bert.embeddings.LayerNorm.weight",
    ("bert", "embeddings", "word_embeddings", "embedding"): "bert.embeddings.word_embeddings.weight",
  }
  for path, name in checks.items():
    before, after = params, got
    for key in path:
      before, after = before[key], after[key]
    grad = torch_grads[name].grad.numpy()
    grad = grad.T if path[-1] == "kernel" else grad
    np.testing.assert_allclose((np.asarray(before) - after) / lr, grad, atol=2e-5, rtol=1e-3, err_msg=name)


@pytest.mark.slow
def test_compile_counter_counts_distinct_shapes(tokenizer, sst2_dev_sentences):
  model = BertForSequenceClassification(NO_DROPOUT, num_labels=3)
  b16, _, _ = _real_batch(tokenizer, sst2_dev_sentences, rows=4, num_rows=4)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), b16.input_ids)["params"]
  state = create_train_state(model, params, optax.adam(1e-3))
  step = make_train_step(classification_loss(model))
  ids, _ = tokenize(tokenizer, sst2_dev_sentences[:8], max_length=512)
  labels = np.arange(8) % 3
  for length in (48, 64, 48, 64, 80):
    state, _ = step(state, batch_from_rows(ids[:4], labels[:4], length, 0))
  assert step.num_compiles == 3


@pytest.fixture(scope="module")
def tiny_task(data_dir, tokenizer):
  ds = load_text_classification(data_dir / "sst2", "dev")
  ids, _ = tokenize(tokenizer, ds.texts[:160], max_length=512)
  return ids, ds.labels[:160]


def _fit(tiny_task, ckpt_dir=None, max_steps=None):
  config = NO_DROPOUT.replace(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)  # dropout RNG must resume
  model = BertForSequenceClassification(config, num_labels=2)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.ones((1, 8), np.int32))["params"]
  batching = BatchingConfig(strategy="bucket", batch_size=16, num_buckets=2)
  loop = LoopConfig(epochs=2, max_steps=max_steps, checkpoint_dir=ckpt_dir, checkpoint_every=3, progress=False)
  return fit(
    model,
    params,
    lambda n: make_optimizer(OptimizerConfig(learning_rate=1e-3), n),
    tiny_task,
    None,
    batching=batching,
    eval_batching=batching,
    loop=loop,
    pad_id=0,
  )


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tiny_task, tmp_path):
  full = _fit(tiny_task)
  assert full.stats["final_step"] == 20  # 10 batches per epoch, 2 epochs
  ckpt = tmp_path / "ckpt"
  first = _fit(tiny_task, str(ckpt), max_steps=14)
  assert first.stats["final_step"] == 14
  # Simulate a kill between checkpoints: the step-14 save never happened, so the run resumes from step 12,
  # inside epoch 1 (the second epoch), which exercises the data position.
  shutil.rmtree(ckpt / "14")
  resumed = _fit(tiny_task, str(ckpt))
  assert resumed.stats["resumed_from_step"] == 12
  assert resumed.stats["final_step"] == 20
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), full.state.params, resumed.state.params
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
    full.state.opt_state,
    resumed.state.opt_state,
  )
