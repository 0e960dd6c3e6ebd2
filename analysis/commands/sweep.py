"""Summarize a Hydra sweep: one row per job (depth, heads, seed, phase-change window, final ICL score,
induction heads, status), as SWEEP_DIR/sweep_summary.parquet and .md, and a figure of the phase-change
onset and final ICL score over depth x heads (sweep_summary.png). Sweeps write it themselves at the end.
"""

from __future__ import annotations

NAME = "sweep"


def register(subparsers) -> None:
    p = subparsers.add_parser(NAME, help="summary table and figure of a sweep", description=__doc__)
    p.add_argument("sweep_dir", help="a sweep directory (from `python -m train -m ...`)")
    p.set_defaults(run=run)


def run(args) -> None:
    from train.sweep_summary import summarize_sweep

    table = summarize_sweep(args.sweep_dir)
    print(f"{table.num_rows} jobs; wrote {args.sweep_dir}/sweep_summary.{{parquet,md,png}}")
