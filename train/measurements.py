"""What is measured at a step, as tensors: pure functions of a model (no Lightning, no files).

`Measurements` holds a run's fixed batches (the probe batch, the evaluation set, a data option's task
batch) and turns a model into a dict of tensors on its device; `Cadence` says which of them are due at
a step. The measurement callback (train/callbacks/measure.py) schedules them and hands the values to
the sink (train/metrics_sink.py); `analysis` and `scripts/bench.py` call the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import head_scores, probes
from .model import HeadEdit


def eval_due(step: int, every: int, per_octave: int = 4) -> bool:
    """Whether the evaluation set is measured at `step`: every `every` steps, and before the first of
    those at `per_octave` log-spaced steps per doubling (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16, ...),
    so curves over log tokens start dense while a long run pays almost nothing for them."""
    if step % every == 0:
        return True
    if step >= every:
        return False
    k = round(per_octave * math.log2(step))
    return round(2 ** (k / per_octave)) == step


@dataclass(frozen=True)
class Due:
    scores: bool  # per-head scores, the induction loss, task metrics
    evaluate: bool  # the evaluation set
    circuits: bool  # the costly per-head scores


@dataclass(frozen=True)
class Cadence:
    """The `probes` config's schedule."""

    enabled: bool = True
    every_n_steps: int = 1
    eval_every_n_steps: int = 50
    circuits_every_n_steps: int = 100

    @classmethod
    def of(cls, probes_cfg: Any) -> "Cadence":
        return cls(probes_cfg.enabled, probes_cfg.every_n_steps, probes_cfg.eval_every_n_steps,
                   probes_cfg.circuits_every_n_steps)

    def at(self, step: int) -> Due:
        scores = self.enabled and step % self.every_n_steps == 0
        evaluate = self.enabled and eval_due(step, self.eval_every_n_steps)
        every = self.circuits_every_n_steps
        return Due(scores, evaluate, scores and evaluate and bool(every) and step % every == 0)


class Measurements:
    def __init__(self, probe_tokens: Tensor, eval_tokens: Tensor, rep_len: int, late: slice | int,
                 early: slice | int, task: Any = None, task_batch: dict[str, Tensor] | None = None):
        # The generator's `task_metrics(logits, batch)` and its fixed batch (at least "tokens").
        self.task, self.task_batch = (task, task_batch) if task_batch is not None else (None, None)
        self.probe_tokens, self.eval_tokens, self.rep_len = probe_tokens, eval_tokens, rep_len
        self.late, self.early = late, early
        self.max_logits = 1 << 24  # the evaluation set's logits held at once (64 MiB in fp32)
        # The probe batch's score weights, computed once: both attention scores of every head in one op.
        batch, t = probe_tokens.shape
        self.score_weights = torch.stack([probes.previous_token_weights(batch, t),
                                          probes.prefix_matching_weights(probe_tokens)])  # [2, batch, q, k]

    @classmethod
    def of(cls, probes_cfg: Any, n_ctx: int, probe_tokens: Tensor, eval_tokens: Tensor, task: Any = None,
           task_batch: dict[str, Tensor] | None = None) -> "Measurements":
        late, early = probes.icl_positions(n_ctx, probes_cfg.icl_late, probes_cfg.icl_early, probes_cfg.icl_span)
        return cls(probe_tokens, eval_tokens, probes_cfg.rep_len, late, early, task, task_batch)

    def to(self, device: torch.device) -> "Measurements":
        self.probe_tokens, self.eval_tokens = self.probe_tokens.to(device), self.eval_tokens.to(device)
        self.score_weights = self.score_weights.to(device)
        if self.task_batch is not None:
            self.task_batch = {k: v.to(device) for k, v in self.task_batch.items()}
        return self

    @torch.inference_mode()
    def __call__(self, model: torch.nn.Module, scores: bool = True, evaluate: bool = False, circuits: bool = False,
                 token_losses: bool = False, edits: dict[int, HeadEdit] | None = None) -> dict[str, Tensor]:
        """The measurements of one step: per-head scores `[layer, head]` (the costly ones with `circuits`),
        the induction loss and task metrics (`scores`); the evaluation set's loss, ICL score and loss by
        position (`evaluate`), and every per-token loss (`token_losses`, at checkpoints). `edits`: the
        step's interventions (train/interventions.py), applied to every forward pass."""
        was_training = model.training
        if was_training:  # the worker's copies are always in eval mode: no walk over the modules
            model.eval()
        try:
            out: dict[str, Tensor] = {}
            if scores or circuits:
                heads = head_scores.Heads(model, self.probe_tokens, self.score_weights, edits=edits)
                if scores:
                    out.update(self.probe_scores(heads))
                    out.update(self.task_scores(model, edits))
                if circuits:
                    out.update({name: heads.score(name) for name in head_scores.names(costly=True)})
            if evaluate or token_losses:
                losses = probes.eval_losses(model, self.eval_tokens, self.max_logits, edits)  # [eval, pos - 1]
                if evaluate:
                    out.update(self.eval_values(losses))
                if token_losses:
                    out["eval/token_losses"] = losses
        finally:
            if was_training:
                model.train()
        return out

    def probe_scores(self, heads: head_scores.Heads) -> dict[str, Tensor]:
        """The cheap per-head scores `[layer, head]` and the induction loss on the probe batch."""
        out = {name: heads.score(name) for name in head_scores.names(costly=False)}
        losses = probes.per_token_loss(heads.logits, self.probe_tokens)
        return out | {"induction_loss": probes.induction_loss(losses, self.rep_len)}

    def eval_values(self, losses: Tensor) -> dict[str, Tensor]:
        """The evaluation set's values from its per-token losses `[eval, pos - 1]`."""
        return {"eval/loss": losses.mean(), "eval/icl_score": probes.icl_score(losses, self.late, self.early),
                "eval/loss_by_position": losses.mean(dim=0)}

    def task_scores(self, model: torch.nn.Module, edits: dict[int, HeadEdit] | None = None) -> dict[str, Tensor]:
        """The data option's task metrics on its fixed batch (scalars named `task/...`), or nothing."""
        if self.task is None:
            return {}
        return self.task.task_metrics(model(self.task_batch["tokens"], edits=edits), self.task_batch)
