"""jfast.cpu.hugepages: the environment it builds, when the entry points re-execute, and that XLA's buffers get THP."""

import os
import subprocess
import sys

import pytest

from jfast.cpu import hugepages
from jfast.cpu.hugepages import RETAIN, TUNABLE, ensure_hugepages, hugepage_env, hugepages_supported, tunables_set


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
  monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "jfast.app.finetune", "--max-steps", "3"])
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(hugepages, "cpu_backend", lambda: True)
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv("JFAST_HUGEPAGES", raising=False)
  ensure_hugepages()
  assert len(calls) == 1
  exe, argv, env = calls[0]
  assert exe == sys.executable and argv == [sys.executable, "-m", "jfast.app.finetune", "--max-steps", "3"]
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
  # A GPU or TPU backend: host allocations hold no step's buffers, so the process is left as it is.
  monkeypatch.setattr(hugepages, "hugepages_supported", lambda: True)
  monkeypatch.setattr(hugepages, "cpu_backend", lambda: False)
  ensure_hugepages()
  assert len(calls) == 1


def test_backend_is_read_without_importing_jax():
  assert hugepages.cpu_backend({"JAX_PLATFORMS": "cpu"}) is True
  assert hugepages.cpu_backend({"JAX_PLATFORMS": "cuda,cpu"}) is False
  assert hugepages.cpu_backend({"JAX_PLATFORMS": "tpu"}) is False
  code = "import sys; from jfast.cpu import hugepages; hugepages.cpu_backend({}); print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


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


def _run_probe(script: str, huge_pages: bool, retain: bool = False) -> int:
  """The integer a probe script prints last, run in a fresh CPU-only process with or without the tunables."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["JAX_PLATFORMS"] = "cpu"
  if huge_pages:
    env = hugepage_env(env, retain=retain)
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
  return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hugepages_supported(), reason="needs Linux, glibc >= 2.35 and THP not disabled")
def test_xla_buffers_get_huge_pages_only_with_the_tunable():
  with_tunable, without = _run_probe(_PROBE, True), _run_probe(_PROBE, False)
  assert with_tunable >= 128 * 1024, with_tunable  # at least half of the 256 MiB buffer in 2 MiB pages
  assert without < with_tunable / 4, (without, with_tunable)


def test_retain_adds_and_removes_only_its_own_settings():
  env = hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_max=7"}, retain=True)
  items = env["GLIBC_TUNABLES"].split(":")
  assert items == [TUNABLE, *RETAIN]  # the user's arena_max / mmap_max replaced by RETAIN's values
  assert tunables_set(retain=True, environ=env) and tunables_set(environ=env)
  assert not tunables_set(retain=True, environ=hugepage_env({}))
  # Switched off for a child (the PyTorch side): RETAIN's exact values go, a user's own value of those names stays.
  off = hugepage_env({"GLIBC_TUNABLES": f"{TUNABLE}:{RETAIN[0]}:{RETAIN[1]}:glibc.malloc.arena_max=2"}, enabled=False)
  assert off["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"


def test_reexecutes_for_retain_when_only_huge_pages_are_set(monkeypatch):
  calls = []
  monkeypatch.setattr(hugepages, "hugepages_supported", lambda: True)
  monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append(env))
  monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "experiments.lm"])
  monkeypatch.delenv("JFAST_HUGEPAGES", raising=False)
  monkeypatch.setenv("GLIBC_TUNABLES", TUNABLE)
  ensure_hugepages()  # huge pages are there: nothing to do
  assert calls == []
  ensure_hugepages(retain=True)
  assert len(calls) == 1 and set(RETAIN) <= set(calls[0]["GLIBC_TUNABLES"].split(":"))


_FAULTS_PROBE = """
import resource
import jax, jax.numpy as jnp
x = jnp.arange(64 * 1024 * 1024, dtype=jnp.float32) % 977.0  # 256 MiB
f = jax.jit(lambda a: a * 1.5 + 0.25)  # a fresh 256 MiB output buffer each call, freed at the next
for _ in range(16):  # XLA frees on its own thread, so the heap grows over the first calls until it holds enough
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not hugepages_supported(), reason="needs Linux, glibc >= 2.35 and THP not disabled")
def test_retained_memory_is_reused_without_page_faults():
  huge_only, retained = _run_probe(_FAULTS_PROBE, True), _run_probe(_FAULTS_PROBE, True, retain=True)
  # Huge pages alone: each 256 MiB buffer is mapped afresh, 128 faults of 2 MiB a call; retained: reused (a stray
  # call may still fault while a freed buffer is in flight).
  assert huge_only >= 8 * 100, huge_only
  assert retained <= huge_only / 3, (retained, huge_only)
