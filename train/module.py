"""The LightningModule: next-token loss (kept per position), AdamW with warm-up and a schedule."""

from __future__ import annotations

import math
import random
import sys
from typing import Any

import numpy as np

import lightning as L
import torch
from torch import Tensor

from .environment import differences, environment
from .interventions import Interventions
from .model import AttentionOnlyTransformer
from .probes import per_token_loss


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Multiplier of the base learning rate at each step: linear warm-up, then `schedule`."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "linear":
            return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
        raise ValueError(f"optim.schedule={schedule!r}: expected constant, cosine or linear")

    return f


class InductionLM(L.LightningModule):
    # Leading dimensions of every parameter before the model's own (1 in a stacked ensemble's module,
    # train/stacked.py): weight decay applies to matrices, whatever stacks them.
    member_dims = 0

    def __init__(self, model: AttentionOnlyTransformer, optim: dict[str, Any], total_steps: int,
                 interventions: Interventions | None = None):
        super().__init__()
        self.model = model
        self.interventions = interventions or Interventions([])
        self.step = 0  # the update this batch makes (Lightning's global_step moves inside the step)
        self.last_intervened = 0  # interventions active in the last training step
        self.optim = optim
        self.total_steps = total_steps
        self.tokens_seen = 0
        # The last batch's per-position losses `[pos - 1]`, averaged over the batch, for the probes.
        self.last_token_losses: Tensor | None = None
        self.last_loss: Tensor | None = None
        self.last_grad_norm: Tensor | None = None  # before clipping; set by configure_gradient_clipping
        self._trained: list[Tensor] | None = None  # see `trained_parameters`
        # On resume: how this process differs from the one that wrote the checkpoint (summary.json).
        self.environment_changes: list[str] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        tokens = batch["tokens"]
        self.step = step = self.global_step
        edits = None
        if self.interventions:
            self.last_intervened = len(self.interventions.active(step))
            self.interventions.hold_frozen(self.raw_model, step, before_update=True)
            edits = self.interventions.edits(step, record=True)
        logits = self.model(tokens, edits=edits) if edits else self.model(tokens)
        losses = per_token_loss(logits, tokens)  # [batch, pos - 1]
        self.last_token_losses = losses.detach().mean(dim=0)
        self.tokens_seen += tokens.numel() * self.trainer.world_size
        loss = losses.mean()
        self.last_loss = loss.detach()  # the progress bar reads it every few steps; Measure records it
        return loss

    @property
    def raw_model(self) -> AttentionOnlyTransformer:
        return getattr(self.model, "_orig_mod", self.model)  # torch.compile's wrapper holds the model

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.interventions:
            self.interventions.zero_frozen_grads(self.raw_model, self.step)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.interventions:
            self.interventions.hold_frozen(self.raw_model, self.step, before_update=False)

    def trained_parameters(self) -> list[Tensor]:
        """The parameters the optimizer updates (not a frozen embedding), listed once: walking the
        module tree at every step costs more than the gradient norm itself."""
        if self._trained is None:
            self._trained = [p for p in self.parameters() if p.requires_grad]
        return self._trained

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by global norm as Lightning does, keeping the norm (`last_grad_norm`, on the device): the
        finite-gradient guard and the metrics read it, so the norm is computed once per step."""
        if gradient_clip_algorithm == "value":
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = self.trained_parameters()
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        if gradient_clip_val and gradient_clip_algorithm != "value":
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
        self.last_grad_norm = norm.detach()

    def configure_optimizers(self):
        o = self.optim
        params = self.trained_parameters()
        decay = [p for p in params if p.dim() - self.member_dims >= 2]
        no_decay = [p for p in params if p.dim() - self.member_dims < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o["lr"],
            betas=tuple(o["betas"]),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(o["schedule"], o["warmup_steps"], self.total_steps, o["min_lr_ratio"])
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["rng"] = rng_state()
        checkpoint["environment"] = environment(self.device)
        if self.interventions:
            checkpoint["interventions"] = self.interventions.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint["tokens_seen"])
        if self.interventions and "interventions" in checkpoint:
            self.interventions.load_state_dict(checkpoint["interventions"])
        if "rng" in checkpoint:
            set_rng_state(checkpoint["rng"])
        if "environment" in checkpoint:
            self.environment_changes = differences(checkpoint["environment"], environment(self.device))
            if self.environment_changes and self.trainer.is_global_zero:
                print(f"warning: resumed in a different environment ({', '.join(self.environment_changes)}): "
                      "the run continues, but is no longer bit-identical to an uninterrupted one", file=sys.stderr)


def rng_state() -> dict[str, Any]:
    """Every global RNG, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, gauss], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
