"""Checkpoints on a log-spaced plus linear schedule, every one kept, listed in an index.

Lightning writes the checkpoint (model, optimizer, LR schedule, loops, the data stream's position,
callbacks); we choose the steps and make each file appear atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L

from ..rundir import CHECKPOINTS, INDEX, read_json, write_json
from .measure import Measure


def is_scheduled(step: int, log_spaced: bool, every_n_steps: int) -> bool:
    """Pythia's log-spaced steps (0, 1, 2, 4, ...) united with a linear interval (timaeus)."""
    if log_spaced and (step == 0 or step & (step - 1) == 0):
        return True
    return every_n_steps > 0 and step % every_n_steps == 0


def checkpoint_name(step: int) -> str:
    return f"step={step:07d}.ckpt"


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint listed in the run's index (files not in the index are never trusted)."""
    index = Path(run_dir) / INDEX
    if not index.exists():
        return None
    entries = read_json(index)["checkpoints"]
    return Path(run_dir) / CHECKPOINTS / entries[-1]["file"] if entries else None


class ScheduledCheckpoint(L.Callback):
    def __init__(self, run_dir: Path, measure: Measure, log_spaced: bool, every_n_steps: int, save_last: bool):
        self.run_dir = Path(run_dir)
        self.measure = measure
        self.log_spaced, self.every_n_steps, self.save_last = log_spaced, every_n_steps, save_last
        self.last_saved = -1

    def on_train_start(self, trainer, module) -> None:
        self.last_saved = trainer.global_step if trainer.global_step > 0 else -1
        if trainer.global_step == 0 and is_scheduled(0, self.log_spaced, self.every_n_steps):
            self.save(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if is_scheduled(trainer.global_step, self.log_spaced, self.every_n_steps):
            self.save(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        if self.save_last and self.last_saved != trainer.global_step:
            self.save(trainer, module)

    def save(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        # Metrics up to this step reach the disk before the checkpoint that claims them.
        if trainer.is_global_zero:
            self.measure.evaluate(module, step, module.tokens_seen, keep_token_losses=True, circuits=True)
            self.measure.flush()
        name = checkpoint_name(step)
        final = self.run_dir / CHECKPOINTS / name
        tmp = final.with_name(f".{name}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, final)
            index_path = self.run_dir / INDEX
            entries = read_json(index_path)["checkpoints"] if index_path.exists() else []
            entries = [e for e in entries if e["step"] < step]
            entries.append({"step": step, "tokens": module.tokens_seen, "file": name})
            write_json(index_path, {"checkpoints": entries})
        self.last_saved = step
