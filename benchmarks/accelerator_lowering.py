"""What each platform gets from jfast's train step: the MiniLM-shaped classifier's gradient, fp32 and bf16, lowered
for the CPU, a GPU (``cuda``) and a TPU on this machine (no accelerator needed), with its matrix products, platform
switches, custom calls and StableHLO size.

    python -m benchmarks.accelerator_lowering            # MiniLM's shape (6 layers, width 384)
    python -m benchmarks.accelerator_lowering --layers 24

Each trace is made for its platform (`jfast.cpu.target`), as a process on that platform makes it: a CPU with bf16
instructions gets `jfast.cpu`'s bf16 products (more dots: the bias gradients are products there; forced on here,
whatever this machine's CPU), a GPU or TPU stock ``nn.Dense`` and XLA's autodiff (the same products as fp32).
Layers are unrolled here, so every layer's products are counted; `tests/test_accelerator_lowering.py` holds the
equalities for both layouts.
"""

from __future__ import annotations

import argparse
import re

from benchmarks import common
from jfast.app.entry import run_main


def lowered_text(dtype: str, platform: str, layers: int = 6, rows: int = 8, length: int = 64) -> str:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jfast.cpu import target, use_layer
  from jfast.data import batch_from_rows
  from jfast.models import BertConfig, BertForSequenceClassification
  from jfast.training import classification_loss

  # Layers unrolled, so that every layer's products are counted (scanned, layers 0..N-2 are one loop body).
  config = BertConfig(**common.MINILM_WIDTH, num_hidden_layers=layers, scan_layers=False)
  model = BertForSequenceClassification(config.replace(dtype=dtype), num_labels=2)
  rng = np.random.default_rng(0)
  seqs = [rng.integers(1, 30522, size=int(n)) for n in rng.integers(8, length, size=rows)]
  batch = batch_from_rows(seqs, rng.integers(0, 2, size=rows), length, pad_id=0)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  loss = classification_loss(model)
  with target(platform), use_layer(True):  # the CPU rows as a CPU with bf16 instructions traces them
    traced = jax.jit(jax.grad(lambda p, b: loss(p, b, jax.random.key(1), False)[0])).trace(params, batch)
  return traced.lower(lowering_platforms=(platform,)).as_text()


def counts(text: str) -> dict[str, int]:
  return {
    "dot_general": len(re.findall(r"\bstablehlo\.dot_general\b", text)),
    "case": len(re.findall(r"\bstablehlo\.case\b", text)),
    "custom_call": len(re.findall(r"\bstablehlo\.custom_call\b", text)),
    "lines": text.count("\n"),
  }


def run(layers: int) -> str:
  lines = [
    f"MiniLM-shaped classifier (width 384, {layers} layers, 8 x 64 tokens), gradient of the loss, lowered per platform:",
    "",
    "| platform | dtype | dot_general | case | custom_call | StableHLO lines |",
    "|---|---|---|---|---|---|",
  ]
  for platform in ("cpu", "cuda", "tpu"):
    for dtype in ("float32", "bfloat16"):
      c = counts(lowered_text(dtype, platform, layers))
      lines.append(f"| {platform} | {dtype} | {c['dot_general']} | {c['case']} | {c['custom_call']} | {c['lines']} |")
  return "\n".join(lines)


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--out", default=None, help="also write the markdown here")
  args = p.parse_args(argv)
  text = run(args.layers)
  common.print_and_save(text, args.out)
  return text


if __name__ == "__main__":
  run_main(main)
