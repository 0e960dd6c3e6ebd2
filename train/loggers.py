"""Loggers from the config: W&B (offline by default) and CSV. The run directory is the source of
truth; loggers are views of it."""

from __future__ import annotations

import logging
import secrets
import string
import sys
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .rundir import read_json, write_json

WANDB_ID = "wandb_id.json"
log = logging.getLogger(__name__)


def job_identity(cfg: DictConfig, run_dir: Path) -> tuple[str | None, str, list[str]]:
    """W&B group, name and tags of this job. In a Hydra sweep, jobs are grouped by sweep directory
    and named by their overrides, so the runs of one sweep sit side by side and never merge."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    w = cfg.logger.wandb
    group, name = w.group, w.name or run_dir.name
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            group = w.group if w.group not in (None, cfg.experiment_name) else Path(hc.sweep.dir).name
            name = w.name or hc.job.override_dirname or run_dir.name
    tags = [*w.tags, f"n_layers={cfg.model.n_layers}", f"n_heads={cfg.model.n_heads}"]
    return group, name, tags


def new_run_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def build_loggers(cfg: DictConfig, run_dir: Path, concurrent: bool = False) -> list[Logger]:
    """The run's loggers. `concurrent`: this process holds other runs' W&B runs at the same time (the
    members of a stacked ensemble), so each starts a W&B run of its own instead of taking the current one."""
    loggers: list[Logger] = []
    w = cfg.logger.wandb
    if w.enabled and w.mode != "disabled":
        import wandb

        # One W&B run per run directory: a resumed run continues the same W&B run.
        id_file = run_dir / WANDB_ID
        run_id = read_json(id_file)["id"] if id_file.exists() else None
        # Chosen here, not by wandb: an offline run has no id until its first log, and the id file must
        # name it from the start (a resumed run, and `analysis llc`, log into the same W&B run).
        run_id = run_id or new_run_id()
        group, name, tags = job_identity(cfg, run_dir)
        def make(mode: str) -> WandbLogger:
            logger = WandbLogger(
                project=w.project, entity=w.entity, group=group, name=name, tags=tags, save_dir=str(run_dir),
                id=run_id, resume="allow",
                # `mode` goes straight to wandb.init: Lightning's `offline=True` would set WANDB_MODE for
                # the whole process and leak into later jobs of a sweep.
                mode=mode, config=OmegaConf.to_container(cfg, resolve=True),
                settings=wandb.Settings(init_timeout=w.init_timeout, silent=True),
                **({"reinit": "create_new"} if concurrent else {}),
            )
            # Lightning always passes `anonymous` (None when unset); wandb warns about any value of it.
            logger._wandb_init.pop("anonymous", None)
            return logger

        logger = make(w.mode)
        if w.mode == "online" and rank_zero_only.rank == 0:
            try:
                logger.experiment  # start the run now: no network must not hang or kill training
            except Exception as e:  # wandb raises several types for no network / no login
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                log.warning("W&B online unavailable (%s); continuing offline: wandb sync %s/wandb later",
                            first, run_dir)
                print(f"warning: W&B online unavailable ({first}); logging offline to {run_dir}/wandb",
                      file=sys.stderr)
                if wandb.run is not None:
                    wandb.finish()
                run_id = new_run_id()  # the failed online attempt keeps its id taken in this process
                logger = make("offline")
        if rank_zero_only.rank == 0:
            write_json(id_file, {"id": run_id})
        loggers.append(logger)
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    """Close every W&B run this job opened, so jobs of a multirun never merge into one run."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            run = logger._experiment  # started by this logger (None if it never logged)
            if run is not None and run is not wandb.run:  # a concurrent run (build_loggers)
                run.finish()
            if wandb.run is not None:
                wandb.finish()
