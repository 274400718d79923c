"""jfast.hugepages: the environment it builds, when the entry points re-execute, and that XLA's buffers get THP."""

import os
import subprocess
import sys

import pytest

from jfast import hugepages
from jfast.hugepages import TUNABLE, ensure_hugepages, hugepage_env, hugepages_supported


def test_env_keeps_other_tunables_and_replaces_an_old_setting():
  env = hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0", "X": "1"})
  assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"
  assert env["X"] == "1"
  assert hugepage_env({})["GLIBC_TUNABLES"] == TUNABLE
  off = hugepage_env({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}"}, enabled=False)
  assert off["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
  assert "GLIBC_TUNABLES" not in hugepage_env({"GLIBC_TUNABLES": TUNABLE}, enabled=False)


def test_reexecutes_once_with_the_original_command(monkeypatch):
  calls = []
  monkeypatch.setattr(hugepages, "hugepages_supported", lambda: True)
  monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
  monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "experiments.finetune", "--max-steps", "3"])
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv("JFAST_HUGEPAGES", raising=False)
  ensure_hugepages()
  assert len(calls) == 1
  exe, argv, env = calls[0]
  assert exe == sys.executable and argv == [sys.executable, "-m", "experiments.finetune", "--max-steps", "3"]
  assert TUNABLE in env["GLIBC_TUNABLES"]
  # Already set (the re-executed process), switched off, or unsupported: no second exec.
  monkeypatch.setenv("GLIBC_TUNABLES", TUNABLE)
  ensure_hugepages()
  monkeypatch.delenv("GLIBC_TUNABLES")
  monkeypatch.setenv("JFAST_HUGEPAGES", "0")
  ensure_hugepages()
  monkeypatch.delenv("JFAST_HUGEPAGES")
  monkeypatch.setattr(hugepages, "hugepages_supported", lambda: False)
  ensure_hugepages()
  assert len(calls) == 1


_PROBE = """
import jax, jax.numpy as jnp
x = jax.jit(lambda: jnp.zeros((64, 1024, 1024), jnp.float32) + 1.0)()  # a 256 MiB XLA buffer, written
x.block_until_ready()
kb = 0
for line in open("/proc/self/smaps_rollup"):
  if line.startswith("AnonHugePages:"):
    kb = int(line.split()[1])
print(kb)
"""


@pytest.mark.skipif(not hugepages_supported(), reason="needs Linux, glibc >= 2.35 and THP not disabled")
def test_xla_buffers_get_huge_pages_only_with_the_tunable():
  base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  base["JAX_PLATFORMS"] = "cpu"

  def huge_kb(env):
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])

  with_tunable, without = huge_kb(hugepage_env(base)), huge_kb(base)
  assert with_tunable >= 128 * 1024, with_tunable  # at least half of the 256 MiB buffer in 2 MiB pages
  assert without < with_tunable / 4, (without, with_tunable)
