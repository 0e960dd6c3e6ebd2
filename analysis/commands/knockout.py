"""Crosbie & Shutova (2024)'s knockout: ablate the top-k heads by prefix-matching score, and the same
number of random other heads over several seeds, and compare few-shot pattern-task accuracy
(`analysis.pattern_tasks`), induction loss (probe batch) and ICL score (evaluation set).

Heads are ranked by prefix-matching score at the run's last measured step (metrics/heads.parquet);
the models are the last checkpoint's. Random sets are drawn from the heads outside the top k.
Writes RUN_DIR/analysis/knockout.parquet (means and spread per condition), knockout_runs.parquet (one
row per ablated set) and knockout.md.
"""

from __future__ import annotations

from . import member_option

NAME = "knockout"


def register(subparsers) -> None:
    p = subparsers.add_parser(NAME, help="top-k prefix-matching heads vs random heads (Crosbie & Shutova)",
                              description=__doc__)
    p.add_argument("run_dir", help="a run directory (from `python -m train`)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--k", type=int, help="ablate this many heads")
    size.add_argument("--fraction", type=float, default=0.03,
                      help="ablate this share of all heads, at least one (default: 0.03, as the paper's 3%%)")
    p.add_argument("--seeds", type=int, default=5, help="random head sets (default: 5)")
    p.add_argument("--method", choices=("zero", "mean", "pattern"), default="zero", help="ablation (default: zero)")
    p.add_argument("--n-sequences", type=int, default=256, help="sequences per pattern task (default: 256)")
    member_option(p)
    p.set_defaults(run=run)


def run(args) -> None:
    import pyarrow as pa

    from train.rundir import write_parquet, write_text

    from ..knockout import knockout, markdown
    from ..runs import open_run

    r = open_run(args.run_dir, args.member)
    rows, summary, meta, tasks = knockout(r, args.k, args.fraction, args.seeds, args.method, args.n_sequences)
    write_parquet(r.out_dir / "knockout_runs.parquet", pa.Table.from_pylist(rows).replace_schema_metadata(meta))
    write_parquet(r.out_dir / "knockout.parquet", pa.Table.from_pylist(summary).replace_schema_metadata(meta))
    text = markdown(summary, meta, tasks)
    write_text(r.out_dir / "knockout.md", text)
    print(text, end="")
    print(f"wrote {r.out_dir / 'knockout.parquet'}, knockout_runs.parquet, knockout.md")
