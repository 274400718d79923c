"""``jfast report``: the latest result of every experiment and benchmark in one ``report.md`` and ``report.html``.

Sources are the run folders (`jfast.app.runs`) and the experiments' output folders under ``results/``: each output
folder's markdown tables and PNG plots are copied in, headed by the machine that produced them
(``machine.json``, written by ``jfast experiment``/``jfast bench``), so a CPU run and a GPU run of the same script
can be read side by side.

The HTML is produced by a small converter for the markdown our own scripts write (headings, tables, images,
paragraphs, code): a full markdown library would be one more dependency for a report that never sees foreign
markdown.
"""

from __future__ import annotations

import datetime
import html
import json
import re
import shutil
from pathlib import Path
from typing import Any

from jfast.app.runs import latest_runs, machine_info


def _machine_line(info: dict[str, Any] | None) -> str:
  if not info:
    return "machine: not recorded (run through `jfast experiment` / `jfast bench` to record it)"
  parts = [
    info.get("cpu") or "unknown CPU",
    f"{info.get('cpus')} cores",
    f"devices {', '.join(info.get('devices') or []) or '?'}",
    f"jax {info.get('jax')}",
    f"torch {info.get('torch')}",
  ]
  return "machine: " + " | ".join(str(p) for p in parts)


def _read_machine(folder: Path) -> dict[str, Any] | None:
  path = folder / "machine.json"
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return None


def _demote_headings(text: str) -> str:
  return re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", text, flags=re.M)


def _section_for_folder(folder: Path, figures: Path, title: str, machine: dict | None) -> list[str]:
  files = sorted(folder.glob("*.md")) + sorted(folder.glob("*.png"))
  if not files:
    return []
  newest = max(f.stat().st_mtime for f in files)
  when = datetime.datetime.fromtimestamp(newest, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  lines = [f"## {title}", "", f"_{folder} · updated {when} · {_machine_line(machine)}_", ""]
  for md in sorted(folder.glob("*.md")):
    lines += [f"### {md.stem}", "", _demote_headings(md.read_text().strip()), ""]
  for png in sorted(folder.glob("*.png")):
    target = figures / f"{folder.name}-{png.name}"
    shutil.copyfile(png, target)
    lines += [f"![{folder.name} {png.stem}](figures/{target.name})", ""]
  return lines


def _runs_table(runs: dict[str, Path]) -> list[str]:
  if not runs:
    return []
  lines = ["## Runs", "", "| run | folder | summary |", "|---|---|---|"]
  for name, path in runs.items():
    summary = json.loads((path / "summary.json").read_text())
    result = summary.get("result", summary)
    shown = {}
    if isinstance(result, dict):
      shown = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40}
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(shown.items())[:8])
    lines.append(f"| {name} | `{path}` | {text or '(see folder)'} |")
  return [*lines, ""]


def build_report(results: str | Path = "results", runs: str | Path = "runs", out: str | Path = "report") -> Path:
  """Writes ``out/report.md`` and ``out/report.html``; returns the markdown's path.

  Args:
    results: folder whose subfolders are experiment/benchmark outputs (tables ``*.md``, plots ``*.png``).
    runs: folder of run folders (the newest finished run per name is listed).
    out: where the report and a copy of its figures go.
  """
  results, out = Path(results), Path(out)
  figures = out / "figures"
  figures.mkdir(parents=True, exist_ok=True)
  latest = latest_runs(runs) if Path(runs).is_dir() else {}
  now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  lines = ["# jfast report", "", f"Built {now} on: {_machine_line(machine_info())}.", ""]
  lines += _runs_table(latest)
  folders = sorted(p for p in results.iterdir() if p.is_dir()) if results.is_dir() else []
  for folder in folders:
    lines += _section_for_folder(folder, figures, folder.name, _read_machine(folder))
  if not folders and not latest:
    lines += [f"No results yet under {results} or {runs}: run `jfast experiment NAME` first.", ""]
  path = out / "report.md"
  path.write_text("\n".join(lines))
  path.with_suffix(".html").write_text(markdown_to_html("\n".join(lines), title="jfast report"))
  return path


def _inline(text: str) -> str:
  text = html.escape(text, quote=False)
  text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2" style="max-width:100%">', text)
  text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)
  text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
  text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
  return re.sub(r"(?<![\w*])_([^_]+)_(?!\w)", r"<i>\1</i>", text)


def markdown_to_html(text: str, *, title: str = "report") -> str:
  """HTML for the subset of markdown the scripts write: headings, pipe tables, images, lists, code, paragraphs."""
  body, lines, i = [], text.splitlines(), 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("```"):
      j = i + 1
      while j < len(lines) and not lines[j].startswith("```"):
        j += 1
      body.append("<pre>" + html.escape("\n".join(lines[i + 1 : j])) + "</pre>")
      i = j + 1
      continue
    heading = re.match(r"^(#{1,6}) (.*)", line)
    if heading:
      level = len(heading.group(1))
      body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
    elif line.startswith("|"):
      rows = []
      while i < len(lines) and lines[i].startswith("|"):
        cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
        if not all(re.fullmatch(r":?-+:?", c) for c in cells if c):
          rows.append(cells)
        i += 1
      head, *rest = rows or [[]]
      table = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
      table += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest]
      body.append("\n".join([*table, "</table>"]))
      continue
    elif re.match(r"^\s*[-*] ", line):
      items = []
      while i < len(lines) and re.match(r"^\s*[-*] ", lines[i]):
        item = _inline(re.sub(r"^\s*[-*] ", "", lines[i]))
        items.append(f"<li>{item}</li>")
        i += 1
      body.append("<ul>" + "".join(items) + "</ul>")
      continue
    elif line.strip():
      body.append(f"<p>{_inline(line)}</p>")
    i += 1
  style = (
    "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
    "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}th{background:#f3f3f3}"
  )
  return (
    f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
    f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
  )
