"""Checkpoints on a log-spaced plus linear schedule, and densely through the phase change (PhaseWatch),
every one kept, listed in an index.

Lightning writes the checkpoint (model, optimizer, LR schedule, loops, the data stream's position,
callbacks); we choose the steps and make each file appear atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..errors import NonFiniteLoss
from ..rundir import CHECKPOINTS, INDEX, named, read_json, write_json
from .measure import Measure
from .phase_watch import PhaseWatch


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


class FiniteGuard(L.Callback):
    """Stops the run at the first step whose loss or gradients are NaN or infinite, before any later
    checkpoint: the step is noted on the device at every step (no host sync) and checked every
    `check_every` steps, at every checkpoint and at the end. Put it first among the callbacks."""

    def __init__(self, check_every: int):
        self.check_every = check_every
        self.first_bad_loss: torch.Tensor | None = None
        self.first_bad_grad: torch.Tensor | None = None

    def _note(self, attr: str, finite: torch.Tensor, step: int) -> None:
        first = getattr(self, attr)
        if first is None:
            first = torch.full((), -1, dtype=torch.long, device=finite.device)
        setattr(self, attr, torch.where((first < 0) & ~finite, step, first))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # the step this batch's update led to, as Measure counts steps
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._note("first_bad_loss", torch.isfinite(loss.detach()), step)
        norm = getattr(module, "last_grad_norm", None)  # computed once, with the clipping
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None  # fp16 skips such steps itself
        if norm is not None and not scaled:
            self._note("first_bad_grad", torch.isfinite(norm), step)
        if step % self.check_every == 0:
            self.check()

    def on_train_end(self, trainer, module) -> None:
        self.check()

    def check(self) -> None:
        """Raise NonFiniteLoss naming the first bad step, if there was one (one host sync)."""
        if self.first_bad_loss is None and self.first_bad_grad is None:
            return
        loss, grad = (-1 if t is None else int(t) for t in (self.first_bad_loss, self.first_bad_grad))
        if loss >= 0 and (grad < 0 or loss <= grad):
            what, step = "training loss", loss
        elif grad >= 0:
            what, step = "gradients", grad
        else:
            return
        raise NonFiniteLoss(f"non-finite {what} at step {step}; the run stopped there and kept its last good "
                            "checkpoint", step)


class ScheduledCheckpoint(L.Callback):
    def __init__(self, run_dir: Path, measure: Measure, log_spaced: bool, every_n_steps: int, save_last: bool,
                 guard: FiniteGuard | None = None, watch: PhaseWatch | None = None):
        self.run_dir = Path(run_dir)
        self.measure = measure
        self.guard = guard
        self.watch = watch
        self.log_spaced, self.every_n_steps, self.save_last = log_spaced, every_n_steps, save_last
        self.last_saved = -1

    @classmethod
    def of(cls, run_dir: Path, measure: Measure, checkpoint_cfg: Any, phase_cfg: Any,
           guard: FiniteGuard | None = None) -> "ScheduledCheckpoint":
        """The callback of a run's `checkpoint` config."""
        c = checkpoint_cfg
        watch = (PhaseWatch(measure, phase_cfg, c.dense_every_n_steps, c.dense_start_fraction, c.dense_max)
                 if c.dense and c.dense_max > 0 else None)
        return cls(run_dir, measure, c.log_spaced, c.every_n_steps, c.save_last, guard, watch)

    def state_dict(self) -> dict:
        return {"watch": self.watch.state_dict()} if self.watch is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.watch is not None and "watch" in state_dict:
            self.watch.load_state_dict(state_dict["watch"])

    def on_train_start(self, trainer, module) -> None:
        self.last_saved = trainer.global_step if trainer.global_step > 0 else -1
        if trainer.global_step == 0 and is_scheduled(0, self.log_spaced, self.every_n_steps):
            self.save(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.watch is not None:
            self.watch.update(step)
            if trainer.world_size > 1 and self.measure.cadence.at(step).evaluate:
                # Rank 0 measures and decides; every rank must save the same checkpoints (a collective).
                self.watch.active = bool(trainer.strategy.broadcast(self.watch.active, src=0))
        if is_scheduled(step, self.log_spaced, self.every_n_steps):
            self.save(trainer, module)
        elif self.watch is not None and self.watch.due(step):
            self.watch.saved()
            self.save(trainer, module, dense=True)

    def on_train_end(self, trainer, module) -> None:
        if self.save_last and self.last_saved != trainer.global_step:
            self.save(trainer, module)

    def save(self, trainer: L.Trainer, module: L.LightningModule, dense: bool = False) -> None:
        step = trainer.global_step
        if self.guard is not None:
            self.guard.check()  # never a checkpoint of a model that a NaN has reached
        # Metrics up to this step reach the disk before the checkpoint that claims them.
        if trainer.is_global_zero:
            self.measure.at_checkpoint(module, step)
        name = checkpoint_name(step)
        final = self.run_dir / CHECKPOINTS / name
        tmp = final.with_name(f".{name}.tmp")
        try:
            trainer.save_checkpoint(tmp, weights_only=False)
            if trainer.is_global_zero:
                os.replace(tmp, final)
        except BaseException as e:  # e.g. a full disk: no partial file stays, the earlier ones are intact
            tmp.unlink(missing_ok=True)
            err = named(e, final)
            if err is e:
                raise
            raise err from e
        if trainer.is_global_zero:
            index_path = self.run_dir / INDEX
            entries = read_json(index_path)["checkpoints"] if index_path.exists() else []
            entries = [e for e in entries if e["step"] < step]
            entries.append({"step": step, "tokens": module.tokens_seen, "file": name} | ({"dense": True} if dense else {}))
            write_json(index_path, {"checkpoints": entries})
        self.last_saved = step
