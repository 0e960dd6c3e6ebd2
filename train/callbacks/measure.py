"""The measurement callback: at each step, what `Cadence` says is due, measured by `Measurements`
(train/measurements.py) and handed to the sink (train/metrics_sink.py).

With `probes.background` (the default on a machine with more than one core), the measurements of a
step run in a worker thread on a copy of the weights taken right after that step's update, while the
training thread goes on with the next steps: the values are the same as measured in line, and the
probes cost the training loop little more than the copy. Values stay on the device until a flush,
which the worker (or, in line, the training thread) writes through the sink.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import lightning as L
import torch

from .. import probes
from ..environment import usable_cores
from ..errors import NonFiniteLoss
from ..measurements import Cadence, Measurements
from ..metrics_sink import MetricsSink, Row, done


class Measure(L.Callback):
    def __init__(self, measurements: Measurements, sink: MetricsSink, cadence: Cadence,
                 flush_every_n_steps: int = 100, background: bool = True):
        self.measurements, self.sink, self.cadence = measurements, sink, cadence
        self.flush_every, self.background = flush_every_n_steps, background
        self.pending: list[Row] = []
        self.last_eval_step, self.last_circuits_step = -1, -1  # each measured once per step
        # Background measurement (made in on_train_start): a worker thread and two copies of the model,
        # used in turn, so the training thread waits only when the worker is two measured steps behind.
        self.worker: ThreadPoolExecutor | None = None
        self.shadows: list[torch.nn.Module] = []
        self.shadow_params: list[list[torch.Tensor]] = []
        self.live_params: list[torch.Tensor] = []
        self.jobs: list[Future | None] = [None, None]  # the last job that read each copy
        self.submitted = 0
        self.last_job: Future | None = None  # the worker's newest job: it runs them in order
        self.flush_job: Future | None = None  # the newest write of rows in the worker
        # The evaluation set's ICL score so far, kept when a PhaseWatch reads it (`watch_icl`): (step,
        # tokens, value), and the evaluations still being measured as (step, tokens, future).
        self.watch_icl = False
        self.icl_points: list[tuple[int, int, float]] = []
        self.icl_pending: list[tuple[int, int, Future]] = []

    @classmethod
    def of(cls, run_dir: Path, probes_cfg: Any, n_ctx: int, probe_tokens: torch.Tensor, eval_tokens: torch.Tensor,
           task: Any = None, task_batch: dict[str, torch.Tensor] | None = None) -> "Measure":
        """The callback of a run's `probes` config."""
        measurements = Measurements.of(probes_cfg, n_ctx, probe_tokens, eval_tokens, task, task_batch)
        sink = MetricsSink(run_dir, probes_cfg.heatmap_every_n_steps)
        return cls(measurements, sink, Cadence.of(probes_cfg), probes_cfg.flush_every_n_steps, probes_cfg.background)

    # --- Lightning hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.measurements.to(module.device)
        self.sink.loggers = trainer.loggers
        step = trainer.global_step
        if not trainer.is_global_zero:
            return
        if self.background and usable_cores() > 1:
            live = getattr(module.model, "_orig_mod", module.model)  # torch.compile's wrapper holds the model
            self.shadows = [copy.deepcopy(live).requires_grad_(False).eval() for _ in range(2)]
            self.shadow_params = [list(shadow.parameters()) for shadow in self.shadows]
            self.live_params = list(live.parameters())
            self.worker = ThreadPoolExecutor(1, thread_name_prefix="measure")
        self.sink.load(up_to_step=step)
        ev = self.sink.columns("eval")
        self.icl_points = list(zip(ev.get("step", []), ev.get("tokens", []), ev.get("icl_score", [])))
        if step == 0:
            enabled = self.cadence.enabled
            row = Row(step, module.tokens_seen, {}, scored=enabled)
            row.measured.append(self.submit(module, scores=enabled, evaluate=True, circuits=enabled))
            self.pending.append(row)
            self.flush()  # step 0 on disk at once (and the first table write's imports out of the loop)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:  # under DDP, rank 0 measures and writes; the replicas are equal
            return
        step = trainer.global_step
        m = self.measurements
        extra = {"loss": outputs["loss"].detach(), "icl_score": probes.icl_score(module.last_token_losses, m.late, m.early)}
        if getattr(module, "last_grad_norm", None) is not None:
            extra["grad_norm"] = module.last_grad_norm  # before clipping
        if module.interventions:  # how many acted on the step whose loss this row holds
            extra["intervened"] = torch.tensor(float(module.last_intervened), device=module.device)
        due = self.cadence.at(step)
        row = Row(step, module.tokens_seen, extra, scored=due.scores)
        if due.scores or due.evaluate:
            row.measured.append(self.submit(module, scores=due.scores, evaluate=due.evaluate, circuits=due.circuits))
        self.pending.append(row)
        if step % self.flush_every == 0:
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
        values = done(self.measurements(module.model, scores=False, evaluate=evaluate, circuits=circuits,
                                        token_losses=True, edits=self.edits(module, step)))
        if evaluate and self.watch_icl:
            self.icl_pending.append((step, module.tokens_seen, values))
        row.measured.append(values)
        self.flush()

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            self.flush()

    def on_exception(self, trainer, module, exception) -> None:
        if not trainer.is_global_zero:
            return
        if isinstance(exception, OSError):  # writing failed: what the worker is writing, it finishes
            if self.last_job is not None:
                wait([self.last_job])
            return
        # Keep what was measured before the failure; a NaN's rows (and later ones) are not written.
        self.flush(keep_going=True, before_step=exception.step if isinstance(exception, NonFiniteLoss) else None)

    def teardown(self, trainer, module, stage) -> None:
        if self.worker is not None:
            self.worker.shutdown(wait=True, cancel_futures=True)
            self.worker, self.shadows, self.shadow_params, self.live_params = None, [], [], []
            self.jobs, self.last_job, self.flush_job = [None, None], None, None

    def icl_curve(self, through_step: int) -> tuple[list[int], list[int], list[float]]:
        """Steps, tokens and ICL scores of the evaluations up to `through_step` (waiting for those still
        being measured; a failed one is left out here and raised by the flush)."""
        waiting = [job for s, _, job in self.icl_pending if s <= through_step]
        wait(waiting)
        still = []
        for s, tokens, job in self.icl_pending:
            if s > through_step:
                still.append((s, tokens, job))
            elif job.exception() is None:
                self.icl_points.append((s, tokens, float(job.result()["eval/icl_score"])))
        self.icl_pending = still
        points = sorted(p for p in self.icl_points if p[0] <= through_step)
        return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]

    # --- scheduling ------------------------------------------------------------------------------
    def note(self, step: int, evaluate: bool, circuits: bool) -> None:
        if evaluate:
            self.last_eval_step = step
        if circuits:
            self.last_circuits_step = step

    @staticmethod
    def edits(module: L.LightningModule, step: int):
        """The interventions of training step `step`: what is measured at it is the intervened model."""
        return module.interventions.edits(step) if module.interventions else None

    def submit(self, module: L.LightningModule, **what: bool) -> Future:
        """Measure the model as it is now: in line, or in the worker on a copy of the weights."""
        step = module.trainer.global_step
        self.note(step, what.get("evaluate", False), what.get("circuits", False))
        what = {**what, "edits": self.edits(module, step)}
        if self.worker is None:
            job = done(self.measurements(module.model, **what))
        else:
            job = self.submit_background(what)
        if what.get("evaluate", False) and self.watch_icl:
            self.icl_pending.append((step, module.tokens_seen, job))
        return job

    def submit_background(self, what: dict) -> Future:
        k = self.submitted % 2
        self.submitted += 1
        if self.jobs[k] is not None:
            wait([self.jobs[k]])  # until the worker is done with this copy (an error is raised at the flush)
        with torch.no_grad():
            torch._foreach_copy_(self.shadow_params[k], self.live_params)  # one op for all
        self.jobs[k] = self.last_job = self.worker.submit(self.measurements, self.shadows[k], **what)
        return self.jobs[k]

    def flush(self, block: bool = True, keep_going: bool = False, before_step: int | None = None) -> None:
        """Write every pending row through the sink.

        Without `block`, with a worker, the worker writes them after the measurements queued before, and
        the training thread goes on; an error of that write is raised at the next flush, before any
        later row is written. With `block` (checkpoints, the end, a failure), the rows are on disk on
        return. With `keep_going` (the run is failing anyway), only what can be written is written."""
        if self.worker is not None and not block:
            self.raise_background_error()
            rows, self.pending = self.pending, []
            self.flush_job = self.last_job = self.worker.submit(self.sink.write_rows, rows)
            return
        if self.last_job is not None:
            wait([self.last_job])  # the worker runs its jobs in order: this is all of them
        if not keep_going:
            self.raise_background_error()
        rows, self.pending = self.pending, []
        self.sink.write_rows(rows, keep_going, before_step)

    def raise_background_error(self) -> None:
        job = self.flush_job
        if job is not None and job.done():
            self.flush_job = None
            if job.exception() is not None:
                raise job.exception()
