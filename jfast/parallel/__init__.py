"""Data, FSDP and tensor parallelism: a named device mesh, one table of sharding rules by parameter path, jitting
on the mesh, and multi-host runs (`jfast.parallel.distributed`)."""

from jfast.parallel import distributed
from jfast.parallel.mesh_jit import MeshJit, compute_shardings, gather_params, sharded_init
from jfast.parallel.sharding import (
  BATCH_AXES,
  DATA,
  DEFAULT_RULES,
  FSDP,
  LOGICAL_AXIS_RULES,
  MESH_AXES,
  PARAM_AXES,
  TENSOR,
  ShardingRules,
  abstract_tree,
  batch_sharding,
  check_batch,
  make_mesh,
  mesh_from_string,
  partition_spec,
  per_device_bytes,
  shard_batch,
  tree_shardings,
)

__all__ = [
  "BATCH_AXES",
  "DATA",
  "DEFAULT_RULES",
  "FSDP",
  "LOGICAL_AXIS_RULES",
  "MESH_AXES",
  "PARAM_AXES",
  "TENSOR",
  "MeshJit",
  "ShardingRules",
  "abstract_tree",
  "batch_sharding",
  "check_batch",
  "compute_shardings",
  "distributed",
  "gather_params",
  "make_mesh",
  "mesh_from_string",
  "partition_spec",
  "per_device_bytes",
  "shard_batch",
  "sharded_init",
  "tree_shardings",
]
