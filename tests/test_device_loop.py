"""The loop keeps the device busy: no implicit device-to-host transfer in any step, one explicit fetch per log
interval, batches placed one step ahead, and throughput reported steady and end to end with compile time apart; the
persistent compilation cache is on at the entry points, can be turned off, and its hits are counted."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src import array as jarray

from jfast.data import BatchingConfig, load_text_classification, make_batches, tokenize
from jfast.models import BertConfig, BertForSequenceClassification
from jfast.training import (
  LoopConfig,
  classification_loss,
  compile_cache,
  create_train_state,
  fit,
  make_train_step,
)
from jfast.training.loop import run, training_loop
from jfast.training.step import CompiledStep

TINY = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


@pytest.fixture(scope="module")
def sst2_batches(data_dir, tokenizer):
  ds = load_text_classification(data_dir / "sst2", "dev")
  ids, _ = tokenize(tokenizer, ds.texts[:192], max_length=512)
  config = BatchingConfig(strategy="packed", batch_size=2, row_length=64)
  return ids, np.asarray(ds.labels[:192]), config


def test_one_fetch_per_log_interval_and_no_implicit_transfer(sst2_batches, monkeypatch):
  ids, labels, config = sst2_batches
  batches = make_batches(ids, labels, config, pad_id=0).batches[:12]
  model = BertForSequenceClassification(TINY, num_labels=2)
  params = jax.jit(model.init)(jax.random.key(0), np.ones((1, 8), np.int32))["params"]
  state = create_train_state(model, params, optax.adamw(1e-3))
  step = make_train_step(classification_loss(model))
  fetches, fetching = [], [False]
  real_get, real_value = jax.device_get, jarray.ArrayImpl._value

  def counting_get(tree):
    fetches.append(len(jax.tree.leaves(tree)))
    fetching[0] = True
    try:
      return real_get(tree)
    finally:
      fetching[0] = False

  def guarded_value(self):  # every device-to-host read of a jax.Array goes through here, on every backend
    if not fetching[0]:
      raise AssertionError("an implicit device-to-host transfer outside jax.device_get")
    return real_value.fget(self)

  monkeypatch.setattr(jax, "device_get", counting_get)
  monkeypatch.setattr(jarray.ArrayImpl, "_value", property(guarded_value))
  placed = []
  loop = training_loop(
    state,
    step,
    batches,
    loop=LoopConfig(log_every=4, quiet=True),
    place=lambda b: placed.append(b) or jax.device_put(b),
  )
  with jax.transfer_guard_device_to_host("disallow"):  # the same on accelerators, where JAX checks it itself
    seen = []
    while True:
      try:
        out = next(loop)
      except StopIteration as stop:
        result = stop.value
        break
      seen.append((out["step"], len(fetches), len(placed)))
  # The start reads the step counter, the end the loss scale; in between, one fetch per 4 steps, at the log steps.
  assert [f for s, f, _ in seen] == [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
  assert len(fetches) == 1 + 3 + 1 and len(result.history) == 3
  assert [p for _, _, p in seen] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12]  # the next batch is placed ahead


def test_throughput_is_reported_steady_and_end_to_end_with_compile_apart(sst2_batches):
  ids, labels, config = sst2_batches
  model = BertForSequenceClassification(TINY, num_labels=2)
  params = jax.jit(model.init)(jax.random.key(1), np.ones((1, 8), np.int32))["params"]
  result = fit(
    model, params, lambda total: optax.adamw(1e-3), (ids, labels), batching=config, loop=LoopConfig(quiet=True)
  )
  s = result.stats
  assert s["compile_steps"] == 1 and s["compile_seconds"] > 0
  assert s["compile_step_tokens"] == int(
    np.count_nonzero(make_batches(ids, labels, config, pad_id=0).batches[0].segment_ids)
  )
  assert s["end_to_end_tokens_per_second"] == pytest.approx(s["train_tokens"] / s["train_seconds"])
  steady = (s["train_tokens"] - s["compile_step_tokens"]) / (s["train_seconds"] - s["compile_seconds"])
  assert s["steady_tokens_per_second"] == pytest.approx(steady)
  assert s["steady_tokens_per_second"] > s["end_to_end_tokens_per_second"]


def test_compile_log_counts_persistent_cache_hits():
  def fn(x):
    return jnp.tanh(x @ x.T + 0.37)  # a program no other test compiles

  x = jnp.ones((5, 7))
  first = CompiledStep(fn)
  first(x)
  jax.clear_caches()  # in-memory caches gone: the next compile must come from the persistent cache (conftest's)
  second = CompiledStep(fn)
  second(x)
  assert [c["cached"] for c in first.compile_log] == [False]
  assert [c["cached"] for c in second.compile_log] == [True]
  assert second.compile_seconds > 0 and second.num_compiles == 1


def test_the_cache_switch_and_its_folder(tmp_path, monkeypatch):
  saved = jax.config.jax_compilation_cache_dir
  saved_env = {
    k: os.environ.get(k) for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
  }
  try:
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.enable_compilation_cache() is None
    monkeypatch.delenv(compile_cache.ENV)
    assert compile_cache.enable_compilation_cache() == compile_cache.Path(saved)  # the user's JAX setting stays
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = compile_cache.enable_compilation_cache()
    assert path == tmp_path / "xdg" / "jfast" / "jax" and path.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(path)
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(path)  # child processes inherit it
    from jfast.app import entry

    jax.config.update("jax_compilation_cache_dir", None)
    assert entry.start(["--no-compile-cache", "finetune"]) == ["finetune"]
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update("jax_compilation_cache_dir", saved)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    for key, value in saved_env.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


class _Counted:
  """A step that counts its calls (its single-step fallback's too)."""

  def __init__(self, step, calls=None):
    self.step, self.calls = step, calls if calls is not None else [0]
    self.steps_per_call = step.steps_per_call
    self.single = _Counted(step.single, self.calls) if step.single is not None else None

  def __call__(self, *args):
    self.calls[0] += 1
    return self.step(*args)

  @property
  def num_compiles(self):
    return self.step.num_compiles

  @property
  def compile_log(self):
    return self.step.compile_log


@pytest.mark.parametrize("strategy", ["packed", "bucket"])
def test_steps_per_call_trains_the_same_as_one_step_per_call(sst2_batches, strategy):
  ids, labels, _ = sst2_batches
  packed = strategy == "packed"
  config = BatchingConfig(
    strategy=strategy, batch_size=2 if packed else 8, num_buckets=3, row_length=64 if packed else None
  )
  batches = make_batches(ids, labels, config, pad_id=0, seed=3).batches[:14]
  model = BertForSequenceClassification(TINY, num_labels=2)  # dropout on: the step's key must follow state.step
  params = jax.jit(model.init)(jax.random.key(2), np.ones((1, 8), np.int32))["params"]
  results, calls = {}, {}
  for k in (1, 4):
    state = create_train_state(model, params, optax.adamw(1e-3))
    step = make_train_step(classification_loss(model), steps_per_call=k)
    counted = _Counted(step)
    loop = training_loop(state, counted, batches, loop=LoopConfig(log_every=4, quiet=True, max_steps=13))
    results[k], calls[k] = run(loop), counted.calls[0]
  one, four = results[1], results[4]
  assert one.stats["final_step"] == four.stats["final_step"] == 13
  assert [h["step"] for h in one.history] == [4, 8, 12, 13]
  if packed:  # calls of 4 land on the log steps; otherwise a log waits for the first call boundary after them
    assert [h["step"] for h in four.history] == [4, 8, 12, 13]
    assert four.history[-1]["loss"] == pytest.approx(one.history[-1]["loss"], rel=1e-4)
  for a, b in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(four.state.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
  assert sum(h["examples"] for h in one.history) == sum(h["examples"] for h in four.history)
  if packed:  # one shape: three calls of 4 steps and one single step
    assert calls[1] == 13 and calls[4] == 3 + 1
  else:
    assert calls[4] < calls[1]
