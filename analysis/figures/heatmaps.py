"""Heatmaps: loss over (training tokens x token index) and its derivative (Olsson et al. 2022, the
per-token-loss analysis), and the per-head score grid logged during training."""

from __future__ import annotations

import numpy as np

from .run_set import RunData
from .style import Plot, figure, log_tokens_axis, style, to_table


def loss_by_position(run: RunData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(steps, tokens, index, loss [eval, index])` from metrics/eval.parquet, rows with tokens > 0.
    `index` is the token index of the predicted token (1 .. n_ctx - 1)."""
    t = run.table("eval")
    steps = np.asarray(t["step"].to_numpy(), dtype=np.int64)
    tokens = np.asarray(t["tokens"].to_numpy(), dtype=np.int64)
    loss = np.array(t["loss_by_position"].to_pylist(), dtype=np.float64)  # [eval, pos - 1]
    keep = tokens > 0
    index = np.arange(1, loss.shape[1] + 1)
    return steps[keep], tokens[keep], index, loss[keep]


def log_bins(loss: np.ndarray, index: np.ndarray, n_bins: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Loss averaged in bins evenly spaced in log token index (single tokens at small indices): `(centers
    [bin], binned [..., bin])`, centers the geometric mean index of each bin. Averaging many tokens per
    bin at large indices keeps the log-index derivative from amplifying noise there."""
    edges = np.unique(np.round(np.geomspace(index[0], index[-1] + 1, n_bins + 1)).astype(int))
    centers, binned = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        m = (index >= a) & (index < b)
        if m.any():
            centers.append(float(np.exp(np.log(index[m]).mean())))
            binned.append(loss[..., m].mean(axis=-1))
    return np.array(centers), np.stack(binned, axis=-1)


def log_index_derivative(loss: np.ndarray, index: np.ndarray) -> np.ndarray:
    """d loss / d ln(token index), along the last axis (central differences on the uneven grid)."""
    return np.gradient(loss, np.log(index), axis=-1)


def loss_heatmap_figure(runs: list[RunData]) -> Plot | str:
    have = [r for r in runs if "loss_by_position" in r.table("eval").column_names]
    if not have:
        return "no run has loss_by_position in metrics/eval.parquet"
    data = {r.label: loss_by_position(r) for r in have}
    derivs = {}
    for k, (_, _, index, loss) in data.items():
        centers, binned = log_bins(loss, index)
        derivs[k] = (centers, log_index_derivative(binned, centers))
    lo = min(np.nanpercentile(v[3], 1) for v in data.values())
    hi = max(np.nanpercentile(v[3], 99) for v in data.values())
    # The colour scale comes from token indices >= 3: the first few carry every model's largest gain
    # (the in-context token frequencies) and would wash out the phase change at later indices.
    span = max(np.nanpercentile(np.abs(d[..., c >= 3] if (c >= 3).any() else d), 99)
               for c, d in derivs.values()) or 1.0
    fig, axes = figure(len(have), 2, width=8.4, height=2.6 * len(have) + 0.3, sharex=True, sharey=True)
    rows = []
    for i, r in enumerate(have):
        steps, tokens, index, loss = data[r.label]
        centers, d = derivs[r.label]
        m0 = axes[i, 0].pcolormesh(tokens, index, loss.T, shading="nearest", vmin=lo, vmax=hi, rasterized=True)
        m1 = axes[i, 1].pcolormesh(tokens, centers, d.T, shading="nearest", cmap="RdBu_r", vmin=-span, vmax=span,
                                   rasterized=True)
        for ax in axes[i]:
            ax.set_yscale("log")
            log_tokens_axis(ax)
            ax.grid(False)
            pc = r.phase_change
            if pc:
                for x in (pc["onset_tokens"], pc["end_tokens"]):
                    ax.axvline(x, color="w" if ax is axes[i, 0] else "k", lw=0.8, ls=":")
            if i < len(have) - 1:
                ax.set_xlabel(None)
        axes[i, 0].set_ylabel(f"{r.label}\ntoken index")
        rows += [{"model": r.label, "panel": "loss", "step": int(steps[a]), "tokens": int(tokens[a]),
                  "token_index": int(index[b]), "loss": float(loss[a, b])}
                 for a in range(len(steps)) for b in range(len(index))]
        rows += [{"model": r.label, "panel": "derivative", "step": int(steps[a]), "tokens": int(tokens[a]),
                  "log_bin_center": float(centers[b]), "dloss_dlog_index": float(d[a, b])}
                 for a in range(len(steps)) for b in range(len(centers))]
    axes[0, 0].set_title("loss by token index (nats)")
    axes[0, 1].set_title("d loss / d ln(token index)")
    fig.colorbar(m0, ax=axes[:, 0], shrink=0.8, label="loss (nats)")
    fig.colorbar(m1, ax=axes[:, 1], shrink=0.8, label="nats per e-fold of token index")
    caption = ("Loss on the fixed evaluation set by token index over training (left) and its derivative with "
               "respect to the log token index (right, on bins evenly spaced in log index; negative: later tokens "
               "are predicted better, in-context learning; colour scale set by token indices >= 3, the first ones "
               "saturate). Dotted: phase-change window.")
    return Plot(fig, to_table(rows), caption)
