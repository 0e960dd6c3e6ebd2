"""Bit-identical runs at the default thread count: the same config twice gives the same run, and a run
of 2N steps equals a run of N steps resumed for N more, even after SIGKILL at random points."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import pyarrow.parquet as pq
import torch

from tests.conftest import ROOT, run_train

SHORT = ["logger=none", "checkpoint.every_n_steps=20", "probes.flush_every_n_steps=7",
         "probes.eval_every_n_steps=5"]


def final_state(run_dir, step):
    ckpt = torch.load(run_dir / "checkpoints" / f"step={step:07d}.ckpt", weights_only=True)
    return ckpt


def assert_same_state(ca, cb):
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for k in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][k], cb["state_dict"][k]), k
    oa, ob = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert oa.keys() == ob.keys() and len(oa) == (len(ca["state_dict"]) if ca["global_step"] else 0)
    for i in oa:
        assert oa[i].keys() == ob[i].keys() == {"exp_avg", "exp_avg_sq", "step"}
        for key in oa[i]:
            assert torch.equal(oa[i][key], ob[i][key]), (i, key)


def assert_same_run(a, b, step):
    ca, cb = final_state(a, step), final_state(b, step)
    assert_same_state(ca, cb)
    assert ca["StreamDataModule"] == cb["StreamDataModule"] and ca["tokens_seen"] == cb["tokens_seen"]
    for table in ("train", "heads", "eval", "eval_token_losses"):
        ta = pq.read_table(a / "metrics" / f"{table}.parquet").to_pandas()
        tb = pq.read_table(b / "metrics" / f"{table}.parquet").to_pandas()
        if table == "eval_token_losses":  # the interrupted run also has its own last checkpoint(s)
            tb = tb[tb.step.isin(ta.step)].reset_index(drop=True)
        assert ta.equals(tb), table
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("steps", "tokens", "final", "phase_change", "heads"):
        assert sa[key] == sb[key], key


@pytest.mark.slow
def test_two_runs_of_one_config_are_bit_identical(tmp_path):
    """Default threads, background measurement and a loader worker: every checkpoint and every table.
    (Slow: the resume tests below compare an uninterrupted run with another run of its config too.)"""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        proc = run_train(*SHORT, "trainer.max_steps=40", run_dir=d)
        assert proc.returncode == 0, proc.stderr[-2000:]
    steps = sorted(int(p.stem.split("=")[1]) for p in (a / "checkpoints").glob("*.ckpt"))
    assert steps == [0, 1, 2, 4, 8, 16, 20, 32, 40]
    for step in steps:
        assert_same_state(final_state(a, step), final_state(b, step))
    assert_same_run(a, b, 40)
    env = json.loads((a / "summary.json").read_text())["environment"]
    assert env["threads"] == torch.get_num_threads() and env["torch"] == torch.__version__


def test_resume_is_bit_identical(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    assert run_train(*SHORT, "trainer.max_steps=60", run_dir=full).returncode == 0
    # The number of loader workers (full: the default 1) changes neither the batches nor their order.
    assert run_train(*SHORT, "trainer.max_steps=30", "data.num_workers=0", run_dir=half).returncode == 0
    proc = run_train(*SHORT, "trainer.max_steps=60", "data.num_workers=2", f"resume={half}", run_dir=half)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(full, half, 60)


def test_a_run_killed_before_its_summary_resumes_to_it(quickstart_run, tmp_path):
    """Killed after its last checkpoint, before it wrote summary.json: `resume=` has no step left to
    train (Lightning runs no training hooks then) and writes the summary the run would have written."""
    run = tmp_path / "run"
    shutil.copytree(quickstart_run, run)
    before = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    args = ("logger=none", "trainer.max_steps=1000", f"resume={run}")  # as quickstart_run was trained
    proc = run_train(*args, run_dir=run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = json.loads((run / "summary.json").read_text())
    assert after["status"] == "finished" and after["steps"] == 1000 and after["phase_change"]
    assert {k: after[k] for k in ("tokens", "final", "phase_change", "heads")} == \
           {k: before[k] for k in ("tokens", "final", "phase_change", "heads")}
    assert "final ICL score" in proc.stdout
    # A finished run resumed again keeps its summary (its wall time, its device).
    assert run_train(*args, run_dir=run).returncode == 0
    assert json.loads((run / "summary.json").read_text()) == after


def test_resume_in_another_environment_warns_in_one_line(tmp_path):
    """A resumed process whose recorded environment differs (here the cuBLAS workspace setting, which
    leaves a CPU run's arithmetic and thread count as users have them) says so in one line and records it."""
    run = tmp_path / "run"
    assert run_train(*SHORT, "trainer.max_steps=4", run_dir=run).returncode == 0
    saved = json.loads((run / "summary.json").read_text())["environment"]["cublas_workspace_config"]
    other = ":16:8" if saved != ":16:8" else ":4096:8"
    proc = run_train(*SHORT, "trainer.max_steps=8", f"resume={run}", run_dir=run,
                     env={"CUBLAS_WORKSPACE_CONFIG": other})
    assert proc.returncode == 0, proc.stderr[-2000:]
    change = f"cublas_workspace_config {saved} -> {other}"
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: resumed")]
    assert len(warnings) == 1 and change in warnings[0], proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["environment"]["cublas_workspace_config"] == other
    assert summary["environment"]["threads"] == torch.get_num_threads()
    assert change in summary["environment_changes_on_resume"]


def kill_and_resume(run_dir, overrides, kill_points, rng):
    """Start the run, SIGKILL it a random moment after it has checkpointed each step of `kill_points`
    (resuming it after each kill), then let it finish."""
    cmd = [sys.executable, "-m", "train", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
           *overrides]
    index = run_dir / "checkpoints" / "index.json"
    for kill_after in kill_points:
        args = cmd + ([f"resume={run_dir}"] if index.exists() else [])
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if index.exists():
                try:
                    saved = [e["step"] for e in json.loads(index.read_text())["checkpoints"]]
                except json.JSONDecodeError:  # must never happen: the index is written atomically
                    raise AssertionError("half-written index.json")
                if max(saved) >= kill_after:
                    time.sleep(rng.uniform(0, 0.5))  # mid-step, mid-write or mid-checkpoint
                    break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed after step {kill_after}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for table in (run_dir / "metrics").glob("*.parquet"):
            pq.read_table(table)  # every visible file is complete
    proc = run_train(*overrides, f"resume={run_dir}", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(run_dir.rglob("*.tmp"))


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    overrides = [*SHORT, "trainer.max_steps=80"]
    assert run_train(*overrides, run_dir=ref).returncode == 0
    rng = random.Random()
    kill_points = [rng.randrange(1, 50)]
    print("killed after step", kill_points)  # pytest shows it if the test fails
    kill_and_resume(killed, overrides, kill_points, rng)
    assert_same_run(ref, killed, 80)


@pytest.mark.slow
def test_sigkill_three_times_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    overrides = [*SHORT, "trainer.max_steps=150"]
    assert run_train(*overrides, run_dir=ref).returncode == 0
    rng = random.Random()
    kill_points = [rng.randrange(1, 40), rng.randrange(40, 80), rng.randrange(80, 120)]
    print("killed after steps", kill_points)
    kill_and_resume(killed, overrides, kill_points, rng)
    assert_same_run(ref, killed, 150)
