"""Text generation with a key/value cache: greedy, temperature, top-k and top-p sampling, one compiled program.

The cache has a fixed size (prompt + new tokens), so the prompt's prefill and every decoding step reuse one
jitted program: the prefill writes the prompt's keys and values, then each step feeds one token, writes its key
and value at its slot and attends to the cache (`jfast.models.llama`), ``O(length)`` work per token instead of
re-running the whole sequence.

Sampling follows Hugging Face's logits processors in their order: temperature, then top-k, then top-p (the
smallest set of most likely tokens whose probability reaches ``top_p``, at least one token kept).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def filter_logits(logits_BxV: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Logits with temperature applied and the tokens outside top-k / top-p set to ``-inf`` (float32).

  Example:
    >>> filter_logits(jnp.array([[1.0, 3.0, 2.0]]), top_k=2)
    Array([[-inf,   3.,   2.]], dtype=float32)
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  if temperature != 1.0:
    logits_BxV = logits_BxV / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    # Hugging Face's rule: sort ascending, drop the tokens whose cumulative probability stays <= 1 - top_p.
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)
    cumulative_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    drop_BxV = cumulative_BxV <= 1.0 - top_p
    drop_BxV = drop_BxV.at[:, -1].set(False)
    # The threshold: the smallest logit kept (ties with it are kept too).
    threshold_Bx1 = jnp.min(jnp.where(drop_BxV, jnp.inf, sorted_BxV), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
  return logits_BxV


def _check(prompt_ids, prompt_mask, max_new_tokens, temperature, top_k, top_p, rng):
  prompt_BxP = jnp.asarray(prompt_ids, jnp.int32)
  if prompt_BxP.ndim != 2 or prompt_BxP.shape[1] == 0:
    raise ValueError(f"prompt_ids must be [batch, length>0], got shape {prompt_BxP.shape}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 keeps every token), got {top_k!r}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")
  if prompt_mask is None:
    return prompt_BxP, jnp.ones_like(prompt_BxP)
  mask_BxP = jnp.asarray(prompt_mask, jnp.int32)
  if mask_BxP.shape != prompt_BxP.shape:
    raise ValueError(f"prompt_mask has shape {mask_BxP.shape}, prompt_ids {prompt_BxP.shape}")
  return prompt_BxP, mask_BxP


def generate_with_cache(
  model,
  params,
  prompt_ids,
  max_new_tokens: int,
  *,
  prompt_mask=None,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  rng: jax.Array | None = None,
  eos_token_id: int | None = None,
  pad_id: int | None = None,
):
  """Continues each prompt by ``max_new_tokens`` tokens, reusing a key/value cache.

  Args:
    model: a model with a ``cache_size`` field and the ``cache_index`` call of `jfast.models.Llama`.
    params: its parameters.
    prompt_ids: ``int[B, P]``; prompts of different lengths are left-padded (Hugging Face's convention).
    max_new_tokens: tokens to add.
    prompt_mask: ``[B, P]`` 1 for real prompt tokens, 0 for left padding (default: all real).
    temperature: 0 is greedy (argmax); above 0 samples from ``softmax(logits / temperature)``.
    top_k: sample among the k most likely tokens only (0: all).
    top_p: sample from the smallest set of most likely tokens whose probability reaches ``top_p`` (1: all).
    rng: a `jax.random.key`, needed when sampling.
    eos_token_id: a row that produced it continues with ``pad_id`` (as Hugging Face pads finished rows).
    pad_id: what finished rows continue with (default: ``eos_token_id``).

  Returns:
    ``int32[B, P + max_new_tokens]``: prompt and continuation.

  Example:
    >>> out = generate_with_cache(Llama(config), params, prompt, 32, temperature=0.8, top_p=0.9,
    ...                           rng=jax.random.key(0))  # doctest: +SKIP
  """
  prompt_BxP, mask_BxP = _check(prompt_ids, prompt_mask, max_new_tokens, temperature, top_k, top_p, rng)
  total = prompt_BxP.shape[1] + max_new_tokens
  config = model.config
  if getattr(config, "remat_policy", "none") != "none":
    config = config.replace(remat_policy="none")  # nothing is differentiated: remat would only cost time
  decoder = model.clone(config=config, cache_size=total)
  pad = eos_token_id if pad_id is None else pad_id
  select = functools.partial(_select, temperature=temperature, top_k=top_k, top_p=top_p)
  run = jax.jit(functools.partial(_generate, decoder, total=total, select=select, eos_token_id=eos_token_id, pad=pad))
  return run(params, prompt_BxP, mask_BxP, jax.random.key(0) if rng is None else rng)


def _select(logits_BxV, rng, *, temperature, top_k, top_p):
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def _generate(decoder, params, prompt_BxP, mask_BxP, rng, *, total, select, eos_token_id, pad):
  batch, plen = prompt_BxP.shape
  # Left padding: a token's position counts the real tokens before it (padding slots get 1, as in transformers).
  positions_BxP = jnp.where(mask_BxP > 0, jnp.cumsum(mask_BxP, axis=1) - 1, 1)
  logits_BxPxV, variables = decoder.apply(
    {"params": params}, prompt_BxP, segment_ids=mask_BxP, position_ids=positions_BxP, cache_index=0, mutable=["cache"]
  )
  keys = jax.random.split(rng, total - plen)
  first_B = select(logits_BxPxV[:, -1], keys[0])
  buf_BxT = jnp.zeros((batch, total), jnp.int32).at[:, :plen].set(prompt_BxP).at[:, plen].set(first_B)
  done_B = jnp.zeros((batch,), bool) if eos_token_id is None else first_B == eos_token_id
  next_pos_B = jnp.sum(mask_BxP, axis=1).astype(jnp.int32)

  def body(t, carry):
    buf_BxT, cache, done_B = carry
    token_Bx1 = jax.lax.dynamic_slice_in_dim(buf_BxT, t, 1, axis=1)
    position_Bx1 = (next_pos_B + (t - plen))[:, None]
    logits_Bx1xV, updated = decoder.apply(
      {"params": params, "cache": cache},
      token_Bx1,
      segment_ids=jnp.ones_like(token_Bx1),
      position_ids=position_Bx1,
      cache_index=t,
      mutable=["cache"],
    )
    nxt_B = select(logits_Bx1xV[:, 0], keys[t - plen + 1])
    if eos_token_id is not None:
      nxt_B = jnp.where(done_B, pad, nxt_B)
      done_B = done_B | (nxt_B == eos_token_id)
    return buf_BxT.at[:, t + 1].set(nxt_B), updated["cache"], done_B

  buf_BxT, _, _ = jax.lax.fori_loop(plen, total - 1, body, (buf_BxT, variables["cache"], done_B))
  return buf_BxT
