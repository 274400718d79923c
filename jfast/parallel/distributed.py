"""Multi-host runs: start `jax.distributed`, give each host its shard of the data, let only process 0 write.

One process runs per host (per GPU node, per TPU VM worker). After `initialize`, `jax.devices()` lists every device
of every host, a `jfast.parallel.make_mesh` mesh spans them all, and XLA's collectives cross hosts. Each host
tokenizes and batches only its own examples (`host_shard`) and passes its rows of every global batch to
`jfast.parallel.shard_batch`; hosts must run the same number of steps, so `equalize_batches` pads the shorter
hosts' epochs with empty batches (no example dropped, none counted twice).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import numpy as np

from jfast.data.batch import Batch
from jfast.data.batching import BatchingConfig, make_batches
from jfast.data.datasets import TextDataset

ENV_COORDINATOR = "JFAST_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JFAST_NUM_PROCESSES"
ENV_PROCESS_ID = "JFAST_PROCESS_ID"
ENV_FORCE = "JFAST_DISTRIBUTED"


def _cluster_detected() -> str | None:
  # Launchers jax.distributed.initialize() configures itself from, when they started more than one process.
  # JFAST_DISTRIBUTED=1 forces it: a TPU pod slice reports its workers through metadata, not the environment.
  if os.environ.get(ENV_FORCE) == "1":
    return "forced"
  if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # set by srun for the job step
    return "slurm"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "mpi"
  return None


def initialize(
  coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
  """Joins this process to a multi-host run when it is one; a single-process run is left alone.

  Call it before anything else touches JAX. The three settings come from the arguments, else from
  ``JFAST_COORDINATOR_ADDRESS`` / ``JFAST_NUM_PROCESSES`` / ``JFAST_PROCESS_ID``, else from the cluster: under SLURM
  (``srun``), under ``mpirun``, or with ``JFAST_DISTRIBUTED=1`` (a TPU VM pod slice), `jax.distributed.initialize`
  finds them itself.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: processes in the run (one per host).
    process_id: this process's index, ``0 .. num_processes - 1``.

  Returns:
    True when `jax.distributed.initialize` was called (or had been already), False for a single-process run.

  Example:
    >>> initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # doctest: +SKIP
    True
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  explicit = (coordinator_address, num_processes, process_id)
  if all(v is None for v in explicit):
    if _cluster_detected() is None:
      return False
    jax.distributed.initialize()
    return True
  if num_processes == 1 and coordinator_address is None:
    return False
  if any(v is None for v in explicit):
    raise ValueError(
      "a multi-host run needs all of coordinator address, number of processes and process id (flags or "
      f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); got {coordinator_address=}, {num_processes=}, "
      f"{process_id=}"
    )
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is not in 0..{num_processes - 1}")
  jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  return True


def is_primary() -> bool:
  """True on process 0, the one that writes logs, metrics and exports (checkpoints are written by all)."""
  return jax.process_index() == 0


def host_shard(num_examples: int, process_index: int | None = None, process_count: int | None = None) -> np.ndarray:
  """Indices of the examples this host loads: every ``process_count``-th one, starting at its index.

  Strided rather than contiguous, so every host sees the same mix of a dataset sorted by class or length.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return np.arange(index, num_examples, count)


def local_batch_size(global_rows: int) -> int:
  """This host's rows of a global batch; raises unless the global batch divides over the processes."""
  count = jax.process_count()
  if global_rows % count:
    raise ValueError(f"a global batch of {global_rows} rows does not divide over {count} processes")
  return global_rows // count


def empty_like(batch: Batch) -> Batch:
  """A batch of the same type and shapes holding no example: it adds nothing to a loss, count or metric."""
  return jax.tree.map(np.zeros_like, batch)


def equalize_batches(batches: Sequence[Batch]) -> list[Batch]:
  """Pads this host's batches with empty ones up to the largest count on any host (every host must step together).

  The padding batches take the shape of this host's last batch, so hosts must cut batches of one static shape
  (packed or fixed batching); the check that they do is the step's own compile, which all hosts must share.
  """
  batches = list(batches)
  if jax.process_count() == 1:
    return batches
  from jax.experimental import multihost_utils

  counts = multihost_utils.process_allgather(np.asarray(len(batches), np.int64))
  target = int(np.max(counts))
  if not batches and target:
    raise ValueError("this host has no batches while others do: give every host at least one batch of data")
  return batches + [empty_like(batches[-1])] * (target - len(batches))


def _global_max(value: int) -> int:
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def host_dataset(dataset: TextDataset) -> TextDataset:
  """This host's examples of ``dataset`` (`host_shard`); the whole dataset in a single-process run."""
  if jax.process_count() == 1:
    return dataset
  index = host_shard(len(dataset))
  texts = tuple(dataset.texts[i] for i in index)
  lines = tuple(dataset.lines[i] for i in index) if dataset.lines else ()
  return dataclasses.replace(dataset, texts=texts, labels=dataset.labels[index], lines=lines)


def agree_batching(config: BatchingConfig, seqs: Sequence[np.ndarray], labels: np.ndarray, pad_id: int):
  """Pins the batch shape every host will cut, from all hosts' data: one compiled step, and arrays that line up.

  Hosts hold different examples, so shapes a strategy reads off the data (the longest sequence, the most examples
  a packed row takes) would differ between them. The fixed and packed strategies have one shape per run; this
  sets it to the largest any host needs. Single-process runs get ``config`` back unchanged.

  Raises:
    ValueError: a strategy with data-dependent shapes per batch (dynamic, bucket, ...) in a multi-host run.
  """
  if jax.process_count() == 1:
    return config
  if config.strategy not in ("fixed", "packed"):
    raise ValueError(
      f"batching strategy {config.strategy!r} cuts batches of data-dependent shapes, which differ between hosts; "
      "multi-host runs use 'packed' or 'fixed'"
    )
  multiple = config.pad_to_multiple_of or 1
  longest = _global_max(max((len(s) for s in seqs), default=1))
  longest = -(-longest // multiple) * multiple
  if config.strategy == "fixed":
    return dataclasses.replace(config, max_length=config.max_length or longest)
  row_length = config.row_length or config.max_length or longest
  config = dataclasses.replace(config, row_length=row_length)
  if config.max_segments is None:
    trial = make_batches(seqs, labels, config, pad_id=pad_id, seed=0, epoch=0).batches
    config = dataclasses.replace(config, max_segments=_global_max(trial[0].labels.shape[1] if trial else 1))
  return config
