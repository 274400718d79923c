"""Distillation: losses against float64 numpy, the jitted step against make_train_step, student construction."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jfast.compress import (
  DistillConfig,
  TeacherBatch,
  distill_params,
  distillation_loss,
  fresh_student,
  make_distill_step,
  precompute_teacher_logits,
  split_params,
  student_from_teacher,
)
from jfast.data import BatchingConfig, make_batches
from jfast.models import BertConfig, BertForSequenceClassification
from jfast.nn import unstack_layers
from jfast.training import (
  attention_map_loss,
  attention_probs,
  classification_loss,
  create_train_state,
  hidden_state_loss,
  make_train_step,
  soft_target_loss,
)

TINY = BertConfig(
  vocab_size=97,
  hidden_size=32,
  num_hidden_layers=4,
  num_attention_heads=4,
  intermediate_size=64,
  max_position_embeddings=64,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(student, teacher, t):
  logp, logq = _np_log_softmax(teacher / t), _np_log_softmax(student / t)
  return t**2 * (np.exp(logp) * (logp - logq)).sum(-1)


def _packed_and_unpacked(seed=0, n=24):
  rng = np.random.default_rng(seed)
  seqs = [rng.integers(1, TINY.vocab_size, size=rng.integers(3, 12)).astype(np.int32) for _ in range(n)]
  labels = rng.integers(0, 2, size=n).astype(np.int32)
  packed = make_batches(
    seqs, labels, BatchingConfig(strategy="packed", batch_size=8, row_length=32, shuffle=False), pad_id=0
  )
  fixed = make_batches(
    seqs, labels, BatchingConfig(strategy="fixed", batch_size=n, max_length=16, shuffle=False), pad_id=0
  )
  assert len(packed.batches) == 1 and len(fixed.batches) == 1
  return packed.batches[0], fixed.batches[0]


@pytest.fixture(scope="module")
def teacher():
  model = BertForSequenceClassification(TINY, num_labels=2)
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))["params"]
  # Sharper logits than the init's, so soft targets carry information and the KL term is not ~0.
  params = jax.tree.map(lambda x: x, params)
  params["classifier"]["kernel"] = params["classifier"]["kernel"] * 50.0
  return model, params


def test_kl_zero_for_equal_logits_and_matches_hand_value():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 3, 4)) * 3
  np.testing.assert_allclose(soft_target_loss(jnp.asarray(logits), jnp.asarray(logits), 3.0), 0.0, atol=1e-6)
  # Two classes, T=2, by hand: p = softmax([2, 0]/2), q = softmax([0, 0]/2) = [.5, .5].
  p = np.array([np.e, 1.0]) / (np.e + 1.0)
  by_hand = 4.0 * float(np.sum(p * np.log(p / 0.5)))
  got = soft_target_loss(jnp.array([[0.0, 0.0]]), jnp.array([[2.0, 0.0]]), 2.0)
  np.testing.assert_allclose(got, [by_hand], rtol=1e-6)
  student, teacher_ = rng.normal(size=(7, 5)) * 2, rng.normal(size=(7, 5)) * 2
  for t in (0.5, 1.0, 4.0):
    np.testing.assert_allclose(soft_target_loss(student, teacher_, t), _np_kl(student, teacher_, t), rtol=1e-5)


def test_t_squared_scaling_keeps_gradients_temperature_independent():
  # Hinton et al.: with the T^2 factor, d loss / d z -> (z - v) / C for large T (zero-mean logits), whatever T.
  rng = np.random.default_rng(1)
  z, v = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  z, v = jnp.asarray(z - z.mean(-1, keepdims=True)), jnp.asarray(v - v.mean(-1, keepdims=True))
  temps = (1.0, 200.0, 400.0)
  grads = [jax.grad(lambda s, t=t: soft_target_loss(s, v, t).sum())(z) for t in temps]
  for t, g in zip(temps, grads, strict=True):  # exact: T^2 * (1/T) * (q - p)
    q, p = np.exp(_np_log_softmax(np.asarray(z) / t)), np.exp(_np_log_softmax(np.asarray(v) / t))
    np.testing.assert_allclose(g, t * (q - p), atol=2e-4)
  np.testing.assert_allclose(grads[1], (z - v) / 5, atol=3e-3)
  np.testing.assert_allclose(grads[2], (z - v) / 5, atol=2e-3)
  # Without the factor the gradient would shrink by T^2: 4x between T=200 and T=400.
  assert float(jnp.abs(grads[2]).max()) > 0.1


def _np_token_weight(seg):
  w = np.zeros(seg.shape)
  for b in range(seg.shape[0]):
    for s in set(seg[b].tolist()) - {0}:
      w[b, seg[b] == s] = 1.0 / np.sum(seg[b] == s)
  return w


def test_hidden_and_attention_losses_match_numpy_on_packed_rows():
  packed, _ = _packed_and_unpacked()
  seg = packed.segment_ids
  rng = np.random.default_rng(2)
  b, length = seg.shape
  s, t, proj = rng.normal(size=(b, length, 16)), rng.normal(size=(b, length, 24)), rng.normal(size=(16, 24)) / 4
  w = _np_token_weight(seg)
  expected = np.sum(((s @ proj - t) ** 2).mean(-1) * w)
  np.testing.assert_allclose(hidden_state_loss(s, t, seg, proj), expected, rtol=1e-5)
  assert float(hidden_state_loss(t, t, seg)) == 0.0
  with pytest.raises(ValueError, match="do not match"):
    hidden_state_loss(s, t, seg)

  heads = 4
  qs, ks, qt, kt = (rng.normal(size=(b, length, 16)) for _ in range(4))

  def np_probs(q, k):
    qh, kh = q.reshape(b, length, heads, 4), k.reshape(b, length, heads, 4)
    scores = np.einsum("bqhk,bthk->bhqt", qh, kh) / 2.0
    allowed = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, None, :] > 0)
    scores = np.where(allowed, scores, -np.inf)
    with np.errstate(invalid="ignore"):  # padding query rows allow no key: NaN, zeroed (never compared)
      e = np.exp(scores - scores.max(-1, keepdims=True))
      return np.nan_to_num(e / e.sum(-1, keepdims=True))

  ps, pt = np_probs(qs, ks), np_probs(qt, kt)
  got_BxLxHxL = np.asarray(attention_probs(qs, ks, seg, heads)).transpose(0, 2, 1, 3)
  np.testing.assert_allclose(got_BxLxHxL[seg > 0], ps.transpose(0, 2, 1, 3)[seg > 0], atol=1e-6)
  kl = np.where(pt > 0, pt * (np.log(np.where(pt > 0, pt, 1)) - np.log(np.where(ps > 0, ps, 1))), 0).sum(-1)
  expected = np.sum(kl.mean(1) * w)
  got = attention_map_loss(attention_probs(qs, ks, seg, heads), attention_probs(qt, kt, seg, heads), seg)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_student_from_teacher_copies_exactly_the_chosen_layers(teacher):
  _, t_params = teacher
  for layers, expect in (("every_other", (0, 2)), ((3, 1, 0), (3, 1, 0))):
    config, params = student_from_teacher(TINY, t_params, layers)
    # Scanned student: layers 0..n-2 stacked, the last apart (`BertConfig.scanned`).
    assert sorted(params["bert"]) == [
      "embeddings",
      "encoder_layer_" + str(len(expect) - 1),
      "encoder_layers",
      "pooler",
    ]
    params, t_params = unstack_layers(params), unstack_layers(t_params)
    assert config.num_hidden_layers == len(expect)
    assert dataclasses.replace(config, num_hidden_layers=TINY.num_hidden_layers) == TINY
    assert sorted(params["bert"]) == sorted(
      ["embeddings", "pooler", *(f"encoder_layer_{j}" for j in range(len(expect)))]
    )
    for j, i in enumerate(expect):
      for k in range(TINY.num_hidden_layers):
        same = jax.tree.map(
          lambda a, b: np.array_equal(a, b),
          params["bert"][f"encoder_layer_{j}"],
          t_params["bert"][f"encoder_layer_{k}"],
        )
        assert all(jax.tree.leaves(same)) == (k == i), (layers, j, k)
    for name in ("embeddings", "pooler"):
      jax.tree.map(np.testing.assert_array_equal, params["bert"][name], t_params["bert"][name])
    jax.tree.map(np.testing.assert_array_equal, params["classifier"], t_params["classifier"])
  # Copies, not views: training the student must not move the teacher.
  params["bert"]["embeddings"]["LayerNorm"]["scale"][0] += 1.0
  assert not np.array_equal(
    params["bert"]["embeddings"]["LayerNorm"]["scale"], t_params["bert"]["embeddings"]["LayerNorm"]["scale"]
  )


TX = optax.adam(1e-3)  # one object: a state's tx is pytree metadata, and a new one would retrace the step


def _state(model, params):
  return create_train_state(model, params, TX)


@pytest.mark.slow
def test_alpha_zero_is_hard_label_training_and_teacher_gets_no_gradient(teacher):
  t_model, t_params = teacher
  s_config, s_params = student_from_teacher(TINY, t_params, (0, 3))
  student = BertForSequenceClassification(s_config, num_labels=2)
  packed, _ = _packed_and_unpacked()
  hard = make_train_step(classification_loss(student), donate=False)
  distill = make_distill_step(student, t_model, DistillConfig(alpha=0.0, temperature=3.0), donate=False)
  ref_state, ref_metrics = hard(_state(student, s_params), packed)
  state, metrics = distill(_state(student, s_params), t_params, packed)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state.params, ref_state.params)

  config = DistillConfig(alpha=0.7, temperature=2.0, hidden_weight=1.0, attention_weight=1.0)
  step = make_distill_step(student, t_model, DistillConfig(alpha=0.7), donate=False)
  before = jax.tree.map(np.array, t_params)
  _, m1 = step(_state(student, s_params), t_params, packed)
  other = jax.tree.map(lambda x: x * 1.01, t_params)
  _, m2 = step(_state(student, s_params), other, packed)
  # The teacher is an argument, not constants baked into the executable: new weights, same executable, new loss.
  assert step.num_compiles == 1 and float(m1["kd_sum"]) != float(m2["kd_sum"])
  jax.tree.map(np.testing.assert_array_equal, t_params, before)

  def loss(sp, tp):
    return distillation_loss(student, t_model, config)(sp, packed, None, True, tp)[0]

  s_grads, t_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(s_params, t_params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(t_grads))
  assert float(optax.tree.norm(s_grads)) > 0


@pytest.mark.slow
def test_packed_equals_unpacked_and_precomputed_equals_in_step(teacher):
  t_model, t_params = teacher
  # A random student, far from the teacher, so every loss term is well above rounding.
  s_config, s_params = fresh_student(TINY, 2, jax.random.key(5), num_hidden_layers=2)
  student = BertForSequenceClassification(s_config, num_labels=2)
  packed, unpacked = _packed_and_unpacked()
  config = DistillConfig(alpha=0.5, temperature=2.0, hidden_weight=0.5, attention_weight=0.5)
  loss_fn = jax.jit(
    functools.partial(distillation_loss(student, t_model, config), teacher_params=t_params), static_argnums=3
  )
  loss_p, aux_p = loss_fn(s_params, packed, None, True)
  loss_u, aux_u = loss_fn(s_params, unpacked, None, True)
  assert float(aux_p["kd_sum"]) > 1e-3 and float(aux_p["hidden_sum"]) > 1e-3 and float(aux_p["attention_sum"]) > 1e-3
  for key in ("kd_sum", "ce_sum", "hidden_sum", "attention_sum", "examples", "correct"):
    np.testing.assert_allclose(aux_p[key], aux_u[key], rtol=2e-5, err_msg=key)
  np.testing.assert_allclose(loss_p, loss_u, rtol=2e-5)

  logits_config = DistillConfig(alpha=0.8, temperature=2.0)
  streamed = precompute_teacher_logits(t_model, t_params, [packed])[0]
  a = make_distill_step(student, t_model, logits_config, donate=False)(_state(student, s_params), t_params, packed)
  b = make_distill_step(student, None, logits_config, donate=False)(_state(student, s_params), None, streamed)
  np.testing.assert_allclose(a[1]["loss"], b[1]["loss"], rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a[0].params, b[0].params)
  # Accumulating 2 micro-batches (the teacher runs on each) equals the whole batch.
  c = make_distill_step(student, t_model, config, micro_batches=2, donate=False)(
    _state(student, s_params), t_params, packed
  )
  d = make_distill_step(student, t_model, config, donate=False)(_state(student, s_params), t_params, packed)
  np.testing.assert_allclose(c[1]["loss"], d[1]["loss"], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-6), c[0].params, d[0].params)


@pytest.mark.slow
def test_bf16_teacher_and_narrower_fresh_student_with_projection(teacher):
  t_model, t_params = teacher
  s_config, s_params = fresh_student(
    TINY, 2, jax.random.key(3), num_hidden_layers=2, hidden_size=16, intermediate_size=32
  )
  student = BertForSequenceClassification(s_config, num_labels=2)
  config = DistillConfig(hidden_weight=1.0)
  params = distill_params(s_params, s_config, TINY, config, jax.random.key(4))
  assert split_params(params)[1]["kernel"].shape == (16, 32)
  packed, _ = _packed_and_unpacked()
  state = _state(student, params)
  f32 = make_distill_step(student, t_model, config, donate=False)(state, t_params, packed)
  bf16 = make_distill_step(student, t_model, config, teacher_policy="pure-bf16", donate=False)(state, t_params, packed)
  assert np.isfinite(float(bf16[1]["loss"]))
  np.testing.assert_allclose(bf16[1]["loss"], f32[1]["loss"], rtol=5e-2)
  assert float(bf16[1]["loss"]) != float(f32[1]["loss"])  # the teacher really ran in bf16
  moved = split_params(f32[0].params)[1]["kernel"] - split_params(params)[1]["kernel"]
  assert float(jnp.abs(moved).max()) > 0  # the projection trains with the student


def test_bad_input_gives_clear_errors(teacher):
  t_model, t_params = teacher
  for kwargs, match in (
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"hidden_weight": -1.0}, "hidden_weight"),
  ):
    with pytest.raises(ValueError, match=match):
      DistillConfig(**kwargs)
  with pytest.raises(ValueError, match="vocabularies differ"):
    make_distill_step(BertForSequenceClassification(TINY.replace(vocab_size=50), num_labels=2), t_model)
  with pytest.raises(ValueError, match="label counts differ"):
    make_distill_step(BertForSequenceClassification(TINY, num_labels=3), t_model)
  with pytest.raises(ValueError, match="head counts"):
    make_distill_step(
      BertForSequenceClassification(TINY.replace(num_attention_heads=2), num_labels=2),
      t_model,
      DistillConfig(attention_weight=1.0),
    )
  with pytest.raises(ValueError, match="layer_map"):
    make_distill_step(
      BertForSequenceClassification(TINY.replace(num_hidden_layers=2), num_labels=2),
      t_model,
      DistillConfig(hidden_weight=1.0, layer_map=(0, 9)),
    )
  with pytest.raises(ValueError, match="needs a teacher_model"):
    make_distill_step(BertForSequenceClassification(TINY, num_labels=2), None, DistillConfig(hidden_weight=1.0))
  with pytest.raises(ValueError, match="layer indices"):
    student_from_teacher(TINY, t_params, (0, 4))
  with pytest.raises(ValueError, match="every_other"):
    student_from_teacher(TINY, t_params, "every_third")
  with pytest.raises(ValueError, match="do not match the teacher config"):
    student_from_teacher(TINY.replace(num_hidden_layers=5), t_params)
  with pytest.raises(ValueError, match="vocabulary"):
    fresh_student(TINY, 2, jax.random.key(0), vocab_size=10)
  student = BertForSequenceClassification(TINY.replace(num_hidden_layers=2), num_labels=2)
  packed, _ = _packed_and_unpacked()
  bad = TeacherBatch(packed, np.zeros((*packed.labels.shape, 3), np.float32))
  state = _state(student, student_from_teacher(TINY, t_params, "every_other")[1])
  with pytest.raises(ValueError, match="teacher logits"):
    make_distill_step(student, None, donate=False)(state, None, bad)
  with pytest.raises(ValueError, match="teacher's params"):
    make_distill_step(student, t_model, donate=False)(state, None, packed)


# ------------------------------------------------------------------ the whole loss against a float64 numpy reference


def _np_internals(model, params, batch):
  """Logits ``[B, S, C]`` and hidden states ``[B, L, D]`` in float64: embeddings first, so ``hidden[i]`` is layer
  ``i``'s input and ``hidden[i + 1]`` its output.

  Read with Flax's ``capture_intermediates`` on every module (not the library's filter), every row of the last layer.
  """
  full = model.clone(last_layer_pooled_only=False, config=model.config.replace(scan_layers=False))
  logits, state = full.apply(
    {"params": unstack_layers(params)},
    batch.input_ids,
    segment_ids=batch.segment_ids,
    position_ids=batch.position_ids,
    cls_positions=batch.cls_positions,
    capture_intermediates=True,
    mutable=["intermediates"],
  )
  tree = state["intermediates"]["bert"]
  hidden = [np.asarray(tree["embeddings"]["__call__"][0], np.float64)]
  for i in range(model.config.num_hidden_layers):
    hidden.append(np.asarray(tree[f"encoder_layer_{i}"]["__call__"][0], np.float64))
  return np.asarray(logits, np.float64), hidden


def _np_projection(params, layer, name, x):
  p = unstack_layers(params)["bert"][f"encoder_layer_{layer}"][name]
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _np_distillation_reference(s_model, s_params, t_model, t_params, batch, config, layer_map):
  """The whole distillation loss, term by term, example by example, in float64: ``(loss, sums)``."""
  s_logits, s_hidden = _np_internals(s_model, s_params, batch)
  t_logits, t_hidden = _np_internals(t_model, t_params, batch)
  heads, head_dim = TINY.num_attention_heads, TINY.head_dim
  t = config.temperature
  sums = dict.fromkeys(("kd_sum", "ce_sum", "hidden_sum", "attention_sum", "examples", "correct"), 0.0)
  pairs = [(i + 1, j + 1) for i, j in enumerate(layer_map)]
  if config.match_embeddings:
    pairs = [(0, 0), *pairs]
  seg = np.asarray(batch.segment_ids)

  def probs(params, layer, x):  # one example's [H, n, n] attention distributions from the layer's input rows
    q = _np_projection(params, layer, "query", x).reshape(len(x), heads, head_dim)
    k = _np_projection(params, layer, "key", x).reshape(len(x), heads, head_dim)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  for b, s in zip(*np.nonzero(np.asarray(batch.example_mask)), strict=True):
    tokens = np.flatnonzero(seg[b] == s + 1)  # slot s holds segment s + 1 (checked below via cls_positions)
    assert tokens[0] == batch.cls_positions[b, s]
    zs, zt, label = s_logits[b, s], t_logits[b, s], int(batch.labels[b, s])
    sums["examples"] += 1.0
    sums["correct"] += float(np.argmax(zs) == label)
    sums["ce_sum"] += -_np_log_softmax(zs)[label]
    sums["kd_sum"] += float(_np_kl(zs[None], zt[None], t)[0])
    per_pair = [np.mean((s_hidden[i][b, tokens] - t_hidden[j][b, tokens]) ** 2) for i, j in pairs]
    sums["hidden_sum"] += np.mean(per_pair)
    per_layer = []
    for i, j in enumerate(layer_map):
      ps, pt = probs(s_params, i, s_hidden[i][b, tokens]), probs(t_params, j, t_hidden[j][b, tokens])
      per_layer.append(np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1)))  # sum over keys, mean over heads/queries
    sums["attention_sum"] += np.mean(per_layer)
  loss_sum = (
    config.alpha * sums["kd_sum"]
    + (1 - config.alpha) * sums["ce_sum"]
    + config.hidden_weight * sums["hidden_sum"]
    + config.attention_weight * sums["attention_sum"]
  )
  return loss_sum / sums["examples"], {**sums, "loss_sum": loss_sum}


def _scale_encoder_kernels(params, factor):
  params = jax.tree.map(np.array, params)  # a copy: the module fixture's teacher stays as it is
  for name, layer in params["bert"].items():
    if name.startswith("encoder_layer"):  # encoder_layer_i, and the scanned stack encoder_layers
      for proj in ("query", "key", "value", "attention_output", "intermediate", "output"):
        layer[proj]["kernel"] = layer[proj]["kernel"] * factor
  return params


@pytest.mark.parametrize(
  ("config", "layer_map"),
  [
    # The default map pairs student layer i with teacher layer (i + 1) * 4 // 2 - 1: (1, 3).
    (DistillConfig(temperature=2.0, alpha=0.3, hidden_weight=0.7, attention_weight=0.4), (1, 3)),
    (DistillConfig(temperature=3.0, alpha=0.6, hidden_weight=1.5, attention_weight=0.9, layer_map=(1, 3)), (1, 3)),
    (
      DistillConfig(
        temperature=1.5, alpha=0.25, hidden_weight=2.0, attention_weight=1.3, layer_map=(2, 0), match_embeddings=False
      ),
      (2, 0),
    ),
  ],
  ids=["default_map", "map_1_3", "map_2_0_no_embeddings"],
)
def test_distillation_loss_matches_float64_reference(teacher, config, layer_map):
  t_model, t_params = teacher
  s_config, s_params = fresh_student(TINY, 2, jax.random.key(7), num_hidden_layers=2)
  # Larger encoder kernels than the init's (std 0.02), whose layers are all near the identity: each teacher layer
  # then differs from the others (so the layer map matters) and attention maps peak (the attention term is large).
  t_params, s_params = _scale_encoder_kernels(t_params, 12.0), _scale_encoder_kernels(s_params, 12.0)
  s_params["classifier"]["kernel"] = s_params["classifier"]["kernel"] * 50.0  # confident, like the teacher
  student = BertForSequenceClassification(s_config, num_labels=2)
  packed, _ = _packed_and_unpacked(seed=3)
  # The batch has padding tokens and empty example slots, so masking is part of what is checked.
  assert (packed.segment_ids == 0).any() and not packed.example_mask.all()
  want_loss, want = _np_distillation_reference(student, s_params, t_model, t_params, packed, config, layer_map)
  # Every term is far from zero, and the layer map matters: another map gives other hidden / attention sums.
  for key in ("kd_sum", "ce_sum", "hidden_sum", "attention_sum"):
    assert want[key] > 0.5, (key, want[key])
  other = (0, 2) if layer_map != (0, 2) else (1, 3)
  _, wrong = _np_distillation_reference(student, s_params, t_model, t_params, packed, config, other)
  assert abs(wrong["hidden_sum"] / want["hidden_sum"] - 1) > 1e-3
  assert abs(wrong["attention_sum"] / want["attention_sum"] - 1) > 1e-3

  loss_fn = jax.jit(distillation_loss(student, t_model, config), static_argnums=3)
  loss, aux = loss_fn(s_params, packed, None, True, t_params)
  for key in ("kd_sum", "ce_sum", "hidden_sum", "attention_sum", "loss_sum"):
    np.testing.assert_allclose(float(aux[key]), want[key], rtol=1e-5, err_msg=key)
  assert float(aux["examples"]) == want["examples"] == packed.example_mask.sum()
  assert float(aux["correct"]) == want["correct"]
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
