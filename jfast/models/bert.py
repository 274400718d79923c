"""A Flax Linen BERT encoder (post-LN, as the original and Hugging Face's) with a classification head.

Parameter names follow Hugging Face's modules closely (``embeddings``, ``encoder/layer_i``, ``pooler``), so
`jfast.models.bert_io` maps weights with a short table and no guessing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from jfast.nn.activations import ACTIVATIONS
from jfast.nn.attention import Attention
from jfast.nn.attention_config import AttentionConfig
from jfast.nn.dropout import Dropout
from jfast.nn.fused import fused_projections
from jfast.nn.layers import DTYPES, dense, layer_norm
from jfast.nn.quant_dense import QUANTIZED_LAYERS, QuantDense, check_mode
from jfast.nn.remat import remat_layer, remat_policy
from jfast.nn.scan import scan_layers


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes and switches of a BERT encoder. Field names match Hugging Face's ``config.json``.

  Attributes:
    dtype: compute dtype of matmuls and activations (``float32``, ``bfloat16``, ``float16``); layer-norm
      statistics, softmax and losses stay float32. Parameters are used in whatever dtype they are passed in
      (`jfast.precision.Policy` decides: float32 master weights, or bf16 under ``pure-bf16``). Traced for the CPU,
      half-precision layers run `jfast.cpu`'s products; for a GPU or TPU, stock ``nn.Dense`` (`jfast.nn.dense`).
    attention: which attention kernel runs (see `AttentionConfig`).
    remat_policy: a key of `jfast.nn.REMAT_POLICIES`; ``none`` keeps every activation.
    layer_num_heads: per-layer head counts of a structurally pruned model (`jfast.compress.shrink`); each layer
      keeps ``head_dim = hidden_size // num_attention_heads``. None: every layer has ``num_attention_heads``.
    layer_intermediate_sizes: per-layer FFN widths of a pruned model. None: every layer has ``intermediate_size``.
    quantization: ``none``, or how the encoder's six projections run (`jfast.nn.QuantDense`): ``int8`` (int8
      weights, per-token activation scales), ``int8-static`` (calibrated activation scales), ``qat`` (float weights,
      fake quantization for quantization-aware fine-tuning).
    fuse_qkv: run the query, key and value projections of one input as one product against their kernels side by
      side per head (the parameters stay three Dense layers, as in Hugging Face's layout; no extra communication
      under tensor parallelism): one larger product, and one product each for the input and the weight gradient
      instead of three. Off by default: level with three products on the 2-core CPU (docs/foundation.md);
      unmeasured on GPUs. Quantized layers (``quantization`` other than ``none``) always run apart.
    scan_layers: run the identical layers 0..N-2 as one ``nn.scan`` over stacked parameters (`jfast.nn.scan`):
      one compiled layer body whatever the depth. The last layer stays outside the scan (a classifier runs it at
      the [CLS] rows only), and a model whose layers differ (``layer_num_heads``, ``layer_intermediate_sizes``)
      or hold int8 weights (``quantization`` ``int8``/``int8-static``) always unrolls; ``scanned`` says which
      applies. False unrolls every layer (per-layer parameters ``encoder_layer_i``; `jfast.nn.unstack_layers`
      converts).
    scan_unroll: layers per iteration of the scan. 1 compiles one layer; more trade compile time for step time
      where the loop costs: XLA:CPU zero-fills the scan's stacked activation buffers every step (6.4% of the
      MiniLM-width fp32 step on a 2-core AVX2 CPU; `benchmarks.compile_depth`), which straight-line code avoids.
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0
  dtype: str = "float32"
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
  remat_policy: str = "none"
  layer_num_heads: tuple[int, ...] | None = None
  layer_intermediate_sizes: tuple[int, ...] | None = None
  quantization: str = "none"
  fuse_qkv: bool = False
  scan_layers: bool = True
  scan_unroll: int = 1

  def __post_init__(self):
    if self.scan_unroll < 1:
      raise ValueError(f"scan_unroll must be >= 1 (layers per loop iteration), got {self.scan_unroll}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
    if self.dtype not in DTYPES:
      raise ValueError(f"unsupported dtype {self.dtype!r}; expected one of {sorted(DTYPES)}")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    remat_policy(self.remat_policy)
    check_mode(self.quantization)
    for name, limit in (("layer_num_heads", self.num_attention_heads), ("layer_intermediate_sizes", None)):
      sizes = getattr(self, name)
      if sizes is None:
        continue
      object.__setattr__(self, name, tuple(int(s) for s in sizes))  # a JSON list stays hashable as a config
      if len(sizes) != self.num_hidden_layers:
        raise ValueError(f"{name} has {len(sizes)} entries for {self.num_hidden_layers} layers")
      if any(s < 1 or (limit is not None and s > limit) for s in sizes):
        bound = f"1..{limit}" if limit else ">= 1"
        raise ValueError(f"{name} entries must be {bound} (a layer cannot lose all its heads/neurons), got {sizes}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @property
  def scanned(self) -> bool:
    """Whether layers run under `nn.scan`: asked for, and the layers are identical."""
    uniform = self.layer_num_heads is None and self.layer_intermediate_sizes is None
    return self.scan_layers and uniform and self.quantization in ("none", "qat") and self.num_hidden_layers > 1

  @property
  def stacked_layers(self) -> int:
    """Layers held stacked under `layer_group` (0..K-1): all but the last when scanned, else none."""
    return self.num_hidden_layers - 1 if self.scanned else 0

  layer_group = "encoder_layers"

  def layer_sizes(self, index: int) -> tuple[int, int]:
    """``(heads, intermediate_size)`` of encoder layer ``index``."""
    heads = self.num_attention_heads if self.layer_num_heads is None else self.layer_num_heads[index]
    ffn = self.intermediate_size if self.layer_intermediate_sizes is None else self.layer_intermediate_sizes[index]
    return heads, ffn

  def replace(self, **changes) -> BertConfig:
    return dataclasses.replace(self, **changes)


def _dense(config: BertConfig, features: int, name: str) -> nn.Module:
  init = nn.initializers.normal(config.initializer_range)
  if config.quantization != "none" and name in QUANTIZED_LAYERS:
    return QuantDense(features, config.quantization, config.compute_dtype, init, name=name)
  return dense(features, config.compute_dtype, init, name=name)


def _layer_norm(config: BertConfig, name: str) -> nn.Module:
  return layer_norm(config.layer_norm_eps, config.compute_dtype, name=name)


class BertEmbeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids_BxL, token_type_ids_BxL, position_ids_BxL, *, deterministic: bool):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    words = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word_embeddings")
    positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, name="position_embeddings")
    types = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, name="token_type_embeddings")
    # Summed in float32 whatever the table dtype (bf16 tables under pure-bf16): the norm that follows rounds once.
    x_BxLxD = sum(
      emb(ids).astype(jnp.float32)
      for emb, ids in ((words, input_ids_BxL), (positions, position_ids_BxL), (types, token_type_ids_BxL))
    )
    x_BxLxD = _layer_norm(cfg, "LayerNorm")(x_BxLxD)
    return Dropout(cfg.hidden_dropout_prob)(x_BxLxD, deterministic=deterministic)


class BertLayer(nn.Module):
  config: BertConfig
  index: int = 0  # which encoder layer: picks its sizes when pruning made them differ
  scanned: bool = False  # under nn.scan: returns (output, None), the output being the next layer's input

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, deterministic: bool, query_positions_BxS=None):
    """The layer's output ``[B, L, D]``; with ``query_positions_BxS``, only those positions' rows ``[B, S, D]``.

    Keys and values always cover the whole row; the query, the attention output, the FFN and both norms then run
    on the ``S`` rows only (a classifier's last layer needs nothing else).
    """
    cfg = self.config
    batch, length, _ = x_BxLxD.shape
    (heads, ffn), head_dim = cfg.layer_sizes(self.index), cfg.head_dim

    def project(names, x_BxTxD):
      if cfg.fuse_qkv and cfg.quantization == "none":
        init = nn.initializers.normal(cfg.initializer_range)
        ys = fused_projections(x_BxTxD, names, heads, head_dim, init, cfg.compute_dtype)
      else:
        ys = [_dense(cfg, heads * head_dim, name)(x_BxTxD).reshape(batch, -1, heads, head_dim) for name in names]
      return [checkpoint_name(y_BxTxHxD, f"{name}_proj") for name, y_BxTxHxD in zip(names, ys, strict=True)]

    if query_positions_BxS is None:
      q_BxLxHxD, k_BxTxHxD, v_BxTxHxD = project(("query", "key", "value"), x_BxLxD)
    else:
      k_BxTxHxD, v_BxTxHxD = project(("key", "value"), x_BxLxD)
      x_BxLxD = jnp.take_along_axis(x_BxLxD, query_positions_BxS[:, :, None].astype(jnp.int32), axis=1)
      length = x_BxLxD.shape[1]
      (q_BxLxHxD,) = project(("query",), x_BxLxD)
    attn_BxLxHxD = Attention(cfg.attention, dropout_rate=cfg.attention_probs_dropout_prob, name="attention")(
      q_BxLxHxD,
      k_BxTxHxD,
      v_BxTxHxD,
      segment_ids_BxL,
      query_positions_BxS=query_positions_BxS,
      deterministic=deterministic,
    )
    attn_BxLxD = _dense(cfg, cfg.hidden_size, "attention_output")(attn_BxLxHxD.reshape(batch, length, -1))
    attn_BxLxD = checkpoint_name(attn_BxLxD, "attention_out")
    attn_BxLxD = Dropout(cfg.hidden_dropout_prob)(attn_BxLxD, deterministic=deterministic)
    h_BxLxD = _layer_norm(cfg, "attention_norm")(x_BxLxD + attn_BxLxD)

    mlp_BxLxF = ACTIVATIONS[cfg.hidden_act](_dense(cfg, ffn, "intermediate")(h_BxLxD))
    mlp_BxLxF = checkpoint_name(mlp_BxLxF, "mlp_hidden")
    out_BxLxD = _dense(cfg, cfg.hidden_size, "output")(mlp_BxLxF)
    out_BxLxD = Dropout(cfg.hidden_dropout_prob)(out_BxLxD, deterministic=deterministic)
    out_BxLxD = _layer_norm(cfg, "output_norm")(h_BxLxD + out_BxLxD)
    out_BxLxD = checkpoint_name(out_BxLxD, "layer_out")
    return (out_BxLxD, None) if self.scanned else out_BxLxD


def _scanned_layers(config: BertConfig):
  # Arguments after the carry: segment ids, deterministic (argument 3 counting the module), query rows (None).
  return scan_layers(
    BertLayer,
    config.stacked_layers,
    remat=config.remat_policy,
    static_argnum=3,
    broadcast=3,
    unroll=config.scan_unroll,
  )


def _default_ids(input_ids_BxL, attention_mask_BxL, token_type_ids_BxL, position_ids_BxL, segment_ids_BxL):
  if segment_ids_BxL is None:
    # A 0/1 attention mask is already a valid segment-id array: one segment per row, 0 for padding.
    segment_ids_BxL = jnp.ones_like(input_ids_BxL) if attention_mask_BxL is None else attention_mask_BxL
  if token_type_ids_BxL is None:
    token_type_ids_BxL = jnp.zeros_like(input_ids_BxL)
  if position_ids_BxL is None:
    position_ids_BxL = jnp.broadcast_to(jnp.arange(input_ids_BxL.shape[1]), input_ids_BxL.shape)
  return segment_ids_BxL.astype(jnp.int32), token_type_ids_BxL, position_ids_BxL


def _check_positions(config: BertConfig, input_ids_BxL, position_ids_BxL) -> None:
  # Out-of-range rows of nn.Embed are clamped silently under jit; a long input must fail here instead.
  length = input_ids_BxL.shape[1]
  if position_ids_BxL is None and length > config.max_position_embeddings:
    raise ValueError(
      f"input length {length} exceeds the position table (max_position_embeddings="
      f"{config.max_position_embeddings}); extend it first with jfast.models.bert.extend_position_embeddings("
      f"config, params, {length}) or pass per-segment position_ids"
    )


class BertModel(nn.Module):
  """BERT encoder with pooler.

  ``model.apply({'params': params}, input_ids, attention_mask)`` returns ``(last_hidden_BxLxD, pooled)``.
  Packed rows pass ``segment_ids`` and per-segment ``position_ids`` instead of ``attention_mask``, and
  ``cls_positions[B, S]`` to pool one vector per packed example (``pooled`` is then ``[B, S, D]``).

  Attributes:
    config: the encoder's sizes and switches.
    add_pooling_layer: whether to pool (``pooled`` is None without).
    last_layer_pooled_only: run the last layer at the pooled positions only: its keys and values still cover
      every token, but its query, attention output, FFN and norms run on the [CLS] rows alone (one per example),
      the only rows the pooler reads. The pooled output is unchanged (up to float rounding, tested) at 1/6 less
      encoder work for a 6-layer model; the first output is then those rows' hidden states, ``[B, S, D]``
      (``[B, 1, D]`` without ``cls_positions``). Needs ``add_pooling_layer``.
  """

  config: BertConfig
  add_pooling_layer: bool = True
  last_layer_pooled_only: bool = False

  @nn.compact
  def __call__(
    self,
    input_ids,
    attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    *,
    segment_ids=None,
    cls_positions=None,
    deterministic: bool = True,
  ):
    cfg = self.config
    _check_positions(cfg, input_ids, position_ids)
    segment_ids_BxL, token_type_ids_BxL, position_ids_BxL = _default_ids(
      input_ids, attention_mask, token_type_ids, position_ids, segment_ids
    )
    x_BxLxD = BertEmbeddings(cfg, name="embeddings")(
      input_ids, token_type_ids_BxL, position_ids_BxL, deterministic=deterministic
    )
    if self.last_layer_pooled_only and not self.add_pooling_layer:
      raise ValueError("last_layer_pooled_only needs add_pooling_layer=True: without a pooler every row is output")
    layer_cls = remat_layer(BertLayer, cfg.remat_policy, static_argnum=3)
    pooled_rows_BxS = None
    if self.last_layer_pooled_only:
      pooled_rows_BxS = jnp.zeros((input_ids.shape[0], 1), jnp.int32) if cls_positions is None else cls_positions
    last = cfg.num_hidden_layers - 1
    if cfg.scanned:
      x_BxLxD, _ = _scanned_layers(cfg)(cfg, scanned=True, name=cfg.layer_group)(
        x_BxLxD, segment_ids_BxL, deterministic, None
      )
    for i in range(cfg.stacked_layers, cfg.num_hidden_layers):
      rows = pooled_rows_BxS if i == last else None
      x_BxLxD = layer_cls(cfg, index=i, name=f"encoder_layer_{i}")(x_BxLxD, segment_ids_BxL, deterministic, rows)
    if not self.add_pooling_layer:
      return x_BxLxD, None
    if cls_positions is None:
      cls_BxD = x_BxLxD[:, 0]
    elif self.last_layer_pooled_only:
      cls_BxD = x_BxLxD
    else:
      cls_BxD = jnp.take_along_axis(x_BxLxD, cls_positions[:, :, None].astype(jnp.int32), axis=1)
    pooled = jnp.tanh(_dense(cfg, cfg.hidden_size, "pooler")(cls_BxD)).astype(jnp.float32)
    return x_BxLxD, pooled


class BertForSequenceClassification(nn.Module):
  """BERT with dropout and a linear classifier on the pooled [CLS] vector.

  Returns float32 logits ``[B, num_labels]``, or ``[B, S, num_labels]`` when ``cls_positions[B, S]`` is given
  (packed rows: one prediction per packed example).

  Attributes:
    config: the encoder's sizes and switches.
    num_labels: classes of the head.
    last_layer_pooled_only: the last encoder layer runs at the [CLS] rows only (`BertModel`); the logits are the
      same. On by default; code that reads the last layer's other rows (hidden-state distillation, activation
      calibration) turns it off with ``model.clone(last_layer_pooled_only=False)``.
  """

  config: BertConfig
  num_labels: int = 2
  last_layer_pooled_only: bool = True

  @nn.compact
  def __call__(
    self,
    input_ids,
    attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    *,
    segment_ids=None,
    cls_positions=None,
    deterministic: bool = True,
  ):
    _, pooled = BertModel(self.config, last_layer_pooled_only=self.last_layer_pooled_only, name="bert")(
      input_ids,
      attention_mask,
      token_type_ids,
      position_ids,
      segment_ids=segment_ids,
      cls_positions=cls_positions,
      deterministic=deterministic,
    )
    pooled = Dropout(self.config.hidden_dropout_prob)(pooled, deterministic=deterministic)
    logits = _dense(self.config, self.num_labels, "classifier")(pooled)
    return logits.astype(jnp.float32)


def extend_position_embeddings(config: BertConfig, params: dict, max_positions: int) -> tuple[BertConfig, dict]:
  """Longer inputs for a pretrained BERT: tiles its position table, as Longformer initialised its 4,096 positions.

  Position ``p`` gets the pretrained embedding of ``p mod max_position_embeddings``: each copy keeps the local
  geometry the model learnt (neighbouring positions look alike), which Longformer found trains far faster than a
  random extension; fine-tuning then sorts out the repeats (pair it with a sparse attention kind).

  Args:
    config: the model's config.
    params: `BertModel` parameters, or `BertForSequenceClassification` parameters (``{'bert', 'classifier'}``).
    max_positions: the new table length, larger than ``config.max_position_embeddings``.

  Returns:
    ``(new_config, new_params)``; the inputs are not modified.

  Example:
    >>> config, params = load_hf_bert(path)  # doctest: +SKIP
    >>> config, params = extend_position_embeddings(config, params, 4096)  # doctest: +SKIP
    >>> config = config.replace(attention=AttentionConfig.sliding_window(256, global_tokens=1))  # doctest: +SKIP
  """
  if isinstance(max_positions, bool) or not isinstance(max_positions, int):
    raise TypeError(f"max_positions must be an int, got {type(max_positions).__name__}")
  old = config.max_position_embeddings
  if max_positions <= old:
    raise ValueError(f"max_positions {max_positions} must exceed the current table of {old} positions")
  encoder = params.get("bert", params)
  if "embeddings" not in encoder or "position_embeddings" not in encoder["embeddings"]:
    raise ValueError("params hold no embeddings/position_embeddings table: pass BertModel or classifier params")
  table = encoder["embeddings"]["position_embeddings"]["embedding"]
  if table.shape[0] != old:
    raise ValueError(f"position table has {table.shape[0]} rows but config says {old}")
  reps = -(-max_positions // old)
  new_table = jnp.tile(jnp.asarray(table), (reps, 1))[:max_positions]
  embeddings = {**encoder["embeddings"], "position_embeddings": {"embedding": new_table}}
  new_encoder = {**encoder, "embeddings": embeddings}
  new_params = {**params, "bert": new_encoder} if "bert" in params else new_encoder
  return config.replace(max_position_embeddings=max_positions), new_params
