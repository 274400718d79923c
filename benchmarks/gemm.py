"""One matrix product at a time, XLA:CPU against PyTorch, at the shapes of the benchmarked models' steps.

    python -m benchmarks.gemm                      # float32, MiniLM (456 packed tokens) and the GPT (2048 tokens)
    python -m benchmarks.gemm --dtype bfloat16     # bf16 x bf16 -> float32 on both sides

Each shape in three forms, the ones a Dense layer's step runs: ``x @ w`` (forward), ``g @ w^T`` (input gradient,
both operands contracted on their last axis) and ``x^T @ g`` (weight gradient, contracted on their first axis).
Medians of 20 calls after 4 warm-up calls, both sides on the same pinned threads, the two results checked against
each other. What a step's products could reach if nothing else got in the way: the step profiles
(`benchmarks.step_profile`) show what they do reach.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks import common
from jfast.app.entry import run_main

# (M, K, N): M tokens, a K -> N Dense layer.
SHAPES = {
  "minilm": [(456, 384, 1536), (456, 1536, 384), (456, 384, 384)],
  "gpt": [(2048, 256, 1024), (2048, 1024, 256), (2048, 256, 768), (2048, 256, 2048)],
}
FORMS = ("x @ w", "g @ w^T", "x^T @ g")


def _median_s(fn, calls: int = 20, warmup: int = 4) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


_DIMS = {
  "x @ w": (((1,), (0,)), ((), ())),
  "g @ w^T": (((1,), (1,)), ((), ())),
  "x^T @ g": (((0,), (0,)), ((), ())),
}


def _operand_shapes(form: str, m: int, k: int, n: int):
  """The two operands of ``form`` as the step holds them."""
  return {"x @ w": ((m, k), (k, n)), "g @ w^T": ((m, n), (k, n)), "x^T @ g": ((m, k), (m, n))}[form]


def _time_form(form: str, a, b, dtype: str) -> tuple[float, float, float]:
  """(XLA median s, PyTorch median s, largest relative disagreement) for one product of float32 numpy operands."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  jdt, tdt = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}[dtype]
  ja, jb = jnp.asarray(a, jdt), jnp.asarray(b, jdt)
  ta, tb = torch.from_numpy(a).to(tdt), torch.from_numpy(b).to(tdt)
  xla = jax.jit(lambda p, q: jax.lax.dot_general(p, q, _DIMS[form], preferred_element_type=jnp.float32))
  eager = {"x @ w": lambda: ta @ tb, "g @ w^T": lambda: ta @ tb.T, "x^T @ g": lambda: ta.T @ tb}[form]
  j_s = _median_s(lambda: xla(ja, jb).block_until_ready())
  t_s = _median_s(eager)
  ours, theirs = np.asarray(xla(ja, jb), np.float32), eager().float().numpy()
  return j_s, t_s, float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def measure(shapes, dtype: str = "float32", seed: int = 0) -> list[dict]:
  """Per shape and form: both sides' median seconds and GFLOP/s, and their largest disagreement (relative)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  rows = []
  for m, k, n in shapes:
    for form in FORMS:
      a, b = (rng.standard_normal(s, dtype=np.float32) for s in _operand_shapes(form, m, k, n))
      j_s, t_s, diff = _time_form(form, a, b, dtype)
      flops = 2.0 * m * k * n
      rows.append(
        {
          "shape": f"{m}x{k}x{n}",
          "form": form,
          "jax_ms": j_s * 1e3,
          "torch_ms": t_s * 1e3,
          "jax_gflops": flops / j_s / 1e9,
          "torch_gflops": flops / t_s / 1e9,
          "max_rel_diff": diff,
        }
      )
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--models", default="minilm,gpt", help=f"comma-separated, from {', '.join(SHAPES)}")
  p.add_argument("--threads", type=int, default=2)
  args = p.parse_args(argv)
  unknown = set(args.models.split(",")) - set(SHAPES)
  if unknown:
    raise SystemExit(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(SHAPES)}")
  common.pin_threads(args.threads)
  import torch

  torch.set_num_threads(args.threads)
  from jfast.app.runs import cpu_description

  shapes = [s for name in args.models.split(",") for s in SHAPES[name]]
  print(f"{args.dtype} products, {args.threads} threads, {cpu_description()}:\n")
  print("| M x K x N | form | XLA ms | PyTorch ms | XLA GFLOP/s | PyTorch GFLOP/s |")
  print("|---|---|---|---|---|---|")
  for r in measure(shapes, args.dtype):
    print(
      f"| {r['shape']} | `{r['form']}` | {r['jax_ms']:.2f} | {r['torch_ms']:.2f} | {r['jax_gflops']:.0f} | "
      f"{r['torch_gflops']:.0f} |"
    )


if __name__ == "__main__":
  run_main(main)
