"""One look for every figure, and how a figure lands on disk (PNG, PDF and its data, atomically)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from train.rundir import atomic_write, write_parquet  # noqa: E402

RC = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.4,
    "image.cmap": "viridis",
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text
}

# Head classes (summary.json) in every per-head figure.
CLASS_COLORS = {"induction": "#d62728", "previous_token": "#1f77b4", "other": "#9a9a9a"}
CLASS_NAMES = {"induction": "induction", "previous_token": "previous-token", "other": "other"}
WINDOW_ALPHA = 0.13
PANEL_W, PANEL_H = 3.6, 2.7  # inches per panel

TOKENS_LABEL = "training tokens"
ICL_LABEL = "ICL score (nats)"


@contextmanager
def style():
    with plt.rc_context(RC):
        yield


def figure(n_rows: int = 1, n_cols: int = 1, width: float | None = None, height: float | None = None, **kw):
    """A figure of panels sized for the page; axes always a 2-D array."""
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width or PANEL_W * n_cols + 0.6, height or PANEL_H * n_rows),
                             squeeze=False, layout="constrained", **kw)
    return fig, axes


def shade_window(ax, run, label: bool = False) -> None:
    """Shade a run's phase-change window, exactly summary.json's onset to end tokens (gid names it)."""
    pc = run.phase_change
    if not pc:
        return
    ax.axvspan(pc["onset_tokens"], pc["end_tokens"], color=run.color, alpha=WINDOW_ALPHA, lw=0,
               gid=f"phase_change:{run.label}", label=f"{run.label} phase change" if label else None)


@dataclass
class Plot:
    """A finished figure and the data drawn in it (one table, saved beside it under the same stem)."""

    fig: plt.Figure
    data: pa.Table
    caption: str
    notes: list[str] = field(default_factory=list)


def save(plot: Plot, out_dir: Path, stem: str) -> list[Path]:
    """Write `stem.png`, `stem.pdf` and `stem.parquet` atomically; close the figure."""
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf", out_dir / f"{stem}.parquet"]
    try:
        atomic_write(paths[0], lambda tmp: plot.fig.savefig(tmp, format="png", metadata={"Software": None}))
        plot.fig.set_layout_engine("none")  # keep the layout just computed: the PDF gets the same, and faster
        atomic_write(paths[1], lambda tmp: plot.fig.savefig(tmp, format="pdf",
                                                            metadata={"CreationDate": None, "Producer": None}))
        write_parquet(paths[2], plot.data)
    finally:
        plt.close(plot.fig)
    return paths


def log_tokens_axis(ax) -> None:
    """Log x axis of training tokens; decades labelled only (minor labels collide on short ranges)."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(TOKENS_LABEL)


def to_table(rows: list[dict]) -> pa.Table:
    """The data behind a figure, rows of dicts, as one table; a key missing from a row is null there
    (column order: first seen)."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return pa.table({k: pa.array([row.get(k) for row in rows]) for k in keys}) if keys else pa.table({})
