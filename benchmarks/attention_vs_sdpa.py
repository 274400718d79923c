"""jfast's dense attention against PyTorch's ``scaled_dot_product_attention``, forward plus backward, alone.

The attention core of a train step at the shapes `experiments.lm` (the GPT: 8 x 256 tokens, 4 heads of 64, causal)
and `benchmarks.compare` (MiniLM: 32 x 64 tokens, 12 heads of 32, padding masked) train with, in float32 and in
bfloat16, on random inputs. Both sides compute the gradient of ``sum(out * probe)`` with respect to q, k and v;
jfast's step is jitted (compiled before timing), PyTorch's runs eagerly with its default (flash) CPU kernel. The two
sides alternate call by call, so machine noise hits both alike; medians after warm-up.

    python -m benchmarks.attention_vs_sdpa                    # both shapes, fp32 and bf16, 2 threads a side
    python -m benchmarks.attention_vs_sdpa --reps 50 --out results/attention/vs_sdpa.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jfast.app.entry import run_main
from jfast.nn import dense_attention

# name: (batch, length, heads, head_dim, causal, padded tail per row)
SHAPES = {"gpt (experiments.lm)": (8, 256, 4, 64, True, 0), "minilm (compare)": (32, 64, 12, 32, False, 20)}


def _inputs(batch, length, heads, depth, pad, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v, probe = (rng.normal(size=(batch, length, heads, depth)).astype(np.float32) for _ in range(4))
  segments = np.ones((batch, length), np.int32)
  if pad:
    segments[:, length - pad :] = 0
  return q, k, v, probe, segments


def _jax_call(arrays, causal, dtype):
  """A zero-argument call returning d/d(q, k, v) as ``[B, L, H, D]`` arrays (compiled here, not on first call)."""
  q, k, v, probe, segments = (jnp.asarray(a) for a in arrays)
  q, k, v, probe = (x.astype(dtype) for x in (q, k, v, probe))

  def loss(q, k, v):
    out = dense_attention(q, k, v, segments, causal=causal)
    return jnp.sum(out.astype(jnp.float32) * probe.astype(jnp.float32))

  compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile()
  return lambda: jax.block_until_ready(compiled(q, k, v))


def _torch_call(arrays, causal, dtype):
  """The same gradients from PyTorch, as ``[B, H, L, D]`` tensors (sdpa's layout)."""
  import torch

  q, k, v, probe, segments = arrays
  cast = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  q, k, v = (torch.tensor(x.transpose(0, 2, 1, 3), dtype=cast, requires_grad=True) for x in (q, k, v))
  probe = torch.tensor(probe.transpose(0, 2, 1, 3), dtype=cast)
  real = torch.tensor(segments > 0)
  mask = None if causal else real[:, None, None, :]  # keys: real tokens only, as jfast's segment mask

  def call():
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return torch.autograd.grad((out * probe).sum(), (q, k, v))

  return call


def measure(reps: int, warmup: int) -> list[dict]:
  rows = []
  for name, (batch, length, heads, depth, causal, pad) in SHAPES.items():
    arrays = _inputs(batch, length, heads, depth, pad)
    for dtype in ("float32", "bfloat16"):
      calls = {"jfast": _jax_call(arrays, causal, dtype), "pytorch": _torch_call(arrays, causal, dtype)}
      times = common.time_alternated(calls, reps, warmup)
      medians = {side: statistics.median(t) for side, t in times.items()}
      rows.append({"shape": name, "dtype": dtype, **{f"{s}_ms": m * 1e3 for s, m in medians.items()}})
  return rows


def markdown(rows: list[dict], threads: int) -> str:
  lines = [
    f"Attention core, forward + backward, {threads} threads a side, medians (ms); jfast `dense_attention` (jitted) "
    "against PyTorch `scaled_dot_product_attention`:",
    "",
    "| shape | dtype | jfast ms | PyTorch ms | jfast speed-up |",
    "|---|---|---|---|---|",
  ]
  for r in rows:
    speed = r["pytorch_ms"] / r["jfast_ms"]
    lines.append(f"| {r['shape']} | {r['dtype']} | {r['jfast_ms']:.2f} | {r['pytorch_ms']:.2f} | {speed:.2f}x |")
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--reps", type=int, default=30)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--out", default=None, help="also write the markdown here")
  args = p.parse_args(argv)
  common.pin_threads(args.threads)
  import torch

  torch.set_num_threads(args.threads)
  rows = measure(args.reps, args.warmup)
  text = markdown(rows, args.threads)
  print(text)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
  return rows


if __name__ == "__main__":
  run_main(main)
