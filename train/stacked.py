"""A stacked ensemble (`seeds=N seed_execution=stacked`): the N members' weights held as one set of tensors
with a leading member dimension, trained in one process by one forward and backward pass for all
(`torch.func.vmap` over the model), so that each kernel works on every member at once. On a GPU, where a
small model alone leaves most of the device idle between kernel launches, that is where the throughput
is; on a CPU, processes (train/ensemble.py) are faster.

Members stay independent: the loss is each member's own mean and their sum is differentiated (so each
member's gradients are its own), gradients are clipped by each member's norm, AdamW is elementwise, and
the learning-rate schedule is the same function of the step for all. Each member is measured by the same
callbacks as a standalone run, on a model whose parameters are views into the stack (`Members`,
train/stacked_members.py), into its own run directory: metrics, summary, checkpoints (standalone
checkpoints: a member resumes and loads as a run of its own) and W&B run. A member whose loss or
gradients turn non-finite stops alone: its callbacks end as a failed run's do, and its weights and
optimizer state are set to zero, where zero gradients keep them. `RUN_DIR/checkpoints/stacked.ckpt`
holds all members at the last checkpointed step; `resume=RUN_DIR` continues from it.

On the CPU, in float32, each member is bit-identical to the standalone run of its seed with the same
thread count (tests/test_stacked.py); under bf16 autocast the stacked kernels round differently.
"""

from __future__ import annotations

import copy
import logging
import warnings
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
from .ensemble_summary import member_dir
from .errors import ConfigError
from .loggers import build_loggers, finish_loggers
from .measurements import Cadence, Measurements
from .metrics_sink import MetricsSink
from .model import AttentionOnlyTransformer
from .module import InductionLM
from .probes import per_token_loss
from .rundir import CHECKPOINTS, CONFIG, write_text
from .stacked_members import STACKED, BatchedMeasurements, Member, MemberMeasurements, Members

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
        buffers = dict(self.model.named_buffers())  # the rotary tables, on the stack's device and dtype
        for k, m in enumerate(self.member_models):
            for name, p in m.named_parameters():
                p.data = stacked[name].data[k]
            for name, _ in list(m.named_buffers()):
                owner, _, leaf = name.rpartition(".")
                m.get_submodule(owner)._buffers[leaf] = buffers[name]

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


def train_stacked(cfg: DictConfig, run_dir: Path, member_cfgs: list[DictConfig], generator) -> dict[int, str]:
    """Train the members stacked in this process; returns {member: its one-line error} for those that
    failed. `member_cfgs[k]` is member k's standalone config; `generator` the data option's generator
    (one for all: it depends on the data config, not on the seed)."""
    from .run import check_resume as check_member_resume, make_trainer

    stacked_ckpt = run_dir / CHECKPOINTS / STACKED
    if cfg.resume:
        if not stacked_ckpt.exists():
            raise ConfigError(f"resume={run_dir}: no {CHECKPOINTS}/{STACKED} "
                              "(the stacked ensemble wrote no checkpoint)")
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
        members.append(Member(k, guard, measure, checkpointer, summary, build_loggers(mcfg, d, concurrent=True)))
    data = cfg.data
    datamodule = StreamDataModule(generator, data.batch_size, tuple(m.data.seed for m in member_cfgs),
                                  data.eval_size, data.eval_seed, data.num_workers)
    fan_out = Members(members, run_dir)
    callbacks: list[L.Callback] = [fan_out]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(StepProgressBar())
    trainer = make_trainer(cfg, run_dir, callbacks, [])
    # On the CPU, vmap runs the fused attention kernel once per member (it has no batching rule there) and
    # says so at every step; the result is the same.
    warnings.filterwarnings("ignore", message=r".*not yet implemented the batching rule for aten::_scaled_dot_product")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(stacked_ckpt) if cfg.resume else None,
                    weights_only=True)
    except (OSError, torch.OutOfMemoryError) as e:  # the whole stack stopped: each member reports it
        from .__main__ import FULL_ERROR, one_line

        logging.getLogger(__name__).exception("the stack stopped")
        if FULL_ERROR:
            raise
        stopped = f"the stack stopped at step {trainer.global_step} ({one_line(e)})"
        if stacked_ckpt.exists():
            step = torch.load(stacked_ckpt, weights_only=True, mmap=True)["global_step"]
            stopped += f"; resume= continues it from step {step}"
        return {m.k: m.error or stopped for m in members}
    finally:
        for m in members:
            if not m.closed:
                finish_loggers(m.loggers)
    return {m.k: m.error for m in members if m.error}
