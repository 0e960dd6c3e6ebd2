"""Attention patterns of the strongest induction head and the strongest previous-token head, at the last
checkpoint, on the run's probe batch (BOS + random tokens repeated; Olsson et al. 2022's figures of an
induction head's off-diagonal stripe and a previous-token head's sub-diagonal)."""

from __future__ import annotations

import numpy as np

from .run_set import RunData
from .style import CLASS_NAMES, Plot, figure, to_table

KINDS = ("prefix_matching", "previous_token")  # the head chosen for each column: highest score of this kind


def final_scores(run: RunData) -> list[dict] | None:
    """Per-head `{layer, head, class, prefix_matching, previous_token}` at the end of training."""
    heads = (run.summary or {}).get("heads")
    if heads:
        return heads
    c = run.table("heads")
    if c is None or c.num_rows == 0:
        return None
    t = run.columns("heads", "step", "layer", "head", "prefix_matching", "previous_token")
    last = t["step"] == t["step"].max()
    return [{"layer": int(a), "head": int(b), "class": "other", "prefix_matching": float(p), "previous_token": float(q)}
            for a, b, p, q in zip(t["layer"][last], t["head"][last], t["prefix_matching"][last],
                                  t["previous_token"][last])]


def probe_patterns(run: RunData) -> tuple[int, np.ndarray, np.ndarray]:
    """`(step, tokens [pos], patterns [layer, head, query, key])` of the last checkpoint on probe sequence 0."""
    import torch

    from train.build import build_generator, probe_tokens

    entry = run.checkpoints[-1]
    model = run.model(entry)
    tokens = probe_tokens(run.cfg, build_generator(run.cfg))[:1]  # [1, pos]
    with torch.no_grad():
        _, patterns = model(tokens, return_patterns=True)
    return entry["step"], tokens[0].numpy(), np.stack([p[0].float().numpy() for p in patterns])


def attention_figure(runs: list[RunData]) -> Plot | str:
    chosen, notes = [], []
    for r in runs:
        heads = final_scores(r)
        if not heads:
            notes.append(f"{r.label}: no per-head scores (summary.json or metrics/heads.parquet)")
        elif not r.file("index").exists():
            notes.append(f"{r.label}: no {r.file('index').relative_to(r.path)}")
        else:
            chosen.append((r, heads))
    if not chosen:
        return "no run with both per-head scores and a checkpoint" + (f" ({'; '.join(notes)})" if notes else "")
    fig, axes = figure(len(chosen), 2, width=6.8, height=3.2 * len(chosen) + 0.2)
    rows = []
    for i, (r, heads) in enumerate(chosen):
        step, tokens, patterns = probe_patterns(r)
        rep = int(r.cfg.probes.rep_len)
        for j, score in enumerate(KINDS):
            best = max(heads, key=lambda h: h[score])
            layer, head = best["layer"], best["head"]
            pattern = patterns[layer, head]  # [query, key]
            ax = axes[i, j]
            im = ax.imshow(pattern, vmin=0, vmax=1, cmap="magma", interpolation="nearest")
            for b in range(1 + rep, len(tokens), rep):
                ax.axhline(b - 0.5, color="w", lw=0.4, alpha=0.5)
                ax.axvline(b - 0.5, color="w", lw=0.4, alpha=0.5)
            ax.grid(False)
            ax.set_title(f"{r.label}: L{layer}H{head}, class {CLASS_NAMES.get(best['class'], best['class'])}\n"
                         f"highest {score.replace('_', '-')} score ({best[score]:.2f})", fontsize=8)
            ax.set_xlabel("key position")
            ax.set_ylabel("query position")
            q, k = np.nonzero(np.ones_like(pattern, dtype=bool))
            rows += [{"model": r.label, "step": step, "selected_by": score, "layer": layer, "head": head,
                      "class": best["class"], "query": int(a), "key": int(b), "attention": float(pattern[a, b]),
                      "query_token": int(tokens[a]), "key_token": int(tokens[b])} for a, b in zip(q, k)]
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="attention")
    caption = ("Attention patterns at the last checkpoint on a probe sequence (BOS, then random tokens repeated; "
               "lines mark the repeats) for each model's head with the highest prefix-matching score (left: an "
               "induction head attends to the token after the previous occurrence of the current one, an "
               "off-diagonal stripe) and with the highest previous-token score (right: the sub-diagonal).")
    return Plot(fig, to_table(rows), caption, notes)
