"""The index pages of a figure set: index.html (open in a browser) and index.md (GitHub, terminals)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from train.rundir import write_text


@dataclass
class Entry:
    stem: str
    title: str
    caption: str = ""
    files: list[Path] = field(default_factory=list)  # png, pdf, data
    skipped: str | None = None  # why it was not made
    notes: list[str] = field(default_factory=list)


def write_index(out_dir: Path, entries: list[Entry], runs: list[tuple[str, str]]) -> list[Path]:
    """Write index.html and index.md listing every figure made (and every one skipped, with why)."""
    made = [e for e in entries if e.skipped is None]
    skipped = [e for e in entries if e.skipped is not None]
    paths = [out_dir / "index.html", out_dir / "index.md"]
    write_text(paths[0], _html(made, skipped, runs))
    write_text(paths[1], _markdown(made, skipped, runs))
    return paths


def _html(made: list[Entry], skipped: list[Entry], runs: list[tuple[str, str]]) -> str:
    e = html.escape
    out = ["<!doctype html>", '<html><head><meta charset="utf-8"><title>Induction-head figures</title>',
           "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
           "figure{margin:2em 0;border-top:1px solid #ddd;padding-top:1em}img{max-width:100%}"
           "figcaption{font-size:0.9em;color:#444}code{background:#f4f4f4;padding:0 .2em}</style></head><body>",
           "<h1>Induction-head figures</h1>", "<h2>Models</h2>", "<ul>"]
    out += [f"<li><b>{e(label)}</b>: <code>{e(path)}</code></li>" for label, path in runs]
    out += ["</ul>", "<h2>Figures</h2>"]
    for entry in made:
        png, pdf, data = (p.name for p in entry.files)
        out += [f'<figure id="{e(entry.stem)}"><h3>{e(entry.title)}</h3>',
                f'<a href="{e(png)}"><img src="{e(png)}" alt="{e(entry.title)}"></a>',
                f"<figcaption>{e(entry.caption)}<br>Files: <a href=\"{e(png)}\">{e(png)}</a>, "
                f"<a href=\"{e(pdf)}\">{e(pdf)}</a>, data <a href=\"{e(data)}\">{e(data)}</a>"
                + "".join(f"<br>Note: {e(n)}" for n in entry.notes) + "</figcaption></figure>"]
    if skipped:
        out += ["<h2>Not made</h2>", "<ul>"]
        out += [f"<li>{e(s.title)}: {e(s.skipped)}</li>" for s in skipped]
        out += ["</ul>"]
    out += ["</body></html>", ""]
    return "\n".join(out)


def _markdown(made: list[Entry], skipped: list[Entry], runs: list[tuple[str, str]]) -> str:
    out = ["# Induction-head figures", "", "## Models", ""]
    out += [f"- **{label}**: `{path}`" for label, path in runs]
    out += ["", "## Figures", ""]
    for entry in made:
        png, pdf, data = (p.name for p in entry.files)
        out += [f"### {entry.title}", "", f"![{entry.title}]({png})", "", entry.caption, "",
                f"Files: [{png}]({png}), [{pdf}]({pdf}), data [{data}]({data})", ""]
        out += [f"Note: {n}  " for n in entry.notes] + ([""] if entry.notes else [])
    if skipped:
        out += ["## Not made", ""] + [f"- {s.title}: {s.skipped}" for s in skipped] + [""]
    return "\n".join(out)
