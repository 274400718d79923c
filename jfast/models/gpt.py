"""A Flax Linen GPT-2-style causal decoder (pre-LN, tied embeddings, learned or rotary positions) and greedy decoding.

Module and parameter names follow Hugging Face's ``GPT2LMHeadModel`` (``wte``, ``wpe``, ``h_i/attn/c_attn``,
``h_i/mlp/c_fc``, ``ln_f``), and Flax ``Dense`` kernels are ``[in, out]`` exactly like GPT-2's ``Conv1D`` weights, so
`jfast.models.gpt_io` maps weights by renaming alone. Attention, layers and remat are BERT's: the `jfast.nn.Attention`
kernels with ``causal=True`` (packed documents are kept apart by ``segment_ids``), the `jfast.nn.dense` layer factory,
and `jfast.nn.REMAT_POLICIES` over the same ``checkpoint_name`` tags.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from jfast.cpu.dots import mixed_dot_general, row_major
from jfast.cpu.platform import active as cpu_active
from jfast.nn.activations import ACTIVATIONS
from jfast.nn.attention import Attention
from jfast.nn.attention_config import AttentionConfig
from jfast.nn.dropout import Dropout
from jfast.nn.layers import DTYPES, dense, layer_norm
from jfast.nn.remat import remat_layer, remat_policy
from jfast.nn.rotary import rotary
from jfast.nn.scan import scan_layers

POSITION_EMBEDDINGS = ("learned", "rotary")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Sizes and switches of a GPT-2-style decoder. Field names match Hugging Face's GPT-2 ``config.json``.

  Attributes:
    n_positions: the position table's length: the longest sequence the model accepts (also with rotary positions,
      where it is the trained context length).
    n_inner: MLP width; None means 4 * n_embd, as in GPT-2.
    position_embedding: ``learned`` (GPT-2's ``wpe`` table) or ``rotary`` (RoPE on queries and keys, no table;
      not exportable to the GPT-2 layout).
    dtype: compute dtype of matmuls and activations; norms' statistics, softmax, logits and loss stay float32.
    attention: which attention kernel runs (see `AttentionConfig`); always causal here.
    remat_policy: a key of `jfast.nn.REMAT_POLICIES`, applied to each block.
    scan_layers: run the blocks as one ``nn.scan`` over parameters stacked under ``h`` (`jfast.nn.scan`): one
      compiled block whatever the depth. False unrolls them (per-block parameters ``h_i``).
    scan_unroll: blocks per iteration of the scan (see `BertConfig.scan_unroll`).

  Example:
    >>> config = GPTConfig(vocab_size=2048, n_positions=256, n_embd=256, n_layer=4, n_head=4)
    >>> config.head_dim
    64
  """

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  activation_function: str = "gelu_new"
  resid_pdrop: float = 0.1
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  layer_norm_epsilon: float = 1e-5
  initializer_range: float = 0.02
  bos_token_id: int = 50256
  eos_token_id: int = 50256
  position_embedding: str = "learned"
  rotary_base: float = 10000.0
  dtype: str = "float32"
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
  remat_policy: str = "none"
  scan_layers: bool = True
  scan_unroll: int = 1

  layer_group = "h"

  def __post_init__(self):
    if self.scan_unroll < 1:
      raise ValueError(f"scan_unroll must be >= 1 (blocks per loop iteration), got {self.scan_unroll}")
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise ValueError(
        f"unknown position_embedding {self.position_embedding!r}; expected one of {POSITION_EMBEDDINGS}"
      )
    if self.position_embedding == "rotary" and self.head_dim % 2:
      raise ValueError(f"rotary positions need an even head dimension, got {self.head_dim}")
    if self.activation_function not in ACTIVATIONS:
      raise ValueError(
        f"unsupported activation_function {self.activation_function!r}; expected one of {sorted(ACTIVATIONS)}"
      )
    if self.dtype not in DTYPES:
      raise ValueError(f"unsupported dtype {self.dtype!r}; expected one of {sorted(DTYPES)}")
    remat_policy(self.remat_policy)

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def inner_dim(self) -> int:
    return 4 * self.n_embd if self.n_inner is None else self.n_inner

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @property
  def scanned(self) -> bool:
    return self.scan_layers and self.n_layer > 1

  @property
  def stacked_layers(self) -> int:
    """Blocks held stacked under ``h`` (all of them when scanned, else none)."""
    return self.n_layer if self.scanned else 0

  def replace(self, **changes) -> GPTConfig:
    return dataclasses.replace(self, **changes)


def _dense(config: GPTConfig, features: int, name: str, std: float | None = None) -> nn.Module:
  init = nn.initializers.normal(config.initializer_range if std is None else std)
  return dense(features, config.compute_dtype, init, name=name)


def _layer_norm(config: GPTConfig, name: str) -> nn.Module:
  return layer_norm(config.layer_norm_epsilon, config.compute_dtype, name=name)


def split_qkv(qkv_BxLx3D: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """GPT-2's fused ``c_attn`` output cut into query, key and value.

  One ``split``, not three slices: the gradient of a split is one concatenate, where three slices give three
  zero-padded copies added up, which XLA:CPU fused into a loop reading every input three times (10 ms of the
  attention backward per layer of the 8 x 256 bf16 step; `benchmarks.step_profile --ab qkvsplit`).
  """
  return tuple(jnp.split(qkv_BxLx3D, 3, axis=-1))


class GPTAttention(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, position_ids_BxL, deterministic: bool):
    cfg = self.config
    batch, length, width = x_BxLxD.shape
    qkv_BxLx3D = _dense(cfg, 3 * width, "c_attn")(x_BxLxD)

    def heads(y_BxLxD, tag):
      return checkpoint_name(y_BxLxD, tag).reshape(batch, length, cfg.n_head, cfg.head_dim)

    q_BxLxD, k_BxLxD, v_BxLxD = split_qkv(qkv_BxLx3D)
    q_BxLxHxD = heads(q_BxLxD, "query_proj")
    k_BxLxHxD = heads(k_BxLxD, "key_proj")
    v_BxLxHxD = heads(v_BxLxD, "value_proj")
    if cfg.position_embedding == "rotary":
      q_BxLxHxD = rotary(q_BxLxHxD, position_ids_BxL, cfg.rotary_base)
      k_BxLxHxD = rotary(k_BxLxHxD, position_ids_BxL, cfg.rotary_base)
    attn_BxLxHxD = Attention(cfg.attention, dropout_rate=cfg.attn_pdrop, causal=True, name="kernel")(
      q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, deterministic=deterministic
    )
    # GPT-2's scaled init of the projections that write into the residual stream (1/sqrt(2 * n_layer)).
    std = cfg.initializer_range / (2 * cfg.n_layer) ** 0.5
    out_BxLxD = _dense(cfg, width, "c_proj", std)(attn_BxLxHxD.reshape(batch, length, width))
    return checkpoint_name(out_BxLxD, "attention_out")


class GPTMLP(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.config
    h_BxLxF = ACTIVATIONS[cfg.activation_function](_dense(cfg, cfg.inner_dim, "c_fc")(x_BxLxD))
    h_BxLxF = checkpoint_name(h_BxLxF, "mlp_hidden")
    std = cfg.initializer_range / (2 * cfg.n_layer) ** 0.5
    return _dense(cfg, x_BxLxD.shape[-1], "c_proj", std)(h_BxLxF)


class GPTBlock(nn.Module):
  """Pre-LN block: ``x + attn(ln_1(x))`` then ``+ mlp(ln_2(.))``; the residual stream stays float32."""

  config: GPTConfig
  scanned: bool = False  # under nn.scan: returns (output, None), the output being the next block's input

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, position_ids_BxL, deterministic: bool):
    cfg = self.config
    attn_BxLxD = GPTAttention(cfg, name="attn")(
      _layer_norm(cfg, "ln_1")(x_BxLxD), segment_ids_BxL, position_ids_BxL, deterministic
    )
    x_BxLxD = x_BxLxD + Dropout(cfg.resid_pdrop)(attn_BxLxD, deterministic=deterministic)
    mlp_BxLxD = GPTMLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x_BxLxD))
    x_BxLxD = x_BxLxD + Dropout(cfg.resid_pdrop)(mlp_BxLxD, deterministic=deterministic)
    x_BxLxD = checkpoint_name(x_BxLxD, "layer_out")
    return (x_BxLxD, None) if self.scanned else x_BxLxD


class GPT(nn.Module):
  """GPT-2-style language model: ``apply({'params': p}, input_ids)`` returns float32 logits ``[B, L, vocab]``.

  ``segment_ids`` (0 = padding, 1..S = the documents packed into a row) keep documents apart; a 0/1
  ``attention_mask`` is a valid ``segment_ids``. ``position_ids`` default to ``0..L-1``; packed rows pass positions
  that restart at each document. Sequences longer than ``n_positions`` raise a ``ValueError``.

  Example:
    >>> model = GPT(GPTConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4))
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    >>> model.apply({"params": params}, jnp.ones((2, 8), jnp.int32)).shape
    (2, 8, 512)
  """

  config: GPTConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, position_ids=None, *, segment_ids=None, deterministic=True):
    cfg = self.config
    batch, length = input_ids.shape
    if length > cfg.n_positions:
      raise ValueError(
        f"sequence length {length} is beyond the model's position table (n_positions={cfg.n_positions})"
      )
    if segment_ids is None:
      segment_ids = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    segment_ids_BxL = segment_ids.astype(jnp.int32)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(length), (batch, length))
    position_ids_BxL = position_ids.astype(jnp.int32)

    init = nn.initializers.normal(cfg.initializer_range)
    wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, name="wte")
    x_BxLxD = wte(input_ids).astype(jnp.float32)
    if cfg.position_embedding == "learned":
      wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, name="wpe")
      x_BxLxD = x_BxLxD + wpe(position_ids_BxL).astype(jnp.float32)
    # A no-op unless a "perturbations" collection is passed: then jax.grad reaches the per-position input vectors
    # (how the tests check causality and packing isolation through gradients).
    x_BxLxD = self.perturb("embeddings", x_BxLxD)
    x_BxLxD = Dropout(cfg.embd_pdrop)(x_BxLxD, deterministic=deterministic)
    if cfg.scanned:
      blocks = scan_layers(
        GPTBlock, cfg.n_layer, remat=cfg.remat_policy, static_argnum=4, broadcast=3, unroll=cfg.scan_unroll
      )
      x_BxLxD, _ = blocks(cfg, scanned=True, name=cfg.layer_group)(
        x_BxLxD, segment_ids_BxL, position_ids_BxL, deterministic
      )
    block_cls = remat_layer(GPTBlock, cfg.remat_policy, static_argnum=4)
    for i in range(cfg.stacked_layers, cfg.n_layer):
      x_BxLxD = block_cls(cfg, name=f"h_{i}")(x_BxLxD, segment_ids_BxL, position_ids_BxL, deterministic)
    h_BxLxD = _layer_norm(cfg, "ln_f")(x_BxLxD)
    # Tied head: logits against the token table, accumulated and returned in float32.
    table_DxV = wte.embedding.T.astype(cfg.compute_dtype)
    dims = (((2,), (0,)), ((), ()))
    if cpu_active(cfg.compute_dtype):
      # A physical [D, V] copy: on the transposed view XLA:CPU ran the largest product of the step in float32.
      logits_BxLxV = mixed_dot_general(h_BxLxD, row_major(table_DxV), dims)
    else:
      logits_BxLxV = jax.lax.dot_general(h_BxLxD, table_DxV, dims, preferred_element_type=jnp.float32)
    return logits_BxLxV.astype(jnp.float32)


def init_gpt(config: GPTConfig, rng: jax.Array) -> tuple[GPT, dict]:
  """Builds a `GPT` and its freshly initialised parameters (one jitted init).

  Example:
    >>> model, params = init_gpt(GPTConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4), key)
  """
  model = GPT(config)
  ids = jnp.zeros((1, 1), jnp.int32)
  params = jax.jit(lambda key: model.init(key, ids)["params"])(rng)
  return model, params


def generate(model: GPT, params, prompt_ids, max_new_tokens: int, *, eos_token_id: int | None = None, pad_id=None):
  """Greedy decoding: appends the most likely next token ``max_new_tokens`` times.

  Every step runs the whole fixed-size buffer ``[B, prompt + new]`` (one compilation; causal attention makes the
  not-yet-written tail irrelevant), which is simple and exact but does ``O(length)`` work per token: there is no
  key/value cache yet.

  Args:
    model: the `GPT`.
    params: its parameters.
    prompt_ids: ``int[B, P]`` prompts, all P tokens real.
    max_new_tokens: tokens to add.
    eos_token_id: a row that produced it continues with ``pad_id`` (as Hugging Face's ``generate`` pads finished
      rows); None never stops.
    pad_id: what finished rows continue with (default: ``eos_token_id``).

  Returns:
    ``int32[B, P + max_new_tokens]``: prompt and continuation.

  Example:
    >>> out = generate(model, params, jnp.array([[464, 3290]]), 20)  # doctest: +SKIP
  """
  prompt_BxP = jnp.asarray(prompt_ids, jnp.int32)
  if prompt_BxP.ndim != 2 or prompt_BxP.shape[1] == 0:
    raise ValueError(f"prompt_ids must be [batch, length>0], got shape {prompt_BxP.shape}")
  plen = prompt_BxP.shape[1]
  total = plen + max_new_tokens
  if total > model.config.n_positions:
    raise ValueError(
      f"prompt ({plen}) + max_new_tokens ({max_new_tokens}) = {total} is beyond the model's position table "
      f"(n_positions={model.config.n_positions})"
    )
  pad = eos_token_id if pad_id is None else pad_id
  return jax.jit(functools.partial(_greedy, model, total=total, eos_token_id=eos_token_id, pad=pad))(
    params, prompt_BxP
  )


def _greedy(model, params, prompt_BxP, *, total, eos_token_id, pad):
  batch, plen = prompt_BxP.shape
  buf_BxT = jnp.zeros((batch, total), jnp.int32).at[:, :plen].set(prompt_BxP)

  def body(t, carry):
    buf_BxT, done_B = carry
    logits_BxTxV = model.apply({"params": params}, buf_BxT)
    nxt_B = jnp.argmax(jax.lax.dynamic_index_in_dim(logits_BxTxV, t - 1, axis=1, keepdims=False), axis=-1)
    nxt_B = nxt_B.astype(jnp.int32)
    if eos_token_id is not None:
      nxt_B = jnp.where(done_B, pad, nxt_B)
      done_B = done_B | (nxt_B == eos_token_id)
    return buf_BxT.at[:, t].set(nxt_B), done_B

  buf_BxT, _ = jax.lax.fori_loop(plen, total, body, (buf_BxT, jnp.zeros((batch,), bool)))
  return buf_BxT
