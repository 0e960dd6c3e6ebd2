"""A full disk (simulated) while checkpointing or writing metrics: a clear error naming the file, the
earlier checkpoints and metrics intact, no temp file left, and the run resumable."""

import errno
import json
import os
import subprocess
import sys

import lightning as L
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT
from train.load import read_checkpoint

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failing write() raises it: no file name
SHORT = ["logger=none", "trainer.enable_progress_bar=false", "trainer.max_steps=20", "probes.flush_every_n_steps=5"]


def fail_checkpoint_at(step):
    """`Trainer.save_checkpoint` that writes half of the checkpoint of `step`, then finds the disk full."""
    save = L.Trainer.save_checkpoint

    def save_checkpoint(self, filepath, *args, **kwargs):
        save(self, filepath, *args, **kwargs)
        if self.global_step == step:
            data = open(filepath, "rb").read()
            open(filepath, "wb").write(data[: len(data) // 2])
            raise ENOSPC

    return save_checkpoint


def fail_metrics_from(step):
    """`pyarrow.parquet.write_table` that finds the disk full once a table reaches `step`."""
    write_table = pq.write_table

    def write(table, where, *args, **kwargs):
        if max(table["step"].to_pylist(), default=-1) >= step:
            open(where, "wb").write(b"PAR1 half a table")
            raise ENOSPC
        return write_table(table, where, *args, **kwargs)

    return write


def assert_intact(run_dir, steps, last_flush):
    index = json.loads((run_dir / "checkpoints" / "index.json").read_text())["checkpoints"]
    assert [e["step"] for e in index] == steps
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == [f"step={s:07d}.ckpt" for s in steps]
    for entry in index:
        assert read_checkpoint(run_dir / "checkpoints" / entry["file"])["global_step"] == entry["step"]
    train = pq.read_table(run_dir / "metrics" / "train.parquet")["step"].to_pylist()
    assert train == list(range(last_flush + 1))
    for table in (run_dir / "metrics").glob("*.parquet"):
        assert max(pq.read_table(table)["step"].to_pylist()) <= last_flush
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]


def test_disk_full_while_checkpointing(compose_cfg, tmp_path, monkeypatch):
    from train.run import run

    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(L.Trainer, "save_checkpoint", fail_checkpoint_at(8))
        with pytest.raises(OSError) as info:
            run(compose_cfg(*SHORT), run_dir)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(run_dir / "checkpoints" / "step=0000008.ckpt")
    assert_intact(run_dir, [0, 1, 2, 4], last_flush=8)  # metrics reach the disk before their checkpoint
    # Room again: the run resumes from its last good checkpoint and finishes.
    summary = run(compose_cfg(*SHORT, f"resume={run_dir}"), run_dir)
    assert summary["status"] == "finished" and summary["steps"] == 20


def test_disk_full_while_writing_metrics(compose_cfg, tmp_path, monkeypatch):
    from train import rundir
    from train.run import run

    run_dir = tmp_path / "run"
    monkeypatch.setattr(rundir.pq, "write_table", fail_metrics_from(12))
    with pytest.raises(OSError) as info:
        run(compose_cfg(*SHORT), run_dir)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename.startswith(str(run_dir / "metrics")) and info.value.filename.endswith(".parquet")
    assert_intact(run_dir, [0, 1, 2, 4, 8], last_flush=10)


SCRIPT = """
import runpy, sys
import lightning as L
from tests.test_disk_full import fail_checkpoint_at
L.Trainer.save_checkpoint = fail_checkpoint_at(8)
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("train", run_name="__main__")
"""


@pytest.mark.slow
def test_disk_full_cli_is_one_line_and_nonzero(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, f"hydra.run.dir={run_dir}", *SHORT], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    ckpt = run_dir / "checkpoints" / "step=0000008.ckpt"
    assert proc.stderr.strip().splitlines()[-1] == f"error: {ckpt}: No space left on device", proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert_intact(run_dir, [0, 1, 2, 4], last_flush=8)
