"""Language-model data: byte-level BPE on the real corpus, packing against an independent reference, the loss
normalised by real targets, accumulation with it, and empty-corpus errors."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import transformers

from jfast.data import (
  encode_documents,
  lm_batches,
  pack_documents,
  pad_documents,
  save_tokenizer,
  split_documents,
  train_bpe,
)
from jfast.data.bpe import END_OF_TEXT
from jfast.models import GPTConfig, init_gpt
from jfast.training import causal_lm_loss, create_train_state, make_train_step


@pytest.fixture(scope="module")
def shakespeare(data_dir) -> str:
  return (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:120_000]


@pytest.fixture(scope="module")
def bpe(shakespeare):
  return train_bpe(split_documents(shakespeare), vocab_size=512)


def test_bpe_on_real_text(bpe, shakespeare, tmp_path):
  assert bpe.get_vocab_size() == 512
  assert bpe.token_to_id(END_OF_TEXT) == 0
  text = shakespeare[50_000:52_000]
  ids = bpe.encode(text).ids
  assert bpe.decode(ids) == text  # byte-level: lossless, no unknown token
  assert len(ids) < len(text) / 1.8  # merges were learned: about two bytes a token at 512 entries
  path = save_tokenizer(bpe, tmp_path / "tok")
  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
  assert fast(text)["input_ids"] == ids
  assert bpe.encode("Zebra quokka §±").ids  # bytes never seen in training still encode


def _reference_rows(docs, length):
  """Row by row, token by token: the stream, its document of origin, and the rows it is cut into."""
  stream, origin = [], []
  for d, doc in enumerate(docs):
    stream += list(doc)
    origin += [d] * len(doc)
  rows = []
  for start in range(0, len(stream) - 1, length):
    row = {"ids": [], "seg": [], "pos": [], "labels": [], "mask": []}
    first_doc, seg_start = origin[start], start
    for i in range(start, min(start + length, len(stream) - 1)):
      if i > start and origin[i] != origin[i - 1]:
        seg_start = i
      row["ids"].append(stream[i])
      row["seg"].append(origin[i] - first_doc + 1)
      row["pos"].append(i - seg_start)
      same = origin[i + 1] == origin[i]
      row["labels"].append(stream[i + 1] if same else 0)
      row["mask"].append(same)
    rows.append(row)
  return rows


def test_pack_documents_matches_reference(bpe, shakespeare):
  docs = encode_documents(bpe, split_documents(shakespeare)[:60], bos_id=0)
  rows = pack_documents(docs, 64, pad_id=7)
  ref = _reference_rows(docs, 64)
  assert rows.input_ids.shape == (len(ref), 64)
  for r, want in enumerate(ref):
    n = len(want["ids"])
    np.testing.assert_array_equal(rows.input_ids[r, :n], want["ids"])
    np.testing.assert_array_equal(rows.segment_ids[r, :n], want["seg"])
    np.testing.assert_array_equal(rows.position_ids[r, :n], want["pos"])
    np.testing.assert_array_equal(rows.labels[r, :n], want["labels"])
    np.testing.assert_array_equal(rows.example_mask[r, :n], want["mask"])
    assert (rows.segment_ids[r, n:] == 0).all() and (rows.input_ids[r, n:] == 7).all()
    assert not rows.example_mask[r, n:].any()
  # Every document of n tokens yields n - 1 targets, whichever rows it was cut across.
  assert rows.num_targets == sum(len(d) - 1 for d in docs)
  assert rows.segment_ids.max() > 2  # several documents per row
  unpacked = pad_documents(docs, 64)
  assert unpacked.num_targets == rows.num_targets
  assert unpacked.input_ids.shape[0] > 1.2 * rows.input_ids.shape[0]  # the padding packing saves


def test_lm_batches_static_shape_and_shuffle():
  rng = np.random.default_rng(0)
  docs = [rng.integers(1, 100, size=n) for n in rng.integers(2, 40, size=30)]
  rows = pack_documents(docs, 16)
  plain = lm_batches(rows, 4)
  shuffled = lm_batches(rows, 4, seed=1, epoch=0)
  assert {b.shape for b in plain} == {(4, 16)} == {b.shape for b in shuffled}
  assert sum(b.num_targets for b in shuffled) == rows.num_targets
  assert lm_batches(rows, 4, seed=1, epoch=1)[0].input_ids.tolist() != shuffled[0].input_ids.tolist()
  got = sorted(map(tuple, np.concatenate([b.input_ids for b in shuffled])[: rows.input_ids.shape[0]].tolist()))
  assert len(got) == rows.input_ids.shape[0]


CONFIG = GPTConfig(
  vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  # Documents of very different lengths, so rows hold very different numbers of real targets.
  docs = [rng.integers(1, 100, size=n) for n in (40, 3, 2, 25, 5, 60, 4, 9)]
  rows = pack_documents(docs, 24)
  return lm_batches(rows, 8)[0]


def test_loss_is_mean_over_real_targets():
  model, params = init_gpt(CONFIG, jax.random.key(0))
  batch = _batch()
  loss, aux = jax.jit(lambda p, b: causal_lm_loss(model)(p, b, None, True))(params, batch)
  logits = np.asarray(
    model.apply({"params": params}, batch.input_ids, batch.segment_ids, batch.position_ids), np.float64
  )
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch.labels[..., None], -1)[..., 0]
  want = nll[batch.example_mask].mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert int(aux["examples"]) == batch.num_targets < batch.num_real_tokens


def test_correct_counts_argmax_hits_on_real_targets():
  model, params = init_gpt(CONFIG, jax.random.key(2))
  batch = _batch(seed=3)
  logits = np.asarray(
    model.apply({"params": params}, batch.input_ids, batch.segment_ids, batch.position_ids), np.float64
  )
  # Point about half the labels (padding included) at the model's argmax, so there are many hits to count.
  rng = np.random.default_rng(0)
  labels = np.where(rng.random(batch.labels.shape) < 0.5, logits.argmax(-1), batch.labels).astype(batch.labels.dtype)
  batch = batch._replace(labels=labels)
  _, aux = jax.jit(lambda p, b: causal_lm_loss(model)(p, b, None, True))(params, batch)
  want = int(((logits.argmax(-1) == labels) & batch.example_mask).sum())
  assert want > 20
  assert int(aux["correct"]) == want


def test_accumulation_equals_full_batch_with_uneven_targets():
  model, params = init_gpt(CONFIG, jax.random.key(1))
  batch = _batch(seed=2)
  halves = [batch.example_mask[:4].sum(), batch.example_mask[4:].sum()]
  assert halves[0] != halves[1]  # uneven micro-batches: per-micro means would weigh them wrongly
  out = []
  for k in (1, 2):
    state = create_train_state(model, params, optax.sgd(0.5))
    state, metrics = make_train_step(causal_lm_loss(model), micro_batches=k)(state, batch)
    out.append((float(metrics["loss"]), jax.device_get(state.params)))
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1]), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_empty_corpus_errors(bpe):
  for text in ("", "\n\n  \n\n"):
    with pytest.raises(ValueError, match="empty corpus"):
      split_documents(text)
  with pytest.raises(ValueError, match="empty corpus"):
    train_bpe(["", "  "], vocab_size=300)
  with pytest.raises(ValueError, match="empty corpus"):
    encode_documents(bpe, [])
  with pytest.raises(ValueError, match="empty corpus"):
    pack_documents([np.array([], np.int32)], 16)
  with pytest.raises(ValueError, match="empty corpus"):
    pad_documents([np.array([5]), np.array([6])], 16)
