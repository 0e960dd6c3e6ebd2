"""Ablate heads one at a time (Olsson et al. 2022's ablation analysis) at chosen checkpoints.

For every checkpoint and head: the change in the ICL score (the head's ICL attribution), in mean
loss and in every per-token loss on the fixed evaluation set, in induction loss on the probe batch,
and the projection of the per-token-loss change onto the before-and-after vector (per-token losses at
the phase change's end minus at its onset, unit length). Writes RUN_DIR/analysis/ablation_METHOD.parquet.
"""

from __future__ import annotations

import sys

NAME = "ablate"


def register(subparsers) -> None:
    p = subparsers.add_parser(NAME, help="per-head ablation effects on ICL score and per-token losses",
                              description=__doc__)
    p.add_argument("run_dir", help="a run directory (from `python -m train`)")
    p.add_argument("--method", choices=("zero", "mean", "pattern"), default="zero",
                   help="zero: z <- 0; mean: z <- its per-position mean over a reference set; "
                        "pattern: z <- 0 with every attention pattern frozen (default: zero)")
    p.add_argument("--checkpoints", default="all", help="all, last, or steps like 0,256,1000 (default: all)")
    p.add_argument("--heads", default="all", help="all, induction, or LAYER.HEAD,... like 1.0,1.3 (default: all)")
    p.add_argument("--together", nargs="?", const="chosen", action="append", metavar="HEADS",
                   help="also ablate a set of heads at once: the chosen --heads (no value), `induction`, "
                        "or LAYER.HEAD,...; may be repeated")
    p.set_defaults(run=run)


def label(heads) -> str:
    return "+".join(f"{layer}.{head}" for layer, head in heads)


def run(args) -> None:
    import pyarrow as pa
    from tqdm import tqdm

    from train.rundir import write_parquet

    from ..effects import Evaluator, before_after_vector
    from ..runs import open_run

    r = open_run(args.run_dir)
    entries = r.select_checkpoints(args.checkpoints)
    heads = r.select_heads(args.heads)
    groups = [[h] for h in heads]
    for spec in args.together or []:
        group = heads if spec == "chosen" else r.select_heads(spec)
        if group and group not in groups:
            groups.append(group)
    direction, info = before_after_vector(r)
    if direction is None:
        print(f"note: projection left empty: {info['reason']}", file=sys.stderr)

    rows = []
    with tqdm(total=len(entries) * len(groups), desc=f"ablate ({args.method})", unit="ablation",
              file=sys.stderr, dynamic_ncols=True) as bar:
        for entry in entries:
            evaluate = Evaluator(r, r.model(entry), args.method)
            clean = evaluate()
            for group in groups:
                out = evaluate(group)
                delta = out["token_losses"] - clean["token_losses"]  # [eval, pos - 1]
                projection = float(delta.flatten() @ direction) if direction is not None else None
                single = len(group) == 1
                rows.append({
                    "step": entry["step"], "tokens": entry["tokens"], "method": args.method,
                    "heads": label(group), "layer": group[0][0] if single else None,
                    "head": group[0][1] if single else None, "n_ablated": len(group),
                    **{f"{k}_clean": clean[k] for k in ("loss", "icl_score", "induction_loss")},
                    **{k: out[k] for k in ("loss", "icl_score", "induction_loss")},
                    **{f"delta_{k}": out[k] - clean[k] for k in ("loss", "icl_score", "induction_loss")},
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
    late, early = r.icl_positions
    meta = {"method": args.method, "icl_late": f"{late.start}-{late.stop - 1}", "icl_early": f"{early.start}-{early.stop - 1}",
            "delta_token_losses_shape": f"{r.cfg.data.eval_size}x{r.cfg.model.n_ctx - 1}",
            **({"mean_reference": "per-position mean of z over batch 1 of the evaluation stream"}
               if args.method == "mean" else {}),
            **{f"before_after_{k}": str(v) for k, v in info.items()}}
    table = table.replace_schema_metadata(meta)
    path = r.out_dir / f"ablation_{args.method}.parquet"
    write_parquet(path, table)
    print_table(rows, entries[-1]["step"])
    print(f"wrote {path}")


def print_table(rows: list[dict], step: int) -> None:
    """The last checkpoint's attributions, largest ICL effect first."""
    last = sorted((row for row in rows if row["step"] == step), key=lambda row: -row["delta_icl_score"])
    print(f"step {step}: ICL score {last[0]['icl_score_clean']:+.3f}, loss {last[0]['loss_clean']:.3f}")
    print(f"{'heads':>10} {'dICL':>8} {'dloss':>8} {'dind.loss':>10} {'undone':>7}")
    for row in last:
        undone = f"{row['undone_fraction']:7.2f}" if row["undone_fraction"] is not None else "      -"
        print(f"{row['heads']:>10} {row['delta_icl_score']:+8.3f} {row['delta_loss']:+8.3f} "
              f"{row['delta_induction_loss']:+10.3f} {undone}")
