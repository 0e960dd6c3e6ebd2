import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_CODE", "true")


@pytest.fixture
def compose_cfg():
    """Compose the real config with overrides, as `python -m train` would."""
    from train.config import register

    register()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return _compose


def run_train(*overrides: str, run_dir: Path, timeout: int = 600, env: dict | None = None):
    """`python -m train` in a subprocess; returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "train", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
           *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """One trained 2-layer quickstart run (1000 steps, no W&B), shared by the tests that need a model
    with real induction heads. About 40 s on 2 CPU cores."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    proc = run_train("logger=none", "trainer.max_steps=1000", run_dir=run_dir, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


ENSEMBLE_STEPS = 150


@pytest.fixture(scope="session")
def ensemble(tmp_path_factory):
    """Two seeds of the quickstart (3 and 4) for ENSEMBLE_STEPS steps as processes, W&B offline, one
    worker (so each member has torch's default threads, as a standalone run does)."""
    run_dir = tmp_path_factory.mktemp("ensemble") / "ens"
    proc = run_train("seeds=2", "seed=3", "seed_workers=1", f"trainer.max_steps={ENSEMBLE_STEPS}",
                     "checkpoint.every_n_steps=0", run_dir=run_dir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc
