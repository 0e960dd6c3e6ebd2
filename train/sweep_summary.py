"""Sweep summary: one row per job of a Hydra sweep, a Markdown table and a figure.

Written at the end of every sweep (`SweepSummaryCallback`, a Hydra callback set in conf/config.yaml)
and on demand with `python -m analysis sweep SWEEP_DIR`.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .ensemble_summary import is_ensemble, member_dir
from .errors import RunError
from .load import RunDir
from .rundir import atomic_write, write_parquet, write_text

COLUMNS = ("job", "member", "n_layers", "n_heads", "seed", "status", "onset_step", "end_step", "onset_tokens",
           "end_tokens", "final_icl_score", "n_induction_heads", "error")


def job_row(job_dir: Path, member: int | None = None) -> dict:
    """What one job (or one member of a job's ensemble) did, read from its run directory (a job that
    never started counts as failed)."""
    row = dict.fromkeys(COLUMNS)
    row["job"] = job_dir.name if member is None else job_dir.parent.parent.name
    row["member"] = member
    job = RunDir(job_dir)
    cfg = job.saved_config()
    if cfg is not None:
        row.update(n_layers=cfg.model.n_layers, n_heads=cfg.model.n_heads, seed=cfg.seed)
    summary = job.summary or {}
    row["status"] = summary.get("status", "failed")
    row["error"] = summary.get("error") or (None if summary else "no summary.json: the job did not finish")
    pc = summary.get("phase_change") or {}
    row.update({k: pc.get(k) for k in ("onset_step", "end_step", "onset_tokens", "end_tokens")})
    row["final_icl_score"] = (summary.get("final") or {}).get("icl_score")
    row["n_induction_heads"] = len(summary.get("induction_heads", [])) if summary else None
    return row


def job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and RunDir(d).is_run()]
    return sorted(dirs, key=lambda d: (int(d.name.split("_")[0]) if d.name.split("_")[0].isdigit() else 1 << 30,
                                       d.name))


def summarize_sweep(sweep_dir: str | Path) -> pa.Table:
    """Write sweep_summary.parquet, sweep_summary.md and sweep_summary.png into the sweep directory."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise RunError(f"{sweep_dir}: not a directory")
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise RunError(f"{sweep_dir}: no sweep jobs in it (no */.hydra)")
    rows = []
    for d in jobs:  # a job that is an ensemble (seeds=N) gives a row per member
        n = seed_count(d)
        rows += [job_row(d)] if n is None else [job_row(member_dir(d, k), k) for k in range(n)]
    table = pa.Table.from_pylist(rows)
    write_parquet(sweep_dir / "sweep_summary.parquet", table)
    write_text(sweep_dir / "sweep_summary.md", markdown(rows) + ("\n" + across_seeds(rows) if any(
        r["member"] is not None for r in rows) else ""))
    plot(rows, sweep_dir / "sweep_summary.png")
    return table


def seed_count(job_dir: Path) -> int | None:
    """The number of members if the job is an ensemble, else None."""
    if not is_ensemble(job_dir):
        return None
    return int(RunDir(job_dir).saved_config().seeds)


def across_seeds(rows: list[dict]) -> str:
    """Per depth x heads: how many seeds show a phase change, and the spread of onset and final ICL score."""
    import numpy as np

    lines = ["| n_layers | n_heads | seeds | phase change | onset step: median (min-max) | final ICL score: median (min-max) |",
             "|---|---|---|---|---|---|"]
    for nl, nh in sorted({(r["n_layers"], r["n_heads"]) for r in rows if r["n_layers"] is not None}):
        group = [r for r in rows if (r["n_layers"], r["n_heads"]) == (nl, nh)]
        cells = []
        for key, fmt in (("onset_step", ".0f"), ("final_icl_score", "+.3f")):
            v = np.array([r[key] for r in group if r[key] is not None], dtype=float)
            cells.append(f"{np.median(v):{fmt}} ({v.min():{fmt}} to {v.max():{fmt}})" if v.size else "none")
        n_pc = sum(r["onset_step"] is not None for r in group)
        lines.append(f"| {nl} | {nh} | {len(group)} | {n_pc}/{len(group)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    fmt = lambda v: "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v).replace("|", "/")
    return head + "".join("| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |\n" for r in rows)


def plot(rows: list[dict], path: Path) -> None:
    """Phase-change onset (tokens) and final ICL score over depth x heads, the median over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in rows if r["n_layers"] is not None]
    layers = sorted({r["n_layers"] for r in ok})
    heads = sorted({r["n_heads"] for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    for ax, key, title in ((axes[0], "onset_tokens", "phase-change onset (tokens)"),
                           (axes[1], "final_icl_score", "final ICL score (nats)")):
        grid = np.full((len(layers), len(heads)), np.nan)
        for i, nl in enumerate(layers):
            for j, nh in enumerate(heads):
                vals = [r[key] for r in ok if r["n_layers"] == nl and r["n_heads"] == nh and r[key] is not None]
                if vals:
                    grid[i, j] = float(np.median(vals))
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, "none" if np.isnan(v) else f"{v:.3g}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(heads)), heads)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("heads per layer")
        ax.set_ylabel("layers")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


class SweepSummaryCallback(Callback):
    """Hydra callback: after a multirun, write the sweep summary and exit non-zero if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        table = summarize_sweep(config.hydra.sweep.dir)
        failed = [row for row in table.to_pylist() if row["status"] != "finished"]
        print(f"\nSweep summary: {Path(config.hydra.sweep.dir) / 'sweep_summary.md'}")
        if failed:
            for row in failed:
                member = "" if row["member"] is None else f" member {row['member']} (seed {row['seed']})"
                print(f"  job {row['job']}{member} failed: {row['error']}")
            raise SystemExit(1)
