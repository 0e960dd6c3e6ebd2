"""Locating the induction-head phase change and classifying heads, from measured curves."""

from __future__ import annotations

import numpy as np


def _gaussian_smooth(y: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return y
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(y, radius, mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def detect_phase_change(
    steps: np.ndarray,
    tokens: np.ndarray,
    icl: np.ndarray,
    smooth: float = 0.15,
    threshold: float = 0.25,
    min_drop: float = 0.05,
    min_step: int = 0,
) -> dict | None:
    """The window where the ICL score falls fastest against log training tokens (Olsson et al. 2022,
    who locate the phase change by the derivative of the ICL score over log tokens).

    The curve is resampled on an even grid in log tokens, smoothed with a Gaussian of width `smooth`
    (natural-log units), and differentiated. The peak is the most negative derivative; the window
    extends on each side while the derivative stays below `threshold` times the peak. Returns None if
    the ICL score does not improve by `min_drop` nats across the window. Steps before `min_step` are
    left out (every model first learns in-context token frequencies, a steep early fall that is not
    the induction-head phase change).
    """
    steps, tokens, icl = (np.asarray(a, dtype=np.float64) for a in (steps, tokens, icl))
    keep = (tokens > 0) & np.isfinite(icl) & (steps >= min_step)
    if keep.sum() < 5:
        return None
    order = np.argsort(tokens[keep], kind="stable")  # rows may come in any order (merged tables)
    steps, x, y = steps[keep][order], np.log(tokens[keep][order]), icl[keep][order]
    grid = np.linspace(x[0], x[-1], 400)
    dx = grid[1] - grid[0]
    if dx <= 0:
        return None
    ys = _gaussian_smooth(np.interp(grid, x, y), smooth / dx)
    slope = np.gradient(ys, dx)
    peak = int(np.argmin(slope))
    if slope[peak] >= 0:
        return None
    cut = threshold * slope[peak]
    onset, end = peak, peak
    while onset > 0 and slope[onset - 1] < cut:
        onset -= 1
    while end < len(slope) - 1 and slope[end + 1] < cut:
        end += 1
    drop = float(ys[onset] - ys[end])
    if drop < min_drop:
        return None

    def nearest(i: int) -> tuple[int, int]:
        j = int(np.argmin(np.abs(x - grid[i])))
        return int(steps[j]), int(round(np.exp(x[j])))

    (s0, t0), (s1, t1), (s2, t2) = nearest(onset), nearest(peak), nearest(end)
    return {
        "onset_step": s0, "peak_step": s1, "end_step": s2,
        "onset_tokens": t0, "peak_tokens": t1, "end_tokens": t2,
        "icl_at_onset": float(ys[onset]), "icl_at_end": float(ys[end]), "icl_drop": drop,
    }


def classify_heads(previous_token: np.ndarray, prefix_matching: np.ndarray, prev_threshold: float,
                   induction_threshold: float) -> list[dict]:
    """One record per head: its scores and class. Arrays are `[layer, head]`.

    Induction: prefix-matching >= `induction_threshold`. Previous-token: previous-token score >=
    `prev_threshold` (and not induction). Otherwise other.
    """
    heads = []
    for layer in range(previous_token.shape[0]):
        for head in range(previous_token.shape[1]):
            pm, pt = float(prefix_matching[layer, head]), float(previous_token[layer, head])
            cls = "induction" if pm >= induction_threshold else "previous_token" if pt >= prev_threshold else "other"
            heads.append({"layer": layer, "head": head, "class": cls, "prefix_matching": pm, "previous_token": pt})
    return heads
