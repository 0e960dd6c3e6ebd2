"""Rebuild the paper's figures (Olsson et al. 2022) from runs: ICL score, loss bump, per-head scores,
loss by token index, per-token-loss PCA, smeared key, ablation attribution, the model analysis table
and attention patterns; PNG + PDF + the data behind each (Parquet), and an index page.

Give run directories and/or sweep directories (every job's run directory is used). Figures the runs
cannot support (a smeared-key comparison without a smeared run, ablations never computed) are skipped
with a one-line note and listed as not made in the index. Ensemble directories (`python -m train
seeds=N`, or sweeps of them) give the curves across seeds instead, with bands; `--member K` gives the
paper's figures of member K of each.
"""

from __future__ import annotations

from . import member_option

NAME = "figures"


def register(subparsers) -> None:
    p = subparsers.add_parser(NAME, help="the paper's figures from run or sweep directories, with an index page",
                              description=__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="run directories or sweep directories")
    p.add_argument("--out", default="figures", help="output directory (default: figures)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated figures to make, e.g. icl_score,pca (an unmakeable one is then an error); "
                        "names: icl_score, loss, head_scores, loss_by_position, pca, smeared_key, ablation, "
                        "model_table, attention")
    member_option(p)
    p.set_defaults(run=run)


def run(args) -> None:
    from ..figures import make_figures

    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    make_figures(args.run_dirs, args.out, only=only, member=args.member)
