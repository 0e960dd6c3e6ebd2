"""Export a checkpoint for TransformerLens (see `analysis.transformerlens`).

CHECKPOINT is a `.ckpt` file inside a run directory (its config is read from the run), or a run
directory (its last checkpoint). Load the result with `analysis.transformerlens.load(path)`: a
TransformerLens 4.x `TransformerBridge` (every scheme) or, with 3.x installed, a `HookedTransformer`
(the schemes 3.x has).
"""

from __future__ import annotations

from . import member_option

NAME = "export-tl"


def register(subparsers) -> None:
    p = subparsers.add_parser(NAME, help="export a checkpoint for TransformerLens", description=__doc__)
    p.add_argument("checkpoint", help="RUN_DIR/checkpoints/step=NNNNNNN.ckpt, or a run directory")
    p.add_argument("out", help="output file, e.g. model.pt")
    member_option(p)
    p.set_defaults(run=run)


def run(args) -> None:
    from pathlib import Path

    from train.load import load_model

    from ..transformerlens import ExportError, export
    from ..runs import AnalysisError, open_run

    if Path(args.out).is_dir():
        raise AnalysisError(f"{args.out}: is a directory; give the output file's name, e.g. {args.out}/model.pt")
    path = Path(args.checkpoint)
    if path.is_dir():
        r = open_run(path, args.member)
        path = r.checkpoints[-1]["path"]
    else:
        if not path.exists():
            raise AnalysisError(f"{path}: checkpoint not found")
        if args.member is not None:
            raise AnalysisError(f"--member {args.member}: give an ensemble's directory, not a checkpoint file")
        r = open_run(path.resolve().parent.parent)  # RUN_DIR/checkpoints/step=....ckpt
    try:
        out = export(load_model(path, r.cfg), args.out)
    except ExportError as e:
        raise ExportError(f"{path}: {e}") from None
    print(f"wrote {out} (from {path}); load it with analysis.transformerlens.load({str(out)!r})")
