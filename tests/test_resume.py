"""Exact resume: a run of 2N steps equals a run of N steps resumed for N more, even after SIGKILL."""

import pytest
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import torch

from tests.conftest import ROOT, run_train

# Bit-identical on the CPU with one thread: with several, some CPU kernels (fused attention) split
# their reductions differently from run to run, a last-bit difference that then grows.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SHORT = ["logger=none", "checkpoint.every_n_steps=20", "probes.flush_every_n_steps=7",
         "probes.eval_every_n_steps=5"]


def final_state(run_dir, step):
    ckpt = torch.load(run_dir / "checkpoints" / f"step={step:07d}.ckpt", weights_only=True)
    return ckpt


def assert_same_run(a, b, step):
    ca, cb = final_state(a, step), final_state(b, step)
    for k in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][k], cb["state_dict"][k]), k
    for sa, sb in zip(ca["optimizer_states"][0]["state"].values(), cb["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
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


def test_resume_is_bit_identical(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    assert run_train(*SHORT, "trainer.max_steps=60", run_dir=full, env=ONE_THREAD).returncode == 0
    # The number of loader workers (full: the default 1) changes neither the batches nor their order.
    assert run_train(*SHORT, "trainer.max_steps=30", "data.num_workers=0", run_dir=half, env=ONE_THREAD).returncode == 0
    proc = run_train(*SHORT, "trainer.max_steps=60", "data.num_workers=2", f"resume={half}", run_dir=half,
                     env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(full, half, 60)


def test_resume_refuses_a_different_model(tmp_path):
    run = tmp_path / "run"
    assert run_train(*SHORT, "trainer.max_steps=5", run_dir=run, env=ONE_THREAD).returncode == 0
    proc = run_train(*SHORT, "trainer.max_steps=10", "model.n_heads=2", f"resume={run}", run_dir=run, env=ONE_THREAD)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.n_heads=2"), proc.stderr


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    steps = ["trainer.max_steps=120"]
    assert run_train(*SHORT, *steps, run_dir=ref, env=ONE_THREAD).returncode == 0
    cmd = [sys.executable, "-m", "train", f"hydra.run.dir={killed}", "trainer.enable_progress_bar=false",
           *SHORT, *steps]
    for kill_after in (20, 60, 100):  # kill it three times, at a different checkpoint each time
        args = cmd + ([f"resume={killed}"] if (killed / "checkpoints" / "index.json").exists() else [])
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, **ONE_THREAD})
        index = killed / "checkpoints" / "index.json"
        deadline = time.time() + 300
        while time.time() < deadline:
            if index.exists():
                try:
                    saved = [e["step"] for e in json.loads(index.read_text())["checkpoints"]]
                except json.JSONDecodeError:  # must never happen: the index is written atomically
                    raise AssertionError("half-written index.json")
                if max(saved) >= kill_after:
                    break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for table in (killed / "metrics").glob("*.parquet"):
            pq.read_table(table)  # every visible file is complete
    proc = run_train(*SHORT, *steps, f"resume={killed}", run_dir=killed, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(killed.rglob("*.tmp"))
    assert_same_run(ref, killed, 120)
