"""The members of a stacked ensemble (train/stacked.py) as their standalone runs' callbacks see them.

Each member keeps the callbacks a standalone run has (finite guard, measurement, scheduled checkpoints,
summary) and its own loggers; `Members` calls them at each of Lightning's hooks with the member's views
of the trainer and the module (`MemberTrainer`, `MemberModule`), whose model is a copy of the model with
its parameters viewing the member's slice of the stack. A member's checkpoint is its slice of the
stacked module's checkpoint, in a standalone run's format. `BatchedMeasurements` measures every member
in one pass on an accelerator.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor
from torch.func import functional_call, vmap

from .callbacks.checkpoint import FiniteGuard, ScheduledCheckpoint
from .callbacks.measure import Measure
from .callbacks.summary import RunSummary
from .errors import NonFiniteLoss
from .interventions import Interventions
from .loggers import finish_loggers
from .measurements import Measurements
from .model import AttentionOnlyTransformer
from .rundir import CHECKPOINTS, named

if TYPE_CHECKING:
    from .stacked import StackedLM

STACKED = "stacked.ckpt"


def batch_measurements(device: torch.device) -> bool:
    """Whether the members' per-step measurements are one batched pass (`BatchedMeasurements`): on an
    accelerator, where each pass costs its kernel launches; on the CPU a loop over members is faster
    (the batched pass took 2.5x as long for 16 quickstart members) and gives the same values, where the
    batched pass's matrix products, blocked for the stack's shapes, may round differently."""
    return device.type != "cpu"


class MemberCall:
    """The stack's model with one member's parameters (inside `vmap`), called as the probes call a model."""

    training = False

    def __init__(self, model: AttentionOnlyTransformer, params: dict[str, Tensor]):
        self.model, self.params, self.config = model, params, model.config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.params, args, kwargs)


class BatchedMeasurements:
    """Every member's per-step measurements (per-head scores, induction loss, task metrics, evaluation
    set) in one pass over the stack, each member's Measure taking its slice. The costly scores and a
    checkpoint's per-token losses are measured per member (they read single values, and are rare)."""

    def __init__(self, measurements: Measurements, stacked: StackedLM):
        self.measurements, self.stacked = measurements, stacked
        self.cache: tuple[tuple, dict[str, Tensor]] | None = None
        self.to(measurements.probe_tokens.device)

    def to(self, device: torch.device) -> "BatchedMeasurements":
        self.measurements.to(device)
        # The pass holds every member's logits at once: the evaluation set in chunks of 1/N the size.
        self.every_member = copy.copy(self.measurements)
        self.every_member.max_logits = max(1, self.measurements.max_logits // self.stacked.n)
        return self

    def values(self, scores: bool, evaluate: bool) -> dict[str, Tensor]:
        key = (self.stacked.global_step, scores, evaluate)
        if self.cache is None or self.cache[0] != key:
            model = self.stacked.model
            params = {name: p.detach() for name, p in model.named_parameters()}

            def measure(p: dict[str, Tensor]) -> dict[str, Tensor]:
                return self.every_member(MemberCall(model, p), scores=scores, evaluate=evaluate)

            self.cache = key, vmap(measure)(params)
        return self.cache[1]


class MemberMeasurements:
    """What a member's Measure calls as its `Measurements`: its slice of the batched pass."""

    def __init__(self, batched: BatchedMeasurements, k: int):
        self.batched, self.k = batched, k

    def __getattr__(self, name: str) -> Any:  # late, early, ...: the measurements' own
        return getattr(self.batched.measurements, name)

    def to(self, device: torch.device) -> "MemberMeasurements":
        self.batched.to(device)
        return self

    def __call__(self, model, scores: bool = True, evaluate: bool = False, circuits: bool = False,
                 token_losses: bool = False, edits=None) -> dict[str, Tensor]:
        if circuits or token_losses or edits or not batch_measurements(self.batched.stacked.device):
            return self.batched.measurements(model, scores=scores, evaluate=evaluate, circuits=circuits,
                                             token_losses=token_losses, edits=edits)
        return {name: value[self.k] for name, value in self.batched.values(scores, evaluate).items()}


def member_checkpoint(stacked: dict[str, Any], k: int, callbacks: dict[str, Any]) -> dict[str, Any]:
    """Member k's checkpoint, as its standalone run writes it, from the stacked module's: its slice of
    every weight and optimizer moment, the shared loop, schedule and data positions, its own callbacks."""
    ckpt = {key: value for key, value in stacked.items() if key not in ("state_dict", "optimizer_states", "alive")}
    ckpt["state_dict"] = {name: t[k].clone() for name, t in stacked["state_dict"].items()}
    ckpt["optimizer_states"] = [
        {"state": {i: {key: v[k].clone() if torch.is_tensor(v) and v.dim() > 0 else v for key, v in s.items()}
                   for i, s in opt["state"].items()},
         "param_groups": opt["param_groups"]}
        for opt in stacked["optimizer_states"]]
    ckpt["callbacks"] = callbacks
    return ckpt


class MemberTrainer:
    """What a run's callbacks read from Lightning's trainer, for one member of a stacked ensemble."""

    is_global_zero = True
    world_size = 1

    def __init__(self, members: "Members", k: int, trainer: L.Trainer, loggers: list):
        self.members, self.k, self.trainer, self.loggers = members, k, trainer, loggers

    @property
    def global_step(self) -> int:
        return self.trainer.global_step

    @property
    def precision_plugin(self):
        return self.trainer.precision_plugin

    @property
    def strategy(self):
        return self.trainer.strategy

    def save_checkpoint(self, path: str | Path, weights_only: bool = False) -> None:
        self.members.save_member(self.k, Path(path))


class MemberModule:
    """What a run's callbacks read from its LightningModule, for member k: its model (views into the
    stack), loss, per-position losses and gradient norm (its slices of the stacked module's)."""

    interventions = Interventions([])

    def __init__(self, stacked: StackedLM, k: int, trainer: MemberTrainer):
        self.stacked, self.k, self.trainer = stacked, k, trainer
        self.model = stacked.member_models[k]

    device = property(lambda self: self.stacked.device)
    tokens_seen = property(lambda self: self.stacked.tokens_seen)
    environment_changes = property(lambda self: self.stacked.environment_changes)
    last_token_losses = property(lambda self: self.stacked.last_token_losses[self.k])

    @property
    def last_grad_norm(self) -> Tensor | None:
        norms = self.stacked.last_grad_norm
        return None if norms is None else norms[self.k]


@dataclass
class Member:
    """One member: the callbacks of its standalone run, in their order, and its loggers."""

    k: int
    guard: FiniteGuard
    measure: Measure
    checkpointer: ScheduledCheckpoint | None
    summary: RunSummary
    loggers: list
    error: str | None = None
    ended: bool = False  # failed, or its callbacks have ended
    closed: bool = False  # its callbacks torn down and loggers finished
    proxies: tuple[MemberTrainer, MemberModule] | None = field(default=None, repr=False)

    @property
    def callbacks(self) -> list[L.Callback]:
        return [self.guard, self.measure, *([self.checkpointer] if self.checkpointer else []), self.summary]


class Members(L.Callback):
    """Every member's callbacks, as its standalone run has them, called at each of Lightning's hooks
    with the member's views of the trainer and the module. A member whose loss or gradients turn
    non-finite ends as its standalone run would; the others go on. Any other error stops the stack.
    After every step at which a member wrote a checkpoint, the stacked checkpoint is written too."""

    def __init__(self, members: list[Member], run_dir: Path):
        self.members, self.run_dir = members, Path(run_dir)
        self.trainer: L.Trainer | None = None
        self.module: StackedLM | None = None
        self.dump: tuple[int, dict] | None = None  # (step, the stacked module's checkpoint at that step)
        self.saved_at = -1

    @property
    def state_key(self) -> str:
        return "Members"

    def state_dict(self) -> dict:
        return {"errors": {m.k: m.error for m in self.members if m.error},
                "checkpointers": {m.k: m.checkpointer.state_dict() for m in self.members if m.checkpointer}}

    def load_state_dict(self, state_dict: dict) -> None:
        for m in self.members:
            m.error = state_dict["errors"].get(m.k)
            m.ended = m.error is not None
            if m.checkpointer is not None and m.k in state_dict["checkpointers"]:
                m.checkpointer.load_state_dict(state_dict["checkpointers"][m.k])

    # --- checkpoints -----------------------------------------------------------------------------
    def save_member(self, k: int, path: Path) -> None:
        step = self.trainer.global_step
        if self.dump is None or self.dump[0] != step:
            # Lightning's own checkpoint of the stacked module (what `trainer.save_checkpoint` writes), once
            # per step however many members save at it.
            self.dump = step, self.trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        m = self.members[k]
        own = {"ScheduledCheckpoint": m.checkpointer.state_dict()} if m.checkpointer else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(member_checkpoint(self.dump[1], k, own), path)
        self.saved_at = step

    def save_stacked(self) -> None:
        """All members at this step, atomically: what `resume=` continues from. First, as before a
        member's own checkpoint, every running member's guard is checked and its rows reach the disk:
        a member that did not checkpoint at this step (the dense checkpoints are each member's own)
        must lose no rows on a resume from here, and no NaN may be saved as a running member."""
        for m in self.members:
            if not m.ended:
                try:
                    m.guard.check()
                except NonFiniteLoss as e:
                    self.end(m, e)
                    continue
                m.measure.flush()
        final = self.run_dir / CHECKPOINTS / STACKED
        tmp = final.with_name(f".{STACKED}.tmp")
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.trainer.save_checkpoint(tmp, weights_only=False)
            os.replace(tmp, final)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            err = named(e, final)
            if err is e:
                raise
            raise err from e
        self.dump = None

    # --- fan-out ---------------------------------------------------------------------------------
    def each(self, hook: str, *args: Any, losses: Tensor | None = None) -> None:
        """Call `hook` of every running member's callbacks (with `losses`: first the member's step
        outputs, `{"loss": losses[k]}`). A member whose loss or gradients turned non-finite ends there;
        any other error (a full disk, memory) stops the whole stack, which `resume=` continues
        for every member from the stacked checkpoint (a member that failed alone could not rejoin it)."""
        for m in self.members:
            if m.ended or m.proxies is None:  # ended, or the run failed before it started
                continue
            trainer, module = m.proxies
            outputs = () if losses is None else ({"loss": losses[m.k]},)
            try:
                for cb in m.callbacks:
                    getattr(cb, hook)(trainer, module, *outputs, *args)
            except NonFiniteLoss as e:
                self.end(m, e)

    def end(self, m: Member, error: BaseException) -> None:
        """Member m failed: its callbacks see the exception as its standalone run's would, then it stops."""
        from .__main__ import one_line

        m.error, m.ended = one_line(error), True
        self.module.stop(m.k, self.trainer.optimizers[0])
        if not bool(self.module.alive.any()):
            self.trainer.should_stop = True  # as a standalone run stops: nothing is left to train
        self.fail(m, error)

    def fail(self, m: Member, error: BaseException) -> None:
        """Member m's callbacks see `error` as its standalone run's would; its loggers finish as failed.
        What fails in the meantime is left unreported: the first error is the one reported."""
        trainer, module = m.proxies
        for cb in m.callbacks:
            try:
                cb.on_exception(trainer, module, error)
            except Exception:
                pass
        try:
            self.close(m, "failed")
        except Exception:
            pass  # a logger that cannot finish: the others go on

    def close(self, m: Member, status: str = "success") -> None:
        """Member m's callbacks torn down and its loggers finished, once."""
        if m.closed:
            return
        m.closed = True
        trainer, module = m.proxies
        for cb in m.callbacks:
            cb.teardown(trainer, module, "fit")
        for logger in m.loggers:
            logger.finalize(status)
        finish_loggers(m.loggers)

    def attach(self, trainer: L.Trainer, module: StackedLM) -> None:
        self.trainer, self.module = trainer, module
        module.bind_members()
        for m in self.members:
            mt = MemberTrainer(self, m.k, trainer, m.loggers)
            m.proxies = mt, MemberModule(module, m.k, mt)

    def on_train_start(self, trainer: L.Trainer, module: StackedLM) -> None:
        self.attach(trainer, module)
        self.each("on_train_start")
        if self.saved_at == trainer.global_step:
            self.save_stacked()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # As Lightning hands a run's callbacks its loss: divided over the accumulated batches.
        losses = module.member_losses / trainer.accumulate_grad_batches
        self.each("on_train_batch_end", None, batch_idx, losses=losses)
        if self.saved_at == trainer.global_step:
            self.save_stacked()

    def on_train_end(self, trainer, module) -> None:
        self.each("on_train_end")
        if self.saved_at == trainer.global_step:
            self.save_stacked()

    def on_fit_end(self, trainer, module) -> None:
        if self.trainer is None:  # resumed at the last step: no training hooks ran (RunSummary.on_fit_end)
            self.attach(trainer, module)
        self.each("on_fit_end")

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        """The whole run failed (Ctrl-C, a full disk while writing the stacked checkpoint): every running
        member ends as its standalone run would. (Lightning calls no `teardown` hook after this.)"""
        for m in self.members:
            if m.proxies is not None and not m.ended:
                self.fail(m, exception)

    def teardown(self, trainer, module, stage: str) -> None:
        for m in self.members:
            if m.proxies is not None:
                self.close(m)
            m.ended = True
