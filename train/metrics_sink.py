"""Where measured values go: the run directory's Parquet tables and the loggers (W&B, CSV).

A `Row` is one step's values: the training loop's own (`extra`) and futures of the measurements'
dicts. `MetricsSink.write_rows` waits for them, moves them to the host in one transfer, appends them
to the tables, writes the tables and sends them to the loggers with their own steps.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from .head_scores import HEAD_SCORES
from .rundir import Table, table_path

TABLES = ("train", "heads", "eval", "eval_token_losses")


def done(values: dict[str, Tensor]) -> Future:
    """A future that already holds `values` (what an in-line measurement gives)."""
    future: Future = Future()
    future.set_result(values)
    return future


@dataclass
class Row:
    """One step's values. `train`: the step has a row in the `train` table (a checkpoint's extra
    measurements do not)."""

    step: int
    tokens: int
    extra: dict[str, Tensor]
    measured: list[Future] = field(default_factory=list)
    train: bool = True
    scored: bool = False  # per-head scores measured at this step


class MetricsSink:
    def __init__(self, run_dir: Path, heatmap_every_n_steps: int = 0):
        self.tables = {name: Table(table_path(run_dir, name)) for name in TABLES}
        self.heatmap_every = heatmap_every_n_steps
        self.loggers: list = []

    def load(self, up_to_step: int) -> None:
        for table in self.tables.values():
            table.load(up_to_step=up_to_step)  # a resumed run recomputes whatever came after its checkpoint

    def columns(self, name: str) -> dict[str, list]:
        return self.tables[name].columns()

    def write_rows(self, rows: list[Row], keep_going: bool = False, before_step: int | None = None) -> None:
        """Write `rows` (those before `before_step`, when given: the first step a NaN reached). A failed
        measurement is raised after the rows before it are written (only those are written with
        `keep_going`, when the run is failing anyway)."""
        done_rows, values, error = [], [], None
        for row in rows:
            if before_step is not None and row.step >= before_step:
                break
            try:
                values.append({k: v for part in row.measured for k, v in part.result().items()} | row.extra)
            except Exception as e:
                error = e
                break
            done_rows.append(row)
        if done_rows:
            self.write(done_rows, values)
        for table in self.tables.values():
            table.flush()
        if error is not None and not keep_going:
            raise error

    def write(self, rows: list[Row], values: list[dict[str, Tensor]]) -> None:
        """Append the rows to the tables and send them to the loggers."""
        flat = torch.cat([v[k].reshape(-1) for v in values for k in sorted(v)]).float()
        flat = flat.cpu().numpy().astype(np.float64)  # unpacked in numpy: indexing tensors costs microseconds
        offset, train_rows, heads, evals, token_losses = 0, [], [], [], []
        for row, tensors in zip(rows, values):
            host: dict[str, np.ndarray] = {}
            for key in sorted(tensors):
                n = tensors[key].numel()
                host[key] = flat[offset:offset + n].reshape(tuple(tensors[key].shape))
                offset += n
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
        if self.heatmap_every and step % self.heatmap_every == 0 and "prefix_matching" in host:
            self.log_heatmap(step, host["prefix_matching"], host["previous_token"])

    def log_heatmap(self, step: int, prefix_matching: np.ndarray, previous_token: np.ndarray) -> None:
        """The per-head score grid as a W&B image (W&B loggers only)."""
        loggers = [lg for lg in self.loggers if hasattr(lg, "log_image")]
        if not loggers:
            return
        import matplotlib.pyplot as plt

        from .plots import heads_heatmap

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
