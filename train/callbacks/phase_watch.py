"""Dense checkpoints through the phase change: whether training is inside it now, from the live ICL
curve and the summary's own detector (train/phase.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..phase import detect_phase_change
from .measure import Measure


class PhaseWatch:
    """Decides at each scheduled evaluation whether the run is inside a phase change: active from when
    the detector finds a window that reaches the newest evaluation and has fallen by `start_fraction *
    phase.min_drop`, until a later evaluation shows the window over (the detector's window ends before
    the newest evaluation). While active, every `every` steps is a checkpoint, `max_count` at most.

    A decision reads the evaluations up to the previous scheduled one, which are measured by then: it
    never waits for the measurement thread, and it is the same in every run of a seed, resumed or not
    (the state is saved in the checkpoint)."""

    def __init__(self, measure: Measure, phase_cfg: Any, every: int, start_fraction: float, max_count: int):
        self.measure, self.phase, self.every = measure, phase_cfg, every
        self.start_fraction, self.max_count = start_fraction, max_count
        measure.watch_icl = True
        self.active = False
        self.seen_until = -1  # the previous scheduled evaluation's step: the next decision reads up to it
        self.count = 0  # dense checkpoints so far

    def update(self, step: int) -> None:
        """At each training step: a new decision if `step` is a scheduled evaluation."""
        if not self.measure.cadence.at(step).evaluate:
            return
        if self.seen_until >= 0:
            self.active = self.inside(*self.measure.icl_curve(self.seen_until))
        self.seen_until = step

    def inside(self, steps: list[int], tokens: list[int], icl: list[float]) -> bool:
        p = self.phase
        window = detect_phase_change(np.array(steps), np.array(tokens), np.array(icl), p.smooth, p.threshold,
                                     self.start_fraction * p.min_drop, p.min_step)
        return window is not None and window["end_step"] == max(steps)

    def due(self, step: int) -> bool:
        return self.active and step % self.every == 0 and self.count < self.max_count

    def saved(self) -> None:
        """A dense checkpoint was written (before its file: the checkpoint's own state counts it)."""
        self.count += 1

    def state_dict(self) -> dict:
        return {"active": self.active, "seen_until": self.seen_until, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.active, self.seen_until, self.count = bool(state["active"]), int(state["seen_until"]), int(state["count"])
