"""The model analysis table (Olsson et al. 2022, the table of per-model plots): a row per model, a column
per analysis (ICL score, loss against the 1-layer model, per-head prefix matching, per-token-loss PCA
trajectory, ablation attribution when analysed). Panels in a column share their axes."""

from __future__ import annotations

from .attribution import draw_attribution, first_attribution
from .curves import class_legend, draw_heads, draw_icl, draw_loss, reference_run
from .pca import draw_pca
from .run_set import RunData
from .style import ICL_LABEL, Plot, figure, to_table


def empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.5", fontsize=8)


def table_figure(runs: list[RunData], pca: dict | str) -> Plot | str:
    if len(runs) < 2:
        return "one model: the model analysis table compares models (the other figures show this one)"
    reference = reference_run(runs)
    attributions = {r: first_attribution(r) for r in runs}
    columns = ["ICL score", "loss", "prefix matching"]
    if isinstance(pca, dict):
        columns.append("per-token loss PCA")
    if any(v is not None for v in attributions.values()):
        columns.append("ablation attribution")
    fig, axes = figure(len(runs), len(columns), width=2.75 * len(columns) + 0.6, height=2.1 * len(runs) + 0.5,
                       sharex="col", sharey="col")
    rows, notes = [], []
    for i, r in enumerate(runs):
        ax = dict(zip(columns, axes[i]))
        panel = lambda name, drawn: [{"panel": name, **row} for row in drawn]  # noqa: E731
        rows += panel("ICL score", draw_icl(ax["ICL score"], [r]))
        rows += panel("loss", draw_loss(ax["loss"], [r], reference if reference is not r else None))
        if r.table("heads") is not None and r.table("heads").num_rows:
            rows += panel("prefix matching", draw_heads(ax["prefix matching"], r, "prefix_matching"))
        else:
            empty(ax["prefix matching"], "no metrics/heads.parquet")
            notes.append(f"{r.label}: no metrics/heads.parquet")
        if "per-token loss PCA" in ax:
            if r in pca["runs"]:
                drawn = draw_pca(ax["per-token loss PCA"], pca, highlight=r)
                rows += panel("per-token loss PCA", [row for row in drawn if row["model"] == r.label])
            else:
                empty(ax["per-token loss PCA"], "no per-token losses stored")
        if "ablation attribution" in ax:
            if attributions[r] is not None:
                rows += panel("ablation attribution", draw_attribution(ax["ablation attribution"], r, attributions[r]))
            else:
                empty(ax["ablation attribution"], "not analysed\n(python -m analysis ablate)")
        ax["ICL score"].set_ylabel(f"{r.label}\n{ICL_LABEL}", color=r.color)
        for name in columns[1:]:
            if name != "per-token loss PCA":
                ax[name].set_ylabel(None)
        for a in axes[i]:
            if i < len(runs) - 1:
                a.set_xlabel(None)
    for a, name in zip(axes[0], columns):
        a.set_title(name)
    if reference is not None:
        axes[0, 1].set_title(f"loss (dashed: {reference.label})")
    class_legend(axes[0, 2])
    caption = ("Model analysis table: one row per model. Columns: ICL score vs training tokens; evaluation loss with "
               "the 1-layer model's dashed; per-head prefix-matching score coloured by class; "
               + ("the model's per-token-loss trajectory in the joint PCA (other models grey); " if
                  "per-token loss PCA" in columns else "")
               + ("ICL-score change when each head is ablated; " if "ablation attribution" in columns else "")
               + "shaded: phase-change windows. Panels in a column share axes.")
    return Plot(fig, to_table(rows), caption, notes)
