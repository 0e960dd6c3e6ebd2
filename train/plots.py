"""The per-head score heatmap, logged to W&B during training and drawn by `analysis.figures`."""

from __future__ import annotations

import numpy as np


def heads_heatmap(prefix_matching, previous_token, title: str | None = None):
    """Per-head score grid `[layer, head]` for prefix matching and previous token, values written in the
    cells: a matplotlib Figure (the caller saves or logs it, e.g. `wandb.Image(fig)`, and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pm, pt = np.asarray(prefix_matching, dtype=float), np.asarray(previous_token, dtype=float)
    if pm.ndim != 2 or pm.shape != pt.shape:
        raise ValueError(f"expected two [layer, head] arrays of one shape, got {pm.shape} and {pt.shape}")
    n_layers, n_heads = pm.shape
    fig, axes = plt.subplots(1, 2, squeeze=False, constrained_layout=True,
                             figsize=(2.0 + 1.1 * 2 * max(n_heads, 2), 1.2 + 0.5 * max(n_layers, 2)))
    for ax, grid, name in ((axes[0, 0], pm, "prefix matching"), (axes[0, 1], pt, "previous token")):
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (layer, head), v in np.ndenumerate(grid):
            ax.text(head, layer, f"{v:.2f}", ha="center", va="center", fontsize=7, color="k" if v > 0.6 else "w")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(name)
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig
