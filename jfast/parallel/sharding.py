"""Data, FSDP and tensor parallelism: a named device mesh, one table of rules, and shardings for any pytree.

jfast does not partition anything itself: it names how each array is laid out over the mesh (a `NamedSharding`)
and XLA's SPMD partitioner inserts the collectives. The layout comes from two small tables:

- `PARAM_AXES`: regular expressions over a leaf's path (``bert/encoder_layer_3/query/kernel``) to logical axes,
  one per dimension (``("embed", "heads")``). Patterns are searched at the end of the path, so the same rule
  covers a parameter and its Adam moments (``opt_state/1/0/mu/bert/.../query/kernel``) and serves any model that
  uses these layer names (BERT here, the GPT decoder, Hugging Face-style names) without model changes.
- `LOGICAL_AXIS_RULES`: logical axis to mesh axes. Megatron-style tensor parallelism (query/key/value and FFN-in
  column-parallel, attention-out and FFN-out row-parallel, vocabulary sharded) puts ``heads``, ``mlp`` and
  ``vocab`` on the ``tensor`` axis; FSDP (ZeRO-3) puts ``embed`` on the ``fsdp`` axis, so every weight matrix and
  its optimizer state is split across it; the batch splits over ``data`` x ``fsdp``.

Scanned layers' stacked parameters (`jfast.nn.scan`) have one more, leading, dimension than their rule: it stays
unsplit, and each layer's slice is laid out as the unstacked parameter would be.

Leaves no rule names (an unknown model's weights, an 8-bit optimizer's blocks) fall back to ZeRO-style sharding of
their largest dimension that divides over ``fsdp`` when they are large, and are replicated when small.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jfast.nn.scan import STACKED_GROUPS
from jfast.paths import path_str

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
BATCH_AXES = (DATA, FSDP)

# Path regex (searched, anchored at the end) -> one logical axis name (or None) per dimension. First match wins.
# Dense kernels are [in, out]; embedding tables are [rows, features].
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
  (r"(word_embeddings|wte|embed_tokens|token_embedding|tok_embeddings)/embedding$", ("vocab", "embed")),
  (r"(position_embeddings|token_type_embeddings|wpe|pos_embedding)/embedding$", (None, "embed")),
  (r"(query|key|value|q_proj|k_proj|v_proj|qkv|c_attn|wq|wk|wv)/kernel$", ("embed", "heads")),
  (r"(query|key|value|q_proj|k_proj|v_proj|qkv|c_attn|wq|wk|wv)/bias$", ("heads",)),
  (r"(attention_output|o_proj|out_proj|attn_out|wo|attn/c_proj|attention/proj)/kernel$", ("heads", "embed")),
  (r"(intermediate|c_fc|fc1|fc_in|up_proj|gate_proj|mlp_in|wi)/kernel$", ("embed", "mlp")),
  (r"(intermediate|c_fc|fc1|fc_in|up_proj|gate_proj|mlp_in|wi)/bias$", ("mlp",)),
  (r"(output|c_proj|fc2|fc_out|down_proj|mlp_out|mlp/proj)/kernel$", ("mlp", "embed")),
  (r"(lm_head|unembed|decoder)/kernel$", ("embed", "vocab")),
  (r"(lm_head|unembed|decoder)/bias$", ("vocab",)),
  (r"pooler/kernel$", ("embed", "mlp")),
  (r"pooler/bias$", ("mlp",)),
  (r"(classifier|score)/kernel$", ("embed", None)),
  # Norm scales and the remaining [D] biases: a few KiB each; gathering them would cost more latency than they save.
  (r"(scale|bias)$", ("norm",)),
  # LoRA adapters (`jfast.nn.lora`): rank-r factors, small enough to replicate.
  (r"lora_(a|b)$", (None, None)),
)

LOGICAL_AXIS_RULES: Mapping[str, tuple[str, ...]] = {
  "batch": BATCH_AXES,
  "vocab": (TENSOR,),
  "heads": (TENSOR,),
  "mlp": (TENSOR,),
  "embed": (FSDP,),
  "norm": (),
}

# Leaves without a rule shard over fsdp only from this many elements on: smaller ones cost more in gathers.
MIN_FALLBACK_SIZE = 2**14


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """The two tables, replaceable as a whole (e.g. a model with other layer names, or no vocabulary sharding).

  Attributes:
    param_axes: ``(path regex, logical axes)`` pairs; the first regex found at the end of a leaf's path wins.
    logical_axes: logical axis name -> mesh axes it is split over (``()``: replicated).
    min_fallback_size: elements from which a leaf no rule names is sharded over ``fsdp``.
  """

  param_axes: tuple[tuple[str, tuple[str | None, ...]], ...] = PARAM_AXES
  logical_axes: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: dict(LOGICAL_AXIS_RULES))
  min_fallback_size: int = MIN_FALLBACK_SIZE

  def __post_init__(self):
    object.__setattr__(self, "_compiled", tuple((re.compile(rx), axes) for rx, axes in self.param_axes))
    for axes in self.param_axes:
      for name in axes[1]:
        if name is not None and name not in self.logical_axes:
          raise ValueError(f"rule {axes[0]!r} uses logical axis {name!r}, which logical_axes does not map")

  def match(self, path: str) -> tuple[str | None, ...] | None:
    for rx, axes in self._compiled:
      if rx.search(path):
        return axes
    return None


DEFAULT_RULES = ShardingRules()


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
  """A ``data x fsdp x tensor`` device mesh with `Auto` axis types (XLA propagates shardings between annotations).

  Args:
    data: data-parallel replicas (-1: whatever the other two axes leave of the devices).
    fsdp: devices the parameters and optimizer state are split over (ZeRO-3); the batch is split over it too.
    tensor: devices each layer's matmuls are split over (Megatron-style tensor parallelism).
    devices: the devices to use (default: all, across hosts); the mesh must use exactly these.

  Returns:
    A `jax.sharding.Mesh` with axes ``("data", "fsdp", "tensor")``.

  Example:
    >>> mesh = make_mesh(data=4, tensor=2)  # doctest: +SKIP
    >>> dict(mesh.shape)  # doctest: +SKIP
    {'data': 4, 'fsdp': 1, 'tensor': 2}
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {DATA: data, FSDP: fsdp, TENSOR: tensor}
  for name, size in sizes.items():
    if not isinstance(size, int | np.integer) or (size < 1 and size != -1):
      raise ValueError(f"mesh axis {name}={size!r} must be a positive integer (or -1 to fill the rest)")
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"only one mesh axis can be -1, got {fill}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if len(devices) % fixed:
      raise ValueError(
        f"the mesh's fixed axes ({_describe(sizes)}) use {fixed} devices, which does not divide the "
        f"{len(devices)} devices available"
      )
    sizes[fill[0]] = len(devices) // fixed
  total = math.prod(sizes.values())
  if total != len(devices):
    if total < len(devices) and len(devices) % total == 0:
      hint = f"make the axes multiply to {len(devices)}, or pass devices=jax.devices()[:{total}]"
      relation = "uses only part of"
    else:
      hint = f"make the axes multiply to {len(devices)}"
      relation = "does not divide" if len(devices) % total else "is more than"
    raise ValueError(f"a mesh of {_describe(sizes)} = {total} devices {relation} the {len(devices)} devices; {hint}")
  return jax.make_mesh(
    tuple(int(s) for s in sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices
  )


def mesh_from_string(spec: str | None) -> Mesh | None:
  """``"data=4,tensor=2"`` -> `make_mesh(data=4, tensor=2)`; ``"tensor=2"`` fills data with the rest; None -> None.

  The command-line form of a mesh; unknown axis names and non-integer sizes raise a `ValueError`.
  """
  if not spec:
    return None
  axes = {}
  for part in spec.split(","):
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in MESH_AXES:
      raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; expected some of {MESH_AXES}, e.g. 'data=4,tensor=2'")
    try:
      axes[name] = int(value)
    except ValueError:
      raise ValueError(f"mesh axis {name} needs an integer size in {spec!r}, got {value!r}") from None
  return make_mesh(**axes)  # data not given: whatever the other axes leave


def _describe(sizes: Mapping[str, int]) -> str:
  return " x ".join(f"{k}={v}" for k, v in sizes.items())


def _mesh_shape(mesh: Mesh | Mapping[str, int]) -> Mapping[str, int]:
  return dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)


def partition_spec(
  path: str, shape: Sequence[int], mesh: Mesh | Mapping[str, int], rules: ShardingRules = DEFAULT_RULES, *, strict=True
) -> P:
  """The `PartitionSpec` of one leaf, from its path and shape.

  Args:
    path: the leaf's path string (`path_str`).
    shape: its shape.
    mesh: the mesh, or just its axis sizes (``{"data": 2, "fsdp": 1, "tensor": 4}``).
    rules: the tables.
    strict: raise when a ruled dimension does not divide by its shard count; otherwise use the fallback.

  Returns:
    The spec; mesh axes of size 1 are kept (they cost nothing), and axes the mesh lacks are dropped.
  """
  sizes = _mesh_shape(mesh)
  axes = rules.match(path)
  if axes is not None and len(shape) == len(axes) + 1 and _in_stacked_group(path):
    axes = (None, *axes)  # scanned layers: the leading layer axis stays whole, each layer is split as alone
  if axes is not None and len(axes) == len(shape):
    spec = []
    for dim, name in zip(shape, axes, strict=True):
      mesh_axes = tuple(a for a in (rules.logical_axes[name] if name else ()) if a in sizes)
      count = math.prod(sizes[a] for a in mesh_axes)
      if dim % count:
        if strict:
          raise ValueError(
            f"parameter {path} has shape {tuple(shape)}: its {name!r} dimension of {dim} does not divide over mesh "
            f"axis {'x'.join(mesh_axes)} of {count} devices; change the mesh, pad the dimension, or map "
            f"{name!r} to other mesh axes in ShardingRules.logical_axes"
          )
        return _fallback_spec(shape, sizes, rules)
      spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    used = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    if len(used) != len(set(used)):
      raise ValueError(f"parameter {path}: logical axes {axes} put a mesh axis on two dimensions ({spec})")
    return P(*spec)
  return _fallback_spec(shape, sizes, rules)


def _in_stacked_group(path: str) -> bool:
  return any(part in STACKED_GROUPS for part in path.split("/"))


def _fallback_spec(shape: Sequence[int], sizes: Mapping[str, int], rules: ShardingRules) -> P:
  n = sizes.get(FSDP, 1)
  if n == 1 or math.prod(shape) < rules.min_fallback_size:
    return P()
  candidates = [i for i in np.argsort(shape)[::-1] if shape[i] % n == 0]
  if not candidates:
    return P()
  spec = [None] * len(shape)
  spec[candidates[0]] = FSDP
  return P(*spec)


def _is_param_path(path: str) -> bool:
  # Optimizer-state leaves that only resemble a parameter (an 8-bit optimizer's blocks and scales) take the
  # fallback instead of failing; the parameters themselves, and moments shaped like them, were already checked.
  return "opt_state" not in path.split("/")


def tree_shardings(tree: Any, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
  """A `NamedSharding` for every array leaf of ``tree`` (params, a `TrainState`, optimizer state, or their shapes).

  Args:
    tree: a pytree of arrays or `jax.ShapeDtypeStruct` (e.g. from `jax.eval_shape`).
    mesh: from `make_mesh`.
    rules: the tables (default `DEFAULT_RULES`).

  Returns:
    A pytree of `NamedSharding` with the structure of ``tree``.

  Raises:
    ValueError: a parameter's dimension does not divide over the mesh axes its rule names (the message names both).

  Example:
    >>> shardings = tree_shardings(params, make_mesh(fsdp=8))  # doctest: +SKIP
    >>> params = jax.device_put(params, shardings)  # doctest: +SKIP
  """
  rules = DEFAULT_RULES if rules is None else rules

  def one(path, x):
    name = path_str(path)
    return NamedSharding(mesh, partition_spec(name, np.shape(x), mesh, rules, strict=_is_param_path(name)))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over ``data x fsdp``, everything else whole: the sharding of every field of a `Batch`."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(batch: Any, mesh: Mesh) -> None:
  """Raises a `ValueError` unless every leaf's leading (row) dimension divides over the mesh's data axes."""
  count = mesh.shape[DATA] * mesh.shape[FSDP]
  for path, x in jax.tree_util.tree_leaves_with_path(batch):
    shape = np.shape(x)
    if not shape or shape[0] % count:
      rows = shape[0] if shape else "a scalar"
      raise ValueError(
        f"batch field {path_str(path)} has {rows} rows, which do not divide over the mesh's data x fsdp = "
        f"{mesh.shape[DATA]} x {mesh.shape[FSDP]} = {count} devices; make the batch size a multiple of {count}"
      )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a host batch on the mesh, rows split over ``data x fsdp``; across hosts, each passes only its rows.

  With several processes, ``batch`` is this host's part (its rows of the global batch, in process order) and the
  result is the global array; with one process it is the whole batch.

  Example:
    >>> batch = shard_batch(batch, mesh)  # doctest: +SKIP
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    check_batch(batch, mesh)
    return jax.device_put(batch, sharding)
  count = mesh.shape[DATA] * mesh.shape[FSDP]
  local = count // jax.process_count() if count % jax.process_count() == 0 else count
  for path, x in jax.tree_util.tree_leaves_with_path(batch):
    if np.shape(x)[0] % local:
      raise ValueError(
        f"this host's batch field {path_str(path)} has {np.shape(x)[0]} rows, which do not divide over its "
        f"{local} data shards"
      )
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def per_device_bytes(tree: Any, shardings: Any = None) -> int:
  """Bytes of ``tree`` held by one device (shards are even, so every device holds the same).

  Args:
    tree: arrays or `jax.ShapeDtypeStruct`.
    shardings: their shardings (default: each leaf's own ``.sharding``).
  """
  leaves = jax.tree.leaves(tree)
  shards = jax.tree.leaves(
    jax.tree.map(lambda x: x.sharding, tree) if shardings is None else shardings,
    is_leaf=lambda s: isinstance(s, jax.sharding.Sharding),
  )
  return sum(
    math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x, s in zip(leaves, shards, strict=True)
  )


def abstract_tree(tree: Any, mesh: Mesh | None = None, rules: ShardingRules | None = None) -> Any:
  """`jax.ShapeDtypeStruct` leaves carrying the shardings ``tree`` would have on ``mesh`` (None: one device).

  The restore target for a checkpoint saved under any other mesh shape: orbax reads each device's slices into this
  layout. ``tree`` may be the state itself, or its `jax.eval_shape`.

  Example:
    >>> state, position = Checkpointer(path).restore_latest(abstract_tree(state, make_mesh(fsdp=8)))  # doctest: +SKIP
  """
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, tree)
  else:
    shardings = tree_shardings(tree, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)
