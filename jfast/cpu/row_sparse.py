"""Row-sparse word-embedding training, an opt-in CPU technique: the word table's gradient and Adam update built
from the batch's rows.

A batch of 32 sentences touches a few hundred of the word table's 30,522 rows, yet `jax.grad` of an embedding
lookup is table-shaped: XLA fills a 47 MB (MiniLM, float32) buffer with zeros, scatters the batch's rows into it,
and the clip and both Adam moments read all of it again. On the 2-core CPU that zero fill alone is 3-4 ms a step,
single-threaded, with page-fault spikes to 30 ms. On a GPU the fill is a memset at memory bandwidth, a few
microseconds, so this is for the CPU (docs/row-sparse.md).

Here the step gathers the batch's distinct ids (`compact_rows`: ``jnp.unique`` with a static size), remaps the
batch onto them, and differentiates a model whose table is just those rows (``[T, D]``, T = tokens in the batch).
The optimizer, `row_sparse_adamw`, takes the compact gradient and the row ids (an optax extra argument) and
scatters it into the decayed moments, ``b1 * mu`` and ``b2 * nu``; the parameter pass stays dense, because every
row that has a moment moves under Adam. So the ``exact`` mode's update is AdamW's, to float rounding (tested against
the dense step). Clipping sees the same global norm, since rows no token touches contribute zeros. The ``lazy`` mode
is a different optimizer, the one of ``torch.optim.SparseAdam``: only the batch's rows update their moments and
move, applied in place as a `RowUpdate`, so no pass over the whole table is left.

No library does this for JAX: optax has no sparse-gradient type, and flax's `nn.Embed` differentiates densely.

    tx = make_optimizer(OptimizerConfig(row_sparse_embeddings="exact"), total_steps)
    step = make_train_step(loss, row_sparse=row_sparse_embedding(model, classification_loss))

It breaks one part of optax's contract on purpose: the table's gradient is ``[T, D]``, not the table's shape. It
composes with the transformations that pass gradients through leaf by leaf (`optax.chain`, `optax.masked`, jfast's
freezing and clipping, in-step accumulation, loss scaling); `optax.MultiSteps`, which adds gradients up across calls
in table-shaped buffers, is refused with an error that names the alternative. Tied tables (a decoder's output layer
reusing its input embedding) have dense gradients and are refused too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# The table's path ends with these keys (jfast's BERT: bert/embeddings/word_embeddings/embedding).
WORD_TABLE = ("word_embeddings", "embedding")


@dataclasses.dataclass(frozen=True)
class RowSparseEmbedding:
  """The loss of a model whose word table holds only some rows, and how the train step uses it.

  `jfast.training.make_train_step(..., row_sparse=spec)` calls `prepare` on the trainable parameters and the batch,
  differentiates the loss it returns, and applies the optimizer's updates with `apply_updates`.

  Attributes:
    make_loss: ``num_rows -> loss_fn``: the step's loss for the same model with a ``num_rows``-row table (the
      batch's ids are remapped onto those rows).
  """

  make_loss: Callable[[int], Callable]

  def check(self, opt_state) -> None:
    """Raises a `ValueError` unless ``opt_state`` holds a row-sparse optimizer that takes compact gradients."""
    if not find_row_sparse_state(opt_state):
      raise ValueError(
        "the optimizer and the step disagree about row-sparse embeddings: build both or neither, "
        "make_optimizer(OptimizerConfig(row_sparse_embeddings='exact' or 'lazy'), ...) with "
        "make_train_step(..., row_sparse=row_sparse_embedding(model, loss))"
      )
    multi = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.MultiStepsState))
    if any(isinstance(x, optax.MultiStepsState) and find_row_sparse_state(x) for x in multi):
      raise ValueError(
        "row-sparse embeddings cannot be accumulated by optax.MultiSteps (jfast.training.multi_steps): their "
        "gradient is the batch's rows, not a table-shaped array MultiSteps can add up. Accumulate inside the step "
        "instead (make_train_step(..., micro_batches=k)), or train the table densely (row_sparse_embeddings='off')"
      )

  def prepare(self, trainable, batch):
    """``(trainable with the table cut to the batch's rows, the batch remapped, the loss, the optimizer's extra
    arguments)``."""
    path = word_table_path(trainable)
    trainable, batch, rows = compact_params_and_batch(trainable, batch, path)
    return trainable, batch, self.make_loss(rows.shape[0]), {"rows": rows}

  @staticmethod
  def apply_updates(params, updates):
    return apply_updates(params, updates)


def row_sparse_embedding(model, make_loss: Callable) -> RowSparseEmbedding:
  """The `RowSparseEmbedding` of a model with one word table (``.../word_embeddings/embedding``, jfast's BERT).

  Args:
    model: a Flax module whose ``config`` has ``vocab_size`` (e.g. `jfast.models.BertForSequenceClassification`).
    make_loss: ``model -> loss_fn``, e.g. `jfast.training.classification_loss`; called with a copy of ``model``
      whose config has a smaller ``vocab_size``.

  Returns:
    The spec to pass to `jfast.training.make_train_step(..., row_sparse=...)`.

  Example:
    >>> spec = row_sparse_embedding(model, classification_loss)  # doctest: +SKIP
  """
  config = getattr(model, "config", None)
  if config is None or not hasattr(config, "vocab_size") or not hasattr(config, "replace"):
    raise ValueError(
      f"row-sparse embeddings need a model whose config has vocab_size (jfast's BERT), not {type(model).__name__}"
    )
  if hasattr(config, "n_embd"):
    raise ValueError(
      "row-sparse embeddings do not apply to a decoder whose output layer is tied to its input embedding: the "
      "output layer reads every row, so the table's gradient is dense and there is nothing to gain"
    )

  def resized_loss(num_rows: int):
    return make_loss(model.clone(config=config.replace(vocab_size=num_rows)))

  return RowSparseEmbedding(make_loss=resized_loss)


def compact_rows(ids: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """The distinct ids of ``ids`` and ``ids`` remapped onto them.

  Returns:
    ``(rows[T], local_ids)``: T = min(ids.size, vocab_size), a static size; ``rows`` is sorted, its unused tail
    holds ``vocab_size`` (out of range: gathers fill zeros, scatters drop it); ``rows[local_ids] == ids``.
  """
  flat = ids.reshape(-1)
  rows, local = jnp.unique(flat, size=min(flat.size, vocab_size), fill_value=vocab_size, return_inverse=True)
  return rows.astype(jnp.int32), local.reshape(ids.shape).astype(ids.dtype)


def gather_rows(table: jax.Array, rows: jax.Array) -> jax.Array:
  """``table[rows]`` with zero rows for the out-of-range fill ids of `compact_rows`."""
  return table.at[rows].get(mode="fill", fill_value=0)


def word_table_mask(params) -> Any:
  """True at the one word-embedding table (path ending ``word_embeddings/embedding``), False elsewhere."""
  mask = jax.tree_util.tree_map_with_path(
    lambda path, _: tuple(getattr(k, "key", None) for k in path[-2:]) == WORD_TABLE, params
  )
  found = sum(jax.tree.leaves(mask))
  if found != 1:
    raise ValueError(
      f"row-sparse embeddings need exactly one trainable parameter at .../{'/'.join(WORD_TABLE)}, found {found}: "
      "set row_sparse_embeddings='off' when the word table is frozen or the model has none"
    )
  return mask


def word_table_path(params) -> tuple[str, ...]:
  """The keys from the parameter root to the one word table (`word_table_mask`'s True leaf)."""
  word_table_mask(params)  # raises unless there is exactly one
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    if tuple(getattr(k, "key", None) for k in path[-2:]) == WORD_TABLE:
      return tuple(k.key for k in path)
  raise AssertionError("unreachable")


class RowUpdate(NamedTuple):
  """An update for some rows of a table only: add ``values[i]`` to row ``rows[i]`` (out-of-range ids dropped).

  What the lazy `row_sparse_adamw` returns for its table; `apply_updates` applies it in place.
  """

  rows: jax.Array
  values: jax.Array


def apply_updates(params, updates):
  """`optax.apply_updates`, with `RowUpdate` leaves scattered into their tables instead of added whole."""

  def apply(p, u):
    if isinstance(u, RowUpdate):
      return p.at[u.rows].add(u.values.astype(p.dtype), mode="drop")
    return jnp.asarray(p + u).astype(p.dtype)

  return jax.tree.map(apply, params, updates, is_leaf=lambda x: isinstance(x, RowUpdate))


class RowSparseAdamState(NamedTuple):
  """Adam's step count and float moments, table-shaped, as `optax.ScaleByAdamState` keeps them."""

  count: jax.Array
  mu: Any
  nu: Any


def row_sparse_adamw(
  learning_rate: float | optax.Schedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  lazy: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """AdamW (as `optax.adamw`) whose gradients arrive as compact rows, with their row ids as the ``rows`` argument.

  ``update(grads, state, params, rows=rows)``: each gradient leaf is ``[T, D]``, row ``i`` holding the gradient
  of table row ``rows[i]`` (ids out of range, the fill of `compact_rows`, are dropped); the moments are
  table-shaped. Rows absent from ``rows`` had zero gradient: their moments decay and they still move, exactly as in
  dense AdamW, so the returned updates are table-shaped and `optax.apply_updates` applies them as usual.

  ``lazy=True`` is a different optimizer, the "lazy" Adam of ``torch.optim.SparseAdam`` and TensorFlow's
  ``LazyAdam``: only the batch's rows update their moments and move (bias correction by the global step count), so
  the whole step touches ``T`` rows, not the table. Its updates are `RowUpdate` leaves: apply them with
  `apply_updates` (the train step does).

  Args:
    learning_rate: a float or an optax schedule (read at the count before this update, as optax does).
    b1, b2, eps: Adam's constants.
    weight_decay: decoupled decay, applied to every row (lazy: to the batch's rows).
    lazy: update only the batch's rows (see above).

  Returns:
    An optax `GradientTransformationExtraArgs` with a `RowSparseAdamState`. Use it through `optax.masked` on the
    table only (`jfast.optim.make_optimizer` does, with ``row_sparse_embeddings="exact"``).

  Example:
    >>> tx = row_sparse_adamw(1e-3)
    >>> table = jnp.arange(12.0).reshape(6, 2)
    >>> state = tx.init(table)
    >>> updates, state = tx.update(jnp.ones((2, 2)), state, table, rows=jnp.array([1, 4]))
    >>> updates.shape, bool(updates[0, 0] == 0), round(float(updates[1, 0]), 6)  # row 0 untouched, row 1 moves
    ((6, 2), True, -0.001)
  """

  def init_fn(params):
    return RowSparseAdamState(
      count=jnp.zeros((), jnp.int32), mu=jax.tree.map(jnp.zeros_like, params), nu=jax.tree.map(jnp.zeros_like, params)
    )

  def update_fn(updates, state, params=None, *, rows=None, **extra_args):
    del extra_args
    if rows is None:
      raise ValueError(
        "row_sparse_adamw needs the gradient's row ids (rows=...): build the step with "
        "make_train_step(..., row_sparse=row_sparse_embedding(model, loss))"
      )
    if weight_decay and params is None:
      raise ValueError("row_sparse_adamw with weight_decay needs params")
    count = optax.safe_increment(state.count)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)

    def adam(m, v, p):
      u = (m / c1.astype(m.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype)) + eps)
      if p is not None:
        u = u + weight_decay * p.astype(m.dtype)
      return (-lr * u).astype(m.dtype)

    def leaf(g, mu, nu, p):
      if g.ndim != mu.ndim or g.shape[1:] != mu.shape[1:] or g.shape[0] != rows.shape[0]:
        raise ValueError(
          f"row_sparse_adamw got a gradient of shape {g.shape} for a table of shape {mu.shape} and {rows.shape[0]} "
          "row ids: expected one gradient row per id"
        )
      g = g.astype(mu.dtype)
      if lazy:
        m_rows = b1 * gather_rows(mu, rows) + (1 - b1) * g
        v_rows = b2 * gather_rows(nu, rows) + (1 - b2) * g * g
        update = RowUpdate(rows, adam(m_rows, v_rows, gather_rows(p, rows) if weight_decay else None))
        return update, mu.at[rows].set(m_rows, mode="drop"), nu.at[rows].set(v_rows, mode="drop")
      mu = (b1 * mu).at[rows].add((1 - b1) * g, mode="drop")
      nu = (b2 * nu).at[rows].add((1 - b2) * g * g, mode="drop")
      return adam(mu, nu, p if weight_decay else None), mu, nu

    # Without decay the parameters are never read: the moments stand in for them so the trees line up.
    new = jax.tree.map(leaf, updates, state.mu, state.nu, params if weight_decay else state.mu)
    pick = lambda i: jax.tree.map(lambda _, n: n[i], updates, new)  # noqa: E731
    return pick(0), RowSparseAdamState(count=count, mu=pick(1), nu=pick(2))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_row_sparse_state(opt_state) -> bool:
  """Whether an optimizer state holds a `row_sparse_adamw` state (the step checks it matches ``row_sparse``)."""
  leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, RowSparseAdamState))
  return any(isinstance(x, RowSparseAdamState) for x in leaves)


def _get(tree, path: tuple[str, ...]):
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      raise ValueError(f"row_sparse path {'/'.join(path)} is not a parameter of this model (no {key!r})")
    tree = tree[key]
  return tree


def _set(tree, path: tuple[str, ...], value):
  if not path:
    return value
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def compact_params_and_batch(params, batch, path: tuple[str, ...]):
  """``(params with the table at path cut to the batch's rows, the batch remapped onto them, the row ids)``."""
  table = _get(params, path)
  if table is None:
    raise ValueError(f"the row-sparse table {'/'.join(path)} is frozen; leave row_sparse off when it does not train")
  if not jnp.issubdtype(batch.input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids must be integer token ids, got {batch.input_ids.dtype}")
  rows, local = compact_rows(batch.input_ids, table.shape[0])
  return _set(params, path, gather_rows(table, rows)), batch._replace(input_ids=local), rows


__all__ = [
  "WORD_TABLE",
  "RowSparseAdamState",
  "RowSparseEmbedding",
  "RowUpdate",
  "apply_updates",
  "compact_params_and_batch",
  "compact_rows",
  "find_row_sparse_state",
  "gather_rows",
  "row_sparse_adamw",
  "row_sparse_embedding",
  "word_table_mask",
  "word_table_path",
]
