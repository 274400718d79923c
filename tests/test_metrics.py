"""Classification accuracy on packed batches with empty slots and filler rows, against an unpacked numpy reference."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jfast.data import BatchingConfig, load_text_classification, make_batches, tokenize
from jfast.models import BertConfig, BertForSequenceClassification
from jfast.training import classification_loss, create_train_state, evaluate, make_eval_step, make_train_step
from tests.conftest import padded

TINY = BertConfig(
  vocab_size=30522,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=64,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


@pytest.fixture(scope="module")
def packed_dev(data_dir, tokenizer):
  """90 real SST-2 dev sentences packed 8 rows a batch: the last batch ends in filler rows, rows in empty slots."""
  ds = load_text_classification(data_dir / "sst2", "dev")
  ids, _ = tokenize(tokenizer, ds.texts[:90], max_length=512)
  labels = np.asarray(ds.labels[:90])
  config = BatchingConfig(strategy="packed", batch_size=8, row_length=64, shuffle=False)
  epoch = make_batches(ids, labels, config, pad_id=0)
  return ids, labels, epoch


@pytest.fixture(scope="module")
def classifier(packed_dev):
  model = BertForSequenceClassification(TINY, num_labels=2)
  params = jax.jit(model.init)(jax.random.key(0), np.ones((1, 8), np.int32))["params"]
  # Confident logits (the init's are ~0), so no prediction sits on a near-tie that float rounding could flip.
  params["classifier"]["kernel"] = params["classifier"]["kernel"] * 40.0
  # Filler slots carry label 0: make the model predict 0 on a filler row (swap the classes if it does not), so a
  # count that forgets the mask would score them as correct.
  last = packed_dev[2].batches[-1]
  row = int(np.flatnonzero((~last.example_mask).all(axis=1))[0])
  if int(np.argmax(_logits(model, params, last)[row, 0])) != 0:
    params["classifier"] = jax.tree.map(lambda x: x[..., ::-1], params["classifier"])
  return model, params


def _logits(model, params, batch):
  apply = jax.jit(model.apply)  # one compile per model (a Flax module hashes by value), reused across batches
  return np.asarray(
    apply(
      {"params": params},
      batch.input_ids,
      segment_ids=batch.segment_ids,
      position_ids=batch.position_ids,
      cls_positions=batch.cls_positions,
    )
  )


def _reference_predictions(model, params, ids):
  """argmax of each sentence's logits, run alone in a right-padded batch (no packing), and the logit margins."""
  input_ids, mask = padded(ids)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, input_ids, mask), np.float64)
  return logits.argmax(-1), np.abs(logits[:, 1] - logits[:, 0])


@pytest.mark.slow
def test_accuracy_counts_only_real_examples_of_packed_batches(packed_dev, classifier):
  ids, labels, epoch = packed_dev
  model, params = classifier
  pred, margin = _reference_predictions(model, params, ids)
  assert margin.min() > 1e-3, margin.min()
  assert 0.2 < np.mean(pred == labels) < 0.8  # neither all right nor all wrong: the count means something

  # The expected count per batch, from the epoch's slot -> sentence index (-1: empty slot) and the sentences' labels.
  want_correct = [sum(int(pred[i] == labels[i]) for i in index.ravel() if i >= 0) for index in epoch.example_index]
  want_examples = [int((index >= 0).sum()) for index in epoch.example_index]
  assert sum(want_examples) == len(ids)
  # The batches hold what the accuracy must leave out: empty slots, rows holding no example at all, and empty
  # slots that an unmasked count would score as correct.
  last = epoch.batches[-1]
  assert (~last.example_mask).all(axis=1).any(), "the last batch should end in filler rows"
  filler_hits = 0
  loss_fn = jax.jit(classification_loss(model), static_argnums=3)
  for batch, index, correct, examples in zip(
    epoch.batches, epoch.example_index, want_correct, want_examples, strict=True
  ):
    assert batch.example_mask.shape[1] > 1  # packed: several slots per row
    np.testing.assert_array_equal(batch.example_mask, index >= 0)
    _, aux = loss_fn(params, batch, None, True)
    assert float(aux["correct"]) == correct and float(aux["examples"]) == examples
    logits = _logits(model, params, batch)
    filler_hits += int(np.sum((logits.argmax(-1) == batch.labels) & (index < 0)))
  assert filler_hits > 0

  # The train step's accuracy (dropout off; lr 0 keeps the params, so every batch sees the same model).
  step = make_train_step(classification_loss(model), donate=False)
  state = create_train_state(model, params, optax.sgd(0.0))
  for batch, correct, examples in zip(epoch.batches, want_correct, want_examples, strict=True):
    state, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["accuracy"]), correct / examples, rtol=1e-6)
    assert float(metrics["correct"]) == correct and float(metrics["examples"]) == examples

  # The evaluation loop, summed over every batch before dividing.
  result = evaluate(make_eval_step(classification_loss(model)), params, epoch.batches)
  assert result["examples"] == len(ids)
  np.testing.assert_allclose(result["accuracy"], np.mean(pred == labels), rtol=1e-6)


def test_classification_report_against_explicit_counts():
  from jfast.training.metrics import classification_report, format_report

  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 500)
  predictions = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 3, 500))
  predictions[predictions == 3] = 0  # class 3 is never predicted: precision 0 by convention
  report = classification_report(labels, predictions, ("a", "b", "c", "d"))
  f1s = []
  for c, name in enumerate("abcd"):
    tp = sum(1 for t, p in zip(labels, predictions, strict=True) if t == c and p == c)
    predicted = sum(1 for p in predictions if p == c)
    actual = sum(1 for t in labels if t == c)
    precision = tp / predicted if predicted else 0.0
    recall = tp / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    f1s.append(f1)
    assert report["per_class"][name] == pytest.approx(
      {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    )
    assert report["confusion_matrix"][c] == [
      sum(1 for t, p in zip(labels, predictions, strict=True) if t == c and p == q) for q in range(4)
    ]
  assert report["per_class"]["d"]["precision"] == 0.0 and report["per_class"]["d"]["support"] > 0
  assert report["macro_f1"] == pytest.approx(sum(f1s) / 4)
  assert report["accuracy"] == pytest.approx(float(np.mean(labels == predictions)))
  assert "macro" in format_report(report) and "true / predicted" in format_report(report)
