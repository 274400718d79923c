"""8-bit AdamW: both Adam moments stored as blockwise-quantised 8-bit codes, as an optax transformation.

float32 AdamW keeps 8 bytes of state per parameter. Here each moment is cut into blocks of at most ``block_size``
elements along the parameter's last axis; a block stores one float32 scale (its largest-magnitude value) and one
uint8 code per element, an index into a fixed 256-entry code map in [-1, 1]. Every step dequantises, updates the
moments in float32, computes the update from the fresh float32 moments and requantises them for storage (the
bitsandbytes recipe, Dettmers et al. 2022): about 2.03 bytes per parameter.

Quantising is "nearest code", found without a search: the float32 bit pattern is monotone in the value, so its top
16 bits index a 64 KiB table giving the first candidate code, and one or two comparisons against midpoints finish
the job. That is one fused elementwise pass; `jnp.searchsorted` over the 255 midpoints is 10x slower on CPU.

    tx = optax.chain(optax.clip_by_global_norm(1.0), adamw_8bit(1e-4, weight_decay=0.01))
    state = tx.init(params)                      # uint8 codes + float32 block scales
    updates, state = tx.update(grads, state, params)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

F32 = jnp.float32
_SIGN = np.uint32(0x80000000)
_KEY_SHIFT = 16  # 65536 buckets over all float32 values: each bucket spans 2**-7 relative width


def dynamic_map(signed: bool) -> np.ndarray:
  """bitsandbytes' dynamic code map: 7 decades, each a linear grid with more points in the higher decades.

  Decade ``i`` (0..6) covers ``[10**(i-7), 10**(i-6)]`` with ``2**i`` points per sign (``2**(i+1)`` unsigned),
  plus 0 and 1: relative spacing 1.4% near the block's max (0.7% unsigned), and values down to 1e-7 of it are kept.
  Same numbers as ``bitsandbytes.functional.create_dynamic_map(signed)``.
  """
  data = []
  for i in range(7):
    n = 2**i if signed else 2 ** (i + 1)
    # float32 arithmetic throughout, as bitsandbytes computes it (torch float32 tensors).
    bounds = np.linspace(0.1, 1.0, n + 1, dtype=np.float32)
    means = np.float32(10.0 ** (i - 6)) * ((bounds[:-1] + bounds[1:]) / np.float32(2.0))
    data += list(means) + (list(-means) if signed else [])
  data += [0.0, 1.0]
  return np.sort(np.asarray(data, np.float32))


def linear_map(signed: bool) -> np.ndarray:
  """Uniform codes: ``k/127`` for k in -128..127 (signed) or ``k/255`` (unsigned). Loses small values."""
  return (np.arange(-128, 128) / 127.0 if signed else np.arange(256) / 255.0).astype(np.float32)


def sqrt_map() -> np.ndarray:
  """Unsigned codes ``(k/255)**2``: a linear grid on ``sqrt(v)``, the quantity Adam divides by."""
  return ((np.arange(256) / 255.0) ** 2).astype(np.float32)


# name -> (map for the first moment (signed), map for the second moment (non-negative)).
CODE_MAPS: dict[str, tuple[np.ndarray, np.ndarray]] = {
  "dynamic": (dynamic_map(True), dynamic_map(False)),
  "linear": (linear_map(True), linear_map(False)),
  "sqrt": (dynamic_map(True), sqrt_map()),
  "dynamic_sqrt": (dynamic_map(True), dynamic_map(False) ** 2),
}


class CodeBook:
  """A sorted 256-entry code map plus the lookup tables that quantise to its nearest entry in one pass."""

  def __init__(self, values: np.ndarray, *, signed: bool):
    values = np.asarray(values, np.float32)
    if values.shape != (256,) or not np.all(np.diff(values) >= 0) or not np.all(np.isfinite(values)):
      raise ValueError(f"a code map needs 256 finite sorted values, got shape {values.shape}")
    if not (0.0 in values and 1.0 in values):
      raise ValueError("a code map must hold 0 and 1, so zero and constant blocks are stored exactly")
    self.values, self.signed = values, signed
    mids = ((values[1:].astype(np.float64) + values[:-1]) / 2).astype(np.float32)
    # The smallest float32 of each bucket of keys, then how many midpoints lie below it: the nearest code of any
    # value in the bucket is that count plus the midpoints inside the bucket that the value exceeds.
    keys = np.arange(1 << (32 - _KEY_SHIFT), dtype=np.uint64) << _KEY_SHIFT
    bits = np.where(keys >= _SIGN, keys ^ _SIGN, ~keys & 0xFFFFFFFF).astype(np.uint32)
    lows = bits.view(np.float32)
    with np.errstate(invalid="ignore"):
      start = np.searchsorted(mids, lows, side="left")
    # NaN bit patterns sit beyond -inf and +inf in key order: keep the table monotone there.
    start[np.isnan(lows) & (keys < _SIGN)] = 0
    start[np.isnan(lows) & (keys >= _SIGN)] = len(mids)
    inside = np.diff(np.append(start, len(mids)))
    self.comparisons = int(max(inside.max(), 1))
    self.start = start.astype(np.uint8)
    self.mids = np.concatenate([mids, np.full(self.comparisons, np.inf, np.float32)])
    self.zero_code = int(np.flatnonzero(values == 0.0)[0])
    # Worst case |x - dequantise(quantise(x))| / block scale over the range a block can hold.
    lo = -1.0 if signed else 0.0
    grid = values[(values >= lo) & (values <= 1.0)].astype(np.float64)
    self.max_error = float(np.max(np.diff(grid)) / 2)

  def encode(self, y: jax.Array) -> jax.Array:
    """Nearest code index (uint8) of each float32 ``y`` in [-1, 1]."""
    bits = jax.lax.bitcast_convert_type(y, jnp.uint32)
    key = jnp.where(bits >= _SIGN, ~bits, bits | _SIGN) >> _KEY_SHIFT
    idx = jnp.asarray(self.start)[key.astype(jnp.int32)].astype(jnp.int32)
    mids = jnp.asarray(self.mids)
    code = idx
    for j in range(self.comparisons):
      code = code + (y > mids[idx + j]).astype(jnp.int32)
    return code.astype(jnp.uint8)

  def decode(self, codes: jax.Array) -> jax.Array:
    return jnp.asarray(self.values)[codes.astype(jnp.int32)]


@functools.cache
def codebooks(code_map: str) -> tuple[CodeBook, CodeBook]:
  """The (first moment, second moment) `CodeBook`s of a `CODE_MAPS` entry, built once per process."""
  m_map, v_map = CODE_MAPS[code_map]
  return CodeBook(m_map, signed=True), CodeBook(v_map, signed=False)


def block_layout(shape: tuple[int, ...], block_size: int) -> tuple[tuple[int, ...], int, int, int]:
  """How a tensor of ``shape`` is cut into blocks: ``(lead_shape, row_length, blocks_per_row, block_length)``.

  Rows run along the last axis (trailing axes are merged while a row is shorter than ``block_size``), so the leading
  axes, the ones a parameter is usually sharded on, stay as they are. A row of ``row_length`` is cut into
  ``ceil(row_length / block_size)`` blocks of equal length (the last one zero-padded when they do not divide):
  a 384-wide row with ``block_size=256`` makes two blocks of 192, not one of 256 and one of 128.
  """
  shape = tuple(shape) or (1,)
  k, row = len(shape) - 1, shape[-1]
  while row < block_size and k > 0:
    k -= 1
    row *= shape[k]
  blocks = max(-(-row // block_size), 1)
  return shape[:k], row, blocks, max(-(-row // blocks), 1)


def _check_block_size(block_size) -> int:
  if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
    raise TypeError(f"block_size must be an integer, got {type(block_size).__name__} {block_size!r}")
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}")
  return int(block_size)


def _blocks(x: jax.Array, block_size: int) -> tuple[jax.Array, tuple]:
  lead, row, blocks, length = block_layout(x.shape, block_size)
  x = x.reshape(*lead, row)
  pad = blocks * length - row
  if pad:
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)])
  return x.reshape(*lead, blocks, length), (lead, row, blocks, length)


def _unblocks(x: jax.Array, layout: tuple, shape: tuple[int, ...]) -> jax.Array:
  lead, row, blocks, length = layout
  return x.reshape(*lead, blocks * length)[..., :row].reshape(shape)


def quantize_blockwise(x: jax.Array, book: CodeBook, block_size: int = 256) -> tuple[jax.Array, jax.Array]:
  """Blockwise quantisation: ``(codes uint8 shaped like x, scales float32 [*lead, blocks_per_row])``.

  A block's scale is its largest-magnitude value with its sign (signed maps), so that value, and every element of a
  constant block, is stored exactly; an all-zero block has scale 0.

  Args:
    x: the tensor (any float dtype; quantised in float32).
    book: the code map (`CodeBook`).
    block_size: the largest block length (see `block_layout`).

  Returns:
    ``(codes, scales)``; `dequantize_blockwise` inverts it within ``book.max_error * |scale|`` per element.

  Example:
    >>> book = CodeBook(dynamic_map(True), signed=True)
    >>> codes, scales = quantize_blockwise(jnp.linspace(-1.0, 3.0, 512), book)
    >>> codes.dtype, scales.shape
    (dtype('uint8'), (2,))
  """
  block_size = _check_block_size(block_size)
  xb, _ = _blocks(x.astype(F32), block_size)
  hi, lo = xb.max(-1), xb.min(-1)
  scales = jnp.where(hi >= -lo, hi, lo) if book.signed else jnp.maximum(hi, -lo)
  y = xb / jnp.where(scales == 0, 1.0, scales)[..., None]
  codes = book.encode(y)
  return _unblocks(codes, block_layout(x.shape, block_size), x.shape), scales


def dequantize_blockwise(codes: jax.Array, scales: jax.Array, book: CodeBook, block_size: int = 256) -> jax.Array:
  """Inverse of `quantize_blockwise`: float32 values shaped like ``codes``."""
  block_size = _check_block_size(block_size)
  cb, layout = _blocks(codes, block_size)
  return _unblocks(book.decode(cb) * scales[..., None], layout, codes.shape)


class ScaleByAdam8bitState(NamedTuple):
  """State of `scale_by_adam_8bit`: every field but ``count`` has the parameters' tree structure.

  ``mu``/``nu`` leaves are uint8 codes shaped like their parameter (float32 moments for tensors below
  ``min_8bit_size``); ``mu_scale``/``nu_scale`` leaves are float32 ``[*lead, blocks_per_row]`` block scales
  (a float32 scalar placeholder for the float32 ones).
  """

  count: jax.Array
  mu: optax.Updates
  mu_scale: optax.Updates
  nu: optax.Updates
  nu_scale: optax.Updates


def scale_by_adam_8bit(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  *,
  block_size: int = 256,
  min_8bit_size: int = 4096,
  code_map: str = "dynamic",
) -> optax.GradientTransformation:
  """Adam's rescaling (`optax.scale_by_adam`) with 8-bit blockwise-quantised moments.

  Args:
    b1, b2, eps, eps_root: as in `optax.scale_by_adam`.
    block_size: the largest quantisation block (elements along a parameter's last axis; see `block_layout`).
    min_8bit_size: tensors with fewer elements keep float32 moments (biases, norms: they cost little).
    code_map: a key of `CODE_MAPS`: ``dynamic`` (bitsandbytes' maps, the default), ``sqrt``, ``linear``.

  Returns:
    An optax `GradientTransformation` with a `ScaleByAdam8bitState`.
  """
  block_size = _check_block_size(block_size)
  if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
    raise ValueError(f"min_8bit_size must be a non-negative integer, got {min_8bit_size!r}")
  if code_map not in CODE_MAPS:
    raise ValueError(f"unknown code_map {code_map!r}; expected one of {sorted(CODE_MAPS)}")
  m_book, v_book = codebooks(code_map)

  def quantized(p) -> bool:
    return p.size >= min_8bit_size

  def init_leaf(p):
    if not quantized(p):
      # A scalar placeholder scale: orbax refuses zero-size arrays, and a scalar replicates under any sharding.
      return jnp.zeros(p.shape, F32), jnp.zeros((), F32), jnp.zeros(p.shape, F32), jnp.zeros((), F32)
    lead, _, blocks, _ = block_layout(p.shape, block_size)
    return (
      jnp.full(p.shape, m_book.zero_code, jnp.uint8),
      jnp.zeros((*lead, blocks), F32),
      jnp.full(p.shape, v_book.zero_code, jnp.uint8),
      jnp.zeros((*lead, blocks), F32),
    )

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    for p in leaves:
      if not jnp.issubdtype(p.dtype, jnp.floating):
        raise TypeError(f"adamw_8bit needs floating-point parameters, got a {p.dtype} leaf of shape {p.shape}")
    fields = list(zip(*[init_leaf(p) for p in leaves], strict=True)) or [(), (), (), ()]
    trees = [jax.tree.unflatten(treedef, list(f)) for f in fields]
    return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), *trees)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    c1, c2 = 1 - b1**count, 1 - b2**count  # as optax.tree.bias_correction computes them

    def leaf(g, mu, mu_scale, nu, nu_scale):
      g32 = g.astype(F32)
      packed = mu.dtype == jnp.uint8
      m = dequantize_blockwise(mu, mu_scale, m_book, block_size) if packed else mu
      v = dequantize_blockwise(nu, nu_scale, v_book, block_size) if packed else nu
      # Same expressions and order as optax.scale_by_adam, so float32 leaves match it bit for bit.
      m = (1 - b1) * g32 + b1 * m
      v = (1 - b2) * (g32**2) + b2 * v
      u = (m / c1) / (jnp.sqrt(v / c2 + eps_root) + eps)
      if packed:
        (mu, mu_scale), (nu, nu_scale) = (
          quantize_blockwise(m, m_book, block_size),
          quantize_blockwise(v, v_book, block_size),
        )
      else:
        mu, nu = m, v
      return u.astype(g.dtype), mu, mu_scale, nu, nu_scale

    leaves, treedef = jax.tree.flatten(updates)
    fields = [treedef.flatten_up_to(t) for t in state[1:]]
    out = [leaf(g, *f) for g, *f in zip(leaves, *fields, strict=True)]
    cols = list(zip(*out, strict=True)) or [()] * 5
    trees = [jax.tree.unflatten(treedef, list(c)) for c in cols]
    return trees[0], ScaleByAdam8bitState(count, *trees[1:])

  return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 1e-4,
  *,
  mask: Any = None,
  block_size: int = 256,
  min_8bit_size: int = 4096,
  code_map: str = "dynamic",
) -> optax.GradientTransformation:
  """AdamW whose two moments are stored as blockwise 8-bit codes: ~2.03 bytes of state per parameter, not 8.

  The same chain as `optax.adamw` (scale_by_adam -> add_decayed_weights -> scale_by_learning_rate) with
  `scale_by_adam_8bit` in front; tensors below ``min_8bit_size`` elements are exactly `optax.adamw`. The update is
  computed from the freshly updated float32 moments; only their storage between steps is 8-bit.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps: Adam's hyper-parameters.
    weight_decay: decoupled weight decay.
    mask: which leaves get weight decay (a tree of bools or a callable), as in `optax.adamw`.
    block_size: the largest quantisation block (one float32 scale each), along each parameter's last axis.
    min_8bit_size: tensors with fewer elements keep float32 moments (bitsandbytes' default: 4096).
    code_map: ``dynamic`` (bitsandbytes' signed/unsigned dynamic maps), ``sqrt`` or ``linear`` (see `CODE_MAPS`).

  Returns:
    An optax `GradientTransformation`; its state is a tuple of NamedTuples of arrays.

  Example:
    >>> tx = adamw_8bit(1e-3, weight_decay=0.01)
    >>> params = {"w": jnp.ones((64, 128)), "b": jnp.zeros(128)}
    >>> state = tx.init(params)
    >>> state[0].mu["w"].dtype, state[0].mu["b"].dtype
    (dtype('uint8'), dtype('float32'))
  """
  return optax.chain(
    scale_by_adam_8bit(b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size, code_map=code_map),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )


def state_bytes(opt_state) -> int:
  """Bytes held by the arrays of any pytree (an optax state, a `TrainState`, params): ``sum(size * itemsize)``.

  Accepts concrete arrays and abstract ones (``jax.ShapeDtypeStruct`` from `jax.eval_shape`); other leaves (Python
  numbers) count as nothing.

  Example:
    >>> state_bytes(optax.adam(1e-3).init({"w": jnp.zeros((1000,))}))  # count + 2 float32 moments
    8004
  """
  total = 0
  for leaf in jax.tree.leaves(opt_state):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total
