"""Measurement at every step: per-head scores on a fixed probe batch, the ICL score, the evaluation set,
and the data option's own task metrics (`task/...`, train/data/icl_tasks.py) when it has them.

Values stay on the device until a flush, which moves them to the host in one transfer, appends them
to the run directory's Parquet tables and sends them to the loggers (W&B, CSV) with their own steps.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .. import probes
from ..circuits import costly_head_scores
from ..rundir import METRICS, Table


# Per-head scores, `[layer, head]` each; the last three only at the evaluation cadence.
HEAD_SCORES = ("previous_token", "prefix_matching", "copying", "ov_copying", "induction_qk")


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


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run stops without saving the broken state."""


class Measure(L.Callback):
    def __init__(self, run_dir: Path, probe_tokens: Tensor, eval_tokens: Tensor, cfg: Any, n_ctx: int,
                 task: Any = None, task_batch: dict[str, Tensor] | None = None):
        # Plain attributes: a DictConfig lookup costs microseconds, and several happen at every step.
        self.cfg = SimpleNamespace(**OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else cfg
        # The generator's `task_metrics(logits, batch)` and its fixed batch (at least "tokens").
        self.task, self.task_batch = (task, task_batch) if task_batch is not None else (None, None)
        self.probe_tokens, self.eval_tokens = probe_tokens, eval_tokens
        # The fixed batch's score weights, computed once: both attention scores of every head in one op.
        batch, t = probe_tokens.shape
        self.score_weights = torch.stack([probes.previous_token_weights(batch, t),
                                          probes.prefix_matching_weights(probe_tokens)])  # [2, batch, q, k]
        self.rep_len = cfg.rep_len
        self.late, self.early = probes.icl_positions(n_ctx, cfg.icl_late, cfg.icl_early)
        names = ("train", "heads", "eval", "eval_token_losses")
        self.tables = {name: Table(Path(run_dir) / METRICS / f"{name}.parquet") for name in names}
        self.pending: list[tuple[int, int, dict[str, Tensor]]] = []
        self.last_eval_step = -1
        self.eval_logs: dict[int, dict[str, float]] = {}  # sent to the loggers with their step's row
        self.loggers: list = []

    # --- Lightning hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        device = module.device
        self.probe_tokens = self.probe_tokens.to(device)
        self.score_weights = self.score_weights.to(device)
        self.eval_tokens = self.eval_tokens.to(device)
        if self.task_batch is not None:
            self.task_batch = {k: v.to(device) for k, v in self.task_batch.items()}
        self.loggers = trainer.loggers
        step = trainer.global_step
        if not trainer.is_global_zero:
            return
        for table in self.tables.values():
            table.load(up_to_step=step)  # a resumed run recomputes whatever came after its checkpoint
        if step == 0:
            self.record(trainer, module, step, extra={})
            self.evaluate(module, step, module.tokens_seen, keep_token_losses=False, circuits=True)
            self.flush()  # step 0 on disk at once (and the first table write's imports out of the loop)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:  # under DDP, rank 0 measures and writes; the replicas are equal
            return
        step = trainer.global_step
        extra = {
            "loss": outputs["loss"].detach(),
            "icl_score": probes.icl_score(module.last_token_losses, self.late, self.early),
        }
        if getattr(module, "last_grad_norm", None) is not None:
            extra["grad_norm"] = module.last_grad_norm  # before clipping
        if self.cfg.enabled and step % self.cfg.every_n_steps == 0:
            self.record(trainer, module, step, extra)
        else:
            self.pending.append((step, module.tokens_seen, extra))
        if self.cfg.enabled and eval_due(step, self.cfg.eval_every_n_steps):
            every = self.cfg.circuits_every_n_steps
            self.evaluate(module, step, module.tokens_seen, circuits=bool(every) and step % every == 0)
        if step % self.cfg.flush_every_n_steps == 0:
            self.flush()

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            self.flush()

    def on_exception(self, trainer, module, exception) -> None:
        if trainer.is_global_zero and not isinstance(exception, (NonFiniteLoss, OSError)):
            self.flush()  # keep what was measured before the failure (not when writing itself failed)

    # --- measurements ----------------------------------------------------------------------------
    @torch.no_grad()
    def probe_scores(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """Per-head scores `[layer, head]` and the induction loss on the probe batch."""
        logits, patterns = model(self.probe_tokens, return_patterns=True)
        stacked = torch.stack(patterns, 1).flatten(1, 2)  # every layer's heads at once: [batch, layer*head, q, k]
        prev, pm = probes.weighted_attention(stacked, self.score_weights).view(2, len(patterns), -1)
        losses = probes.per_token_loss(logits, self.probe_tokens)
        return {"previous_token": prev, "prefix_matching": pm,
                "induction_loss": probes.induction_loss(losses, self.rep_len)}

    @torch.no_grad()
    def task_scores(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """The data option's task metrics on its fixed batch (scalars named `task/...`), or nothing."""
        if self.task is None:
            return {}
        return self.task.task_metrics(model(self.task_batch["tokens"]), self.task_batch)

    def record(self, trainer: L.Trainer, module: L.LightningModule, step: int, extra: dict[str, Tensor]) -> None:
        was_training = module.training
        module.eval()
        values = {**extra, **self.probe_scores(module.model), **self.task_scores(module.model)}
        module.train(was_training)
        self.pending.append((step, module.tokens_seen, values))

    @torch.no_grad()
    def evaluate(self, module: L.LightningModule, step: int, tokens: int, keep_token_losses: bool = False,
                 circuits: bool = False) -> None:
        """Loss, ICL score and loss by position on the fixed evaluation set. With `keep_token_losses`
        (at checkpoints), also every per-token loss, for the per-token-loss PCA; with `circuits` (at
        checkpoints and every `circuits_every_n_steps`), the costly per-head scores."""
        if step == self.last_eval_step and not keep_token_losses:
            return
        was_training = module.training
        module.eval()
        losses = probes.per_token_loss(module.model(self.eval_tokens), self.eval_tokens)  # [eval, pos - 1]
        if circuits and self.pending and self.pending[-1][0] == step and "previous_token" in self.pending[-1][2]:
            values = self.pending[-1][2]
            values.update(costly_head_scores(module.model, self.probe_tokens, values["previous_token"]))
        module.train(was_training)
        by_position = losses.mean(dim=0)
        if step != self.last_eval_step:
            loss, icl = torch.stack([losses.mean(), probes.icl_score(losses, self.late, self.early)]).tolist()
            self.tables["eval"].append([{"step": step, "tokens": tokens, "loss": loss, "icl_score": icl,
                                         "loss_by_position": by_position.cpu().tolist()}])
            self.last_eval_step = step
            self.eval_logs[step] = {"eval/loss": loss, "eval/icl_score": icl}
        if keep_token_losses:
            self.tables["eval_token_losses"].append(
                [{"step": step, "tokens": tokens, "token_losses": losses.flatten().cpu().tolist()}])

    def log_heatmap(self, step: int, prefix_matching: np.ndarray, previous_token: np.ndarray) -> None:
        """The per-head score grid as a W&B image (W&B loggers only)."""
        loggers = [lg for lg in self.loggers if hasattr(lg, "log_image")]
        if not loggers:
            return
        import matplotlib.pyplot as plt

        from ..plots import heads_heatmap

        fig = heads_heatmap(prefix_matching, previous_token, title=f"step {step}")
        for logger in loggers:
            logger.log_image(key="heads/scores", images=[fig], step=step)
        plt.close(fig)

    def flush(self) -> None:
        """Move pending values to the host in one transfer; write tables; send to the loggers.

        A non-finite training loss stops the run here: rows before it are written, and since every
        checkpoint flushes first, no checkpoint ever holds the broken state."""
        bad_step = None
        if self.pending:
            flat = torch.cat([v[k].detach().float().flatten() for _, _, v in self.pending for k in sorted(v)])
            flat = flat.cpu().numpy()  # host-side unpacking in numpy: indexing tensors costs microseconds each
            offset, train_rows, head_rows, log_rows = 0, [], [], []
            for step, tokens, values in self.pending:
                row: dict[str, np.ndarray] = {}
                for key in sorted(values):
                    n = values[key].numel()
                    row[key] = flat[offset:offset + n].reshape(tuple(values[key].shape))
                    offset += n
                train = {"step": step, "tokens": tokens, **{k: float(v) for k, v in row.items() if v.ndim == 0}}
                if "loss" in train and not math.isfinite(train["loss"]):
                    bad_step = step
                    break
                train_rows.append(train)
                logged = {k: v for k, v in train.items() if k != "step"}
                if "prefix_matching" in row:
                    n_layers, n_heads = row["prefix_matching"].shape
                    for layer in range(n_layers):
                        for head in range(n_heads):
                            head_row = {"step": step, "tokens": tokens, "layer": layer, "head": head}
                            for name in HEAD_SCORES:
                                if name in row:
                                    head_row[name] = float(row[name][layer, head])
                                    logged[f"{name}/L{layer}H{head}"] = head_row[name]
                            head_rows.append(head_row)
                log_rows.append((step, {**logged, **self.eval_logs.pop(step, {})}))
                every = self.cfg.heatmap_every_n_steps
                if every and step % every == 0 and "prefix_matching" in row:
                    self.log_heatmap(step, row["prefix_matching"], row["previous_token"])
            self.tables["train"].append(train_rows)
            self.tables["heads"].append(head_rows)
            for logger in self.loggers:
                for step, logged in log_rows:
                    logger.log_metrics(logged, step)
            self.pending = []
        for logger in self.loggers:
            for step, logged in sorted(self.eval_logs.items()):
                logger.log_metrics(logged, step)
        self.eval_logs = {}
        for table in self.tables.values():
            table.flush()
        if bad_step is not None:
            raise NonFiniteLoss(f"non-finite training loss at step {bad_step}; the run stopped there and "
                                "kept its last good checkpoint")
