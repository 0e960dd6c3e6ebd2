"""Measurement at every step: per-head scores on a fixed probe batch, the ICL score, the evaluation set,
and the data option's own task metrics (`task/...`, train/data/icl_tasks.py) when it has them.

With `probes.background` (the default on a machine with more than one core), the measurements of a
step run in a worker thread on a copy of the weights taken right after that step's update, while the
training thread goes on with the next steps: the values are the same as measured in line, and the
probes cost the training loop little more than the copy. Values stay on the device until a flush,
which moves them to the host in one transfer, appends them to the run directory's Parquet tables
and sends them to the loggers (W&B, CSV) with their own steps.
"""

from __future__ import annotations

import copy
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pyarrow as pa
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .. import probes
from ..circuits import costly_head_scores
from ..rundir import METRICS, Table


# Per-head scores, `[layer, head]` each; the last three only at the circuits cadence and at checkpoints.
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


def usable_cores() -> int:
    """Cores this process may run on (a container or `taskset` may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def done(values: dict[str, Tensor]) -> Future:
    """A future that already holds `values` (what an in-line measurement gives)."""
    future: Future = Future()
    future.set_result(values)
    return future


@dataclass
class Row:
    """One step's values: the training loop's own (`extra`) and the measurements' (futures of dicts).
    `train`: the step has a row in the `train` table (a checkpoint's extra measurements do not)."""

    step: int
    tokens: int
    extra: dict[str, Tensor]
    measured: list[Future] = field(default_factory=list)
    train: bool = True
    scored: bool = False  # per-head scores measured at this step


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
        self.late, self.early = probes.icl_positions(n_ctx, cfg.icl_late, cfg.icl_early, cfg.icl_span)
        names = ("train", "heads", "eval", "eval_token_losses")
        self.tables = {name: Table(Path(run_dir) / METRICS / f"{name}.parquet") for name in names}
        self.pending: list[Row] = []
        self.last_eval_step, self.last_circuits_step = -1, -1  # each measured once per step
        self.loggers: list = []
        # Background measurement (made in on_train_start): a worker thread and two copies of the model,
        # used in turn, so the training thread waits only when the worker is two measured steps behind.
        self.worker: ThreadPoolExecutor | None = None
        self.shadows: list[torch.nn.Module] = []
        self.shadow_params: list[list[Tensor]] = []
        self.live_params: list[Tensor] = []
        self.jobs: list[Future | None] = [None, None]  # the last job that read each copy
        self.submitted = 0
        self.last_job: Future | None = None  # the worker's newest job: it runs them in order
        self.flush_job: Future | None = None  # the newest write of rows in the worker

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
        if getattr(self.cfg, "background", False) and usable_cores() > 1:
            live = getattr(module.model, "_orig_mod", module.model)  # torch.compile's wrapper holds the model
            self.shadows = [copy.deepcopy(live).requires_grad_(False).eval() for _ in range(2)]
            self.shadow_params = [list(shadow.parameters()) for shadow in self.shadows]
            self.live_params = list(live.parameters())
            self.worker = ThreadPoolExecutor(1, thread_name_prefix="measure")
        for table in self.tables.values():
            table.load(up_to_step=step)  # a resumed run recomputes whatever came after its checkpoint
        if step == 0:
            row = Row(step, module.tokens_seen, {}, scored=self.cfg.enabled)
            row.measured.append(self.submit(module, scores=row.scored, evaluate=True, circuits=row.scored))
            self.pending.append(row)
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
        cfg = self.cfg
        row = Row(step, module.tokens_seen, extra, scored=cfg.enabled and step % cfg.every_n_steps == 0)
        evaluate = cfg.enabled and eval_due(step, cfg.eval_every_n_steps)
        if row.scored or evaluate:
            every = cfg.circuits_every_n_steps
            circuits = row.scored and evaluate and bool(every) and step % every == 0
            row.measured.append(self.submit(module, scores=row.scored, evaluate=evaluate, circuits=circuits))
        self.pending.append(row)
        if step % cfg.flush_every_n_steps == 0:
            self.flush(block=False)

    def at_checkpoint(self, module: L.LightningModule, step: int) -> None:
        """Measure what a checkpoint keeps beside the weights (every per-token loss of the evaluation
        set, and the costly scores), in line, and flush: metrics reach the disk before the checkpoint."""
        row = self.pending[-1] if self.pending and self.pending[-1].step == step else None
        if row is None:  # this step's row was flushed already: only new values, in a row of their own
            row = Row(step, module.tokens_seen, {}, train=False)
            self.pending.append(row)
        # The costly scores go with the step's own per-head scores, so only into a row that has them.
        circuits = row.scored and self.last_circuits_step != step
        evaluate = self.last_eval_step != step
        self.note(step, evaluate, circuits)
        row.measured.append(done(self.compute(module.model, scores=False, evaluate=evaluate, circuits=circuits,
                                              token_losses=True)))
        self.flush()

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            self.flush()

    def on_exception(self, trainer, module, exception) -> None:
        if not trainer.is_global_zero:
            return
        if isinstance(exception, (NonFiniteLoss, OSError)):  # not when writing failed, or the loss did
            if self.last_job is not None:
                wait([self.last_job])  # what the worker is writing, it finishes
        else:
            self.flush(keep_going=True)  # keep what was measured before the failure

    def teardown(self, trainer, module, stage) -> None:
        if self.worker is not None:
            self.worker.shutdown(wait=True, cancel_futures=True)
            self.worker, self.shadows, self.shadow_params, self.live_params = None, [], [], []
            self.jobs, self.last_job, self.flush_job = [None, None], None, None

    # --- measurements ----------------------------------------------------------------------------
    def note(self, step: int, evaluate: bool, circuits: bool) -> None:
        if evaluate:
            self.last_eval_step = step
        if circuits:
            self.last_circuits_step = step

    def submit(self, module: L.LightningModule, **what: bool) -> Future:
        """Measure the model as it is now: in line, or in the worker on a copy of the weights."""
        self.note(module.trainer.global_step, what.get("evaluate", False), what.get("circuits", False))
        if self.worker is None:
            return done(self.compute(module.model, **what))
        k = self.submitted % 2
        self.submitted += 1
        if self.jobs[k] is not None:
            wait([self.jobs[k]])  # until the worker is done with this copy (an error is raised at the flush)
        with torch.no_grad():
            torch._foreach_copy_(self.shadow_params[k], self.live_params)  # one op for all
        self.jobs[k] = self.last_job = self.worker.submit(self.compute, self.shadows[k], **what)
        return self.jobs[k]

    @torch.inference_mode()
    def compute(self, model: torch.nn.Module, scores: bool = True, evaluate: bool = False, circuits: bool = False,
                token_losses: bool = False) -> dict[str, Tensor]:
        """The measurements of one step, as tensors on the model's device: per-head scores `[layer, head]`,
        the induction loss and task metrics (`scores`); the evaluation set's loss, ICL score and loss by
        position (`evaluate`), and every per-token loss (`token_losses`, at checkpoints); the costly
        per-head scores (`circuits`)."""
        was_training = model.training
        if was_training:  # the worker's copies are always in eval mode: no walk over the modules
            model.eval()
        try:
            out = self.probe_scores(model) if scores or circuits else {}
            if scores:
                out.update(self.task_scores(model))
            if circuits:
                out.update(costly_head_scores(model, self.probe_tokens, out["previous_token"]))
            if not scores:  # measured only for the costly scores: the step's own scores come from elsewhere
                out = {k: v for k, v in out.items() if k not in ("previous_token", "prefix_matching", "induction_loss")}
            if evaluate or token_losses:
                losses = probes.eval_losses(model, self.eval_tokens)  # [eval, pos - 1]
                if evaluate:
                    out["eval/loss"] = losses.mean()
                    out["eval/icl_score"] = probes.icl_score(losses, self.late, self.early)
                    out["eval/loss_by_position"] = losses.mean(dim=0)
                if token_losses:
                    out["eval/token_losses"] = losses
        finally:
            if was_training:
                model.train()
        return out

    def probe_scores(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """Per-head scores `[layer, head]` and the induction loss on the probe batch."""
        logits, patterns = model(self.probe_tokens, return_patterns=True)
        stacked = torch.stack(patterns, 1).flatten(1, 2)  # every layer's heads at once: [batch, layer*head, q, k]
        prev, pm = probes.weighted_attention(stacked, self.score_weights).view(2, len(patterns), -1)
        losses = probes.per_token_loss(logits, self.probe_tokens)
        return {"previous_token": prev, "prefix_matching": pm,
                "induction_loss": probes.induction_loss(losses, self.rep_len)}

    def task_scores(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """The data option's task metrics on its fixed batch (scalars named `task/...`), or nothing."""
        if self.task is None:
            return {}
        return self.task.task_metrics(model(self.task_batch["tokens"]), self.task_batch)

    # --- writing ---------------------------------------------------------------------------------
    def flush(self, block: bool = True, keep_going: bool = False) -> None:
        """Write every pending row: move its values to the host in one transfer, append them to the
        tables, write the tables, send them to the loggers.

        Without `block`, with a worker, the worker writes them after the measurements queued before, and
        the training thread goes on; an error of that write is raised at the next flush, before any
        later row is written. With `block` (checkpoints, the end, a failure), the rows are on disk on
        return. With `keep_going` (the run is failing anyway), only what can be written is written."""
        if self.worker is not None and not block:
            self.raise_background_error()
            rows, self.pending = self.pending, []
            self.flush_job = self.last_job = self.worker.submit(self.write_rows, rows, False)
            return
        if self.last_job is not None:
            wait([self.last_job])  # the worker runs its jobs in order: this is all of them
        if not keep_going:
            self.raise_background_error()
        rows, self.pending = self.pending, []
        self.write_rows(rows, keep_going)

    def raise_background_error(self) -> None:
        job = self.flush_job
        if job is not None and job.done():
            self.flush_job = None
            if job.exception() is not None:
                raise job.exception()

    def write_rows(self, rows: list[Row], keep_going: bool) -> None:
        """A non-finite training loss stops the run here: rows before it are written, and since every
        checkpoint flushes first, no checkpoint ever holds the broken state. A failed measurement is
        raised after the rows before it are written (only those are written with `keep_going`)."""
        done_rows, values, error = [], [], None
        for row in rows:
            try:
                values.append({k: v for part in row.measured for k, v in part.result().items()} | row.extra)
            except Exception as e:
                error = e
                break
            done_rows.append(row)
        bad_step = self.write(done_rows, values) if done_rows else None
        for table in self.tables.values():
            table.flush()
        if bad_step is not None:
            raise NonFiniteLoss(f"non-finite training loss at step {bad_step}; the run stopped there and "
                                "kept its last good checkpoint")
        if error is not None and not keep_going:
            raise error

    def write(self, rows: list[Row], values: list[dict[str, Tensor]]) -> int | None:
        """Append the rows to the tables and the loggers; the step of a non-finite loss, if any (the rows
        from it on are dropped)."""
        flat = torch.cat([v[k].reshape(-1) for v in values for k in sorted(v)]).float()
        flat = flat.cpu().numpy().astype(np.float64)  # unpacked in numpy: indexing tensors costs microseconds
        offset, bad_step, train_rows, heads, evals, token_losses = 0, None, [], [], [], []
        for row, tensors in zip(rows, values):
            host: dict[str, np.ndarray] = {}
            for key in sorted(tensors):
                n = tensors[key].numel()
                host[key] = flat[offset:offset + n].reshape(tuple(tensors[key].shape))
                offset += n
            loss = host.get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                bad_step = row.step
                break
            at = {"step": row.step, "tokens": row.tokens}
            train = {k: float(v) for k, v in host.items() if v.ndim == 0 and not k.startswith("eval/")}
            if row.train:
                train_rows.append(at | train)
            if "prefix_matching" in host:
                heads.append((row, {name: host[name] for name in HEAD_SCORES if name in host}))
            if "eval/loss" in host:
                evals.append(at | {"loss": float(host["eval/loss"]), "icl_score": float(host["eval/icl_score"]),
                                   "loss_by_position": host["eval/loss_by_position"]})
            if "eval/token_losses" in host:
                token_losses.append(at | {"token_losses": host["eval/token_losses"].ravel()})
            self.send(row, train, host, evals[-1] if evals and evals[-1]["step"] == row.step else None)
        self.tables["train"].append(train_rows)
        if heads:
            self.tables["heads"].append(head_columns(heads))
        self.tables["eval"].append(evals)
        self.tables["eval_token_losses"].append(token_losses)
        return bad_step

    def send(self, row: Row, train: dict[str, float], host: dict[str, np.ndarray], ev: dict | None) -> None:
        """Send one step's values to the loggers (W&B, CSV), per-head scores as `name/L{layer}H{head}`."""
        if not self.loggers:
            return
        step = row.step
        logged: dict[str, float] = {"tokens": row.tokens, **train}
        for name in HEAD_SCORES:
            if name in host:
                for (layer, head), value in np.ndenumerate(host[name]):
                    logged[f"{name}/L{layer}H{head}"] = float(value)
        if ev is not None:
            logged |= {"eval/loss": ev["loss"], "eval/icl_score": ev["icl_score"]}
        for logger in self.loggers:
            logger.log_metrics(logged, step)
        every = self.cfg.heatmap_every_n_steps
        if every and step % every == 0 and "prefix_matching" in host:
            self.log_heatmap(step, host["prefix_matching"], host["previous_token"])

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


def head_columns(heads: list[tuple[Row, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """The `heads` table's columns: a row per step, layer and head; a score not measured at a step is null."""
    n_layers, n_heads = heads[0][1]["prefix_matching"].shape
    per_step = n_layers * n_heads
    columns: dict[str, Any] = {
        "step": np.repeat([row.step for row, _ in heads], per_step),
        "tokens": np.repeat([row.tokens for row, _ in heads], per_step),
        "layer": np.tile(np.repeat(np.arange(n_layers), n_heads), len(heads)),
        "head": np.tile(np.arange(n_heads), len(heads) * n_layers),
    }
    for name in HEAD_SCORES:
        present = [name in scores for _, scores in heads]
        if not any(present):
            continue
        values = np.concatenate([scores[name].ravel() if name in scores else np.full(per_step, np.nan)
                                 for _, scores in heads]).astype(np.float64)
        columns[name] = pa.array(values, mask=np.repeat(~np.array(present), per_step))
    return columns
