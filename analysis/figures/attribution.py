"""Per-head ICL attribution over training: the change in ICL score when a head is ablated (Olsson et al.
2022's ablation-to-attribution analysis), read from `python -m analysis ablate`'s
RUN_DIR/analysis/ablation_<method>.parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..runs import ANALYSIS
from .curves import class_legend
from .run_set import RunData
from .style import CLASS_COLORS, Plot, figure, log_tokens_axis, shade_window, to_table

DELTA = ("delta_icl_score", "delta_icl", "icl_delta")  # column names the attribution may have


def ablation_files(run: RunData) -> list[Path]:
    return sorted((run.path / ANALYSIS).glob("ablation_*.parquet"))


def read_attribution(path: Path) -> tuple[str, dict[str, np.ndarray]] | str:
    """`(method, {step, tokens, layer, head, delta})` of the single-head rows, or why the file cannot be used."""
    t = pq.read_table(path)
    names = t.column_names
    delta = next((c for c in DELTA if c in names), None) or next(
        (c for c in names if "delta" in c and "icl" in c), None)
    missing = [c for c in ("step", "layer", "head") if c not in names] + ([] if delta else ["delta_icl_score"])
    if missing:
        return f"{path}: no column {missing[0]} (columns: {', '.join(names)})"
    col = lambda c: np.asarray(t[c].to_numpy(zero_copy_only=False), dtype=np.float64)  # noqa: E731
    out = {"step": col("step"), "layer": col("layer"), "head": col("head"), "delta": col(delta)}
    out["tokens"] = col("tokens") if "tokens" in names else np.full_like(out["step"], np.nan)
    single = np.isfinite(out["layer"]) & np.isfinite(out["head"])
    if "n_ablated" in names:
        single &= col("n_ablated") == 1
    out = {k: v[single] for k, v in out.items()}
    method = path.stem.removeprefix("ablation_")
    return method, out


def _tokens_for(run: RunData, steps: np.ndarray) -> np.ndarray:
    """Tokens at each step, from train.parquet (for ablation files that only have steps)."""
    c = run.columns("train", "step", "tokens")
    return np.interp(steps, c["step"], c["tokens"])


def first_attribution(run: RunData) -> dict[str, np.ndarray] | None:
    """The single-head attributions of the run's first usable ablation file (zero ablation first)."""
    for path in sorted(ablation_files(run), key=lambda p: (p.stem != "ablation_zero", p.stem)):
        got = read_attribution(path)
        if not isinstance(got, str):
            return got[1]
    return None


def draw_attribution(ax, r: RunData, c: dict[str, np.ndarray]) -> list[dict]:
    """One line per head: ICL score change when ablated vs tokens, coloured by class, class heads named."""
    rows = []
    tokens = np.where(np.isfinite(c["tokens"]), c["tokens"], _tokens_for(r, c["step"]))
    classes = r.head_classes()
    for layer, head in sorted({(int(a), int(b)) for a, b in zip(c["layer"], c["head"])}):
        m = (c["layer"] == layer) & (c["head"] == head) & (tokens > 0)
        order = np.argsort(tokens[m])
        cls = classes.get((layer, head), "other")
        x, y = tokens[m][order], c["delta"][m][order]
        ax.plot(x, y, color=CLASS_COLORS.get(cls, "k"), marker=".", ms=3, lw=1.0)
        if len(x) and cls != "other":
            ax.annotate(f"L{layer}H{head}", (x[-1], y[-1]), fontsize=6, color=CLASS_COLORS[cls],
                        xytext=(2, 0), textcoords="offset points", va="center")
        rows += [{"model": r.label, "layer": layer, "head": head, "class": cls, "step": int(s), "tokens": int(t),
                  "delta_icl_score": float(v)} for s, t, v in zip(c["step"][m][order], x, y)]
    shade_window(ax, r)
    log_tokens_axis(ax)
    ax.axhline(0, color="k", lw=0.6, alpha=0.4)
    return rows


def ablation_figure(runs: list[RunData]) -> Plot | str:
    found, notes = [], []
    for r in runs:
        for path in ablation_files(r):
            got = read_attribution(path)
            if isinstance(got, str):
                notes.append(got)
            else:
                found.append((r, *got))
    if not found:
        hint = "; ".join(notes) if notes else "run `python -m analysis ablate RUN_DIR` first"
        return f"no usable RUN_DIR/analysis/ablation_*.parquet ({hint})"
    models = list(dict.fromkeys(r for r, _, _ in found))
    methods = list(dict.fromkeys(m for _, m, _ in found))
    fig, axes = figure(len(models), len(methods), sharey=True)
    rows = []
    for r, method, c in found:
        ax = axes[models.index(r), methods.index(method)]
        rows += [{"method": method, **row} for row in draw_attribution(ax, r, c)]
        ax.set_title(f"{r.label}, {method} ablation")
    for i in range(len(models)):
        axes[i, 0].set_ylabel("ICL score change when ablated\n(nats; + = the head helps ICL)")
    class_legend(axes[0, 0])
    caption = ("Per-head attribution of in-context learning over training: the change in ICL score on the fixed "
               "evaluation set when one head is ablated (positive: the head's output makes the ICL score more "
               "negative), at each analysed checkpoint, coloured by head class. Shaded: phase-change window.")
    left = [f"{r.label}: no analysis/ablation_*.parquet" for r in runs if r not in models]
    return Plot(fig, to_table(rows), caption, notes + left)
