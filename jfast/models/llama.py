"""A Flax Linen Llama-family decoder: Llama (2/3), Mistral, Qwen2 and Qwen3 in one model, with a key/value cache.

One module covers the four Hugging Face types; `LlamaConfig` holds what differs between them: grouped-query
attention (``num_key_value_heads``), RoPE with Llama-3 frequency scaling (`jfast.nn.rotary`), RMSNorm, the SwiGLU
MLP, tied or untied embeddings, Mistral's sliding window (run by jfast's own sliding-window kernels), Qwen2's biases
on q/k/v and Qwen3's RMSNorm on each query and key head. Module and parameter names follow ``LlamaForCausalLM``
(``embed_tokens``, ``layers_i/self_attn/q_proj``, ``mlp/gate_proj``, ``input_layernorm``, ``norm``, ``lm_head``), so
`jfast.models.llama_io` maps Hugging Face weights by renaming and transposing.

Everything else is shared with BERT and GPT: the `jfast.nn.Attention` entry point (``causal=True``, packed
documents kept apart by ``segment_ids``), the `jfast.nn.dense` / `jfast.nn.rms_norm` factories and their precision
handling, scanned layers (`jfast.nn.scan`, parameters stacked under ``layers``), the remat tags of
`jfast.nn.REMAT_POLICIES`, and the sharding rules of `jfast.parallel` (which already name these projections).

Grouped-query attention repeats each key/value head over its group of query heads before the kernel
(``jnp.repeat``, Hugging Face's ``repeat_kv``), so every attention kind and backend serves it unchanged.

Generation: built with ``cache_size=T``, the model keeps a ``cache`` collection (keys after RoPE, values, and
which slots hold real tokens) of T positions per layer; a call writes its tokens at ``cache_index`` and attends
to the cache. `jfast.models.generation.generate_with_cache` drives it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from jfast.cpu.dots import mixed_dot_general, row_major
from jfast.cpu.platform import active as cpu_active
from jfast.nn.activations import ACTIVATIONS
from jfast.nn.attention import Attention, masked_attention
from jfast.nn.attention_config import AttentionConfig
from jfast.nn.layers import DTYPES, dense, rms_norm
from jfast.nn.quant_dense import QuantDense, check_mode
from jfast.nn.remat import remat_layer, remat_policy
from jfast.nn.rotary import RopeScaling, apply_rotary, rope_frequencies
from jfast.nn.scan import scan_layers

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The seven projections of a layer: LoRA's usual targets, and the layers int8 quantization converts.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes and switches of a Llama-family decoder. Field names match Hugging Face's ``config.json`` where one exists.

  Attributes:
    model_type: ``llama``, ``mistral``, ``qwen2`` or ``qwen3``: the Hugging Face type the model exports as.
    num_key_value_heads: key/value heads (grouped-query attention); None means ``num_attention_heads``.
    head_dim: width of one head; None means ``hidden_size // num_attention_heads`` (Qwen3 sets it apart).
    rope_theta: RoPE base; ``rope_scaling`` a `RopeScaling` (Llama 3.1+) or None.
    attention_bias: biases on q, k, v and o (Llama's and Qwen3's option); ``qkv_bias``: on q, k, v only (Qwen2).
    mlp_bias: biases on the MLP's three projections.
    qk_norm: RMSNorm over each query and key head before RoPE (Qwen3).
    sliding_window: Mistral's window: a token sees itself and the ``sliding_window - 1`` tokens before it; None
      sees the whole causal prefix. Runs on `jfast.nn.sliding_window_attention` (window ``sliding_window - 1``).
    tie_word_embeddings: the output head is the token table (no ``lm_head``).
    dtype: compute dtype of matmuls and activations; norm statistics, softmax, logits and loss stay float32, and the
      residual stream float32.
    attention: which attention kernel and backend run (`AttentionConfig`); with ``sliding_window`` set, its kind
      must stay ``dense`` (the window decides).
    quantization: ``none`` or ``int8`` / ``int8-static`` / ``qat``: the seven projections run as
      `jfast.nn.QuantDense` (`jfast.compress.quantize` with ``layers=PROJECTIONS`` makes the parameters).
    remat_policy: a key of `jfast.nn.REMAT_POLICIES`, applied to each layer.
    scan_layers: run the layers as one ``nn.scan`` over parameters stacked under ``layers``; False unrolls them
      (``layers_i``). Quantized layers always unroll.
    scan_unroll: layers per iteration of the scan.

  Example:
    >>> config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    ...                      num_attention_heads=8, num_key_value_heads=2)
    >>> config.head_dim, config.num_key_value_heads
    (32, 2)
  """

  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  hidden_act: str = "silu"
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  attention_bias: bool = False
  qkv_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  tie_word_embeddings: bool = False
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  pad_token_id: int | None = None
  dtype: str = "float32"
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
  quantization: str = "none"
  remat_policy: str = "none"
  scan_layers: bool = True
  scan_unroll: int = 1

  layer_group = "layers"

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"unknown model_type {self.model_type!r}; expected one of {MODEL_TYPES}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(
          f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}; "
          "set head_dim"
        )
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
        f"{self.num_key_value_heads}"
      )
    if self.head_dim <= 0 or self.head_dim % 2:
      raise ValueError(f"RoPE needs a positive even head_dim, got {self.head_dim}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
    if self.dtype not in DTYPES:
      raise ValueError(f"unsupported dtype {self.dtype!r}; expected one of {sorted(DTYPES)}")
    if self.sliding_window is not None:
      if self.sliding_window < 2:
        raise ValueError(f"sliding_window must be >= 2 (the token and one before it), got {self.sliding_window}")
      if self.attention.kind != "dense":
        raise ValueError(
          f"sliding_window={self.sliding_window} sets the attention pattern; attention.kind must stay 'dense', "
          f"got {self.attention.kind!r}"
        )
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise TypeError(f"rope_scaling must be a RopeScaling or None, got {type(self.rope_scaling).__name__}")
    if not 0.0 <= self.attention_dropout < 1.0:
      raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
    if self.scan_unroll < 1:
      raise ValueError(f"scan_unroll must be >= 1 (layers per loop iteration), got {self.scan_unroll}")
    check_mode(self.quantization)
    remat_policy(self.remat_policy)

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @property
  def attention_config(self) -> AttentionConfig:
    """The kernel the layers run: ``attention``, or a causal sliding window of ``sliding_window`` tokens."""
    if self.sliding_window is None:
      return self.attention
    return AttentionConfig.sliding_window(self.sliding_window - 1, backend=self.attention.backend)

  @property
  def scanned(self) -> bool:
    return self.scan_layers and self.num_hidden_layers > 1 and self.quantization in ("none", "qat")

  @property
  def stacked_layers(self) -> int:
    """Layers held stacked under ``layers`` (all of them when scanned, else none)."""
    return self.num_hidden_layers if self.scanned else 0

  def replace(self, **changes) -> LlamaConfig:
    return dataclasses.replace(self, **changes)


def _dense(config: LlamaConfig, features: int, name: str, bias: bool) -> nn.Module:
  init = nn.initializers.normal(config.initializer_range)
  if config.quantization != "none":
    return QuantDense(features, config.quantization, config.compute_dtype, init, use_bias=bias, name=name)
  return dense(features, config.compute_dtype, init, use_bias=bias, name=name)


def _norm(config: LlamaConfig, name: str) -> nn.Module:
  return rms_norm(config.rms_norm_eps, config.compute_dtype, name=name)


class LlamaAttention(nn.Module):
  config: LlamaConfig
  cache_size: int = 0

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, position_ids_BxL, cache_index, deterministic: bool):
    cfg = self.config
    batch, length, _ = x_BxLxD.shape
    heads, kv_heads, depth = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv_bias = cfg.attention_bias or cfg.qkv_bias

    def project(name, count, tag):
      y_BxLxHD = _dense(cfg, count * depth, name, qkv_bias)(x_BxLxD)
      return checkpoint_name(y_BxLxHD, tag).reshape(batch, length, count, depth)

    q_BxLxHxD = project("q_proj", heads, "query_proj")
    k_BxLxKxD = project("k_proj", kv_heads, "key_proj")
    v_BxLxKxD = project("v_proj", kv_heads, "value_proj")
    if cfg.qk_norm:
      q_BxLxHxD = _norm(cfg, "q_norm")(q_BxLxHxD)
      k_BxLxKxD = _norm(cfg, "k_norm")(k_BxLxKxD)
    inv_freq_F = rope_frequencies(depth, cfg.rope_theta, cfg.rope_scaling)
    q_BxLxHxD = apply_rotary(q_BxLxHxD, position_ids_BxL, inv_freq_F)
    k_BxLxKxD = apply_rotary(k_BxLxKxD, position_ids_BxL, inv_freq_F)
    group = heads // kv_heads
    if self.cache_size:
      attn_BxLxHxD = self._cached(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, cache_index, group)
    else:
      attn_BxLxHxD = Attention(cfg.attention_config, dropout_rate=cfg.attention_dropout, causal=True, name="kernel")(
        q_BxLxHxD,
        jnp.repeat(k_BxLxKxD, group, axis=2),
        jnp.repeat(v_BxLxKxD, group, axis=2),
        segment_ids_BxL,
        deterministic=deterministic,
      )
    out_BxLxD = _dense(cfg, cfg.hidden_size, "o_proj", cfg.attention_bias)(
      attn_BxLxHxD.reshape(batch, length, heads * depth)
    )
    return checkpoint_name(out_BxLxD, "attention_out")

  def _cached(self, q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, cache_index, group):
    """Writes this call's keys and values at ``cache_index`` and attends over the whole cache.

    A query at slot i sees the real slots j <= i (within the sliding window, counted in slots as Hugging Face
    counts them); slots not yet written are never seen, since they lie after every query.
    """
    cfg = self.config
    batch, length, kv_heads, depth = k_BxLxKxD.shape
    size = self.cache_size
    dtype = k_BxLxKxD.dtype
    keys = self.variable("cache", "key", jnp.zeros, (batch, size, kv_heads, depth), dtype)
    values = self.variable("cache", "value", jnp.zeros, (batch, size, kv_heads, depth), dtype)
    real = self.variable("cache", "real", jnp.zeros, (batch, size), jnp.bool_)
    start = jnp.asarray(cache_index, jnp.int32)
    keys.value = jax.lax.dynamic_update_slice(keys.value, k_BxLxKxD, (0, start, 0, 0))
    values.value = jax.lax.dynamic_update_slice(values.value, v_BxLxKxD, (0, start, 0, 0))
    real.value = jax.lax.dynamic_update_slice(real.value, segment_ids_BxL > 0, (0, start))
    q_slot_L = start + jnp.arange(length)
    k_slot_T = jnp.arange(size)
    allowed_LxT = k_slot_T[None, :] <= q_slot_L[:, None]
    if cfg.sliding_window is not None:
      allowed_LxT &= q_slot_L[:, None] - k_slot_T[None, :] < cfg.sliding_window
    mask_Bx1xLxT = (allowed_LxT[None] & real.value[:, None, :])[:, None]
    return masked_attention(
      q_BxLxHxD,
      jnp.repeat(keys.value, group, axis=2),
      jnp.repeat(values.value, group, axis=2),
      mask_Bx1xLxT,
    )


class LlamaMLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.config
    gate_BxLxF = _dense(cfg, cfg.intermediate_size, "gate_proj", cfg.mlp_bias)(x_BxLxD)
    up_BxLxF = _dense(cfg, cfg.intermediate_size, "up_proj", cfg.mlp_bias)(x_BxLxD)
    h_BxLxF = checkpoint_name(ACTIVATIONS[cfg.hidden_act](gate_BxLxF) * up_BxLxF, "mlp_hidden")
    return _dense(cfg, cfg.hidden_size, "down_proj", cfg.mlp_bias)(h_BxLxF)


class LlamaLayer(nn.Module):
  """Pre-norm layer: ``x + attn(norm(x))`` then ``+ mlp(norm(.))``; the residual stream stays float32."""

  config: LlamaConfig
  cache_size: int = 0
  scanned: bool = False  # under nn.scan: returns (output, None), the output being the next layer's input

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, position_ids_BxL, cache_index, deterministic: bool):
    cfg = self.config
    attn_BxLxD = LlamaAttention(cfg, self.cache_size, name="self_attn")(
      _norm(cfg, "input_layernorm")(x_BxLxD), segment_ids_BxL, position_ids_BxL, cache_index, deterministic
    )
    x_BxLxD = x_BxLxD + attn_BxLxD.astype(jnp.float32)
    mlp_BxLxD = LlamaMLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(x_BxLxD))
    x_BxLxD = checkpoint_name(x_BxLxD + mlp_BxLxD.astype(jnp.float32), "layer_out")
    return (x_BxLxD, None) if self.scanned else x_BxLxD


class Llama(nn.Module):
  """Llama-family causal LM: ``apply({'params': p}, input_ids)`` returns float32 logits ``[B, L, vocab]``.

  ``segment_ids`` (0 = padding, 1..S = the documents packed into a row) keep documents apart; a 0/1
  ``attention_mask`` is a valid ``segment_ids``. ``position_ids`` default to ``0..L-1``; packed rows pass positions
  that restart at each document.

  With ``cache_size > 0`` the model decodes: pass ``cache_index`` (the cache slot of the first input token; the
  positions then default to ``cache_index, cache_index + 1, ...``) and ``mutable=["cache"]``; see
  `jfast.models.generation.generate_with_cache`. A Python int ``cache_index`` is checked against the cache's size.

  Example:
    >>> config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2)
    >>> model = Llama(config)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    >>> model.apply({"params": params}, jnp.ones((2, 8), jnp.int32)).shape
    (2, 8, 512)
  """

  config: LlamaConfig
  cache_size: int = 0

  @nn.compact
  def __call__(
    self, input_ids, attention_mask=None, position_ids=None, *, segment_ids=None, cache_index=0, deterministic=True
  ):
    cfg = self.config
    batch, length = input_ids.shape
    if self.cache_size and isinstance(cache_index, int) and not 0 <= cache_index <= self.cache_size - length:
      raise ValueError(
        f"{length} tokens written at cache slot {cache_index} do not fit a cache of {self.cache_size} positions"
      )
    if segment_ids is None:
      segment_ids = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    segment_ids_BxL = segment_ids.astype(jnp.int32)
    if position_ids is None:
      # Decoding: the tokens written at cache slots cache_index.. are those positions of the sequence.
      start = cache_index if self.cache_size else 0
      position_ids = jnp.broadcast_to(start + jnp.arange(length), (batch, length))
    position_ids_BxL = position_ids.astype(jnp.int32)

    embed = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      embedding_init=nn.initializers.normal(cfg.initializer_range),
      name="embed_tokens",
    )
    x_BxLxD = embed(input_ids).astype(jnp.float32)
    # A no-op unless a "perturbations" collection is passed: then jax.grad reaches the per-position input vectors
    # (how the tests check causality and packing isolation through gradients).
    x_BxLxD = self.perturb("embeddings", x_BxLxD)
    args = (segment_ids_BxL, position_ids_BxL, cache_index, deterministic)
    if cfg.scanned:
      layers = scan_layers(
        LlamaLayer, cfg.num_hidden_layers, remat=cfg.remat_policy, static_argnum=5, broadcast=4, unroll=cfg.scan_unroll
      )
      x_BxLxD, _ = layers(cfg, self.cache_size, scanned=True, name=cfg.layer_group)(x_BxLxD, *args)
    layer_cls = remat_layer(LlamaLayer, cfg.remat_policy, static_argnum=5)
    for i in range(cfg.stacked_layers, cfg.num_hidden_layers):
      x_BxLxD = layer_cls(cfg, self.cache_size, name=f"layers_{i}")(x_BxLxD, *args)
    h_BxLxD = _norm(cfg, "norm")(x_BxLxD)
    if cfg.tie_word_embeddings:
      return _logits(h_BxLxD, embed.embedding.T.astype(cfg.compute_dtype), cfg.compute_dtype)
    return LMHead(cfg.vocab_size, cfg.initializer_range, cfg.compute_dtype, name="lm_head")(h_BxLxD)


class LMHead(nn.Module):
  """The untied output head: ``kernel`` ``[hidden, vocab]``, logits in float32. LoRA may adapt it (peft's
  ``lm_head`` target): `jfast.nn.with_lora` adds the adapter term to its output."""

  lora_compatible = True

  features: int
  init_std: float
  dtype: Any

  @nn.compact
  def __call__(self, h_BxLxD):
    init = nn.initializers.normal(self.init_std)
    kernel_DxV = self.param("kernel", init, (h_BxLxD.shape[-1], self.features), jnp.float32)
    return _logits(h_BxLxD, kernel_DxV.astype(self.dtype), self.dtype)


def _logits(h_BxLxD, table_DxV, dtype):
  """Logits accumulated and returned in float32 whatever the compute dtype."""
  dims = (((2,), (0,)), ((), ()))
  if cpu_active(dtype):
    # A physical [D, V] copy: on a transposed view XLA:CPU ran the largest product of the step in float32.
    return mixed_dot_general(h_BxLxD, row_major(table_DxV), dims).astype(jnp.float32)
  return jax.lax.dot_general(h_BxLxD, table_DxV, dims, preferred_element_type=jnp.float32)


def init_llama(config: LlamaConfig, rng: jax.Array) -> tuple[Llama, dict]:
  """Builds a `Llama` and its freshly initialised parameters (one jitted init).

  Example:
    >>> model, params = init_llama(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
    ...                                        num_hidden_layers=2, num_attention_heads=4), jax.random.key(0))
  """
  model = Llama(config)
  ids = jnp.zeros((1, 1), jnp.int32)
  params = jax.jit(lambda key: model.init(key, ids)["params"])(rng)
  return model, params
