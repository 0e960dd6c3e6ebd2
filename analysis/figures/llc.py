"""The LLC over training beside the ICL score, the phase-change window shaded in both."""

from __future__ import annotations

import numpy as np

from ..runs import Run
from .style import ICL_LABEL, WINDOW_ALPHA, Plot, figure, log_tokens_axis, to_table


def llc_figure(run: Run, rows: list[dict]) -> Plot:
    eval_ = run.metrics("eval")
    eval_ = eval_[eval_.tokens > 0]
    pts = sorted((r["tokens"], r["llc_mean"], r["llc_std"], r["dense"]) for r in rows if r["tokens"] > 0)
    tokens, mean, sd, dense = (np.array(c) for c in zip(*pts)) if pts else (np.array([]),) * 4
    fig, axes = figure(2, 1, height=4.6, sharex=True)
    top, bottom = axes[0, 0], axes[1, 0]
    top.plot(eval_.tokens, eval_.icl_score, color="C0")
    top.set_ylabel(ICL_LABEL)
    bottom.fill_between(tokens, mean - sd, mean + sd, color="C3", alpha=0.2, lw=0)
    bottom.plot(tokens, mean, color="C3", marker=".", ms=3)
    if dense.any():
        bottom.plot(tokens[dense.astype(bool)], mean[dense.astype(bool)], "o", ms=4, mfc="none", color="C3",
                    label="dense checkpoints")
        bottom.legend(loc="best")
    bottom.set_ylabel("LLC (mean +- sd over chains)")
    window = (run.summary or {}).get("phase_change")
    for ax in (top, bottom):
        if window:
            ax.axvspan(window["onset_tokens"], window["end_tokens"], color="C0", alpha=WINDOW_ALPHA, lw=0,
                       gid="phase_change")
    log_tokens_axis(bottom)
    top.set_title("LLC over training, ICL phase change shaded")
    data = to_table([{"tokens": int(t), "llc_mean": float(m), "llc_std": float(s), "dense": bool(d)}
                     for t, m, s, d in zip(tokens, mean, sd, dense)])
    caption = ("The local learning coefficient (devinterp SGLD) at each checkpoint (band: sd over chains) under "
               "the ICL score of the evaluation set; shaded: the phase-change window of summary.json.")
    return Plot(fig, data, caption)
