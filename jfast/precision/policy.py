"""Mixed-precision policies: which dtype the parameters, the computation and the outputs live in.

A `Policy` is a frozen value (hashable, so it can be a static jit argument) built from one word or a short string:

    get_policy("bf16")                                      # fp32 master weights, bf16 compute, fp32 outputs
    get_policy("params=float32,compute=bfloat16,output=float32")
    get_policy("p=f32,c=f16")                               # the same grammar with short keys and dtype names

The model reads the compute dtype (``BertConfig.dtype``; `Policy.configure` sets it); layer-norm statistics, the
softmax and the loss stay float32 whatever the policy. `jfast.training.create_train_state` casts the parameters (and so
the optimizer state, which optax allocates like the parameters) to the param dtype. float16 compute needs loss
scaling (`jfast.precision.loss_scale`), which the train step then turns on by default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Every spelling a config or a command line may use for the three floating dtypes a policy allows.
_DTYPE_NAMES = {
  "float32": jnp.float32,
  "f32": jnp.float32,
  "fp32": jnp.float32,
  "full": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "bf16": jnp.bfloat16,
  "float16": jnp.float16,
  "f16": jnp.float16,
  "fp16": jnp.float16,
  "half": jnp.float16,
}
_FIELD_KEYS = {
  "params": "param_dtype",
  "param": "param_dtype",
  "p": "param_dtype",
  "compute": "compute_dtype",
  "c": "compute_dtype",
  "output": "output_dtype",
  "o": "output_dtype",
}
# Presets name the combinations people actually train with; a bare dtype name means the preset that computes in it
# (``bfloat16``: float32 parameters, bf16 matmuls).
_PRESETS = {
  "fp32": ("float32", "float32", "float32"),
  "bf16": ("float32", "bfloat16", "float32"),
  "fp16": ("float32", "float16", "float32"),
  "pure-bf16": ("bfloat16", "bfloat16", "float32"),
}
_PRESET_ALIASES = {
  "f32": "fp32",
  "float32": "fp32",
  "bfloat16": "bf16",
  "f16": "fp16",
  "float16": "fp16",
  "pure_bf16": "pure-bf16",
}
PRESETS = tuple(_PRESETS)


def _to_dtype(value: Any, what: str) -> np.dtype:
  if isinstance(value, str):
    if value.strip().lower() not in _DTYPE_NAMES:
      raise ValueError(f"unknown dtype {value!r} for {what}; expected one of {sorted(_DTYPE_NAMES)}")
    value = _DTYPE_NAMES[value.strip().lower()]
  try:
    dtype = np.dtype(value)
  except TypeError as e:
    raise ValueError(f"{what} must be a floating dtype, got {value!r}") from e
  if dtype not in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
    raise ValueError(f"{what} must be float32, bfloat16 or float16, got {dtype.name}")
  return dtype


def _cast_floating(tree, dtype: np.dtype):
  # Integer and boolean leaves (token ids, masks, step counters) keep their dtype; only floating values move.
  def cast(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
      return x.astype(dtype)
    return x

  return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
  """Dtypes of parameters (master weights and optimizer state), computation, and outputs (logits, loss).

  Attributes:
    param_dtype: dtype the parameters are stored and updated in.
    compute_dtype: dtype of matmuls and activations inside the model.
    output_dtype: dtype of what leaves the model and the loss (float32 in every preset).

  Example:
    >>> policy = Policy("float32", "bfloat16", "float32")
    >>> str(policy)
    'params=float32,compute=bfloat16,output=float32'
  """

  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32

  def __post_init__(self):
    # Normalise to np.dtype so equal policies compare and hash equal however their dtypes were spelled.
    for field in ("param_dtype", "compute_dtype", "output_dtype"):
      object.__setattr__(self, field, _to_dtype(getattr(self, field), field))

  def cast_to_param(self, tree):
    """Casts the floating leaves of ``tree`` to the param dtype; other leaves pass through."""
    return _cast_floating(tree, self.param_dtype)

  def cast_to_compute(self, tree):
    """Casts the floating leaves of ``tree`` to the compute dtype; other leaves pass through."""
    return _cast_floating(tree, self.compute_dtype)

  def cast_to_output(self, tree):
    """Casts the floating leaves of ``tree`` to the output dtype; other leaves pass through."""
    return _cast_floating(tree, self.output_dtype)

  @property
  def needs_loss_scale(self) -> bool:
    """True when gradients pass through float16, whose narrow range underflows small gradients to zero."""
    return np.dtype(jnp.float16) in (self.param_dtype, self.compute_dtype)

  def configure(self, config):
    """Returns a model config (any dataclass with a ``dtype`` name field, e.g. `BertConfig`) set to compute dtype.

    Example:
      >>> get_policy("bf16").configure(BertConfig()).dtype  # doctest: +SKIP
      'bfloat16'
    """
    return dataclasses.replace(config, dtype=self.compute_dtype.name)

  def __str__(self) -> str:
    return f"params={self.param_dtype.name},compute={self.compute_dtype.name},output={self.output_dtype.name}"


def get_policy(spec: str | Policy | None = None) -> Policy:
  """Builds a `Policy` from a preset name, a ``key=dtype`` string, or passes a `Policy` through.

  Presets: ``fp32``; ``bf16`` (float32 parameters, bfloat16 compute); ``fp16`` (float32 parameters, float16 compute,
  loss scaling on by default in the train step); ``pure-bf16`` (bfloat16 parameters and optimizer state too).
  Strings are comma-separated ``key=dtype`` pairs with keys ``params``/``p``, ``compute``/``c`` and
  ``output``/``o``, and dtypes ``float32``/``f32``, ``bfloat16``/``bf16``, ``float16``/``f16``. A key left out
  means float32.

  Args:
    spec: a preset name, a policy string, a `Policy`, or None (``fp32``).

  Returns:
    The `Policy`.

  Raises:
    ValueError: unknown preset or dtype name, unknown or repeated key, or a malformed pair.

  Example:
    >>> get_policy("bf16") == get_policy("params=float32,compute=bfloat16,output=float32")
    True
    >>> get_policy("p=bf16,c=bf16").param_dtype.name
    'bfloat16'
  """
  if spec is None:
    return Policy()
  if isinstance(spec, Policy):
    return spec
  if not isinstance(spec, str):
    raise TypeError(f"a precision policy is a string or a Policy, got {type(spec).__name__}")
  text = spec.strip().lower()
  name = _PRESET_ALIASES.get(text, text)
  if name in _PRESETS:
    return Policy(*_PRESETS[name])
  if "=" not in text:
    raise ValueError(
      f"unknown precision policy {spec!r}: expected a preset ({', '.join(PRESETS)}) or a string like "
      "'params=float32,compute=bfloat16,output=float32'"
    )
  fields: dict[str, np.dtype] = {}
  for pair in text.split(","):
    key, sep, value = (part.strip() for part in pair.partition("="))
    if not sep or not key or not value:
      raise ValueError(f"malformed pair {pair.strip()!r} in precision policy {spec!r}; expected key=dtype")
    if key not in _FIELD_KEYS:
      raise ValueError(f"unknown key {key!r} in precision policy {spec!r}; expected params, compute or output")
    field = _FIELD_KEYS[key]
    if field in fields:
      raise ValueError(f"{key!r} given twice in precision policy {spec!r}")
    fields[field] = _to_dtype(value, f"{key!r} in precision policy {spec!r}")
  return Policy(**fields)
