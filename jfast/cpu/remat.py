"""The XLA:CPU compiler option that makes `jax.checkpoint` save memory on the CPU.

XLA:CPU expands the optimization barriers that `jax.checkpoint` places around recomputed values
(`cse_barrier_expander`) before its own common-subexpression elimination runs, so CSE merges the backward pass's
recomputation back into the forward pass and remat silently saves nothing (measured on BERT and on a plain
`jax.checkpoint` MLP: same dot count, same temp memory). Keeping the barriers makes remat work on CPU as it does on
GPU and TPU, whose pipelines do not expand them early.
"""

from __future__ import annotations

import jax

from jfast.cpu.platform import platform_kind

CPU_REMAT_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def compiler_options(remat_policy: str, backend: str | None = None) -> dict[str, str] | None:
  """XLA options a step needs for remat policy ``remat_policy`` to take effect on ``backend`` (default: JAX's).

  Pass them to `jfast.training.make_train_step(..., compiler_options=...)`; `jfast.training.fit` does so from the
  model config. None when nothing is needed: no remat (``"none"``), or a GPU/TPU backend.

  Example:
    >>> compiler_options("none") is None
    True
    >>> compiler_options("full", backend="cuda") is None
    True
  """
  if remat_policy == "none":
    return None
  backend = backend or jax.default_backend()
  return dict(CPU_REMAT_OPTIONS) if platform_kind(backend) == "cpu" else None
