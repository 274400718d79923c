"""Checkpoints of the whole train state and the data position, with orbax-checkpoint.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed at any moment leaves
only complete checkpoints behind; `Checkpointer.restore_latest` resumes from the newest one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves ``(state, data_position)`` every so often and keeps the last N.

  Args:
    directory: where checkpoints live (created if missing).
    keep: how many of the most recent checkpoints to keep.

  Example:
    >>> ckpt = Checkpointer("runs/sst2/ckpt", keep=2)  # doctest: +SKIP
    >>> ckpt.save(int(state.step), state, {"epoch": 0, "batch": 120})  # doctest: +SKIP
    >>> state, position = ckpt.restore_latest(state)  # doctest: +SKIP
  """

  def __init__(self, directory: str | Path, *, keep: int = 2):
    if keep < 1:
      raise ValueError(f"keep must be at least 1, got {keep}")
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
      self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    )

  def save(self, step: int, state: Any, data_position: dict[str, int]) -> None:
    """Starts an asynchronous save; the next save or `close` waits for it."""
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore_latest(self, target: Any) -> tuple[Any, dict[str, int]] | None:
    """Restores the newest complete checkpoint into the structure, shapes and shardings of ``target``.

    Args:
      target: a state with the right structure (e.g. the freshly initialised state, or its `jax.eval_shape`).
        Its leaves' shardings decide where the restored arrays land, whatever mesh saved them:
        `jfast.parallel.sharding.abstract_tree(state, mesh)` restores onto another mesh shape (``mesh=None``: one device).

    Returns:
      ``(state, data_position)``, or None when there is no checkpoint yet.
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
    )
    return restored["state"], dict(restored["data"])

  def restore_params(self, step: int | None = None) -> tuple[int, Any] | None:
    """``(step, params)`` of a checkpoint (default the newest) as host arrays, without the optimizer's structure:
    what an export needs. None when there is no checkpoint."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return None
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
    )
    return step, jax.device_get(restored["state"]["params"])

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
