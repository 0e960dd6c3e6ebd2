"""`summary.json`: what happened in the run, written at the end (and when it fails)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from ..environment import environment
from ..phase import classify_heads, detect_phase_change
from ..rundir import SUMMARY, read_json, write_json
from .measure import Measure


def summarize(measure: Measure, probes_cfg: Any, phase_cfg: Any, n_layers: int, n_heads: int) -> dict:
    """Phase-change window from the evaluation set's ICL curve; head classes from the last probes."""
    train, heads, ev = (measure.sink.columns(k) for k in ("train", "heads", "eval"))
    out: dict[str, Any] = {"steps": int(train["step"][-1]) if train else 0,
                           "tokens": int(train["tokens"][-1]) if train else 0}
    out["final"] = {
        "loss": ev["loss"][-1] if ev else None,
        "icl_score": ev["icl_score"][-1] if ev else None,
        "train_loss": next((v for v in reversed(train.get("loss", [])) if v is not None), None),
        "induction_loss": next((v for v in reversed(train.get("induction_loss", [])) if v is not None), None),
    }
    out["phase_change"] = (
        detect_phase_change(np.array(ev["step"]), np.array(ev["tokens"]), np.array(ev["icl_score"]),
                            phase_cfg.smooth, phase_cfg.threshold, phase_cfg.min_drop,
                            phase_cfg.min_step)
        if ev else None
    )
    if heads:
        last = max(heads["step"])
        rows = [i for i, s in enumerate(heads["step"]) if s == last]
        prev, pm = np.zeros((n_layers, n_heads)), np.zeros((n_layers, n_heads))
        for i in rows:
            prev[heads["layer"][i], heads["head"][i]] = heads["previous_token"][i]
            pm[heads["layer"][i], heads["head"][i]] = heads["prefix_matching"][i]
        classes = classify_heads(prev, pm, probes_cfg.previous_token_threshold, probes_cfg.induction_threshold)
    else:
        classes = []
    out["heads"] = classes
    out["induction_heads"] = [
        {"layer": h["layer"], "head": h["head"], "prefix_matching": h["prefix_matching"]}
        for h in sorted(classes, key=lambda h: -h["prefix_matching"]) if h["class"] == "induction"
    ]
    out["previous_token_heads"] = [
        {"layer": h["layer"], "head": h["head"], "previous_token": h["previous_token"]}
        for h in sorted(classes, key=lambda h: -h["previous_token"]) if h["class"] == "previous_token"
    ]
    return out


class RunSummary(L.Callback):
    def __init__(self, run_dir: Path, measure: Measure, cfg: Any):
        self.run_dir, self.measure, self.cfg = Path(run_dir), measure, cfg
        self.started = time.time()
        self.summary: dict | None = None
        self.device = None  # where the run trains: read before Lightning's teardown moves the model off it

    def write(self, module, status: str, error: str | None = None) -> dict:
        m = self.cfg.model
        summary = {"status": status, **summarize(self.measure, self.cfg.probes, self.cfg.phase, m.n_layers, m.n_heads)}
        if module.interventions:
            summary["interventions"] = module.interventions.describe()
        summary["wall_time_s"] = round(time.time() - self.started, 1)
        summary["environment"] = environment(self.device or module.device)
        if module.environment_changes:
            summary["environment_changes_on_resume"] = module.environment_changes
        if error:
            summary["error"] = error
        write_json(self.run_dir / SUMMARY, summary)
        self.summary = summary
        return summary

    def on_train_end(self, trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        summary = self.write(module, "finished")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "summary"):  # W&B: the window and heads as run summary fields
                pc = summary["phase_change"] or {}
                experiment.summary.update({f"phase_change/{k}": v for k, v in pc.items()})
                experiment.summary["n_induction_heads"] = len(summary["induction_heads"])
                experiment.summary["final_icl_score"] = summary["final"]["icl_score"]

    def on_fit_end(self, trainer, module) -> None:
        # A run resumed from the checkpoint of its last step has nothing left to train, and Lightning
        # then calls no training hooks: if it was killed before writing its summary, it is written here.
        path = self.run_dir / SUMMARY
        if trainer.is_global_zero and self.summary is None and not (
                path.exists() and read_json(path).get("status") == "finished"):
            self.device = trainer.strategy.root_device
            self.measure.sink.load(up_to_step=trainer.global_step)
            self.on_train_end(trainer, module)

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        if trainer.is_global_zero:
            self.write(module, "failed", f"{type(exception).__name__}: {exception}")
