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
import numpy as np


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
  if np.shape(prompt_mask) != prompt_BxP.shape:
    raise ValueError(f"prompt_mask has shape {np.shape(prompt_mask)}, prompt_ids {prompt_BxP.shape}")
  if not isinstance(prompt_mask, jax.core.Tracer):
    mask = np.asarray(prompt_mask)
    if not np.isin(mask, (0, 1)).all():
      raise ValueError("prompt_mask must hold 0 (padding) and 1 (real token) only")
    if (np.diff(mask.astype(np.int64), axis=1) < 0).any() or not mask[:, -1].all():
      raise ValueError(
        "prompts must be left-padded (padding first, the last column real in every row): the continuation "
        "starts after the last column"
      )
  return prompt_BxP, jnp.asarray(prompt_mask, jnp.int32)


def _end_ids(eos_token_id) -> tuple[int, ...]:
  """``eos_token_id`` as a tuple of ids (Llama 3's configs name several)."""
  if eos_token_id is None:
    return ()
  ids = (eos_token_id,) if isinstance(eos_token_id, int | np.integer) else tuple(eos_token_id)
  if not ids or not all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in ids):
    raise ValueError(f"eos_token_id must be an int or a sequence of ints, got {eos_token_id!r}")
  return tuple(int(i) for i in ids)


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
    eos_token_id: an id, or several (Llama 3's ``config.eos_token_id``): a row that produced one continues with
      ``pad_id`` (as Hugging Face pads finished rows).
    pad_id: what finished rows continue with (default: the first end id).

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
  end_ids = _end_ids(eos_token_id)
  pad = (end_ids[0] if end_ids else None) if pad_id is None else int(pad_id)
  run = _compiled(decoder, total, float(temperature), int(top_k), float(top_p), end_ids, pad)
  return run(params, prompt_BxP, mask_BxP, jax.random.key(0) if rng is None else rng)


@functools.lru_cache(maxsize=32)
def _compiled(decoder, total, temperature, top_k, top_p, end_ids, pad):
  """One jitted generator per model and settings, so repeated calls reuse its compilation."""
  select = functools.partial(_select, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.jit(functools.partial(_generate, decoder, total=total, select=select, end_ids=end_ids, pad=pad))


def _select(logits_BxV, rng, *, temperature, top_k, top_p):
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def _generate(decoder, params, prompt_BxP, mask_BxP, rng, *, total, select, end_ids, pad):
  batch, plen = prompt_BxP.shape
  # Left padding: a token's position counts the real tokens before it (padding slots get 1, as in transformers).
  positions_BxP = jnp.where(mask_BxP > 0, jnp.cumsum(mask_BxP, axis=1) - 1, 1)
  logits_BxPxV, variables = decoder.apply(
    {"params": params}, prompt_BxP, segment_ids=mask_BxP, position_ids=positions_BxP, cache_index=0, mutable=["cache"]
  )
  keys = jax.random.split(rng, total - plen)
  first_B = select(logits_BxPxV[:, -1], keys[0])
  buf_BxT = jnp.zeros((batch, total), jnp.int32).at[:, :plen].set(prompt_BxP).at[:, plen].set(first_B)
  ends = jnp.asarray(end_ids, jnp.int32)
  done_B = jnp.isin(first_B, ends) if end_ids else jnp.zeros((batch,), bool)
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
    if end_ids:
      nxt_B = jnp.where(done_B, pad, nxt_B)
      done_B = done_B | jnp.isin(nxt_B, ends)
    return buf_BxT.at[:, t + 1].set(nxt_B), updated["cache"], done_B

  buf_BxT, _, _ = jax.lax.fori_loop(plen, total - 1, body, (buf_BxT, variables["cache"], done_B))
  return buf_BxT
