"""The local learning coefficient (LLC) at checkpoints, with devinterp's SGLD sampler, and the stages
its curve marks beside the ICL phase change (Hoogland et al. 2024).

Writes RUN_DIR/analysis/llc.parquet (per checkpoint: LLC mean and sd over chains, each chain's
estimate, the loss at the weights, the trace's rise after its second quarter), llc_traces.parquet
(devinterp's SGLD loss traces: step, chain, sgld_step, loss), llc.md (the table and the stages) and
llc_curve.png/.pdf/.parquet (the LLC under the ICL score, the window shaded, and its data); logs them
to the run's W&B run when it
has one. Defaults and how they were chosen: docs/llc.md.
"""

from __future__ import annotations

from . import member_option

NAME = "llc"


def register(subparsers) -> None:
    from ..llc import LLCSettings

    d = LLCSettings()
    p = subparsers.add_parser(NAME, help="local learning coefficient over checkpoints (devinterp)", description=__doc__)
    p.add_argument("run_dir", help="a run directory (from `python -m train`)")
    p.add_argument("--checkpoints", default="all", help="all, last, or steps like 0,256,1000 (default: all)")
    p.add_argument("--chains", type=int, default=d.chains, help=f"SGLD chains per checkpoint (default: {d.chains})")
    p.add_argument("--draws", type=int, default=d.draws, help=f"draws per chain (default: {d.draws})")
    p.add_argument("--burnin", type=int, default=d.burnin, help=f"SGLD steps before the draws (default: {d.burnin})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"SGLD step size (default: {d.lr})")
    p.add_argument("--nbeta", type=float, default=d.nbeta, help=f"inverse temperature n*beta (default: {d.nbeta})")
    p.add_argument("--localization", type=float, default=d.localization,
                   help=f"pull towards the checkpoint's weights, gamma (default: {d.localization})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per SGLD step (default: {d.batch_size})")
    p.add_argument("--n-sequences", type=int, default=d.n_sequences,
                   help=f"sequences of the training distribution to sample on (default: {d.n_sequences})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"the chains' seed (default: {d.seed})")
    p.add_argument("--params", default=d.params, metavar="REGEX",
                   help="sample only the parameters whose names match, e.g. 'blocks\\.1\\.' (a layer's LLC; "
                        "default: all)")
    p.add_argument("--no-wandb", action="store_true", help="do not log to the run's W&B run")
    member_option(p)
    p.set_defaults(run=run)


def run(args) -> None:
    import json
    from dataclasses import asdict

    import pyarrow as pa

    from train.rundir import write_parquet, write_text

    from ..figures.llc import llc_figure
    from ..figures.style import save, style
    from ..llc import LLCSettings, llc_over_checkpoints, markdown, stages
    from ..runs import open_run

    settings = LLCSettings(args.lr, args.nbeta, args.localization, args.chains, args.draws, args.burnin,
                           args.batch_size, args.n_sequences, args.seed, args.params).checked()
    r = open_run(args.run_dir, args.member)
    entries = r.select_checkpoints(args.checkpoints)

    def progress(row: dict) -> None:
        print(f"step {row['step']}: LLC {row['llc_mean']:.1f} +- {row['llc_std']:.1f}", flush=True)

    rows, traces = llc_over_checkpoints(r, entries, settings, progress)
    meta = {"settings": json.dumps(asdict(settings))}
    table = pa.Table.from_pylist(rows).replace_schema_metadata(meta)
    write_parquet(r.out_dir / "llc.parquet", table)
    write_parquet(r.out_dir / "llc_traces.parquet", pa.Table.from_pylist(traces).replace_schema_metadata(meta))
    window = (r.summary or {}).get("phase_change")
    text = markdown(rows, stages(rows), window, settings)
    write_text(r.out_dir / "llc.md", text)
    with style():
        plot = llc_figure(r, rows)
        if not args.no_wandb:
            log_to_wandb(r, rows, plot.fig)
        paths = save(plot, r.out_dir, "llc_curve")
    print(text, end="")
    print(f"wrote {r.out_dir / 'llc.parquet'}, llc_traces.parquet, llc.md, {paths[0].name}")


def log_to_wandb(r, rows: list[dict], fig) -> None:
    """Into the run's own W&B run (its id in wandb_id.json), against a step axis of its own: the run's
    logged steps are over, and W&B accepts only increasing steps."""
    from train.loggers import WANDB_ID
    from train.rundir import read_json

    w = r.cfg.logger.wandb
    id_file = r.path / WANDB_ID
    if not (w.enabled and w.mode != "disabled" and id_file.exists()):
        return
    import wandb

    run = wandb.init(project=w.project, entity=w.entity, id=read_json(id_file)["id"], resume="allow", mode=w.mode,
                     dir=str(r.path), settings=wandb.Settings(init_timeout=w.init_timeout, silent=True))
    try:
        run.define_metric("llc/step")
        run.define_metric("llc/*", step_metric="llc/step")
        for row in rows:
            run.log({"llc/step": row["step"], "llc/tokens": row["tokens"], "llc/mean": row["llc_mean"],
                     "llc/std": row["llc_std"]})
        run.log({"llc/figure": wandb.Image(fig)})
    finally:
        run.finish()
