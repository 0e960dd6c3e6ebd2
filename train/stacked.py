"""A stacked ensemble (`seeds=N seed_execution=stacked`): the N members' weights held as one set of tensors
with a leading member dimension, trained in one process by one forward and backward pass for all
(`torch.func.vmap` over the model), so that each kernel works on every member at once. On a GPU, where a
small model alone leaves most of the device idle between kernel launches, that is where the throughput
is; on a CPU, processes (train/ensemble.py) are faster.

Members stay independent: the loss is each member's own mean and their sum is differentiated (so each
member's gradients are its own), gradients are clipped by each member's norm, AdamW is elementwise, and
the learning-rate schedule is the same function of the step for all. Each member is measured by the same
callbacks as a standalone run, on a model whose parameters are views into the stack (`Members`), into
its own run directory: metrics, summary, checkpoints (standalone checkpoints: a member resumes and loads
as a run of its own) and W&B run. A member whose loss or gradients turn non-finite stops alone: its
callbacks end as a failed run's do, and its weights and optimizer state are set to zero, where zero
gradients keep them. `RUN_DIR/checkpoints/stacked.ckpt` holds all members at the last checkpointed step;
`resume=RUN_DIR` continues from it.

On the CPU each member is bit-identical to the standalone run of its seed with the same thread count
(tests/test_stacked.py).
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from .build import build_model, probe_tokens, task_batch
from .callbacks.checkpoint import FiniteGuard, ScheduledCheckpoint
from .callbacks.measure import Measure
from .callbacks.progress import StepProgressBar
from .callbacks.summary import RunSummary
from .data.datamodule import StreamDataModule
from .measurements import Cadence, Measurements
from .metrics_sink import MetricsSink
from .ensemble_summary import member_dir
from .errors import ConfigError
from .interventions import Interventions
from .loggers import build_loggers, finish_loggers
from .model import AttentionOnlyTransformer
from .module import InductionLM
from .probes import per_token_loss
from .rundir import CHECKPOINTS, CONFIG, named, write_text

STACKED = "stacked.ckpt"

# On the CPU, vmap runs the fused attention kernel once per member (it has no batching rule there) and
# says so at every step; the result is the same.
warnings.filterwarnings("ignore", message=r".*not yet implemented the batching rule for aten::_scaled_dot_product")


class StackedLM(InductionLM):
    """The members' parameters stacked `[member, ...]` in one model of the members' architecture."""

    member_dims = 1

    def __init__(self, models: list[AttentionOnlyTransformer], optim: dict[str, Any], total_steps: int):
        stack = copy.deepcopy(models[0])
        stacked, _ = stack_module_state(models)
        for name, p in list(stack.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            setattr(stack.get_submodule(owner), leaf, nn.Parameter(stacked[name].detach().clone(),
                                                                   requires_grad=p.requires_grad))
        super().__init__(stack, optim, total_steps)
        self.n = len(models)
        # The members' own models, outside the module tree: their parameters become views into the stack
        # (`bind_members`), so the probes read each member's current weights without a copy.
        self.member_models = [m.requires_grad_(False) for m in models]
        self.alive = torch.ones(self.n, dtype=torch.bool)
        self.member_losses: Tensor | None = None

    def bind_members(self) -> None:
        """Point each member's parameters at its slice of the stack (again after a move to a device)."""
        self.alive = self.alive.to(self.device)
        stacked = dict(self.model.named_parameters())
        for k, m in enumerate(self.member_models):
            for name, p in m.named_parameters():
                p.data = stacked[name].data[k]
            m.to(self.device)  # the buffers (rotary tables); the parameters are there already

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        tokens = batch["tokens"]  # [member, batch, pos]
        self.step = self.global_step
        model = self.model

        def member(params: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
            losses = per_token_loss(functional_call(model, params, (x,)), x)  # [batch, pos - 1]
            return losses.mean(), losses.detach().mean(dim=0)

        loss, token_losses = vmap(member)(dict(model.named_parameters()), tokens)
        self.member_losses = loss.detach()
        self.last_token_losses = token_losses  # [member, pos - 1]
        self.tokens_seen += tokens[0].numel()
        alive = self.alive
        self.last_loss = torch.where(alive, self.member_losses, 0).sum() / alive.sum()  # the progress bar's
        # The sum's gradient with respect to member k's weights is that of member k's loss alone.
        return loss.sum()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip each member by its own global norm (on the CPU the same bits as a standalone run's norm:
        tests/test_stacked.py), and zero a stopped member's gradients."""
        if gradient_clip_algorithm == "value":  # elementwise: each member's own already
            L.LightningModule.configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for p in self.trained_parameters() if p.grad is not None]
        if not grads:
            return
        # [member]: each parameter's norm per member, then their norm (get_total_norm's two steps).
        norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads],
                                                     dim=1), dim=1)
        scale = torch.ones_like(norms)
        if gradient_clip_val and gradient_clip_algorithm != "value":
            scale = torch.clamp(gradient_clip_val / (norms + 1e-6), max=1.0)  # as clip_grads_with_norm_
        scale = torch.where(self.alive, scale, 0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))
        self.last_grad_norm = norms.detach()

    def stop(self, k: int, optimizer: torch.optim.Optimizer) -> None:
        """Member k trains no more: its weights and AdamW moments are zero and its gradients are zeroed
        at every step, under which AdamW leaves zero where it is (decay and update both vanish)."""
        self.alive[k] = False
        with torch.no_grad():
            for p in self.model.parameters():
                p[k] = 0
                for value in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.dim() > 0:
                        value[k] = 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["alive"] = self.alive.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.alive = checkpoint["alive"].clone()


def batch_measurements(device: torch.device) -> bool:
    """Whether the members' per-step measurements are one batched pass (`BatchedMeasurements`): on an
    accelerator, where each pass costs its kernel launches; on the CPU a loop over members is faster
    (the batched pass took 2.5x as long for 16 quickstart members) and gives the same values."""
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

    def values(self, scores: bool, evaluate: bool) -> dict[str, Tensor]:
        key = (self.stacked.global_step, scores, evaluate)
        if self.cache is None or self.cache[0] != key:
            model = self.stacked.model
            params = {name: p.detach() for name, p in model.named_parameters()}
            measure = lambda p: self.measurements(MemberCall(model, p), scores=scores, evaluate=evaluate)  # noqa: E731
            self.cache = key, vmap(measure)(params)
        return self.cache[1]


class MemberMeasurements:
    """What a member's Measure calls as its `Measurements`: its slice of the batched pass."""

    def __init__(self, batched: BatchedMeasurements, k: int):
        self.batched, self.k = batched, k

    def __getattr__(self, name: str) -> Any:  # late, early, ...: the measurements' own
        return getattr(self.batched.measurements, name)

    def to(self, device: torch.device) -> "MemberMeasurements":
        self.batched.measurements.to(device)
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
    last_loss = property(lambda self: self.stacked.member_losses[self.k])

    @property
    def last_grad_norm(self) -> Tensor | None:
        norms = self.stacked.last_grad_norm
        return None if norms is None else norms[self.k]


@dataclass
class Member:
    k: int
    cfg: DictConfig
    run_dir: Path
    callbacks: list[L.Callback]
    loggers: list
    checkpointer: ScheduledCheckpoint | None
    summary: RunSummary
    error: str | None = None
    ended: bool = False  # failed, or its callbacks have ended
    closed: bool = False  # its callbacks torn down and loggers finished
    proxies: tuple[MemberTrainer, MemberModule] | None = field(default=None, repr=False)


class Members(L.Callback):
    """Every member's callbacks, as its standalone run has them, called at each of Lightning's hooks
    with the member's views of the trainer and the module. A member's callback that raises (a non-finite
    loss, a full disk) ends that member as the exception would end its standalone run; the others go on.
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
        """All members at this step, atomically: what `resume=` continues from."""
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
    def each(self, hook: str, *args: Any) -> None:
        """Call `hook` of every running member's callbacks; a member whose callback raises ends there."""
        for m in self.members:
            if m.ended:
                continue
            trainer, module = m.proxies
            try:
                for cb in m.callbacks:
                    getattr(cb, hook)(trainer, module, *args)
            except Exception as e:
                self.end(m, e)

    def end(self, m: Member, error: BaseException) -> None:
        """Member m failed: its callbacks see the exception as its standalone run's would, then it stops."""
        from .__main__ import one_line

        m.error, m.ended = one_line(error), True
        trainer, module = m.proxies
        for cb in m.callbacks:
            try:
                cb.on_exception(trainer, module, error)
            except Exception:
                pass  # the member is failing already; the first error is the one reported
        self.close(m)
        self.module.stop(m.k, self.trainer.optimizers[0])

    def close(self, m: Member) -> None:
        if m.closed:
            return
        m.closed = True
        trainer, module = m.proxies
        for cb in m.callbacks:
            cb.teardown(trainer, module, "fit")
        for logger in m.loggers:
            logger.finalize("success" if m.error is None else "failed")
        finish_loggers(m.loggers)

    def on_train_start(self, trainer: L.Trainer, module: StackedLM) -> None:
        self.trainer, self.module = trainer, module
        module.bind_members()
        for m in self.members:
            mt = MemberTrainer(self, m.k, trainer, m.loggers)
            m.proxies = mt, MemberModule(module, m.k, mt)
        self.each("on_train_start")
        if self.saved_at == trainer.global_step:
            self.save_stacked()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        for m in self.members:
            if m.ended:
                continue
            trainer_k, module_k = m.proxies
            try:
                for cb in m.callbacks:
                    cb.on_train_batch_end(trainer_k, module_k, {"loss": module.member_losses[m.k]}, None, batch_idx)
            except Exception as e:
                self.end(m, e)
        if self.saved_at == trainer.global_step:
            self.save_stacked()

    def on_train_end(self, trainer, module) -> None:
        self.each("on_train_end")
        if self.saved_at == trainer.global_step:
            self.save_stacked()

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        self.each("on_exception", exception)

    def teardown(self, trainer, module, stage: str) -> None:
        for m in self.members:
            if m.proxies is not None:
                self.close(m)
            m.ended = True


def train_stacked(cfg: DictConfig, run_dir: Path, member_cfgs: list[DictConfig], generator) -> dict[int, str]:
    """Train the members stacked in this process; returns {member: its one-line error} for those that
    failed. `member_cfgs[k]` is member k's standalone config; `generator` the data option's generator
    (one for all: it depends on the data config, not on the seed)."""
    from .run import check_resume as check_member_resume, make_trainer

    stacked_ckpt = run_dir / CHECKPOINTS / STACKED
    if cfg.resume:
        if not stacked_ckpt.exists():
            raise ConfigError(f"resume={run_dir}: no {CHECKPOINTS}/{STACKED} (the stacked ensemble wrote no checkpoint)")
        check_member_resume(member_cfgs[0], member_dir(run_dir, 0))  # the same model, data, optimizer, probes
    models = []
    for mcfg in member_cfgs:
        # As `run` builds a standalone run: the same draws from the same seed give the same weights (the
        # data generators draw from their own seeded generators, never the global ones).
        L.seed_everything(mcfg.seed, workers=True, verbose=False)
        models.append(build_model(mcfg))
    module = StackedLM(models, OmegaConf.to_container(cfg.optim), cfg.trainer.max_steps)

    def measurements_of(mcfg: DictConfig) -> Measurements:
        d = mcfg.data
        eval_tokens = StreamDataModule(generator, d.batch_size, d.seed, d.eval_size, d.eval_seed).eval_tokens()
        return Measurements.of(mcfg.probes, mcfg.model.n_ctx, probe_tokens(mcfg, generator), eval_tokens,
                               task=generator, task_batch=task_batch(mcfg, generator))

    # The probe batch, evaluation set and task batch come from the probes' and the evaluation set's own
    # seeds, not the run's: one set for all members, measured in one batched pass on an accelerator,
    # unless a config ties them to the run's seed.
    inputs = [(m.probes, m.data.eval_seed, m.data.eval_size) for m in member_cfgs]
    batched = BatchedMeasurements(measurements_of(member_cfgs[0]), module) if all(i == inputs[0] for i in inputs) \
        else None
    members = []
    for k, mcfg in enumerate(member_cfgs):
        d = member_dir(run_dir, k)
        measurements = MemberMeasurements(batched, k) if batched else measurements_of(mcfg)
        measure = Measure(measurements, MetricsSink(d, mcfg.probes.heatmap_every_n_steps), Cadence.of(mcfg.probes),
                          mcfg.probes.flush_every_n_steps, background=False)
        if not cfg.resume:
            write_text(d / CONFIG, OmegaConf.to_yaml(mcfg, resolve=True))
        guard = FiniteGuard(mcfg.probes.flush_every_n_steps)
        checkpointer = (ScheduledCheckpoint.of(d, measure, mcfg.checkpoint, mcfg.phase, guard)
                        if mcfg.checkpoint.enabled else None)
        summary = RunSummary(d, measure, mcfg)
        callbacks = [guard, measure, *([checkpointer] if checkpointer else []), summary]
        members.append(Member(k, mcfg, d, callbacks, build_loggers(mcfg, d, concurrent=True), checkpointer, summary))
    data = cfg.data
    datamodule = StreamDataModule(generator, data.batch_size, tuple(m.data.seed for m in member_cfgs),
                                  data.eval_size, data.eval_seed, data.num_workers)
    fan_out = Members(members, run_dir)
    callbacks: list[L.Callback] = [fan_out]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(StepProgressBar())
    trainer = make_trainer(cfg, run_dir, callbacks, [])
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(stacked_ckpt) if cfg.resume else None,
                    weights_only=True)
    finally:
        for m in members:
            if not m.closed:
                finish_loggers(m.loggers)
    return {m.k: m.error for m in members if m.error}
