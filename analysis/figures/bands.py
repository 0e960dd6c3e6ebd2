"""Curves across the seeds of ensembles (`python -m train seeds=N`): the median and a band over members.

`python -m analysis figures ENSEMBLE_DIR...` (or a sweep of ensembles) makes these instead of the
single-run figures. Each curve is read from the ensemble's metric tables (`member`, `seed` columns) at
the steps every finished member measured; the band is the 10-90 % range across members (min-max with
fewer than 5), each member faint behind it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from train.ensemble_summary import is_ensemble
from train.load import RunDir
from train.rundir import CONFIG

from ..runs import AnalysisError
from .run_set import base_label
from .style import ICL_LABEL, Plot, figure, log_tokens_axis, to_table

FIGURES = (
    ("01_icl_score_bands", "1. ICL score across seeds"),
    ("02_loss_bands", "2. Evaluation loss across seeds"),
    ("03_prefix_matching_bands", "3. Best layer >= 1 prefix matching and best previous-token score across seeds"),
    ("04_head_score_bands", "4. Per-head scores across seeds"),
    ("05_windows", "5. Phase-change window of each seed"),
)


class Ensemble(RunDir):
    """An ensemble directory read back: its concatenated tables, summary, label and colour."""

    def __init__(self, path: Path, color: str):
        super().__init__(path, OmegaConf.load(Path(path) / CONFIG))
        n = int(self.cfg.seeds)
        self.label = f"{base_label(self.cfg)} ({n} seeds)"
        self.color = color
        if self.summary is None:
            raise AnalysisError(f"{self.file('summary')}: not found (is the ensemble still training?)")
        self.finished = [m["member"] for m in self.summary["members"] if m["status"] == "finished"]
        if not self.finished:
            raise AnalysisError(f"{self.file('summary')}: no member finished")

    def grid(self, table: str, value: str, rows=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, tokens, values [members, steps]) at the steps every finished member has."""
        df = self.metrics(table) if rows is None else rows
        df = df[df.member.isin(self.finished)]
        wide = df.pivot_table(index="step", columns="member", values=value, aggfunc="last").dropna()
        tokens = df.groupby("step").tokens.first().reindex(wide.index) if "tokens" in df else wide.index.to_series()
        keep = tokens.to_numpy() > 0
        return wide.index.to_numpy()[keep], tokens.to_numpy()[keep], wide.to_numpy().T[:, keep]


def find_ensembles(paths: list[str | Path]) -> list[Path]:
    """Ensemble directories among `paths`, or the ensembles that are a sweep's jobs."""
    found = []
    for p in map(Path, paths):
        if is_ensemble(p):
            found.append(p)
        elif p.is_dir():
            found += sorted((d for d in p.iterdir() if d.is_dir() and is_ensemble(d)), key=lambda d: d.name)
    return found


def band(ax, x, values, color, label, members: bool = True) -> list[dict]:
    """Median line, 10-90 % band (min-max under 5 members), faint members; the rows drawn."""
    lo_q, hi_q = (10, 90) if len(values) >= 5 else (0, 100)
    lo, mid, hi = np.percentile(values, [lo_q, 50, hi_q], axis=0)
    if members:
        for v in values:
            ax.plot(x, v, color=color, lw=0.5, alpha=0.25)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
    ax.plot(x, mid, color=color, label=f"{label}: median, {lo_q}-{hi_q} %")
    return [{"model": label, "x": float(a), "median": float(m), "low": float(l), "high": float(h),
             "low_quantile": lo_q, "high_quantile": hi_q} for a, m, l, h in zip(x, mid, lo, hi)]


def curve_figure(ensembles: list[Ensemble], table: str, value: str, ylabel: str, title: str) -> Plot:
    fig, axes = figure(1, 1, width=5.4, height=3.5)
    ax, rows = axes[0, 0], []
    for e in ensembles:
        _, tokens, values = e.grid(table, value)
        rows += band(ax, tokens, values, e.color, e.label)
    log_tokens_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="best")
    return Plot(fig, to_table(rows), f"{title}: the median across seeds, the band 10-90 % (min-max under 5 seeds), "
                                     "each seed faint.")


def best_heads(e: Ensemble):
    """Per member and step: the best prefix matching in layers >= 1 and the best previous-token score."""
    heads = e.metrics("heads")
    later = heads[heads.layer >= 1] if (heads.layer >= 1).any() else heads
    pm = later.groupby(["member", "step"], as_index=False).agg(prefix_matching=("prefix_matching", "max"))
    prev = heads.groupby(["member", "step"], as_index=False).agg(previous_token=("previous_token", "max"))
    tokens = e.metrics("train")[["member", "step", "tokens"]]
    return pm.merge(prev, on=["member", "step"]).merge(tokens, on=["member", "step"])


def prefix_figure(ensembles: list[Ensemble]) -> Plot:
    fig, axes = figure(1, 2)
    rows = []
    for e in ensembles:
        best = best_heads(e)
        for ax, col in zip(axes[0], ("prefix_matching", "previous_token")):
            _, tokens, values = e.grid("heads", col, rows=best)
            rows += [{**r, "score": col} for r in band(ax, tokens, values, e.color, e.label)]
    for ax, t in zip(axes[0], ("best prefix matching, layers >= 1", "best previous-token score")):
        log_tokens_axis(ax)
        ax.set_title(t)
        ax.set_ylim(-0.02, 1.02)
    axes[0, 0].legend(loc="upper left")
    return Plot(fig, to_table(rows), "The strongest induction head (best prefix matching in layers >= 1) and "
                                     "previous-token head of each seed: median across seeds and band.")


def heads_figure(e: Ensemble) -> Plot:
    heads = e.metrics("heads")
    n_layers, n_heads = int(e.cfg.model.n_layers), int(e.cfg.model.n_heads)
    fig, axes = figure(n_layers, n_heads, width=2.4 * n_heads + 0.6, height=2.0 * n_layers + 0.4, sharey=True)
    rows = []
    tokens = e.metrics("train")[["member", "step", "tokens"]]
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer, head]
            one = heads[(heads["layer"] == layer) & (heads["head"] == head)].merge(tokens, on=["member", "step"])
            for col, color in (("prefix_matching", "#d62728"), ("previous_token", "#1f77b4")):
                _, x, values = e.grid("heads", col, rows=one)
                drawn = band(ax, x, values, color, col.replace("_", " "), members=False)
                rows += [{**r, "layer": layer, "head": head} for r in drawn]
            log_tokens_axis(ax)
            ax.set_title(f"L{layer}H{head}")
            ax.set_ylim(-0.02, 1.02)
    axes[0, 0].legend(loc="upper left", fontsize=6)
    return Plot(fig, to_table(rows), f"{e.label}: each head's prefix-matching (red) and previous-token (blue) "
                                     "scores, median and band across seeds. Which head of a layer becomes the "
                                     "induction head differs between seeds, so a head's band can be wide.")


def windows_figure(ensembles: list[Ensemble]) -> Plot:
    fig, axes = figure(1, 1, width=5.4, height=0.6 + 0.18 * sum(len(e.summary["members"]) for e in ensembles))
    ax, rows, y, ticks = axes[0, 0], [], 0, []
    for e in ensembles:
        for m in e.summary["members"]:
            pc = m.get("phase_change")
            if pc:
                ax.plot([pc["onset_tokens"], pc["end_tokens"]], [y, y], color=e.color, lw=4, solid_capstyle="butt")
                ax.plot([pc["peak_tokens"]], [y], "k|", ms=8)
            rows.append({"model": e.label, "member": m["member"], "seed": m["seed"], "status": m["status"],
                         **{k: (pc or {}).get(k) for k in ("onset_tokens", "peak_tokens", "end_tokens",
                                                           "onset_step", "end_step", "icl_drop")}})
            ticks.append((y, f"{e.label.split(' (')[0]} seed {m['seed']}"))
            y += 1
        y += 0.5
    ax.set_yticks([t for t, _ in ticks], [s for _, s in ticks], fontsize=6)
    ax.invert_yaxis()
    log_tokens_axis(ax)
    n_pc = sum(r["onset_tokens"] is not None for r in rows)
    ax.set_title(f"Phase-change window of each seed ({n_pc}/{len(rows)} with one)")
    return Plot(fig, to_table(rows), "Each seed's phase-change window from its summary.json (bar: onset to end; "
                                     "tick: peak); a seed without one has no bar.")


def band_figures(paths: list[Path]) -> tuple[list, list[Ensemble]]:
    """`(stem, title, builder)` of every band figure for the ensembles at `paths`, and the ensembles."""
    ensembles = [Ensemble(p, f"C{i % 10}") for i, p in enumerate(paths)]
    if any(e.table(t) is None for e in ensembles for t in ("eval", "heads", "train")):
        bad = next(e for e in ensembles if any(e.table(t) is None for t in ("eval", "heads", "train")))
        raise AnalysisError(f"{bad.path / 'metrics'}: the ensemble's tables are missing (probes off, or it failed)")
    builders = {
        "01_icl_score_bands": lambda: curve_figure(ensembles, "eval", "icl_score", ICL_LABEL, "ICL score across seeds"),
        "02_loss_bands": lambda: curve_figure(ensembles, "eval", "loss", "evaluation loss (nats)",
                                              "Evaluation loss across seeds"),
        "03_prefix_matching_bands": lambda: prefix_figure(ensembles),
        "04_head_score_bands": lambda: heads_figure(ensembles[0]),
        "05_windows": lambda: windows_figure(ensembles),
    }
    return [(stem, title, builders[stem]) for stem, title in FIGURES], ensembles
