"""A worked example: TransformerLens across the checkpoints of a finished run.

For 8-12 checkpoints through training (the dense ones inside the phase change when the run has them),
load the model in TransformerLens 4.x (`run.tl_model(step)`, a `TransformerBridge`, whose word-level
tokenizer spells token `i` as "i", so `detect_head` takes the sequence as text), cache the induction head's attention pattern on a repeated random sequence, and
score every head with TransformerLens' own head detector beside our probes:

- previous-token: TransformerLens' `detect_head(..., "previous_token_head")` divides the attention on
  each query's previous token by every query's attention (all `t` rows), ours by the `t - 1` queries
  that have a previous token: theirs is ours times `(t - 1) / t`, within 0.02 for `t >= 50`.
- induction: both mark the same keys (the token after each earlier occurrence of the query's token),
  but TransformerLens again divides by all `t` queries, ours by the queries that have an earlier
  occurrence (Olsson et al.'s prefix matching): theirs is ours times that share, about 1 - rep_len / t
  on the probe sequence. Rescaled by it, the two agree.

    python examples/tl_checkpoints.py RUN_DIR [--out DIR]

writes DIR/tl_checkpoints.png (patterns over training; both scores over training) and
DIR/tl_checkpoints.parquet, and prints the largest disagreement. DIR defaults to RUN_DIR/analysis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

AGREE = 0.02  # the largest difference allowed where the definitions coincide


def choose_checkpoints(entries: list[dict], window: dict | None, n: int = 10) -> list[dict]:
    """About `n` checkpoints: the ones inside the phase-change window first (at most half), the rest
    spread evenly in log step over the run, the first and the last always in."""
    entries = [e for e in entries if e["step"] > 0]
    if len(entries) <= n:
        return entries
    inside = [e for e in entries if window and window["onset_step"] <= e["step"] <= window["end_step"]]
    inside = [inside[i] for i in np.linspace(0, len(inside) - 1, min(len(inside), n // 2)).round().astype(int)]
    steps = np.log([e["step"] for e in entries])
    targets = np.linspace(steps[0], steps[-1], n - len(inside))
    spread = {int(np.abs(steps - t).argmin()) for t in targets}
    chosen = {e["step"]: e for e in inside} | {entries[i]["step"]: entries[i] for i in spread}
    return [chosen[s] for s in sorted(chosen)]


def scores_at(run, step: int, sequence: torch.Tensor) -> tuple[list[dict], np.ndarray]:
    """Per-head rows (ours and TransformerLens' scores) at a checkpoint, and every head's pattern
    `[layer, head, query, key]` from TransformerLens' cache."""
    from transformer_lens.head_detector import detect_head

    from train import probes

    model, lens = run.model(step), run.tl_model(step)
    text = " ".join(str(int(t)) for t in sequence[1:])  # the bridge's digit tokenizer adds BOS (0)
    tokens = sequence[None]
    with torch.no_grad():
        _, patterns = model(tokens, return_patterns=True)
        _, cache = lens.run_with_cache(tokens)
    tl_prev = detect_head(lens, text, "previous_token_head")
    tl_ind = detect_head(lens, text, "induction_head")
    t = tokens.shape[1]
    share = float(probes.prefix_matching_mask(tokens).any(-1).float().mean())  # queries with an earlier occurrence
    rows = []
    for layer, pattern in enumerate(patterns):
        ours_prev, ours_ind = probes.previous_token_score(pattern), probes.prefix_matching_score(pattern, tokens)
        for head in range(pattern.shape[1]):
            rows.append({"step": step, "layer": layer, "head": head,
                         "previous_token": float(ours_prev[head]), "tl_previous_token": float(tl_prev[layer, head]),
                         "tl_previous_token_expected": float(ours_prev[head]) * (t - 1) / t,
                         "prefix_matching": float(ours_ind[head]), "tl_induction": float(tl_ind[layer, head]),
                         "tl_induction_rescaled": float(tl_ind[layer, head]) / share})
    lens_patterns = np.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0].float().numpy()
                              for layer in range(len(patterns))])
    return rows, lens_patterns


def figure(rows: list[dict], patterns: dict[int, np.ndarray], head: tuple[int, int], prev_head: tuple[int, int]):
    from analysis.figures.style import figure as new_figure

    steps = sorted(patterns)
    fig, axes = new_figure(2, len(steps), width=1.6 * len(steps) + 0.6, height=4.8)
    layer, h = head
    for ax, step in zip(axes[0], steps):
        ax.imshow(patterns[step][layer, h], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"step {step}", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
        ax.grid(False)
    axes[0, 0].set_ylabel(f"L{layer}H{h} pattern\n(query x key)")
    for ax in axes[1, 1:]:
        ax.remove()
    gs = axes[1, 0].get_gridspec()
    axes[1, 0].remove()
    ax = fig.add_subplot(gs[1, :])
    by = {(r["step"], r["layer"], r["head"]): r for r in rows}
    for (lh, key, tl_key, label, color) in (
            (head, "prefix_matching", "tl_induction_rescaled", f"L{head[0]}H{head[1]} induction", "C3"),
            (prev_head, "previous_token", "tl_previous_token", f"L{prev_head[0]}H{prev_head[1]} previous-token", "C0")):
        ours = [by[(s, *lh)][key] for s in steps]
        theirs = [by[(s, *lh)][tl_key] for s in steps]
        ax.plot(steps, ours, color=color, marker="o", ms=3, label=f"{label}: ours")
        ax.plot(steps, theirs, color=color, ls="--", marker="x", ms=4, label=f"{label}: TransformerLens detect_head"
                + (" (rescaled)" if tl_key.endswith("rescaled") else ""))
    ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("score")
    ax.legend(loc="best", fontsize=7)
    return fig


def main(argv: list[str] | None = None) -> int:
    import pyarrow as pa

    from analysis import Run
    from analysis.figures.style import save, style, Plot, to_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/analysis)")
    args = parser.parse_args(argv)
    run = Run(args.run_dir)
    out = Path(args.out) if args.out else run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    summary = run.summary or {}
    heads = run.metrics("heads")
    last = heads[heads.step == heads.step.max()]
    deep = last[last.layer >= 1] if (last.layer >= 1).any() else last
    best = deep.sort_values("prefix_matching").iloc[-1]
    prev = last[last.layer == 0].sort_values("previous_token").iloc[-1]
    head, prev_head = (int(best["layer"]), int(best["head"])), (int(prev["layer"]), int(prev["head"]))
    sequence = run.probe_tokens[0, :-1]  # detect_head takes sequences shorter than the context
    rows, patterns = [], {}
    for entry in choose_checkpoints(run.checkpoints, summary.get("phase_change")):
        step_rows, patterns[entry["step"]] = scores_at(run, entry["step"], sequence)
        rows += step_rows
    prev_gap = max(abs(r["previous_token"] - r["tl_previous_token"]) for r in rows)
    ind_gap = max(abs(r["prefix_matching"] - r["tl_induction_rescaled"]) for r in rows)
    with style():
        fig = figure(rows, patterns, head, prev_head)
        caption = (f"L{head[0]}H{head[1]}'s attention on a repeated random sequence at {len(patterns)} checkpoints "
                   "(TransformerLens' cache), and our scores beside TransformerLens' detect_head.")
        save(Plot(fig, to_table(rows), caption), out, "tl_checkpoints")
    print(f"{len(patterns)} checkpoints, {len(rows)} head scores: largest |ours - TransformerLens| previous-token "
          f"{prev_gap:.4f}, induction (rescaled) {ind_gap:.4f}; wrote {out / 'tl_checkpoints.png'}")
    return 0 if max(prev_gap, ind_gap) <= AGREE else 1


if __name__ == "__main__":
    sys.exit(main())
