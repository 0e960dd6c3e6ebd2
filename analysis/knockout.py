"""Crosbie & Shutova (2024)'s knockout: ablate the top-k heads by prefix-matching score, and the same
number of random other heads over several seeds, and compare few-shot pattern-task accuracy
(`analysis.pattern_tasks`), induction loss (probe batch) and ICL score (evaluation set).

Heads are ranked by prefix-matching score at the run's last measured step (metrics/heads.parquet);
the models are the last checkpoint's. Random sets are drawn from the heads outside the top k.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm import tqdm

from .effects import Evaluator
from .head_ablation import ablate
from .pattern_tasks import accuracy, build_tasks
from .runs import AnalysisError, Run

METRICS = ("labelled_patterns", "repeat_completion", "induction_loss", "icl_score")


def rank_heads(heads_table) -> list[tuple[int, int, float]]:
    """`(layer, head, prefix_matching)` at the last measured step, highest score first."""
    rows = heads_table.to_pylist()
    last = max(row["step"] for row in rows)
    ranked = [(row["layer"], row["head"], row["prefix_matching"]) for row in rows if row["step"] == last]
    return sorted(ranked, key=lambda h: (-h[2], h[0], h[1]))


def knockout(r: Run, k: int | None, fraction: float, seeds: int, method: str, n_sequences: int):
    """`(rows, summary, meta, tasks)`: a row per ablated set (and the clean model), the per-condition
    summary, the settings as metadata, and the pattern tasks."""
    ranked = rank_heads(r.heads_table())
    n = len(ranked)
    k = k if k is not None else max(1, round(fraction * n))
    if not 1 <= k < n:
        raise AnalysisError(f"--k {k}: must be between 1 and {n - 1} (the run's model has {n} heads)")
    if seeds < 1:
        raise AnalysisError(f"--seeds {seeds}: must be at least 1")
    top = [(layer, head) for layer, head, _ in ranked[:k]]
    others = [(layer, head) for layer, head, _ in ranked[k:]]
    entry = r.checkpoints[-1]
    model = r.model(entry)
    tasks = build_tasks(r.cfg, r.generator, n_sequences)
    evaluate = Evaluator(r, model, method)

    conditions = [("clean", None, []), (f"top_{k}", None, top)]
    for seed in range(seeds):
        pick = np.random.default_rng(seed).choice(len(others), size=k, replace=False)
        conditions.append((f"random_{k}", seed, sorted(others[i] for i in pick)))
    prev_heads = {(h["layer"], h["head"]) for h in (r.summary or {}).get("previous_token_heads", [])}
    rows = []
    for condition, seed, heads in tqdm(conditions, desc=f"knockout ({method})", file=sys.stderr,
                                       dynamic_ncols=True):
        out = evaluate(heads)
        row = {"condition": condition, "seed": seed, "heads": "+".join(f"{a}.{b}" for a, b in heads),
               "k": len(heads), "step": entry["step"],
               "has_previous_token_head": any(h in prev_heads for h in heads)}
        with torch.no_grad():
            for task in tasks:
                logits = ablate(model, task.tokens, heads, method, evaluate.means) if heads else model(task.tokens)
                row[task.name] = accuracy(logits, task)
        row.update(induction_loss=out["induction_loss"], icl_score=out["icl_score"])
        rows.append(row)

    summary = summarize(rows)
    # Breakdown (not a new draw): the random sets that miss every previous-token head (summary.json).
    # In a small model one previous-token head feeds every induction head, so a random set that hits
    # it breaks the circuit upstream; large models (Crosbie & Shutova's) have too many heads for that.
    spared = [dict(row, condition=f"random_{k}_no_prev_token") for row in rows
              if row["condition"] == f"random_{k}" and not row["has_previous_token_head"]]
    if spared and len(spared) < seeds:
        summary += summarize(spared)
    meta = {"method": method, "step": str(entry["step"]), "k": str(k), "seeds": str(seeds),
            "ranking": ", ".join(f"{a}.{b}={pm:.3f}" for a, b, pm in ranked),
            **{f"chance_{t.name}": f"{t.chance:.4f}" for t in tasks}}
    return rows, summary, meta, tasks


def summarize(rows: list[dict]) -> list[dict]:
    """Per condition: mean, standard deviation (over seeds; 0 for one set), min and max of each metric."""
    out = []
    for condition in dict.fromkeys(row["condition"] for row in rows):
        group = [row for row in rows if row["condition"] == condition]
        record = {"condition": condition, "k": group[0]["k"], "n_sets": len(group),
                  "heads": "; ".join(row["heads"] for row in group)}
        for metric in METRICS:
            values = np.array([row[metric] for row in group], dtype=float)
            record.update({f"{metric}_mean": float(values.mean()),
                           f"{metric}_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                           f"{metric}_min": float(values.min()), f"{metric}_max": float(values.max())})
        out.append(record)
    return out


def markdown(summary: list[dict], meta: dict, tasks) -> str:
    chance = ", ".join(f"{t.name} {t.chance:.2f}" for t in tasks)
    lines = [f"# Knockout ({meta['method']} ablation, step {meta['step']}, k={meta['k']}, {meta['seeds']} random sets)",
             "", f"Ranking by prefix matching: {meta['ranking']}. Chance accuracy: {chance}.", "",
             "| condition | heads | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for s in summary:
        cells = [f"{s[f'{m}_mean']:.3f} ± {s[f'{m}_std']:.3f}" for m in METRICS]
        lines.append(f"| {s['condition']} | {s['heads'] or '-'} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± standard deviation over the random sets (top-k and clean are single sets). "
              "`random_k_no_prev_token`: the same random sets, only those without a previous-token head.", ""]
    return "\n".join(lines)
