"""The fine-tuned MiniLM that pruning, distillation, quantization and compression start from.

Those experiments read a fine-tuned classifier from ``runs/teacher/model`` by default, which a fresh clone does not
have. `ensure_teacher` makes it on first use by running the README's main job (`jfast.app.finetune --preset quick`, which exports its model; all-MiniLM-L6-v2
fine-tuned one epoch on 40,000 SST-2 sentences, packed: about 7 minutes on 2 CPU cores, 88.4% dev accuracy), so
``jfast experiment distill`` works from a fresh clone; a folder the user names must exist.

    python -m experiments.teacher          # make (or confirm) runs/teacher/model explicitly
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jfast.app import finetune
from jfast.app.entry import run_main

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEACHER = ROOT / "runs" / "teacher" / "model"


def ensure_teacher(folder: str | Path, data: str | None = None) -> Path:
  """Returns ``folder``; fine-tunes and exports the default teacher there first if it is the missing default.

  Args:
    folder: Hugging Face folder of a fine-tuned BERT classifier.
    data: the fine-tune's ``--data`` (SST-2 folder or hub name) when the teacher has to be made.

  Returns:
    The folder, as a `Path`.

  Raises:
    FileNotFoundError: ``folder`` is not the default and holds no model.

  Example:
    >>> ensure_teacher("runs/teacher/model")  # doctest: +SKIP
  """
  folder = Path(folder)
  if (folder / "config.json").is_file():
    return folder
  if folder.resolve() != DEFAULT_TEACHER:
    raise FileNotFoundError(
      f"no fine-tuned model at {folder} (config.json missing); pass a Hugging Face BERT classifier folder, or "
      f"leave the default and the teacher is made at {DEFAULT_TEACHER}"
    )
  print(
    f"no teacher at {folder}: fine-tuning all-MiniLM-L6-v2 on SST-2 first (the README's main job, "
    "about 7 minutes on 2 CPU cores)",
    file=sys.stderr,
    flush=True,
  )
  argv = ["--preset", "quick", "--output", str(folder.parent), "--no-progress"]
  if data:
    argv += ["--data", data]
  finetune.main(argv)
  if not (folder / "config.json").is_file():
    raise RuntimeError(f"the teacher fine-tune finished but wrote no model to {folder}")
  return folder


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description="Make (or confirm) the fine-tuned teacher the compression experiments use.")
  p.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="folder of the fine-tuned model")
  p.add_argument("--data", default=None, help="SST-2 folder or hub name for the fine-tune (default: the script's)")
  args = p.parse_args(argv)
  folder = ensure_teacher(args.teacher, args.data)
  print(f"teacher: {folder}")
  return {"teacher": str(folder)}


if __name__ == "__main__":
  run_main(main)
