"""Loss scaling: the scale rules, pytree round trips, and the train step skipping exactly the overflowing update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jfast.precision import (
  DynamicLossScale,
  NoOpLossScale,
  StaticLossScale,
  all_finite,
  get_loss_scale,
  resolve_loss_scale,
  select_tree,
)
from jfast.training import Checkpointer, create_train_state, make_train_step

FINITE, OVERFLOW = jnp.bool_(True), jnp.bool_(False)
# Every hyper-parameter away from its default, so a field that falls back to its default on a round trip shows.
CUSTOM = DynamicLossScale(loss_scale=64.0, counter=2, period=7, factor=4.0, min_scale=0.5, max_scale=1024.0)


def _fields(ls: DynamicLossScale) -> tuple:
  return (float(ls.loss_scale), int(ls.counter), ls.period, ls.factor, ls.min_scale, ls.max_scale)


def test_every_field_survives_flatten_unflatten_and_jit():
  leaves, treedef = jax.tree.flatten(CUSTOM)
  assert _fields(jax.tree.unflatten(treedef, leaves)) == _fields(CUSTOM)
  assert _fields(jax.jit(lambda ls: ls)(CUSTOM)) == _fields(CUSTOM)
  # jmp's bug: min_loss_scale reset to its default once the scale passed through jit; here it bounds the result.
  shrunk = jax.jit(lambda ls: ls.adjust(OVERFLOW).adjust(OVERFLOW).adjust(OVERFLOW).adjust(OVERFLOW))(CUSTOM)
  assert _fields(shrunk) == (0.5, 0, 7, 4.0, 0.5, 1024.0)
  static = jax.jit(lambda ls: ls)(StaticLossScale(256.0))
  assert float(static.loss_scale) == 256.0
  assert jax.tree.leaves(NoOpLossScale()) == []


def test_returned_scale_does_not_recompile():
  traces = []

  @jax.jit
  def step(ls):
    traces.append(1)
    return ls.adjust(FINITE)

  ls = CUSTOM
  for _ in range(3):
    ls = step(ls)
  # The initial host values must trace like the device arrays the step returns (no weak-typed Python floats).
  assert len(traces) == 1


def test_overflow_shrinks_by_factor_down_to_min_and_resets_counter():
  ls = DynamicLossScale(8.0, counter=5, period=10, min_scale=2.0)
  ls = ls.adjust(OVERFLOW)
  assert (float(ls.loss_scale), int(ls.counter)) == (4.0, 0)
  ls = ls.adjust(OVERFLOW).adjust(OVERFLOW)
  assert float(ls.loss_scale) == 2.0


def test_growth_after_period_finite_steps_up_to_max():
  ls = DynamicLossScale(4.0, period=3, max_scale=16.0)
  scales = []
  for _ in range(9):
    ls = ls.adjust(FINITE)
    scales.append(float(ls.loss_scale))
  assert scales == [4.0, 4.0, 8.0, 8.0, 8.0, 16.0, 16.0, 16.0, 16.0]
  # An overflow in the middle of a run of finite steps restarts the count.
  ls = DynamicLossScale(4.0, period=2).adjust(FINITE).adjust(OVERFLOW).adjust(FINITE)
  assert (float(ls.loss_scale), int(ls.counter)) == (2.0, 1)


def test_static_and_noop_scale_round_trip_and_never_move():
  grads = {"w": jnp.array([1.5, -3.0], jnp.bfloat16), "b": jnp.array(0.25, jnp.float32)}
  for ls in (StaticLossScale(2.0**15), NoOpLossScale()):
    back = ls.unscale(ls.scale(grads))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, grads)
    assert jax.tree.map(lambda g: g.dtype, back) == jax.tree.map(lambda g: g.dtype, grads)
    assert ls.adjust(OVERFLOW) is ls
  # Scales past float16's range still unscale float16 gradients (the division happens in float32).
  half = DynamicLossScale(2.0**20).unscale(jnp.array([1024.0], jnp.float16))
  assert half.dtype == jnp.float16 and float(half[0]) == 2.0**-10


def test_all_finite_and_select_tree():
  assert bool(all_finite({"a": jnp.ones(3), "b": jnp.zeros((2, 2), jnp.bfloat16)}))
  assert not bool(all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.nan])}))
  assert not bool(all_finite([jnp.array([-jnp.inf], jnp.float16)]))
  assert bool(all_finite({}))
  a, b = {"w": jnp.array([1.0, jnp.nan])}, {"w": jnp.array([3.0, 4.0])}
  np.testing.assert_array_equal(np.asarray(select_tree(FINITE, a, b)["w"]), [1.0, np.nan])
  np.testing.assert_array_equal(np.asarray(select_tree(OVERFLOW, a, b)["w"]), [3.0, 4.0])
  with pytest.raises(ValueError, match="scalar predicate"):
    select_tree(jnp.array([True, False]), a, b)
  with pytest.raises(ValueError, match="same structure"):
    select_tree(FINITE, a, {"v": b["w"]})


@pytest.mark.parametrize(
  ("make", "match"),
  [
    (lambda: DynamicLossScale(0.0), "loss_scale must be positive"),
    (lambda: DynamicLossScale(-2.0), "loss_scale must be positive"),
    (lambda: DynamicLossScale(float("inf")), "loss_scale must be positive and finite"),
    (lambda: StaticLossScale(0.0), "loss_scale must be positive"),
    (lambda: DynamicLossScale(factor=1.0), "factor must be a finite number greater than 1"),
    (lambda: DynamicLossScale(factor=-2.0), "factor must be a finite number greater than 1"),
    (lambda: DynamicLossScale(period=0), "period must be a positive integer"),
    (lambda: DynamicLossScale(period=2.5), "period must be a positive integer"),
    (lambda: DynamicLossScale(min_scale=0.0), "need 0 < min_scale <= max_scale"),
    (lambda: DynamicLossScale(2.0, min_scale=4.0, max_scale=2.0), "need 0 < min_scale <= max_scale"),
    (lambda: DynamicLossScale(2.0**30), r"outside \[min_scale, max_scale\]"),
    (lambda: DynamicLossScale(counter=-1), "counter must be non-negative"),
    (lambda: get_loss_scale("sometimes"), "unknown loss scale 'sometimes'"),
    (lambda: get_loss_scale("static:big"), "'big' is not a number"),
    (lambda: get_loss_scale("static:-4"), "loss_scale must be positive"),
  ],
)
def test_bad_inputs_are_named(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_policy_defaults_and_disabling_scaling_warns():
  assert isinstance(resolve_loss_scale("fp16", None), DynamicLossScale)
  assert isinstance(resolve_loss_scale("bf16", None), NoOpLossScale)
  assert isinstance(resolve_loss_scale(None, "static:128"), StaticLossScale)
  with pytest.warns(UserWarning, match="without loss scaling"):
    assert isinstance(resolve_loss_scale("fp16", "none"), NoOpLossScale)


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x_BxF):
    return nn.Dense(1)(x_BxF)[:, 0]


def _linear_loss(model):
  def loss_fn(params, batch, rng, deterministic):
    loss = jnp.mean((model.apply({"params": params}, batch["x"]) - batch["y"]) ** 2)
    return loss, {"loss_sum": loss, "correct": jnp.float32(0), "examples": jnp.float32(1)}

  return loss_fn


def _batches():
  rng = np.random.default_rng(0)
  good = [
    {"x": rng.normal(size=(8, 4)).astype(np.float32), "y": rng.normal(size=8).astype(np.float32)} for _ in range(3)
  ]
  poisoned = {"x": good[0]["x"].copy(), "y": good[0]["y"]}
  poisoned["x"][3, 1] = np.inf  # its gradient holds inf and NaN
  return good, poisoned


def _state(model, loss_scale):
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.ones((1, 4), np.float32))["params"]
  return create_train_state(model, params, optax.adam(0.1), loss_scale=loss_scale)


def test_injected_overflow_skips_exactly_that_update_and_halves_the_scale():
  model = _Linear()
  good, poisoned = _batches()
  step = make_train_step(_linear_loss(model))
  state = _state(model, DynamicLossScale(2.0**10, period=100))
  state, _ = step(state, good[0])
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = step(state, poisoned)
  after = jax.device_get((state.params, state.opt_state))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), after, before)  # bit for bit
  assert float(metrics["skipped"]) == 1.0 and float(metrics["loss_scale"]) == 2.0**10
  assert float(state.loss_scale.loss_scale) == 2.0**9 and int(state.step) == 2
  state, metrics = step(state, good[1])
  assert float(metrics["skipped"]) == 0.0 and float(metrics["loss_scale"]) == 2.0**9
  state, _ = step(state, good[2])
  assert step.num_compiles == 1  # the scale changed twice without a recompilation

  # The same run without the poisoned batch ends in the same parameters: nothing of the skipped step leaked in.
  clean = _state(model, DynamicLossScale(2.0**10, period=100))
  for batch in good:
    clean, _ = step(clean, batch)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state.params, clean.params)


def test_unscaled_run_is_unchanged_by_the_loss_scale_machinery():
  model = _Linear()
  good, _ = _batches()
  step = make_train_step(_linear_loss(model))
  plain, scaled = _state(model, None), _state(model, StaticLossScale(2.0**12))
  for batch in good:
    (plain, m_plain), (scaled, m_scaled) = step(plain, batch), step(scaled, batch)
  # Power-of-two scales multiply and divide exactly, so the scaled run matches bit for bit.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), plain.params, scaled.params)
  assert float(m_plain["loss_scale"]) == 1.0 and float(m_scaled["loss_scale"]) == 2.0**12


def test_dynamic_scale_checkpoints_and_restores_every_field(tmp_path):
  model = _Linear()
  state = _state(model, CUSTOM)
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(0, state, {"epoch": 0, "batch": 0})
  ckpt.close()
  fresh = _state(model, CUSTOM.replace(loss_scale=np.float32(1.0), counter=np.int32(0)))
  restored, _ = Checkpointer(tmp_path / "ckpt").restore_latest(fresh)
  assert _fields(restored.loss_scale) == _fields(CUSTOM)


# ------------------------------------------------------------- the same skip when the step accumulates micro-batches


def _fp16_bert_setup():
  from jfast.data import batch_from_rows
  from jfast.models import BertConfig, BertForSequenceClassification
  from jfast.precision import get_policy

  config = BertConfig(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
  )
  model = BertForSequenceClassification(get_policy("fp16").configure(config), num_labels=2)
  params = jax.jit(BertForSequenceClassification(config, num_labels=2).init)(
    jax.random.key(0), np.ones((1, 4), np.int32)
  )
  params = jax.tree.map(np.array, params["params"])
  # Token 49 is the poison: its embedding row is inf, so any batch holding it has a non-finite loss and gradient,
  # while batches without it never read the row (their embedding gradient there is a plain zero).
  params["bert"]["embeddings"]["word_embeddings"]["embedding"][49] = np.inf
  rng = np.random.default_rng(0)

  def batch(poison_row=None):
    rows = [rng.integers(1, 49, size=n).astype(np.int32) for n in rng.integers(4, 16, size=7)]
    if poison_row is not None:
      rows[poison_row][2] = 49
    # 7 real rows and one padding row of 8: micro-batches hold different real counts.
    return batch_from_rows(rows, rng.integers(0, 2, size=7), 16, pad_id=0, num_rows=8)

  return model, params, batch


@pytest.mark.slow
@pytest.mark.parametrize(("micro_batches", "poison_row"), [(2, 5)])  # the overflow in the second of two
def test_fp16_overflow_in_one_micro_batch_skips_the_whole_accumulated_step(micro_batches, poison_row):
  from jfast.training import classification_loss

  model, params, make_batch = _fp16_bert_setup()
  good = [make_batch() for _ in range(3)]
  poisoned = make_batch(poison_row)
  step = make_train_step(classification_loss(model), policy="fp16", micro_batches=micro_batches, donate=False)

  def fresh():
    state = create_train_state(model, params, optax.adam(1e-2), policy="fp16", loss_scale=DynamicLossScale(2.0**10))
    assert isinstance(state.loss_scale, DynamicLossScale)
    return state

  state, metrics = step(fresh(), good[0])
  assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
  # The accumulated gradient is unscaled: its norm is the float32 model's (float16 compute: within 2%).
  f32_loss = classification_loss(model.clone(config=model.config.replace(dtype="float32")))
  want = jax.jit(jax.grad(lambda p: f32_loss(p, good[0], None, True)[0]))(params)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(want)), rtol=2e-2)
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = step(state, poisoned)
  assert not np.isfinite(float(metrics["loss"]))  # the overflow really happened, in one micro-batch of the step
  after = jax.device_get((state.params, state.opt_state))
  jax.tree.map(np.testing.assert_array_equal, after, before)  # bit for bit (the inf row compares equal to itself)
  assert float(metrics["skipped"]) == 1.0 and float(metrics["loss_scale"]) == 2.0**10
  assert float(state.loss_scale.loss_scale) == 2.0**9 and int(state.loss_scale.counter) == 0
  assert int(state.step) == 2
  state, metrics = step(state, good[1])
  assert float(metrics["skipped"]) == 0.0 and float(metrics["loss_scale"]) == 2.0**9
  moved = jax.device_get(state.params)
  assert float(np.abs(moved["classifier"]["kernel"] - after[0]["classifier"]["kernel"]).max()) > 0
  state, _ = step(state, good[2])
  assert step.num_compiles == 1 and int(state.step) == 4

  # The run without the poisoned batch, its scale set to the halved one after its first step as the skip set this
  # run's, ends bit for bit where this one does: nothing of the skipped step leaked in.
  clean, _ = step(fresh(), good[0])
  clean = clean.replace(loss_scale=DynamicLossScale(2.0**9))
  for batch in good[1:]:
    clean, _ = step(clean, batch)
  assert int(clean.opt_state[0].count) == int(state.opt_state[0].count) == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(clean.params))
