"""Measurement in the background equals measurement in line; the metric tables' own behaviour."""

from concurrent.futures import Future

import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import run_train
from tests.test_resume import SHORT, assert_same_run
from train.callbacks.checkpoint import is_scheduled
from train.callbacks.measure import Measure
from train.measurements import Cadence, Measurements
from train.metrics_sink import MetricsSink, Row, done
from train.rundir import Table


def test_background_measurement_equals_in_line(tmp_path):
    """The worker thread measures a copy of the weights taken right after each step: every metric,
    checkpoint and summary field is the same as when the training thread measures them itself."""
    background, in_line = tmp_path / "background", tmp_path / "in_line"
    for run_dir, flag in ((background, "true"), (in_line, "false")):
        proc = run_train(*SHORT, "trainer.max_steps=40", f"probes.background={flag}", run_dir=run_dir)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(background, in_line, 40)
    heads = pq.read_table(background / "metrics" / "heads.parquet").to_pydict()
    assert sorted(set(heads["step"])) == list(range(41))  # every step measured, in order
    costly = {step for step, v in zip(heads["step"], heads["copying"]) if v is not None}
    assert costly == {s for s in range(41) if is_scheduled(s, log_spaced=True, every_n_steps=20)}  # checkpoints


def test_table_rows_with_different_keys_and_resume(tmp_path):
    table = Table(tmp_path / "t.parquet")
    table.append([{"step": 0, "a": 1.0}, {"step": 1, "b": None}, {"step": 2, "a": 3.0, "b": 2.0}])
    table.append({"step": [3, 4], "c": ["x", "y"]})  # columns, with a new one
    table.flush()
    got = pq.read_table(tmp_path / "t.parquet").to_pydict()
    assert got == {"step": [0, 1, 2, 3, 4], "a": [1.0, None, 3.0, None, None], "b": [None, None, 2.0, None, None],
                   "c": [None, None, None, "x", "y"]}
    resumed = Table(tmp_path / "t.parquet")
    resumed.load(up_to_step=2)
    assert resumed.columns()["step"] == [0, 1, 2] and not resumed.dirty


def small_measure(tmp_path):
    tokens = torch.zeros(2, 8, dtype=torch.long)
    return Measure(Measurements(tokens, tokens, rep_len=3, late=6, early=1), MetricsSink(tmp_path), Cadence())


def test_a_failed_measurement_is_raised_after_the_rows_before_it_are_written(tmp_path):
    measure = small_measure(tmp_path)
    failed: Future = Future()
    failed.set_exception(RuntimeError("probe failed"))
    measure.pending = [Row(0, 0, {"loss": torch.tensor(2.0)}, [done({"induction_loss": torch.tensor(1.5)})]),
                       Row(1, 10, {"loss": torch.tensor(1.0)}, [failed]),
                       Row(2, 20, {"loss": torch.tensor(0.5)})]
    with pytest.raises(RuntimeError, match="probe failed"):
        measure.flush()
    assert pq.read_table(tmp_path / "metrics" / "train.parquet").to_pydict() == {
        "step": [0], "tokens": [0], "induction_loss": [1.5], "loss": [2.0]}
