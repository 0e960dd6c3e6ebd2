"""Dense checkpoints through the phase change: PhaseWatch follows the live ICL curve with the summary's
detector, a run holds them inside its window, and a resumed run makes the same ones."""

import json
import math

import pyarrow.parquet as pq
import pytest

from tests.conftest import run_train
from tests.test_resume import assert_same_run
from train.callbacks.phase_watch import PhaseWatch
from train.config import PhaseConfig
from train.measurements import Cadence


class CurveMeasure:
    """A Measure stand-in whose evaluations follow a known curve: a fall of 1 nat centred on step 400,
    a factor of ~1.5 in tokens wide, and nothing else (1000 tokens per step)."""

    def __init__(self):
        self.cadence, self.watch_icl, self.reads = Cadence(eval_every_n_steps=50), False, []

    @staticmethod
    def icl(step: int) -> float:
        return -1 / (1 + math.exp(-(math.log(step) - math.log(400)) / 0.08))

    def icl_curve(self, through_step: int):
        self.reads.append(through_step)
        steps = [s for s in range(1, through_step + 1) if self.cadence.at(s).evaluate]
        return steps, [1000 * s for s in steps], [self.icl(s) for s in steps]


def decisions(watch: PhaseWatch, steps: range) -> list[int]:
    active = []
    for step in steps:
        watch.update(step)
        if watch.due(step):
            watch.saved()
            active.append(step)
    return active


def test_phase_watch_is_active_inside_the_window_only_and_resumes_its_decisions():
    measure = CurveMeasure()
    watch = PhaseWatch(measure, PhaseConfig(min_drop=0.5), every=10, start_fraction=0.5, max_count=1000)
    assert measure.watch_icl
    due = decisions(watch, range(1, 1201))
    # The fall runs from about 300 to 530 (the logistic's 5-95 %); the watch starts once half of
    # min_drop has fallen, one evaluation late (it reads the evaluations up to the previous one).
    assert 350 <= due[0] <= 450 and 500 <= due[-1] <= 650, due
    assert due == list(range(due[0], due[-1] + 1, 10))  # one stretch, every 10 steps
    assert all(r < s for r, s in zip(measure.reads, [s for s in range(2, 1201) if measure.cadence.at(s).evaluate]))
    # Resumed from its state at any step, a watch makes the same decisions.
    for cut in (due[0] - 5, due[0] + 15, due[-1] + 1):
        first = PhaseWatch(measure, PhaseConfig(min_drop=0.5), 10, 0.5, 1000)
        before = decisions(first, range(1, cut + 1))
        second = PhaseWatch(measure, PhaseConfig(min_drop=0.5), 10, 0.5, 1000)
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert before + decisions(second, range(cut + 1, 1201)) == due, cut
    # No phase change big enough: no dense checkpoint; a cap: at most max_count.
    assert decisions(PhaseWatch(measure, PhaseConfig(min_drop=3), 10, 0.5, 1000), range(1, 1201)) == []
    assert len(decisions(PhaseWatch(measure, PhaseConfig(min_drop=0.5), 10, 0.5, 3), range(1, 1201))) == 3


def test_quickstart_checkpoints_densely_inside_its_phase_change(quickstart_run):
    index = json.loads((quickstart_run / "checkpoints" / "index.json").read_text())["checkpoints"]
    window = json.loads((quickstart_run / "summary.json").read_text())["phase_change"]
    inside = [e for e in index if window["onset_step"] <= e["step"] <= window["end_step"]]
    dense = [e["step"] for e in index if e.get("dense")]
    assert len(inside) >= 10 and dense, (window, index)
    assert all(s % 20 == 0 for s in dense) and dense == list(range(dense[0], dense[-1] + 1, 20))
    assert dense[0] < window["end_step"] < dense[-1] + 100, (dense, window)


DENSE = ["logger=none", "checkpoint.every_n_steps=0", "probes.flush_every_n_steps=7", "probes.eval_every_n_steps=10",
         "phase.min_drop=0.2", "checkpoint.dense_every_n_steps=5"]  # the early in-context-frequency fall


@pytest.mark.slow
def test_resume_makes_the_same_dense_checkpoints(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    assert run_train(*DENSE, "trainer.max_steps=160", run_dir=full).returncode == 0
    index = json.loads((full / "checkpoints" / "index.json").read_text())["checkpoints"]
    dense = [e["step"] for e in index if e.get("dense")]
    assert len(dense) >= 3, index
    cut = next(s for s in dense[1:] if s % 10 == 0)  # resumed from inside the dense stretch, at an evaluation
    assert run_train(*DENSE, f"trainer.max_steps={cut}", run_dir=half).returncode == 0
    proc = run_train(*DENSE, "trainer.max_steps=160", f"resume={half}", run_dir=half)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = json.loads((half / "checkpoints" / "index.json").read_text())["checkpoints"]
    assert resumed == index
    assert_same_run(full, half, 160)
    losses = pq.read_table(full / "metrics" / "eval_token_losses.parquet").to_pandas()
    assert losses.step.tolist() == [e["step"] for e in index]
