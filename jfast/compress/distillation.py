"""Knowledge distillation: a student trained on a teacher's soft targets (and hidden states) in one jitted step.

`distillation_loss` is a loss with the teacher's forward pass inside, and `make_distill_step` is
`jfast.training.make_train_step` of it: the same step runs (precision checks, loss scaling, in-step accumulation,
freezing, a mesh), and the teacher's parameters are a step *input*, never differentiated and never baked into the
executable as constants. `jfast.training.fit(..., loss=lambda m: distillation_loss(m, teacher, config),
inputs=(teacher_params,))` trains with it in the generic loop. The
teacher may run in its own precision policy (bf16) while the student trains in another, or its logits may be
precomputed once and streamed with the batch (`TeacherBatch`) when the teacher is too large to run per step.

Every loss term is a per-example quantity summed over real examples, like `classification_loss`, so micro-batch
accumulation and packed rows give exactly the full batch's loss. Hidden states and the query/key projections for
attention maps are read with Flax's ``capture_intermediates`` (module outputs), so the models need no extra outputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jfast.data.batch import Batch
from jfast.models.bert import BertConfig
from jfast.nn.scan import unrolled
from jfast.precision.policy import Policy, get_policy
from jfast.training.losses import (
  attention_map_loss,
  attention_probs,
  classifier_logits,
  cross_entropy,
  hidden_state_loss,
  lm_logits,
  loss_sums,
  soft_target_loss,
)
from jfast.training.step import CompiledStep, LossFn, make_train_step

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


# ---------------------------------------------------------------------------------------------- models and checks


def _capture(mdl: nn.Module, method: str) -> bool:
  return method == "__call__" and (mdl.name or "").startswith(("embeddings", "encoder_layer_", "query", "key"))


def _forward(model, params, batch, *, internals: bool, deterministic: bool, rng=None):
  """Logits ``[B, S, C]`` and, when asked, hidden states (embeddings first) and per-layer (q, k) projections."""
  kwargs = dict(deterministic=deterministic, rng=rng)
  if not internals:
    return classifier_logits(model, params, batch, **kwargs), None, None
  if getattr(model, "last_layer_pooled_only", False):
    model = model.clone(last_layer_pooled_only=False)  # the losses read every row of the last layer
  if model.config.fuse_qkv:
    model = model.clone(config=model.config.replace(fuse_qkv=False))  # query and key outputs are captured apart
  model, params = unrolled(model, params)  # each layer's output and projections captured under its own name
  logits, state = classifier_logits(
    model, params, batch, capture_intermediates=_capture, mutable=["intermediates"], **kwargs
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
  student_model: nn.Module,
  teacher_model: nn.Module | None,
  config: DistillConfig | None = None,
  *,
  teacher_policy: str | Policy | None = None,
) -> LossFn:
  """The loss ``(params, batch, rng, deterministic, teacher_params) -> (loss, aux)`` of `make_distill_step`.

  ``batch`` is a `Batch` (the teacher runs here on ``teacher_params``, deterministic, without gradients) or a
  `TeacherBatch` (precomputed logits; ``teacher_params`` None). ``aux`` holds additive sums: ``loss_sum``,
  ``correct``, ``examples``, ``tokens``, ``kd_sum``, ``ce_sum``, ``hidden_sum``, ``attention_sum`` and ``agree``
  (argmax equals the teacher's). ``teacher_policy`` (e.g. ``bf16``) sets the teacher's compute dtype and casts its
  parameters to the policy's param dtype inside the step (``pure-bf16`` halves their memory traffic).

  Example:
    >>> loss = distillation_loss(student, teacher, DistillConfig(alpha=0.5))  # doctest: +SKIP
    >>> result = fit(student, params, tx_factory, batches, dev, loss=lambda m: loss, inputs=(t_params,),
    ...              eval_loss=classification_loss)  # doctest: +SKIP
  """
  config = DistillConfig() if config is None else config
  teacher_policy = None if teacher_policy is None else get_policy(teacher_policy)
  if teacher_model is not None:
    check_compatible(student_model, teacher_model, config)
    if teacher_policy is not None:
      teacher_model = teacher_model.clone(config=teacher_policy.configure(teacher_model.config))
  elif config.needs_teacher_internals:
    raise ValueError("hidden-state or attention matching needs a teacher_model (not only precomputed logits)")
  internals = config.needs_teacher_internals

  def loss_fn(params, batch, rng, deterministic, teacher_params=None):
    student_params, projection = split_params(params)
    if teacher_params is not None and teacher_policy is not None:
      teacher_params = teacher_policy.cast_to_param(teacher_params)
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
    prediction_BxS = jnp.argmax(s_logits, -1)
    sums = loss_sums(
      cross_entropy(s_logits, batch.labels), prediction_BxS == batch.labels, mask_BxS, batch.segment_ids
    )
    ce_sum = sums["loss_sum"]
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
    aux = {
      **sums,
      "loss_sum": loss_sum,
      "kd_sum": kd_sum,
      "ce_sum": ce_sum,
      "hidden_sum": hidden_sum,
      "attention_sum": attention_sum,
      "agree": jnp.sum((prediction_BxS == jnp.argmax(t_logits, -1)) * mask_BxS),
    }
    return loss_sum / jnp.maximum(sums["examples"], 1.0), aux

  return loss_fn


def causal_lm_distillation_loss(
  student_model: nn.Module,
  teacher_model: nn.Module,
  config: DistillConfig | None = None,
  *,
  teacher_policy: str | Policy | None = None,
) -> LossFn:
  """Distillation of a causal LM (Llama, GPT): ``alpha * T^2 * KL + (1 - alpha) * CE`` per real next-token target.

  Every real target of an `jfast.data.LMBatch` is one example: the loss is summed over them and divided by their
  count, as `jfast.training.causal_lm_loss` is, so packed rows and micro-batches give the whole batch's loss. The
  teacher runs on ``teacher_params`` (the step's extra input) without gradients; it may be larger (more layers,
  wider, more heads) as long as it reads the same vocabulary. Hidden-state and attention-map terms are BERT's only.

  Example:
    >>> loss = causal_lm_distillation_loss(Llama(small), Llama(large), DistillConfig(temperature=2.0))  # doctest: +SKIP
    >>> step = make_train_step(loss)  # then step(state, teacher_params, batch)  # doctest: +SKIP
  """
  config = DistillConfig() if config is None else config
  if config.needs_teacher_internals:
    raise ValueError("hidden-state and attention-map matching are implemented for BERT; a causal LM distils logits")
  check_compatible(student_model, teacher_model, config)
  teacher_policy = None if teacher_policy is None else get_policy(teacher_policy)
  if teacher_policy is not None:
    teacher_model = teacher_model.clone(config=teacher_policy.configure(teacher_model.config))

  def loss_fn(params, batch, rng, deterministic, teacher_params=None):
    if teacher_params is None:
      raise ValueError("give the teacher's params to the step: step(state, teacher_params, batch)")
    if teacher_policy is not None:
      teacher_params = teacher_policy.cast_to_param(teacher_params)
    t_logits = jax.lax.stop_gradient(lm_logits(teacher_model, teacher_params, batch))
    s_logits = lm_logits(student_model, params, batch, deterministic=deterministic, rng=rng)
    mask_BxL = batch.example_mask.astype(jnp.float32)
    prediction_BxL = jnp.argmax(s_logits, -1)
    sums = loss_sums(
      cross_entropy(s_logits, batch.labels), prediction_BxL == batch.labels, mask_BxL, batch.segment_ids
    )
    kd_sum = jnp.sum(soft_target_loss(s_logits, t_logits, config.temperature) * mask_BxL)
    loss_sum = config.alpha * kd_sum + (1.0 - config.alpha) * sums["loss_sum"]
    aux = {
      **sums,
      "loss_sum": loss_sum,
      "kd_sum": kd_sum,
      "ce_sum": sums["loss_sum"],
      "agree": jnp.sum((prediction_BxL == jnp.argmax(t_logits, -1)) * mask_BxL),
    }
    return loss_sum / jnp.maximum(sums["examples"], 1.0), aux

  return loss_fn


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
) -> CompiledStep:
  """Builds the jitted distillation step ``(state, teacher_params, batch) -> (state, metrics)``.

  The teacher's forward pass runs inside the step on ``teacher_params`` (a jit argument: one executable serves any
  teacher weights, and no gradient is taken with respect to them). Pass ``teacher_params=None`` and a `TeacherBatch`
  to stream precomputed logits instead. Everything else is `jfast.training.make_train_step`'s step.

  Args:
    student_model: the `BertForSequenceClassification` being trained (``state.params`` are its params, see
      `distill_params`), or a causal LM (`jfast.models.Llama`, `GPT`) trained on `jfast.data.LMBatch` rows with
      `causal_lm_distillation_loss`.
    teacher_model: the teacher module; None when only precomputed logits are streamed.
    config: the `DistillConfig` (default: T=2, alpha=0.5, logits only).
    policy: the student's precision policy, as in `make_train_step`.
    teacher_policy: the teacher's policy (e.g. ``bf16``): its compute dtype is set on the teacher's config and its
      params are cast to the policy's param dtype inside the step (``pure-bf16`` halves their memory traffic).
    micro_batches: in-step gradient accumulation; the teacher runs per micro-batch too.
    freeze_mask: frozen student parameters (`jfast.optim.freeze_mask` on ``state.params``).
    donate: donate the input state's buffers.
    mesh: a `jfast.parallel.make_mesh` mesh: the student state and the teacher's params are sharded by ``rules``
      and the batch rows over data x fsdp (as `jfast.training.make_train_step` does). None: one device.
    rules: `jfast.parallel.ShardingRules` (default: the library's table).

  Returns:
    A `CompiledStep`.

  Example:
    >>> s_cfg, s_params = student_from_teacher(t_cfg, t_params, layers="every_other")  # doctest: +SKIP
    >>> student = BertForSequenceClassification(s_cfg, num_labels=2)  # doctest: +SKIP
    >>> step = make_distill_step(student, teacher, DistillConfig(temperature=2.0, alpha=0.5))  # doctest: +SKIP
    >>> state, metrics = step(state, t_params, batch)  # doctest: +SKIP
  """
  if isinstance(getattr(student_model, "config", None), BertConfig):
    loss_fn = distillation_loss(student_model, teacher_model, config, teacher_policy=teacher_policy)
  elif teacher_model is None:
    raise ValueError("a causal LM student distils from a teacher run in the step: give teacher_model")
  else:  # a causal LM (Llama, GPT) distils on next-token targets
    loss_fn = causal_lm_distillation_loss(student_model, teacher_model, config, teacher_policy=teacher_policy)
  return make_train_step(
    loss_fn, policy=policy, micro_batches=micro_batches, freeze_mask=freeze_mask, donate=donate, mesh=mesh, rules=rules
  )


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
