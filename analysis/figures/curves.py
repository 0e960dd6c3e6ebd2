"""Curves over training (Olsson et al. 2022, figs. of the ICL score, the loss bump and per-head scores).

Each `draw_*` draws one panel into an axis and returns the rows it drew (dicts), so the per-figure
builders and the model table (`table.py`) draw the same thing.
"""

from __future__ import annotations

import numpy as np
from matplotlib.lines import Line2D

from .run_set import RunData
from .style import CLASS_COLORS, CLASS_NAMES, ICL_LABEL, Plot, figure, log_tokens_axis, shade_window, to_table


def draw_icl(ax, runs: list[RunData], shade: bool = True) -> list[dict]:
    """ICL score of the fixed evaluation set vs training tokens, the phase-change windows shaded."""
    rows = []
    for r in runs:
        c = r.columns("eval", "step", "tokens", "icl_score", positive_tokens=True)
        ax.plot(c["tokens"], c["icl_score"], color=r.color, label=r.label)
        if shade:
            shade_window(ax, r)
        pc = r.phase_change or {}
        rows += [{"model": r.label, "run": str(r.path), "step": int(s), "tokens": int(t), "icl_score": float(v),
                  "phase_onset_tokens": pc.get("onset_tokens"), "phase_end_tokens": pc.get("end_tokens")}
                 for s, t, v in zip(c["step"], c["tokens"], c["icl_score"])]
    log_tokens_axis(ax)
    ax.set_ylabel(ICL_LABEL)
    ax.axhline(0, color="k", lw=0.6, alpha=0.4)
    return rows


def icl_figure(runs: list[RunData]) -> Plot:
    fig, axes = figure(1, 1, width=5.4, height=3.5)
    rows = draw_icl(axes[0, 0], runs)
    axes[0, 0].legend(loc="lower left")
    axes[0, 0].set_title("In-context learning score over training")
    windows = [f"{r.label}: {r.phase_change['onset_tokens']:,}-{r.phase_change['end_tokens']:,} tokens"
               for r in runs if r.phase_change]
    caption = ("ICL score (loss at a late minus an early token index, fixed evaluation set) vs training tokens. "
               "Shaded: the phase-change window from summary.json"
               + (f" ({'; '.join(windows)})." if windows else " (none detected)."))
    return Plot(fig, to_table(rows), caption)


def reference_run(runs: list[RunData]) -> RunData | None:
    """The 1-layer run to overlay: attention-only and not smeared if given, else any 1-layer run."""
    return next((r for r in runs if r.is_vanilla_1l), None) or next((r for r in runs if r.n_layers == 1), None)


def _loss(run: RunData) -> dict[str, np.ndarray]:
    return run.columns("eval", "step", "tokens", "loss", positive_tokens=True)


def draw_loss(ax, runs: list[RunData], reference: RunData | None, diff_ax=None) -> list[dict]:
    """Evaluation loss vs tokens; the 1-layer reference dashed. With `diff_ax`, also each model's loss
    minus the reference's (interpolated in log tokens): the phase change shows as a bump."""
    rows = []
    ref = _loss(reference) if reference is not None else None
    if reference is not None and reference not in runs:
        ax.plot(ref["tokens"], ref["loss"], color="k", ls="--", lw=1.0, label=f"{reference.label} (reference)")
    for r in runs:
        c = _loss(r)
        ls = "--" if r is reference else "-"
        ax.plot(c["tokens"], c["loss"], color=r.color, ls=ls, label=r.label + (" (reference)" if ls == "--" else ""))
        shade_window(ax, r)
        diff = (c["loss"] - np.interp(np.log(c["tokens"]), np.log(ref["tokens"]), ref["loss"])
                if ref is not None else np.full_like(c["loss"], np.nan))
        if diff_ax is not None and r is not reference and ref is not None:
            diff_ax.plot(c["tokens"], diff, color=r.color, label=r.label)
            shade_window(diff_ax, r)
        rows += [{"model": r.label, "step": int(s), "tokens": int(t), "loss": float(v),
                  "reference": reference.label if reference else None,
                  "loss_minus_reference": None if np.isnan(d) else float(d)}
                 for s, t, v, d in zip(c["step"], c["tokens"], c["loss"], diff)]
    log_tokens_axis(ax)
    ax.set_ylabel("evaluation loss (nats)")
    if diff_ax is not None:
        log_tokens_axis(diff_ax)
        diff_ax.axhline(0, color="k", lw=0.6, alpha=0.4)
        diff_ax.set_ylabel(f"loss minus {reference.label} loss (nats)")
    return rows


def loss_figure(runs: list[RunData]) -> Plot:
    reference = reference_run(runs)
    others = [r for r in runs if r is not reference]
    two = reference is not None and others
    fig, axes = figure(1, 2 if two else 1, width=9.0 if two else 5.4, height=3.5)
    rows = draw_loss(axes[0, 0], runs, reference, axes[0, 1] if two else None)
    axes[0, 0].legend(loc="upper right")
    axes[0, 0].set_title("Loss over training")
    if two:
        axes[0, 1].set_title(f"Difference from the {reference.label} model")
    notes = [] if reference else ["no 1-layer run given: the loss curves are drawn without the 1-layer overlay"]
    caption = ("Loss on the fixed evaluation set vs training tokens"
               + (f", with the {reference.label} model's curve as the reference (dashed); right: each model's "
                  "loss minus the reference's, where the phase change shows as a bump." if reference else
                  " (no 1-layer run given to overlay).")
               + " Shaded: phase-change windows.")
    return Plot(fig, to_table(rows), caption, notes)


def class_legend(ax, loc: str = "upper left") -> None:
    handles = [Line2D([], [], color=c, label=CLASS_NAMES[k]) for k, c in CLASS_COLORS.items()]
    ax.legend(handles=handles, loc=loc, title="head class", title_fontsize=8)


def draw_heads(ax, run: RunData, score: str = "prefix_matching") -> list[dict]:
    """One line per head of a per-head score vs tokens, coloured by the head's class (summary.json)."""
    c = run.columns("heads", "step", "tokens", "layer", "head", score, positive_tokens=True)
    classes = run.head_classes()
    rows = []
    order = {"other": 0, "previous_token": 1, "induction": 2}  # the interesting heads drawn on top
    keys = sorted({(int(a), int(b)) for a, b in zip(c["layer"], c["head"])},
                  key=lambda k: order.get(classes.get(k, "other"), 0))
    for layer, head in keys:
        m = (c["layer"] == layer) & (c["head"] == head)
        cls = classes.get((layer, head), "other")
        ax.plot(c["tokens"][m], c[score][m], color=CLASS_COLORS.get(cls, "k"), lw=1.0, alpha=0.9)
        rows += [{"model": run.label, "layer": layer, "head": head, "class": cls, "step": int(s), "tokens": int(t),
                  score: float(v)} for s, t, v in zip(c["step"][m], c["tokens"][m], c[score][m])]
    shade_window(ax, run)
    log_tokens_axis(ax)
    ax.set_ylim(-0.02, 1.02)
    return rows


def heads_figure(runs: list[RunData]) -> Plot | str:
    have = [r for r in runs if r.table("heads") is not None and r.table("heads").num_rows]
    if not have:
        return "no run has metrics/heads.parquet (per-head probes disabled?)"
    fig, axes = figure(2, len(have), sharey="row")
    rows = []
    for j, r in enumerate(have):
        pm = draw_heads(axes[0, j], r, "prefix_matching")
        pt = draw_heads(axes[1, j], r, "previous_token")
        for a, b in zip(pm, pt):
            a["previous_token"] = b["previous_token"]
        rows += pm
        axes[0, j].set_title(r.label)
    axes[0, 0].set_ylabel("prefix-matching score")
    axes[1, 0].set_ylabel("previous-token score")
    class_legend(axes[0, 0])
    caption = ("Per-head prefix-matching score (top) and previous-token score (bottom) on the repeated-random-token "
               "probe vs training tokens, one line per head, coloured by the head's class at the end of training "
               "(summary.json). Shaded: phase-change window.")
    notes = [f"{r.label}: no metrics/heads.parquet, left out" for r in runs if r not in have]
    return Plot(fig, to_table(rows), caption, notes)


def smeared_figure(runs: list[RunData]) -> Plot | str:
    """Vanilla vs smeared key, one panel per depth (Olsson et al.'s smeared-key models)."""
    smeared = [r for r in runs if r.smeared]
    if not smeared:
        return "no smeared-key run given (model.smeared_key=true)"
    depths = sorted({r.n_layers for r in smeared})
    fig, axes = figure(1, len(depths), sharey=True, height=3.3)
    rows = []
    for j, depth in enumerate(depths):
        ax = axes[0, j]
        mlps = {s.mlp for s in smeared if s.n_layers == depth}
        group = [r for r in runs if r.n_layers == depth and r.mlp in mlps]
        for r in group:
            c = r.columns("eval", "step", "tokens", "icl_score", positive_tokens=True)
            ax.plot(c["tokens"], c["icl_score"], color=r.color, ls="-" if r.smeared else "--",
                    label=r.label if r.smeared else f"{r.label} (vanilla)")
            shade_window(ax, r)
            rows += [{"model": r.label, "n_layers": depth, "smeared_key": r.smeared, "step": int(s),
                      "tokens": int(t), "icl_score": float(v)}
                     for s, t, v in zip(c["step"], c["tokens"], c["icl_score"])]
        log_tokens_axis(ax)
        ax.axhline(0, color="k", lw=0.6, alpha=0.4)
        ax.set_title(f"{depth}-layer")
        ax.legend(loc="lower left")
    axes[0, 0].set_ylabel(ICL_LABEL)
    missing = [f"{d}-layer vanilla" for d in depths if not any(r.n_layers == d and not r.smeared for r in runs)]
    notes = [f"no {m} run given to compare with" for m in missing]
    caption = ("Smeared key vs vanilla attention (dashed): ICL score vs training tokens per depth. Olsson et al.: the "
               "smeared key gives a 1-layer model a phase change and brings the 2-layer one's earlier. Shaded: "
               "phase-change windows.")
    return Plot(fig, to_table(rows), caption, notes)
