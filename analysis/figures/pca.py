"""PCA of per-token losses (Olsson et al. 2022, sec. 5: each checkpoint as the vector of its losses on
every token of a fixed evaluation set; the models compared share one set of principal components)."""

from __future__ import annotations

import numpy as np
from omegaconf import OmegaConf

from ..runs import AnalysisError
from .run_set import RunData
from .style import Plot, figure, to_table

# Keys of the data config that do not change the evaluation set.
NOT_EVAL_KEYS = ("batch_size", "seed")


def eval_set_key(run: RunData) -> dict:
    """What determines the fixed evaluation set: the data config but the training stream's keys, and the
    context length (eval_seed, eval_size, the generator and its parameters, n_ctx)."""
    data = OmegaConf.to_container(run.cfg.data, resolve=True)
    key = {f"data.{k}": v for k, v in sorted(data.items()) if k not in NOT_EVAL_KEYS}
    key["model.n_ctx"] = int(run.cfg.model.n_ctx)
    return key


def check_shared_eval_set(runs: list[RunData]) -> None:
    """AnalysisError unless every run was evaluated on the same fixed evaluation set."""
    first = eval_set_key(runs[0])
    for r in runs[1:]:
        key = eval_set_key(r)
        for name in sorted(set(first) | set(key)):
            if first.get(name) != key.get(name):
                raise AnalysisError(
                    f"{r.path}: {name}={key.get(name)} but {runs[0].path} has {name}={first.get(name)}: the runs "
                    "were evaluated on different evaluation sets, so their per-token losses cannot share one PCA "
                    "(compare runs with the same data.eval_seed, data.eval_size, data options and model.n_ctx)")


def token_loss_matrix(run: RunData) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """`(steps, tokens, losses [checkpoint, eval_size * (n_ctx - 1)])` from eval_token_losses.parquet."""
    t = run.table("eval_token_losses")
    if t is None or t.num_rows == 0:
        return None
    steps = np.asarray(t["step"].to_numpy(), dtype=np.int64)
    tokens = np.asarray(t["tokens"].to_numpy(), dtype=np.int64)
    losses = t["token_losses"].to_pylist()
    if len({len(v) for v in losses}) != 1:
        raise AnalysisError(f"{run.path / 'metrics/eval_token_losses.parquet'}: rows of different lengths")
    return steps, tokens, np.array(losses, dtype=np.float64)


def joint_pca(matrices: list[np.ndarray], k: int = 2) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Principal components fitted jointly on the stacked rows of every matrix `[n_i, dim]`.

    Returns `(coords, explained, components, mean)`: each matrix's rows projected on the first `k`
    components `[n_i, k]`, the share of variance each explains `[k]`, the components `[k, dim]` (unit
    rows) and the mean row `[dim]`. numpy SVD of the centered stack; each component's sign is fixed
    so that its largest-magnitude loading is positive (deterministic up to ties).
    """
    if not matrices:
        raise ValueError("joint_pca: no matrix given")
    stack = np.concatenate(matrices, axis=0)  # [sum n_i, dim]
    mean = stack.mean(axis=0)
    centered = stack - mean
    _, sing, vt = np.linalg.svd(centered, full_matrices=False)  # vt [r, dim]
    k = min(k, vt.shape[0])
    components = vt[:k]
    signs = np.sign(components[np.arange(k), np.argmax(np.abs(components), axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    total = float((sing ** 2).sum())
    explained = (sing[:k] ** 2) / total if total > 0 else np.zeros(k)
    coords = [(m - mean) @ components.T for m in matrices]
    return coords, explained, components, mean


def fit(runs: list[RunData]) -> dict | str:
    """The joint PCA of the runs that stored per-token losses, or why there is none."""
    have = [(r, m) for r in runs if (m := token_loss_matrix(r)) is not None]
    if not have:
        return "no run has metrics/eval_token_losses.parquet"
    check_shared_eval_set([r for r, _ in have])
    if sum(len(m[0]) for _, m in have) < 3:
        return "fewer than 3 checkpoints with per-token losses in all"
    coords, explained, _, _ = joint_pca([m[2] for _, m in have], k=2)
    return {"runs": [r for r, _ in have], "steps": [m[0] for _, m in have], "tokens": [m[1] for _, m in have],
            "coords": coords, "explained": explained}


def window_span(tokens: np.ndarray, onset: int, end: int) -> tuple[int, int]:
    """Indices of the checkpoints that bracket the window: the last at or before `onset`, the first at or
    after `end` (checkpoints are log-spaced, so few lie inside a window)."""
    before = np.nonzero(tokens <= onset)[0]
    after = np.nonzero(tokens >= end)[0]
    return (int(before[-1]) if len(before) else 0), (int(after[0]) if len(after) else len(tokens) - 1)


def draw_pca(ax, pca: dict, highlight: RunData | None = None) -> list[dict]:
    """Trajectories in PC1 x PC2: start hollow, end filled, the phase-change window's checkpoints bold."""
    rows = []
    for r, steps, tokens, xy in zip(pca["runs"], pca["steps"], pca["tokens"], pca["coords"]):
        faint = highlight is not None and r is not highlight
        color = "0.8" if faint else r.color
        ax.plot(xy[:, 0], xy[:, 1], "-", color=color, lw=1.0, marker=".", ms=4, label=None if faint else r.label,
                zorder=1 if faint else 2)
        if not faint:
            ax.plot(*xy[0, :2], "o", mfc="white", mec=color, ms=5, zorder=3)
            ax.plot(*xy[-1, :2], "o", color=color, ms=5, zorder=3)
            pc = r.phase_change
            if pc:
                a, b = window_span(tokens, pc["onset_tokens"], pc["end_tokens"])
                ax.plot(xy[a:b + 1, 0], xy[a:b + 1, 1], "-", color=color, lw=3, alpha=0.5, zorder=2)
        rows += [{"model": r.label, "step": int(s), "tokens": int(t), "pc1": float(p[0]), "pc2": float(p[1]),
                  "pc1_explained": float(pca["explained"][0]), "pc2_explained": float(pca["explained"][1])}
                 for s, t, p in zip(steps, tokens, xy)]
    ex = pca["explained"]
    ax.set_xlabel(f"PC1 ({100 * ex[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * ex[1]:.0f}% of variance)")
    return rows


def pca_figure(runs: list[RunData], pca: dict | str) -> Plot | str:
    if isinstance(pca, str):
        return pca
    fig, axes = figure(1, 1, width=5.0, height=4.2)
    rows = draw_pca(axes[0, 0], pca)
    axes[0, 0].legend(loc="best")
    axes[0, 0].set_title("Per-token loss trajectories (joint PCA)")
    caption = ("Each checkpoint's per-token losses on the shared fixed evaluation set, projected on the first two "
               "principal components fitted jointly across the models shown. Hollow: first checkpoint; filled: "
               "last; thick: the stretch from the last checkpoint before the phase-change window to the first after it.")
    return Plot(fig, to_table(rows), caption)
