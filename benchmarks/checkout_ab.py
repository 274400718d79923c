"""The same step timed from two checkouts of jfast, in fresh processes taken in turns: does a change cost speed?

    python -m benchmarks.checkout_ab --other /path/to/older/jfast --config packed_bf16 --repeats 5

Each process runs ``python -m benchmarks.step_profile --config CONFIG --time-only`` with its checkout's own
library (the working directory decides which ``jfast`` Python imports) and prints its median step after warm-up;
the two checkouts alternate, so machine noise falls on both alike. Both start in the same allocator environment
(glibc's huge pages, as `benchmarks.compare` gives the jfast side).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import common
from jfast.app.entry import run_main

ROOT = Path(__file__).resolve().parent.parent


def time_once(checkout: Path, config: str, steps: int, threads: int) -> float:
  from jfast.cpu.hugepages import hugepage_env

  env = hugepage_env({**os.environ, "PYTHONPATH": str(checkout)})
  cmd = [sys.executable, "-m", "benchmarks.step_profile", "--config", config, "--time-only"]
  cmd += ["--steps", str(steps), "--threads", str(threads)]
  done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
  if done.returncode:
    raise SystemExit(f"{checkout}: the timing process failed:\n{done.stderr[-2000:]}")
  return float(done.stdout.strip().splitlines()[-1])


def run(other: Path, config: str, repeats: int, steps: int, threads: int) -> str:
  checkouts = {"this checkout": ROOT, f"other ({other})": other}
  times = {name: [] for name in checkouts}
  for _ in range(repeats):
    for name, path in checkouts.items():
      times[name].append(time_once(path, config, steps, threads))
  medians = {name: statistics.median(v) for name, v in times.items()}
  base = medians["this checkout"]
  lines = [f"`{config}`, {repeats} fresh processes per checkout, alternated; each a median of {steps} steps:", ""]
  lines += ["| checkout | process medians (ms) | median (ms) | this / it |", "|---|---|---|---|"]
  for name, values in times.items():
    ms = ", ".join(f"{v * 1e3:.1f}" for v in values)
    lines.append(f"| {name} | {ms} | {medians[name] * 1e3:.1f} | {medians[name] / base:.3f} |")
  return "\n".join(lines)


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--other", required=True, help="the other checkout's root (it holds jfast/ and benchmarks/)")
  p.add_argument("--config", default="packed_bf16")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  other = Path(args.other).resolve()
  if not (other / "benchmarks" / "step_profile.py").is_file():
    raise SystemExit(f"--other {other}: no benchmarks/step_profile.py there")
  text = run(other, args.config, args.repeats, args.steps, args.threads)
  common.print_and_save(text, args.out)
  return text


if __name__ == "__main__":
  run_main(main)
