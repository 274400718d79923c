"""Knowledge distillation: a student trained on a teacher's soft targets (and hidden states) in one jitted step.

`make_distill_step` is `jfast.train.make_train_step` with the teacher's forward pass inside the loss: the same
`_train_step` runs (precision checks, loss scaling, in-step accumulation, freezing), and the teacher's parameters
are an *argument* of the jitted step, never differentiated and never baked into the executable as constants. The
teacher may run in its own precision policy (bf16) while the student trains in another, or its logits may be
precomputed once and streamed with the batch (`TeacherBatch`) when the teacher is too large to run per step.

Every loss term is a per-example quantity summed over real examples, like `classification_loss`, so micro-batch
accumulation and packed rows give exactly the full batch's loss. Hidden states and the query/key projections for
attention maps are read with Flax's ``capture_intermediates`` (module outputs), so the models need no extra outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from jfast import train
from jfast.data.batch import Batch
from jfast.models.bert import BertConfig, BertForSequenceClassification, BertModel
from jfast.precision import Policy, get_policy

_HIDDEN_MODULES = ("embeddings", "encoder_layer_")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """What the student learns from.

  ``loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels) + hidden_weight * hidden_MSE
  + attention_weight * attention_KL``, each averaged over real examples.

  Attributes:
    temperature: T > 0 softens both distributions; the KL term is scaled by T^2 so its gradients keep their size
      as T changes (Hinton et al. 2015).
    alpha: weight of the soft-target term in [0, 1]; 0 is plain hard-label training.
    hidden_weight: weight of hidden-state matching (TinyBERT): MSE between each student layer's output (projected
      when widths differ) and its teacher layer's, plus the embeddings' when ``match_embeddings``.
    attention_weight: weight of attention-map matching (MiniLM): KL between teacher and student attention
      distributions of matched layers; needs equal head counts.
    layer_map: the teacher layer (0-based) each student layer matches; None maps uniformly, student layer i to
      teacher layer ``(i + 1) * N // M - 1`` (so the last layers always pair).
    match_embeddings: include the embedding output in hidden-state matching.
  """

  temperature: float = 2.0
  alpha: float = 0.5
  hidden_weight: float = 0.0
  attention_weight: float = 0.0
  layer_map: tuple[int, ...] | None = None
  match_embeddings: bool = True

  def __post_init__(self):
    if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature) or self.temperature <= 0:
      raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
    if not isinstance(self.alpha, int | float) or not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
    for name in ("hidden_weight", "attention_weight"):
      value = getattr(self, name)
      if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if self.layer_map is not None:
      object.__setattr__(self, "layer_map", tuple(int(i) for i in self.layer_map))

  @property
  def needs_teacher_internals(self) -> bool:
    return self.hidden_weight > 0 or self.attention_weight > 0


class TeacherBatch(NamedTuple):
  """A `Batch` with the teacher's precomputed logits ``[B, S, C]``; reads like a `Batch` to the train step."""

  batch: Batch
  teacher_logits: Any

  input_ids = property(lambda self: self.batch.input_ids)
  segment_ids = property(lambda self: self.batch.segment_ids)
  position_ids = property(lambda self: self.batch.position_ids)
  labels = property(lambda self: self.batch.labels)
  cls_positions = property(lambda self: self.batch.cls_positions)
  example_mask = property(lambda self: self.batch.example_mask)


# ---------------------------------------------------------------------------------------------------------- losses


def soft_target_loss(student_logits, teacher_logits, temperature: float) -> jax.Array:
  """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per example (last axis: classes), float32.

  Example:
    >>> kd_BxS = soft_target_loss(student_BxSxC, teacher_BxSxC, temperature=2.0)  # doctest: +SKIP
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  logq = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  return temperature**2 * optax.losses.kl_divergence_with_log_targets(logq, logp)


def _token_weights(segment_ids_BxL):
  """(1 / length of the token's example, 0 on padding) and the same-example mask ``[B, L, L]``."""
  seg_BxL = segment_ids_BxL
  same_BxLxL = (seg_BxL[:, :, None] == seg_BxL[:, None, :]) & (seg_BxL[:, None, :] > 0)
  length_BxL = same_BxLxL.sum(-1).astype(jnp.float32)
  return jnp.where(seg_BxL > 0, 1.0 / jnp.maximum(length_BxL, 1.0), 0.0), same_BxLxL


def hidden_state_loss(student_BxLxD, teacher_BxLxE, segment_ids_BxL, projection_DxE=None) -> jax.Array:
  """Sum over the batch's examples of each example's mean (over its tokens and features) squared error.

  Args:
    student_BxLxD: a student layer's output.
    teacher_BxLxE: the matched teacher layer's output.
    segment_ids_BxL: 0 for padding, one id per example in a row (packed or not).
    projection_DxE: maps the student's width to the teacher's; required when D != E.

  Returns:
    A float32 scalar; divide by the number of examples for the mean.
  """
  s = student_BxLxD.astype(jnp.float32)
  if projection_DxE is not None:
    s = s @ projection_DxE.astype(jnp.float32)
  if s.shape != teacher_BxLxE.shape:
    raise ValueError(f"student hidden states {s.shape} do not match the teacher's {teacher_BxLxE.shape}")
  mse_BxL = jnp.mean((s - teacher_BxLxE.astype(jnp.float32)) ** 2, axis=-1)
  weight_BxL, _ = _token_weights(segment_ids_BxL)
  return jnp.sum(mse_BxL * weight_BxL)


def attention_probs(q_BxLxD, k_BxLxD, segment_ids_BxL, num_heads: int) -> jax.Array:
  """Softmax attention distributions ``[B, H, L, L]`` (float32) within each example, from query/key projections."""
  b, length, d = q_BxLxD.shape
  q_BxLxHxK = q_BxLxD.astype(jnp.float32).reshape(b, length, num_heads, d // num_heads)
  k_BxLxHxK = k_BxLxD.astype(jnp.float32).reshape(b, length, num_heads, d // num_heads)
  scores_BxHxLxL = jnp.einsum("bqhk,bthk->bhqt", q_BxLxHxK, k_BxLxHxK) / math.sqrt(d // num_heads)
  _, same_BxLxL = _token_weights(segment_ids_BxL)
  return jax.nn.softmax(jnp.where(same_BxLxL[:, None], scores_BxHxLxL, -1e30), axis=-1)


def attention_map_loss(student_probs_BxHxLxL, teacher_probs_BxHxLxL, segment_ids_BxL) -> jax.Array:
  """Sum over examples of the mean (over heads and the example's query tokens) KL(teacher || student)."""
  p, q = teacher_probs_BxHxLxL, student_probs_BxHxLxL
  kl_BxHxL = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.maximum(p, 1e-30)) - jnp.log(jnp.maximum(q, 1e-30))), 0), -1)
  weight_BxL, _ = _token_weights(segment_ids_BxL)
  return jnp.sum(kl_BxHxL.mean(axis=1) * weight_BxL)


# ---------------------------------------------------------------------------------------------- models and checks


def _capture(mdl: nn.Module, method: str) -> bool:
  return method == "__call__" and (mdl.name or "").startswith(("embeddings", "encoder_layer_", "query", "key"))


def _forward(model, params, batch, *, internals: bool, deterministic: bool, rng=None):
  """Logits ``[B, S, C]`` and, when asked, hidden states (embeddings first) and per-layer (q, k) projections."""
  kwargs = dict(
    segment_ids=batch.segment_ids,
    position_ids=batch.position_ids,
    cls_positions=batch.cls_positions,
    deterministic=deterministic,
    rngs=None if deterministic else {"dropout": rng},
  )
  if not internals:
    return model.apply({"params": params}, batch.input_ids, **kwargs), None, None
  logits, state = model.apply(
    {"params": params}, batch.input_ids, capture_intermediates=_capture, mutable=["intermediates"], **kwargs
  )
  tree = state["intermediates"]["bert"]
  layers = [tree[f"encoder_layer_{i}"] for i in range(model.config.num_hidden_layers)]
  hidden = [tree["embeddings"]["__call__"][0]] + [layer["__call__"][0] for layer in layers]
  qk = [(layer["query"]["__call__"][0], layer["key"]["__call__"][0]) for layer in layers]
  return logits, hidden, qk


def _layer_map(config: DistillConfig, student: BertConfig, teacher: BertConfig) -> tuple[int, ...]:
  m, n = student.num_hidden_layers, teacher.num_hidden_layers
  layer_map = config.layer_map or tuple((i + 1) * n // m - 1 for i in range(m))
  if len(layer_map) != m or any(not 0 <= t < n for t in layer_map):
    raise ValueError(f"layer_map {layer_map} must give one teacher layer in [0, {n}) per student layer ({m})")
  return layer_map


def check_compatible(student_model: nn.Module, teacher_model: nn.Module, config: DistillConfig) -> None:
  """Raises ValueError when the teacher cannot teach the student: vocabularies, label counts, heads, layer map."""
  s, t = student_model.config, teacher_model.config
  if s.vocab_size != t.vocab_size:
    raise ValueError(
      f"teacher and student vocabularies differ ({t.vocab_size} vs {s.vocab_size} tokens): both must read the same "
      "token ids, so use the teacher's tokenizer and vocab_size for the student"
    )
  s_labels, t_labels = getattr(student_model, "num_labels", None), getattr(teacher_model, "num_labels", None)
  if s_labels != t_labels:
    raise ValueError(f"teacher and student label counts differ ({t_labels} vs {s_labels})")
  if config.attention_weight > 0 and s.num_attention_heads != t.num_attention_heads:
    raise ValueError(
      f"attention-map matching needs equal head counts (teacher {t.num_attention_heads}, student "
      f"{s.num_attention_heads})"
    )
  if config.needs_teacher_internals:
    _layer_map(config, s, t)


# --------------------------------------------------------------------------------------------------- loss and step


def split_params(params) -> tuple[dict, dict | None]:
  """(student params, hidden-state projection or None) from a distillation state's params."""
  if isinstance(params, dict) and set(params) == {"student", "projection"}:
    return params["student"], params["projection"]
  return params, None


def distill_params(student_params, student: BertConfig, teacher: BertConfig, config: DistillConfig, rng=None):
  """The trainable tree: the student's params, plus a learnt width projection when hidden widths differ.

  Returns:
    ``student_params`` itself, or ``{"student": ..., "projection": {"kernel": [D_s, D_t]}}`` (unwrap with
    `split_params`; export ``split_params(state.params)[0]``).
  """
  if config.hidden_weight == 0 or student.hidden_size == teacher.hidden_size:
    return student_params
  rng = jax.random.key(0) if rng is None else rng
  kernel = jax.random.normal(rng, (student.hidden_size, teacher.hidden_size)) / math.sqrt(student.hidden_size)
  return {"student": student_params, "projection": {"kernel": kernel}}


def distillation_loss(
  student_model: nn.Module, teacher_model: nn.Module | None, config: DistillConfig, teacher_params=None
) -> train.LossFn:
  """The loss ``(params, batch, rng, deterministic) -> (loss, aux)`` for `jfast.train._train_step`.

  ``batch`` is a `Batch` (the teacher runs here on ``teacher_params``, deterministic, without gradients) or a
  `TeacherBatch` (precomputed logits). ``aux`` holds additive sums: ``loss_sum``, ``correct``, ``examples``,
  ``tokens``, ``kd_sum``, ``ce_sum``, ``hidden_sum``, ``attention_sum`` and ``agree`` (argmax equals the teacher's).
  """
  internals = config.needs_teacher_internals

  def loss_fn(params, batch, rng, deterministic):
    student_params, projection = split_params(params)
    if isinstance(batch, TeacherBatch):
      if internals:
        raise ValueError("hidden-state or attention matching needs the teacher's forward pass, not precomputed logits")
      t_logits, t_hidden, t_qk = batch.teacher_logits, None, None
    else:
      if teacher_params is None:
        raise ValueError("give the teacher's params to the step, or stream TeacherBatch(batch, teacher_logits)")
      t_logits, t_hidden, t_qk = jax.lax.stop_gradient(
        _forward(teacher_model, teacher_params, batch, internals=internals, deterministic=True)
      )
    s_logits, s_hidden, s_qk = _forward(
      student_model, student_params, batch, internals=internals, deterministic=deterministic, rng=rng
    )
    if t_logits.shape != s_logits.shape:
      raise ValueError(f"teacher logits {t_logits.shape} do not match the student's {s_logits.shape}")
    mask_BxS = batch.example_mask.astype(jnp.float32)
    logp_BxSxC = jax.nn.log_softmax(s_logits.astype(jnp.float32), axis=-1)
    ce_sum = -jnp.sum(jnp.take_along_axis(logp_BxSxC, batch.labels[..., None], axis=-1)[..., 0] * mask_BxS)
    kd_sum = jnp.sum(soft_target_loss(s_logits, t_logits, config.temperature) * mask_BxS)
    hidden_sum = attention_sum = jnp.zeros((), jnp.float32)
    if internals:
      layer_map = _layer_map(config, student_model.config, teacher_model.config)
      pairs = [(i + 1, t + 1) for i, t in enumerate(layer_map)]
      if config.match_embeddings:
        pairs = [(0, 0), *pairs]
      kernel = None if projection is None else projection["kernel"]
      if config.hidden_weight > 0:
        terms = [hidden_state_loss(s_hidden[i], t_hidden[j], batch.segment_ids, kernel) for i, j in pairs]
        hidden_sum = sum(terms) / len(terms)
      if config.attention_weight > 0:
        terms = []
        for i, t in enumerate(layer_map):
          # Head counts from the projections' widths: a pruned model's layers may differ from the config's count.
          s_heads = s_qk[i][0].shape[-1] // student_model.config.head_dim
          t_heads = t_qk[t][0].shape[-1] // teacher_model.config.head_dim
          if s_heads != t_heads:
            raise ValueError(
              f"attention-map matching: student layer {i} has {s_heads} heads, teacher layer {t} {t_heads}"
            )
          s_probs = attention_probs(*s_qk[i], batch.segment_ids, s_heads)
          terms.append(
            attention_map_loss(s_probs, attention_probs(*t_qk[t], batch.segment_ids, t_heads), batch.segment_ids)
          )
        attention_sum = sum(terms) / len(terms)
    loss_sum = (
      config.alpha * kd_sum
      + (1.0 - config.alpha) * ce_sum
      + config.hidden_weight * hidden_sum
      + config.attention_weight * attention_sum
    )
    examples = mask_BxS.sum()
    prediction_BxS = jnp.argmax(s_logits, -1)
    aux = {
      "loss_sum": loss_sum,
      "correct": jnp.sum((prediction_BxS == batch.labels) * mask_BxS),
      "examples": examples,
      "tokens": (batch.segment_ids > 0).sum().astype(jnp.float32),
      "kd_sum": kd_sum,
      "ce_sum": ce_sum,
      "hidden_sum": hidden_sum,
      "attention_sum": attention_sum,
      "agree": jnp.sum((prediction_BxS == jnp.argmax(t_logits, -1)) * mask_BxS),
    }
    return loss_sum / jnp.maximum(examples, 1.0), aux

  return loss_fn


def _distill_step(state, teacher_params, batch, *, student_model, teacher_model, config, teacher_policy, **kwargs):
  if teacher_params is not None and teacher_policy is not None:
    teacher_params = teacher_policy.cast_to_param(teacher_params)
  loss_fn = distillation_loss(student_model, teacher_model, config, teacher_params)
  return train._train_step(state, batch, loss_fn=loss_fn, **kwargs)


def make_distill_step(
  student_model: nn.Module,
  teacher_model: nn.Module | None = None,
  config: DistillConfig | None = None,
  *,
  policy: str | Policy | None = None,
  teacher_policy: str | Policy | None = None,
  micro_batches: int = 1,
  freeze_mask=None,
  donate: bool = True,
  mesh=None,
  rules=None,
) -> train.CompiledStep:
  """Builds the jitted distillation step ``(state, teacher_params, batch) -> (state, metrics)``.

  The teacher's forward pass runs inside the step on ``teacher_params`` (a jit argument: one executable serves any
  teacher weights, and no gradient is taken with respect to them). Pass ``teacher_params=None`` and a `TeacherBatch`
  to stream precomputed logits instead. Everything else is `jfast.train.make_train_step`'s step.

  Args:
    student_model: the `BertForSequenceClassification` being trained (``state.params`` are its params, see
      `distill_params`).
    teacher_model: the teacher module; None when only precomputed logits are streamed.
    config: the `DistillConfig` (default: T=2, alpha=0.5, logits only).
    policy: the student's precision policy, as in `make_train_step`.
    teacher_policy: the teacher's policy (e.g. ``bf16``): its compute dtype is set on the teacher's config and its
      params are cast to the policy's param dtype inside the step (``pure-bf16`` halves their memory traffic).
    micro_batches: in-step gradient accumulation; the teacher runs per micro-batch too.
    freeze_mask: frozen student parameters (`jfast.freezing.freeze_mask` on ``state.params``).
    donate: donate the input state's buffers.
    mesh: a `jfast.sharding.make_mesh` mesh: the student state and the teacher's params are sharded by ``rules``
      and the batch rows over data x fsdp (as `jfast.train.make_train_step` does). None: one device.
    rules: `jfast.sharding.ShardingRules` (default: the library's table).

  Returns:
    A `CompiledStep`.

  Example:
    >>> s_cfg, s_params = student_from_teacher(t_cfg, t_params, layers="every_other")  # doctest: +SKIP
    >>> student = BertForSequenceClassification(s_cfg, num_labels=2)  # doctest: +SKIP
    >>> step = make_distill_step(student, teacher, DistillConfig(temperature=2.0, alpha=0.5))  # doctest: +SKIP
    >>> state, metrics = step(state, t_params, batch)  # doctest: +SKIP
  """
  config = DistillConfig() if config is None else config
  teacher_policy = None if teacher_policy is None else get_policy(teacher_policy)
  if teacher_model is not None:
    check_compatible(student_model, teacher_model, config)
    if teacher_policy is not None:
      teacher_model = teacher_model.clone(config=teacher_policy.configure(teacher_model.config))
  elif config.needs_teacher_internals:
    raise ValueError("hidden-state or attention matching needs a teacher_model (not only precomputed logits)")
  if not isinstance(micro_batches, int) or micro_batches < 1:
    raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}")
  step = functools.partial(
    _distill_step,
    student_model=student_model,
    teacher_model=teacher_model,
    config=config,
    teacher_policy=teacher_policy,
    policy=None if policy is None else get_policy(policy),
    micro_batches=micro_batches,
    freeze_mask=freeze_mask,
  )
  jit_kwargs = {"donate_argnames": ("state",)} if donate else {}
  # With a mesh, the state and the teacher's params are laid out by the same path rules as any train step.
  return train.CompiledStep(step, mesh=mesh, rules=rules, **jit_kwargs)


def precompute_teacher_logits(
  teacher_model: nn.Module, teacher_params, batches: Sequence[Batch], *, policy: str | Policy | None = None
) -> list[TeacherBatch]:
  """Runs the teacher once over ``batches`` (deterministic) and pairs each with its logits, for streaming."""
  if policy is not None:
    policy = get_policy(policy)
    teacher_model = teacher_model.clone(config=policy.configure(teacher_model.config))
    teacher_params = policy.cast_to_param(teacher_params)
  forward = jax.jit(lambda p, b: _forward(teacher_model, p, b, internals=False, deterministic=True)[0])
  return [TeacherBatch(b, np.asarray(forward(teacher_params, b))) for b in batches]


# ------------------------------------------------------------------------------------------------- student building


def _check_params(config: BertConfig, encoder_params) -> None:
  ids = jnp.zeros((1, 1), jnp.int32)
  expected = jax.eval_shape(lambda: BertModel(config).init(jax.random.key(0), ids))["params"]
  got = jax.tree.map(lambda x: tuple(np.shape(x)), encoder_params)
  want = jax.tree.map(lambda s: tuple(s.shape), expected)
  if got != want:
    raise ValueError("teacher params do not match the teacher config (layer count, widths or names differ)")


def student_from_teacher(
  teacher_config: BertConfig, teacher_params: dict, layers: str | Sequence[int] = "every_other"
) -> tuple[BertConfig, dict]:
  """Builds a shallower student by copying some of the teacher's layers (DistilBERT's initialisation).

  Embeddings, pooler and classifier head (when present) are copied too; weights are copies, not views.

  Args:
    teacher_config: the teacher's config.
    teacher_params: `BertForSequenceClassification` params (``{"bert", "classifier"}``) or bare `BertModel` params;
      pruned weights are fine as long as their shapes match ``teacher_config``.
    layers: ``"every_other"`` (teacher layers 0, 2, 4, ...) or the teacher layer indices to keep, in student order.

  Returns:
    ``(student_config, student_params)`` in the structure ``teacher_params`` had.

  Example:
    >>> s_cfg, s_params = student_from_teacher(t_cfg, t_params, layers=(0, 3))  # doctest: +SKIP
    >>> s_cfg.num_hidden_layers  # doctest: +SKIP
    2
  """
  n = teacher_config.num_hidden_layers
  if isinstance(layers, str):
    if layers != "every_other":
      raise ValueError(f"layers must be 'every_other' or a sequence of layer indices, got {layers!r}")
    layers = tuple(range(0, n, 2))
  layers = tuple(layers)
  if not layers or any(not isinstance(i, int | np.integer) or not 0 <= i < n for i in layers):
    raise ValueError(f"layers {layers} must be a non-empty sequence of teacher layer indices in [0, {n})")
  has_head = "classifier" in teacher_params
  encoder = teacher_params["bert"] if has_head else teacher_params
  _check_params(teacher_config, encoder)
  copy = functools.partial(jax.tree.map, lambda x: np.array(x, copy=True))
  student = {k: copy(v) for k, v in encoder.items() if not k.startswith("encoder_layer_")}
  for j, i in enumerate(layers):
    student[f"encoder_layer_{j}"] = copy(encoder[f"encoder_layer_{i}"])
  # A structurally pruned teacher has per-layer sizes: the student keeps those of the layers it copies.
  per_layer = {
    name: tuple(getattr(teacher_config, name)[i] for i in layers)
    for name in ("layer_num_heads", "layer_intermediate_sizes")
    if getattr(teacher_config, name, None) is not None
  }
  config = teacher_config.replace(num_hidden_layers=len(layers), **per_layer)
  if has_head:
    return config, {"bert": student, "classifier": copy(teacher_params["classifier"])}
  return config, student


def fresh_student(teacher_config: BertConfig, num_labels: int, rng, **changes) -> tuple[BertConfig, dict]:
  """A randomly initialised smaller classifier that reads the teacher's tokens (same vocabulary).

  Args:
    teacher_config: the teacher's config; ``changes`` override its sizes (``num_hidden_layers``, ``hidden_size``,
      ``num_attention_heads``, ``intermediate_size``...).
    num_labels: the teacher's label count.
    rng: a JAX key.

  Returns:
    ``(student_config, student_params)`` for `BertForSequenceClassification`.
  """
  if "vocab_size" in changes and changes["vocab_size"] != teacher_config.vocab_size:
    raise ValueError("a student must keep the teacher's vocabulary (vocab_size) to learn from its outputs")
  config = teacher_config.replace(**changes)
  model = BertForSequenceClassification(config, num_labels=num_labels)
  params = jax.jit(model.init)(rng, jnp.zeros((1, 1), jnp.int32))["params"]
  return config, params


def num_params(params) -> int:
  """Number of scalar parameters in a tree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))
