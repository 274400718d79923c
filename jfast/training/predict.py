"""Class probabilities for tokenized texts: jfast's own batching (packed rows included) and one jitted step, with
each slot's prediction put back at its example's index."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jfast.data.batching import BatchingConfig, make_batches
from jfast.training.losses import classifier_logits
from jfast.training.step import CompiledStep


def _predict_step(params, batch, *, model):
  logits_BxSxC = classifier_logits(model, params, batch)
  return jax.nn.softmax(logits_BxSxC.astype(jnp.float32), axis=-1)


def make_predict_step(model, *, platform: str | None = None) -> CompiledStep:
  """The jitted ``(params, batch) -> float32[B, S, C]`` class probabilities of a jfast classifier (dropout off)."""
  return CompiledStep(functools.partial(_predict_step, model=model), platform=platform)


def predict_probabilities(
  predict_step,
  params,
  seqs: Sequence[np.ndarray],
  batching: BatchingConfig,
  *,
  pad_id: int,
  progress: bool = False,
  desc: str = "predict",
) -> np.ndarray:
  """``float32[N, C]``: the class probabilities of each tokenized text, in input order.

  Args:
    predict_step: from `make_predict_step`.
    params: the classifier's parameters.
    seqs: token id arrays, one per text.
    batching: how to batch them (its ``shuffle`` is ignored: one fixed pass).
    pad_id: the tokenizer's pad id.
    progress: show a progress bar over batches (on a terminal).
  """
  if not len(seqs):
    raise ValueError("no texts to predict")
  epoch = make_batches(
    seqs, np.zeros(len(seqs), np.int32), dataclasses.replace(batching, shuffle=False), pad_id=pad_id
  )
  pending = []
  for batch in tqdm(epoch.batches, desc=desc, unit="batch", disable=not (progress and sys.stderr.isatty())):
    pending.append(predict_step(params, batch))  # dispatched; fetched together below
  out = None
  for probs_BxSxC, index_BxS in zip(jax.device_get(pending), epoch.example_index, strict=True):
    if out is None:
      out = np.zeros((len(seqs), probs_BxSxC.shape[-1]), np.float32)
    filled = index_BxS >= 0
    out[index_BxS[filled]] = probs_BxSxC[filled]
  return out
