"""Sweeps: every job its own run directory and finished W&B run, failures isolated, a summary table."""

import pytest
import shutil
import subprocess
import sys

import pyarrow.parquet as pq

from tests.conftest import ROOT
from tests.wandb_records import summarize

FAST = ["trainer.max_steps=10", "checkpoint.enabled=false", "trainer.enable_progress_bar=false",
        "probes.eval_every_n_steps=5"]


def sweep(tmp_path, *overrides, timeout=600):
    cmd = [sys.executable, "-m", "train", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *FAST, *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def check_four_jobs(sweep_dir):
    table = pq.read_table(sweep_dir / "sweep_summary.parquet").to_pandas()
    assert len(table) == 4 and set(table.status) == {"finished"}, table
    assert sorted(zip(table.n_layers, table.n_heads)) == [(1, 2), (1, 4), (2, 2), (2, 4)]
    assert (sweep_dir / "sweep_summary.md").exists() and (sweep_dir / "sweep_summary.png").exists()
    runs = [summarize(next((sweep_dir / job).glob("wandb/offline-run-*/run-*.wandb"))) for job in table.job]
    assert len({r["id"] for r in runs}) == 4, "one W&B run per job, never merged"
    assert all(r["finished"] for r in runs)
    assert {r["group"] for r in runs} == {sweep_dir.name}
    for r, (nl, nh) in zip(runs, zip(table.n_layers, table.n_heads)):
        assert f"n_layers={nl}" in r["tags"] and f"n_heads={nh}" in r["tags"]
        assert f"model.n_layers={nl}" in r["name"] and f"model.n_heads={nh}" in r["name"]
        assert sorted(set(r["global_steps"])) == list(range(11))


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    proc = sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                 "model.n_layers=1,2", "model.n_heads=2,4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_four_jobs(tmp_path / "sweep")


@pytest.mark.slow
def test_joblib_sweep(tmp_path):
    proc = sweep(tmp_path, "hydra/launcher=local_parallel", "model.n_layers=1,2", "model.n_heads=2,4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_four_jobs(tmp_path / "sweep")


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory):
    """Three learning rates, the middle one diverging."""
    tmp_path = tmp_path_factory.mktemp("failing")
    proc = sweep(tmp_path, "logger=none", "probes.flush_every_n_steps=2", "optim.lr=5e-3,1e30,1e-3")
    return tmp_path / "sweep", proc


def test_a_failing_job_does_not_stop_the_sweep(failing_sweep):
    sweep_dir, proc = failing_sweep
    assert proc.returncode == 1
    table = pq.read_table(sweep_dir / "sweep_summary.parquet").to_pandas()
    assert table.status.tolist() == ["finished", "failed", "finished"]
    assert "non-finite" in table.error[1]
    assert "job 1" in proc.stdout and "failed" in proc.stdout


def test_sweep_summary_on_demand(failing_sweep, tmp_path):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(failing_sweep[0], sweep_dir)
    (sweep_dir / "sweep_summary.parquet").unlink()
    out = subprocess.run([sys.executable, "-m", "analysis", "sweep", str(sweep_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    table = pq.read_table(sweep_dir / "sweep_summary.parquet").to_pandas()
    assert table.status.tolist() == ["finished", "failed", "finished"]
    bad = subprocess.run([sys.executable, "-m", "analysis", "sweep", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "nope" in bad.stderr


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_one_run(tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "train", f"hydra.run.dir={run}", "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.max_steps=12", "checkpoint.every_n_steps=6", "trainer.enable_progress_bar=false",
           # dense checkpoints on the first steps' small ICL fall: rank 0 decides, every rank saves them
           "probes.eval_every_n_steps=1", "phase.min_drop=0.005", "checkpoint.dense_every_n_steps=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(run.glob("wandb/offline-run-*"))) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    import json

    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "finished" and s["steps"] == 12
    assert s["tokens"] == 12 * 2 * 32 * 64  # both ranks' batches count
    train = pq.read_table(run / "metrics" / "train.parquet").to_pandas()
    assert train.step.tolist() == list(range(13))
    index = json.loads((run / "checkpoints" / "index.json").read_text())["checkpoints"]
    assert any(e.get("dense") for e in index), index
