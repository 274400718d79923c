"""The default optimizer: clipped AdamW (optax or 8-bit) with warm-up and linear decay, configured by one dataclass."""

from __future__ import annotations

import dataclasses

import jax
import optax

from jfast.cpu.row_sparse import row_sparse_adamw, word_table_mask
from jfast.optim.adamw8bit import adamw_8bit
from jfast.optim.clipping import clip_by_global_norm

OPTIMIZERS = ("adamw", "adamw_8bit")
ROW_SPARSE_MODES = ("off", "exact", "lazy")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warm-up and linear decay, gradient clipping, no decay on biases and norms.

  ``name`` picks the AdamW: ``adamw`` (optax, float32 moments) or ``adamw_8bit`` (`jfast.optim.adamw_8bit`:
  blockwise 8-bit moments, ``block_size`` and ``min_8bit_size`` as there).

  ``row_sparse_embeddings`` (`ROW_SPARSE_MODES`), an opt-in CPU technique, trains the word table with
  `jfast.cpu.row_sparse_adamw`: ``exact`` is the same AdamW fed the batch's rows only, ``lazy`` updates only those
  rows (``torch.optim.SparseAdam``'s optimizer, a different one). The step must then be built with
  ``make_train_step(..., row_sparse=...)``, and the optimizer cannot be wrapped in ``optax.MultiSteps``. The table's
  moments are float32 (its parameter dtype) even under ``adamw_8bit``.
  """

  learning_rate: float = 5e-5
  weight_decay: float = 0.01
  warmup_ratio: float = 0.06
  max_grad_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  name: str = "adamw"
  block_size: int = 256
  min_8bit_size: int = 4096
  row_sparse_embeddings: str = "off"

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer {self.name!r}; expected one of {OPTIMIZERS}")
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
    if not 0 <= self.warmup_ratio < 1:
      raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
    if self.row_sparse_embeddings not in ROW_SPARSE_MODES:
      raise ValueError(
        f"unknown row_sparse_embeddings {self.row_sparse_embeddings!r}; expected one of {ROW_SPARSE_MODES}"
      )
    if not self.max_grad_norm > 0:
      raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}")


def decay_mask(params):
  """True for the leaves AdamW decays: weight matrices, not biases, norm scales or embedding tables."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale", "embedding"), params
  )


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up over ``config.warmup_ratio`` of ``total_steps`` to ``config.learning_rate``, then linear decay to 0.

  Example:
    >>> schedule = learning_rate_schedule(OptimizerConfig(learning_rate=1e-4, warmup_ratio=0.1), total_steps=100)
    >>> round(float(schedule(10)), 8), round(float(schedule(55)), 8)
    (0.0001, 5e-05)
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be at least 1, got {total_steps}")
  warmup = int(config.warmup_ratio * total_steps)
  return optax.join_schedules(
    [
      optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
      optax.linear_schedule(config.learning_rate, 0.0, max(total_steps - warmup, 1)),
    ],
    [warmup],
  )


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """Builds the optimizer chain: clip (`jfast.optim.clip_by_global_norm`) -> AdamW (decay masked to weight matrices)
  under a warm-up/decay schedule.

  Args:
    config: optimizer hyper-parameters.
    total_steps: optimizer updates in the whole run (sets the schedule).

  Returns:
    An optax `GradientTransformation`.

  Example:
    >>> tx = make_optimizer(OptimizerConfig(learning_rate=3e-5), total_steps=1000)
  """
  schedule = learning_rate_schedule(config, total_steps)
  if config.name == "adamw_8bit":
    adam = adamw_8bit(
      schedule,
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
      mask=decay_mask,
      block_size=config.block_size,
      min_8bit_size=config.min_8bit_size,
    )
  else:
    adam = optax.adamw(
      schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay, mask=decay_mask
    )
  if config.row_sparse_embeddings != "off":
    # Embedding tables take no weight decay (decay_mask), so neither does the row-sparse table.
    lazy = config.row_sparse_embeddings == "lazy"
    table = row_sparse_adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, lazy=lazy)
    rest_mask = lambda params: jax.tree.map(lambda t: not t, word_table_mask(params))  # noqa: E731
    adam = optax.chain(optax.masked(adam, rest_mask), optax.masked(table, word_table_mask))
  return optax.chain(clip_by_global_norm(config.max_grad_norm), adam)
