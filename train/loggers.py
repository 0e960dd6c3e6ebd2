"""Loggers from the config: W&B (offline by default) and CSV. The run directory is the source of
truth; loggers are views of it."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from .rundir import read_json, write_json

WANDB_ID = "wandb_id.json"


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    w = cfg.logger.wandb
    if w.enabled and w.mode != "disabled":
        # One W&B run per run directory: a resumed run continues the same W&B run.
        id_file = run_dir / WANDB_ID
        run_id = read_json(id_file)["id"] if id_file.exists() else None
        import wandb

        logger = WandbLogger(
            project=w.project, entity=w.entity, group=w.group, name=w.name or run_dir.name,
            tags=list(w.tags), save_dir=str(run_dir), id=run_id, resume="allow" if run_id else None,
            # `mode` goes straight to wandb.init: Lightning's `offline=True` would set WANDB_MODE for
            # the whole process and leak into later jobs of a sweep.
            mode=w.mode, config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
        write_json(id_file, {"id": logger.version})
        loggers.append(logger)
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    """Close every W&B run this job opened, so jobs of a multirun never merge into one run."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            if wandb.run is not None:
                wandb.finish()
