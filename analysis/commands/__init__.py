"""Subcommands of `python -m analysis`, one module each, found by `analysis/__main__.py`.

To add one (say `figures`), create `analysis/commands/figures.py` with

    def register(subparsers) -> None:
        p = subparsers.add_parser("figures", help="...", description=__doc__)
        p.add_argument("run_dir")
        p.set_defaults(run=run)

    def run(args) -> None:
        ...  # raise analysis.runs.AnalysisError("<file>: <what is wrong>") for bad input

Keep heavy imports inside `run`, so `--help` stays fast and one command's missing optional
dependency does not break the others.
"""


def member_option(parser) -> None:
    """`--member K`: the command works on member K of an ensemble (`python -m train seeds=N`)."""
    parser.add_argument("--member", type=int, default=None, metavar="K",
                        help="member K of an ensemble directory (python -m train seeds=N), 0-based")
