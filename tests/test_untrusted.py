"""Untrusted and broken files: refused in one line, never executed."""

import os
import pickle

import torch

from tests.conftest import run_train


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch EXPLOITED",))


def make_run(tmp_path):
    run = tmp_path / "run"
    proc = run_train("logger=none", "trainer.max_steps=4", run_dir=run, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def test_resume_never_runs_code_in_a_checkpoint(tmp_path):
    """Through the CLI: a checkpoint that is a pickle running code when loaded without `weights_only` is
    refused in one line and never run. (Truncated, foreign and missing files: tests/test_bad_inputs.py.)"""
    run = make_run(tmp_path)
    last = run / "checkpoints" / "step=0000004.ckpt"
    with open(last, "wb") as f:
        pickle.dump({"state_dict": Exploit()}, f)
    proc = run_train("logger=none", "trainer.max_steps=8", f"resume={run}", run_dir=run, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {last}: not a loadable checkpoint")
    assert not (tmp_path / "EXPLOITED").exists() and not (run / "EXPLOITED").exists()


def test_load_model_refuses_code(tmp_path):
    import pytest

    from train.errors import RunError
    from train.load import read_checkpoint

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(RunError, match="not a loadable checkpoint"):
        read_checkpoint(path)
    assert not (tmp_path / "EXPLOITED").exists()


def test_wandb_online_without_network_continues_offline(tmp_path):
    run = tmp_path / "online"
    proc = run_train("logger.wandb.mode=online", "logger.wandb.init_timeout=10", "trainer.max_steps=5",
                     "checkpoint.enabled=false", run_dir=run, timeout=300,
                     env={"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("warning: W&B online unavailable") == 1
    assert list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert (run / "summary.json").exists()
