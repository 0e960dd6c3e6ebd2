"""One training run: validate -> build -> fit -> summarize. `train/__main__.py` wraps it for Hydra."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.warnings import PossibleUserWarning
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from .build import build_datamodule, build_generator, build_model, probe_tokens, task_batch
from .callbacks.checkpoint import FiniteGuard, ScheduledCheckpoint, last_checkpoint
from .callbacks.measure import Measure
from .callbacks.progress import StepProgressBar
from .callbacks.summary import RunSummary
from .config import leaves, validate
from .ensemble_summary import is_ensemble
from .errors import ConfigError, RunError
from .interventions import Interventions
from .interventions import parse as parse_interventions
from .load import read_checkpoint
from .module import InductionLM
from .rundir import CONFIG, write_text
from .loggers import build_loggers, finish_loggers


# What a resumed run must share with the run it continues: everything that decides its weights or the
# meaning of its metric columns. Changing one of these starts a new run (a new directory), not a resume.
RESUME_MUST_MATCH = ("model", "data", "optim", "probes", "seed", "compile", "intervene", "trainer.precision",
                     "trainer.gradient_clip_val", "trainer.accumulate_grad_batches", "trainer.deterministic")
# Keys that change how a run is computed or written, not what: a resumed run may set them anew.
FREE_ON_RESUME = ("data.num_workers", "probes.background", "probes.flush_every_n_steps",
                  "probes.heatmap_every_n_steps")


def check_resume(cfg: DictConfig, run_dir: Path) -> Path:
    """The checkpoint to resume from; the saved config must match the current one on every key that
    decides the weights or the metrics (`RESUME_MUST_MATCH`), else one line names the first that does not."""
    if not (run_dir / CONFIG).exists():
        raise ConfigError(f"resume={run_dir}: not a run directory (no {CONFIG})")
    ckpt = last_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"resume={run_dir}: no checkpoint listed in checkpoints/index.json")
    state = read_checkpoint(ckpt)  # truncated or foreign files fail here, in one line, before any work
    missing = [k for k in ("optimizer_states", "loops", "tokens_seen") if k not in state]  # read_checkpoint checked state_dict
    if missing:
        raise RunError(f"{ckpt}: not a checkpoint of this harness (no {', '.join(missing)})")
    saved = OmegaConf.load(run_dir / CONFIG)
    for group in RESUME_MUST_MATCH:
        node = OmegaConf.select(cfg, group)
        node = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
        for key, value in leaves(node, group).items():
            if key in FREE_ON_RESUME:
                continue
            old = OmegaConf.select(saved, key)
            old = OmegaConf.to_container(old) if isinstance(old, ListConfig) else old
            if str(old) != str(value):
                raise ConfigError(f"{key}={value}: the run being resumed used {old} (start a new run to change it)")
    return ckpt


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    validate(cfg)
    run_dir = Path(run_dir)
    if not cfg.resume and rank_zero_only.rank == 0 and (run_dir / CONFIG).exists():
        # A second run would mix its metrics and checkpoints into the first one's files. (DDP's other
        # ranks start after rank 0 has written the config.)
        raise ConfigError(f"{run_dir}: already holds a run ({CONFIG}); resume={run_dir} continues it, "
                          "or choose another hydra.run.dir")
    if cfg.resume and is_ensemble(cfg.resume):
        raise ConfigError(f"resume={cfg.resume}: an ensemble of {OmegaConf.load(Path(cfg.resume) / CONFIG).seeds} "
                          "seeds: resume it with the same seeds=N (or one member: resume=RUN/members/K)")
    ckpt = check_resume(cfg, run_dir) if cfg.resume else None
    if ckpt is not None:
        for stale in run_dir.rglob(".*.tmp"):  # temp files of a killed run; the real files are intact
            stale.unlink()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    generator = build_generator(cfg)
    datamodule = build_datamodule(cfg, generator)
    model = build_model(cfg)
    if cfg.compile:
        model = torch.compile(model)
    interventions = Interventions(parse_interventions(cfg.intervene, cfg.model.n_layers, cfg.model.n_heads,
                                                      cfg.trainer.max_steps))
    module = InductionLM(model, OmegaConf.to_container(cfg.optim), cfg.trainer.max_steps, interventions)
    measure = Measure.of(run_dir, cfg.probes, cfg.model.n_ctx, probe_tokens(cfg, generator), datamodule.eval_tokens(),
                         task=generator, task_batch=task_batch(cfg, generator))
    # After the data is ready: bad data leaves no run directory behind.
    if not cfg.resume and rank_zero_only.rank == 0:
        write_text(run_dir / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    guard = FiniteGuard(cfg.probes.flush_every_n_steps)  # first: a NaN stops the run before anything else
    callbacks: list[L.Callback] = [guard, measure]
    c = cfg.checkpoint
    if c.enabled:
        callbacks.append(ScheduledCheckpoint.of(run_dir, measure, c, cfg.phase, guard))
    summary = RunSummary(run_dir, measure, cfg)
    callbacks.append(summary)
    if cfg.trainer.enable_progress_bar:
        callbacks.append(StepProgressBar())

    loggers = build_loggers(cfg, run_dir)
    trainer = make_trainer(cfg, run_dir, callbacks, loggers)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    finally:
        finish_loggers(loggers)
    return summary.summary or {}


def make_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback], loggers: list) -> L.Trainer:
    """Lightning's trainer as every run uses it: one endless epoch, our callbacks write checkpoints and
    metrics, a quiet console."""
    # Lightning suggests a worker per core, and persistent workers under spawn (which restarts them
    # every epoch): one worker makes a batch faster than a step trains on it, and there is one epoch.
    warnings.filterwarnings("ignore", message=".*does not have many workers", category=PossibleUserWarning)
    warnings.filterwarnings("ignore", message="Consider setting `persistent_workers=True`")
    # Lightning's notices (accelerators found, tips, "max_steps reached") stay in train.log; its console
    # handler shows warnings and errors only, so a run's console is the bar and the report.
    for handler in logging.getLogger("lightning").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    # Lightning's own deprecation inside its loop, about a torch API it calls, not ours.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    return L.Trainer(
        **OmegaConf.to_container(cfg.trainer),
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        enable_checkpointing=False,  # ScheduledCheckpoint writes them
        enable_model_summary=False,
        log_every_n_steps=1,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
