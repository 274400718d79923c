"""Turns the two sides' results into the side-by-side table, the best-vs-best verdict, markdown and a bar chart.

python -m benchmarks.report results/benchmarks/NAME.json     # re-render NAME.md and NAME.png from the JSON
"""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path
from typing import Any

TARGET_SPEEDUP = 1.5
# Medians over repeats for these; everything else is taken from the first repeat.
_REPEATED = ("real_tokens_per_s", "median_step_s", "mean_step_s", "compile_s", "model_tflops_per_s", "epoch_s")


def merge_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """One result from several repeats of the same side and configuration (medians of the timing fields)."""
  ok = [r for r in runs if "error" not in r]
  if not ok:
    return runs[0]
  merged = dict(ok[0])
  for key in _REPEATED:
    values = [r[key] for r in ok if r.get(key) is not None]
    if values:
      merged[key] = statistics.median(values)
  merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
  merged["repeats"] = len(ok)
  return merged


def estimate_epoch(result: dict[str, Any], epoch_tokens: int, epoch_shapes: int | None) -> float | None:
  """Seconds for one epoch from a short run: its real tokens at the measured rate plus the compilations it needs.

  jfast compiles once per batch shape, so its measured compile time per shape is scaled to the epoch's shapes.
  PyTorch's compile time (torch.compile only) is taken as measured: dynamo turns shapes dynamic after the first
  recompilation rather than compiling each one.
  """
  if "error" in result:
    return None
  if "epoch_s" in result:
    return result["epoch_s"]
  compile_s = result["compile_s"]
  if result["side"] == "jax" and epoch_shapes:
    compile_s = compile_s / max(result["num_shapes"], 1) * epoch_shapes
  return epoch_tokens / result["real_tokens_per_s"] + compile_s


def build_rows(
  results: dict[str, dict[str, dict]], meta: dict[str, Any], peak_tflops: float | None
) -> list[dict[str, Any]]:
  """One row per configuration with both sides' figures (None where a side has no form of it)."""
  rows = []
  for name, sides in results.items():
    row: dict[str, Any] = {"config": name, "technique": meta["techniques"][name], "in_best": meta["in_best"][name]}
    for side in ("jax", "torch"):
      r = sides.get(side)
      if r is None:
        continue
      if "error" in r:
        row[side] = {"error": r["error"]}
        continue
      gpu = r["device"] != "cpu"
      fig = {
        "tokens_per_s": r["real_tokens_per_s"],
        "median_step_s": r["median_step_s"],
        "compile_s": r["compile_s"],
        "warmup_s": r["warmup_s"],
        "num_shapes": r["num_shapes"],
        "peak_mb": r["device_peak_mb"] if gpu and r.get("device_peak_mb") else r["peak_rss_mb"],
        "peak_kind": "device" if gpu and r.get("device_peak_mb") else "host RSS",
        "padding_efficiency": r["padding_efficiency"],
        "examples_per_step": sum(r["step_examples"]) / max(len(r["step_examples"]), 1),
        "tflops": r["model_tflops_per_s"],
        "mfu": r["model_tflops_per_s"] / peak_tflops if gpu and peak_tflops else None,
        "est_epoch_s": estimate_epoch(r, meta["epoch_tokens"], meta["epoch_shapes"].get(name)),
        "epoch_s": r.get("epoch_s"),
        "dev_accuracy": r.get("dev_accuracy"),
        "train_loss": r["train_loss"],
        "tokens": r["timed_tokens"],
        "cpu_share": r.get("cpu_share"),
        "timed_steps": r["timed_steps"],
        "contended_steps": r.get("contended_steps", 0),
        "clean_fraction": r.get("clean_fraction", 1.0),
      }
      row[side] = fig
    j, t = row.get("jax"), row.get("torch")
    if j and t and "error" not in j and "error" not in t:
      row["speedup"] = j["tokens_per_s"] / t["tokens_per_s"]
    rows.append(row)
  return rows


def best_vs_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
  """Each side's fastest configuration by (estimated or measured) epoch time, and jfast's speedup over PyTorch's.

  Rows marked ``in_best=False`` (they train a different model, e.g. with frozen layers) do not compete.
  """
  best = {}
  for side in ("jax", "torch"):
    candidates = [
      (r[side]["est_epoch_s"], r["config"])
      for r in rows
      if side in r and "error" not in r[side] and r.get("in_best", True)
    ]
    candidates = [c for c in candidates if c[0] is not None]
    if candidates:
      best[side] = min(candidates)
  if len(best) < 2:
    return None
  (j_s, j_name), (t_s, t_name) = best["jax"], best["torch"]
  return {
    "jax_config": j_name,
    "jax_epoch_s": j_s,
    "torch_config": t_name,
    "torch_epoch_s": t_s,
    "speedup": t_s / j_s,
    "target": TARGET_SPEEDUP,
    "meets_target": t_s / j_s >= TARGET_SPEEDUP,
  }


def _f(value, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def _pair(row: dict, key: str, fmt: str) -> tuple[str, str]:
  out = []
  for side in ("jax", "torch"):
    fig = row.get(side)
    if fig is None:
      out.append("n/a")
    elif "error" in fig:
      out.append("failed")
    else:
      out.append(_f(fig.get(key), fmt))
  return out[0], out[1]


_SIDES = {"jax": "the jfast side", "torch": "the PyTorch side", "both": "both sides", "none": "neither side"}


def _hugepages_note(which: str | None, retain: str | None = None) -> str:
  note = (
    f" glibc huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, jfast.cpu.hugepages): {_SIDES[which]}."
    if which
    else ""
  )
  if retain:  # absent from runs before the option existed, which retained nothing
    note += f" Freed memory retained (jfast.cpu.hugepages.RETAIN): {_SIDES[retain]}."
  return note


def markdown(rows: list[dict[str, Any]], verdict: dict | None, meta: dict[str, Any]) -> str:
  """The side-by-side table (J = jfast, T = PyTorch) with the best-vs-best line and the run's settings."""
  full = meta["full"]
  gpu = any(r.get(s) and r[s].get("mfu") is not None for r in rows for s in ("jax", "torch"))
  cols = [
    ("real tok/s", "tokens_per_s", ",.0f"),
    ("median step s", "median_step_s", ".3f"),
    ("compile s", "compile_s", ".1f"),
    ("warm-up s", "warmup_s", ".1f"),
    ("shapes", "num_shapes", "d"),
    ("peak MiB", "peak_mb", ",.0f"),
    ("pad eff", "padding_efficiency", ".3f"),
    ("ex/step", "examples_per_step", ".1f"),
    ("epoch s" if full else "est. epoch s", "est_epoch_s", ",.0f"),
    ("CPU share", "cpu_share", ".2f"),
  ]
  if full:
    cols.append(("dev acc", "dev_accuracy", ".4f"))
  if gpu:
    cols += [("TFLOP/s", "tflops", ".1f"), ("MFU", "mfu", ".1%")]
  header = ["config"] + [f"{name} J / T" for name, _, _ in cols] + ["J/T tok/s"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [row["config"]]
    for _, key, fmt in cols:
      j, t = _pair(row, key, fmt)
      cells.append(f"{j} / {t}")
    cells.append(_f(row.get("speedup"), ".2f") + ("x" if row.get("speedup") else ""))
    lines.append("| " + " | ".join(cells) + " |")
  length = "one full epoch" if full else f"{meta['warmup']} warm-up + {meta['steps']} timed steps"
  if meta.get("max_train_examples"):
    length += f" (over the first {meta['max_train_examples']:,} training examples)"
  out = [
    f"Task {meta['task']}, model {meta['model']}, device {meta['device']}, {meta['threads']} threads per side, "
    f"{length} per run, "
    f"{meta['repeats']} repeat(s). J = jfast, T = PyTorch; n/a = no form of the technique on that side yet."
    + _hugepages_note(meta.get("hugepages"), meta.get("retain_freed")),
    "",
    *lines,
    "",
  ]
  if gpu:
    parts = []
    for side, name in (("jax", "jfast"), ("torch", "PyTorch")):
      best = max(((r[side]["mfu"], r["config"]) for r in rows if r.get(side) and r[side].get("mfu")), default=None)
      if best:
        parts.append(f"{name} {best[0]:.1%} (`{best[1]}`)")
    out.append(f"Best MFU: {', '.join(parts)}; target: jfast at least 50% and above PyTorch's.")
    out.append("")
  if verdict and meta["task"] != "synthetic":
    out.append(
      f"Best vs best: jfast `{verdict['jax_config']}` {verdict['jax_epoch_s']:,.0f} s vs PyTorch "
      f"`{verdict['torch_config']}` {verdict['torch_epoch_s']:,.0f} s per {'measured' if full else 'estimated'} "
      f"epoch: **{verdict['speedup']:.2f}x** (target {verdict['target']}x: "
      f"{'met' if verdict['meets_target'] else 'not met'})."
    )
    out.append("")
  if meta.get("min_cpu_share"):
    left = [
      f"{r['config']}/{'jfast' if side == 'jax' else 'PyTorch'} {r[side]['contended_steps']}"
      + (" (all of them, so kept as measured)" if r[side]["clean_fraction"] == 0 else "")
      for r in rows
      for side in ("jax", "torch")
      if r.get(side) and "error" not in r[side] and r[side].get("contended_steps")
    ]
    out.append(
      f"Steps with a CPU share under {meta['min_cpu_share']} (a neighbour on the shared machine took a core) are "
      f"left out of the statistics: {', '.join(left) or 'none'}."
    )
    out.append("")
  out.append("Techniques:")
  out += [f"- `{r['config']}`: {r['technique']}" for r in rows]
  return "\n".join(out) + "\n"


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
  """Bars of real tokens/s and peak memory per configuration, jfast beside PyTorch."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = [r["config"] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(names) + 4), 4.5))
  for ax, key, label in ((axes[0], "tokens_per_s", "real tokens / s"), (axes[1], "peak_mb", "peak memory (MiB)")):
    for k, (side, color, name) in enumerate((("jax", "tab:blue", "jfast"), ("torch", "tab:orange", "PyTorch"))):
      values = [r[side][key] if r.get(side) and "error" not in r[side] else 0.0 for r in rows]
      ax.bar([i + (k - 0.5) * 0.4 for i in range(len(names))], values, width=0.4, color=color, label=name)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(label)
    ax.grid(axis="y", alpha=0.3)
  axes[0].legend()
  # The device names the CPU and its vector extensions: wrapped, or the title runs off a narrow figure.
  fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 11)), fontsize="medium")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def rerender(path: Path) -> str:
  """Rebuilds ``{name}.md`` and ``{name}.png`` from a saved ``{name}.json`` (e.g. after a change to the table)."""
  import json

  from benchmarks.configs import CONFIGS

  summary = json.loads(Path(path).read_text())
  meta = summary["meta"]
  meta.setdefault("in_best", {c: CONFIGS[c].in_best if c in CONFIGS else True for c in summary["results"]})
  rows = build_rows(summary["results"], meta, meta.get("peak_tflops"))
  verdict = best_vs_best(rows)
  md = markdown(rows, verdict, meta)
  summary.update(rows=rows, best_vs_best=verdict)
  Path(path).write_text(json.dumps(summary, indent=1))
  Path(path).with_suffix(".md").write_text(f"`{meta['command']}`\n\n{md}")
  chart(
    rows,
    Path(path).with_suffix(".png"),
    f"jfast vs PyTorch: {meta['task']}, {meta['model']}, {meta['device']}",
  )
  return md


if __name__ == "__main__":
  import sys

  for arg in sys.argv[1:]:
    print(rerender(Path(arg)))
