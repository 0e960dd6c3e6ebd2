"""Olsson et al. (2022)'s ablation analysis over training: heads ablated one at a time (or in chosen
sets) at each checkpoint, and what that does to the paper's quantities.

Per checkpoint and head set: the change in the ICL score (the head's ICL attribution), in mean loss
and in every per-token loss on the fixed evaluation set, in induction loss on the probe batch, and the
projection of the per-token-loss change onto the before-and-after vector (per-token losses at the
phase change's end minus at its onset, unit length). `python -m analysis ablate` writes the table.
"""

from __future__ import annotations

import sys
from typing import Sequence

import pyarrow as pa
from tqdm import tqdm

from .effects import Evaluator, before_after_vector
from .head_ablation import Head
from .runs import Run

QUANTITIES = ("loss", "icl_score", "induction_loss")


def label(heads: Sequence[Head]) -> str:
    return "+".join(f"{layer}.{head}" for layer, head in heads)


def attribution_table(run: Run, entries: list[dict], groups: list[list[Head]], method: str) -> pa.Table:
    """A row per checkpoint entry and head set, with the clean values, the ablated ones and their
    differences; the schema's metadata records the method, the ICL positions and the before-and-after
    vector's steps (or why there is none)."""
    direction, info = before_after_vector(run)
    if direction is None:
        print(f"note: projection left empty: {info['reason']}", file=sys.stderr)
    rows = []
    with tqdm(total=len(entries) * len(groups), desc=f"ablate ({method})", unit="ablation",
              file=sys.stderr, dynamic_ncols=True) as bar:
        for entry in entries:
            evaluate = Evaluator(run, run.model(entry), method)
            clean = evaluate()
            for group in groups:
                out = evaluate(group)
                delta = out["token_losses"] - clean["token_losses"]  # [eval, pos - 1]
                projection = float(delta.flatten() @ direction) if direction is not None else None
                single = len(group) == 1
                rows.append({
                    "step": entry["step"], "tokens": entry["tokens"], "method": method,
                    "heads": label(group), "layer": group[0][0] if single else None,
                    "head": group[0][1] if single else None, "n_ablated": len(group),
                    **{f"{k}_clean": clean[k] for k in QUANTITIES},
                    **{k: out[k] for k in QUANTITIES},
                    **{f"delta_{k}": out[k] - clean[k] for k in QUANTITIES},
                    "projection": projection,
                    # The share of the onset -> end displacement that ablation undoes along it (1: all).
                    "undone_fraction": -projection / info["norm"] if projection is not None else None,
                    "delta_loss_by_position": delta.mean(dim=0).tolist(),
                    "delta_token_losses": delta.flatten().tolist(),
                })
                bar.update()
    table = pa.Table.from_pylist(rows)
    for name in ("delta_loss_by_position", "delta_token_losses"):  # float32 halves the file
        table = table.set_column(table.schema.get_field_index(name), name, table[name].cast(pa.list_(pa.float32())))
    late, early = run.icl_positions
    meta = {"method": method, "icl_late": f"{late.start}-{late.stop - 1}", "icl_early": f"{early.start}-{early.stop - 1}",
            "delta_token_losses_shape": f"{run.cfg.data.eval_size}x{run.cfg.model.n_ctx - 1}",
            **({"mean_reference": "per-position mean of z over batch 1 of the evaluation stream"}
               if method == "mean" else {}),
            **{f"before_after_{k}": str(v) for k, v in info.items()}}
    return table.replace_schema_metadata(meta)


def last_step_report(table: pa.Table) -> str:
    """The last checkpoint's attributions, largest ICL effect first."""
    rows = table.select(["step", "heads", "loss_clean", "icl_score_clean", "delta_icl_score", "delta_loss",
                         "delta_induction_loss", "undone_fraction"]).to_pylist()
    step = max(row["step"] for row in rows)
    last = sorted((row for row in rows if row["step"] == step), key=lambda row: -row["delta_icl_score"])
    lines = [f"step {step}: ICL score {last[0]['icl_score_clean']:+.3f}, loss {last[0]['loss_clean']:.3f}",
             f"{'heads':>10} {'dICL':>8} {'dloss':>8} {'dind.loss':>10} {'undone':>7}"]
    for row in last:
        undone = f"{row['undone_fraction']:7.2f}" if row["undone_fraction"] is not None else "      -"
        lines.append(f"{row['heads']:>10} {row['delta_icl_score']:+8.3f} {row['delta_loss']:+8.3f} "
                     f"{row['delta_induction_loss']:+10.3f} {undone}")
    return "\n".join(lines)
