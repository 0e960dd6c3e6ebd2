"""Ablate heads one at a time (Olsson et al. 2022's ablation analysis) at chosen checkpoints.

For every checkpoint and head: the change in the ICL score (the head's ICL attribution), in mean
loss and in every per-token loss on the fixed evaluation set, in induction loss on the probe batch,
and the projection of the per-token-loss change onto the before-and-after vector (per-token losses at
the phase change's end minus at its onset, unit length). Writes RUN_DIR/analysis/ablation_METHOD.parquet
(`analysis/attribution.py` computes it).
"""

from __future__ import annotations

from . import member_option

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
    member_option(p)
    p.set_defaults(run=run)


def run(args) -> None:
    from train.rundir import write_parquet

    from ..attribution import attribution_table, last_step_report
    from ..runs import open_run

    r = open_run(args.run_dir, args.member)
    entries = r.select_checkpoints(args.checkpoints)
    heads = r.select_heads(args.heads)
    groups = [[h] for h in heads]
    for spec in args.together or []:
        group = heads if spec == "chosen" else r.select_heads(spec)
        if group and group not in groups:
            groups.append(group)
    table = attribution_table(r, entries, groups, args.method)
    path = r.out_dir / f"ablation_{args.method}.parquet"
    write_parquet(path, table)
    print(last_step_report(table))
    print(f"wrote {path}")
