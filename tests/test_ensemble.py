"""Ensembles (`python -m train seeds=N`): each member is the standalone run of its seed, measured and
summarized per member, with the spread across seeds, band figures, `--member K` and sweeps."""

import json
import os
from pathlib import Path
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import ENSEMBLE_STEPS as STEPS, ROOT, run_train
from tests.wandb_records import summarize
from train.ensemble_summary import spread


def analysis(capsys, *args) -> tuple[int, str]:
    """`python -m analysis ARGS` in this process: (exit status, stderr)."""
    from analysis.__main__ import main

    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_spread_known_answer():
    s = spread([4.0, None, 1.0, 3.0, 2.0, 5.0])
    assert s == {"n": 5, "median": 3.0, "min": 1.0, "max": 5.0, "p10": pytest.approx(1.4), "p90": pytest.approx(4.6)}
    assert spread([None, None]) is None


def test_each_member_is_the_standalone_run_of_its_seed(ensemble, tmp_path):
    run_dir, _ = ensemble
    member = run_dir / "members" / "1"
    summary = json.loads((member / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == STEPS
    # The standalone run of seed 4 (= seed 3 + member 1), default threads like the member, to step 64 (a
    # log-spaced checkpoint of both; the learning rate is constant after warm-up, so the length does not
    # enter): the same weights and optimizer state, bit for bit, and the same measurements.
    solo = tmp_path / "solo"
    proc = run_train("seed=4", "trainer.max_steps=64", "logger=none", run_dir=solo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = torch.load(member / "checkpoints" / "step=0000064.ckpt", weights_only=True)
    b = torch.load(solo / "checkpoints" / "step=0000064.ckpt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert torch.equal(a["optimizer_states"][0]["state"][0]["exp_avg"], b["optimizer_states"][0]["state"][0]["exp_avg"])
    heads_m = pq.read_table(member / "metrics" / "heads.parquet").to_pandas()
    heads_s = pq.read_table(solo / "metrics" / "heads.parquet").to_pandas()
    assert heads_m[heads_m.step <= 64].prefix_matching.tolist() == heads_s.prefix_matching.tolist()
    # Member 0 is another seed: different weights.
    other = torch.load(run_dir / "members" / "0" / "checkpoints" / "step=0000064.ckpt", weights_only=True)
    assert not any(torch.equal(other["state_dict"][k], a["state_dict"][k]) for k in a["state_dict"])


def test_summary_tables_report_and_wandb(ensemble):
    run_dir, proc = ensemble
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "finished" and s["seeds"] == [3, 4] and s["finished"] == 2
    assert [(m["member"], m["seed"], m["status"]) for m in s["members"]] == [(0, 3, "finished"), (1, 4, "finished")]
    for m in s["members"]:
        own = json.loads((run_dir / "members" / str(m["member"]) / "summary.json").read_text())
        assert m["final"] == own["final"] and m["heads"] == own["heads"]
    finals = [m["final"]["icl_score"] for m in s["members"]]
    assert s["spread"]["final_icl_score"]["min"] == min(finals) and s["spread"]["final_icl_score"]["n"] == 2
    assert s["execution"] == {"workers": 1, "threads": None}
    for name in ("train", "heads", "eval"):
        t = pq.read_table(run_dir / "metrics" / f"{name}.parquet").to_pandas()
        assert t.columns[:2].tolist() == ["member", "seed"]
        for k, seed in ((0, 3), (1, 4)):
            own = pq.read_table(run_dir / "members" / str(k) / "metrics" / f"{name}.parquet").to_pandas()
            part = t[t.member == k]
            assert (part.seed == seed).all() and len(part) == len(own)
            assert part.drop(columns=["member", "seed"]).reset_index(drop=True).equals(own)
    assert "Ensemble finished: 2/2 seeds (3-4) finished" in proc.stdout
    assert "phase change in" in proc.stdout and "member 1 (seed 4): finished" in proc.stdout
    # W&B: one run per member, in one group named for the ensemble.
    runs = [summarize(next((run_dir / "members" / str(k) / "wandb").glob("offline-run-*/run-*.wandb")))
            for k in (0, 1)]
    assert [r["group"] for r in runs] == ["ens", "ens"] and [r["name"] for r in runs] == ["ens-seed3", "ens-seed4"]
    assert all(r["finished"] for r in runs) and runs[0]["id"] != runs[1]["id"]


def test_member_option_and_band_figures(ensemble, tmp_path, capsys):
    run_dir, _ = ensemble
    rc, err = analysis(capsys, "ablate", str(run_dir), "--checkpoints", "last")
    assert rc == 2 and "an ensemble of 2 seeds: choose one with --member K (0-1)" in err
    rc, err = analysis(capsys, "knockout", str(run_dir), "--member", "5")
    assert rc == 2 and "--member 5:" in err
    rc, err = analysis(capsys, "ablate", str(run_dir / "members" / "0"), "--member", "0")
    assert rc == 2 and "is a single run, not an ensemble" in err
    rc, err = analysis(capsys, "ablate", str(run_dir), "--member", "1", "--checkpoints", "last")
    assert rc == 0, err
    assert (run_dir / "members" / "1" / "analysis" / "ablation_zero.parquet").exists()
    out = tmp_path / "model.pt"
    rc, err = analysis(capsys, "export-tl", str(run_dir), str(out), "--member", "0")
    assert rc == 0 and out.exists(), err

    from analysis import Run
    from analysis.figures import make_figures

    model = Run(run_dir / "members" / "0").model(STEPS)  # a member loads as a standalone model
    assert len(model.blocks) == 2
    entries = make_figures([run_dir], tmp_path / "bands", log=lambda _: None)
    assert [e.stem for e in entries if e.skipped is None] == [
        "01_icl_score_bands", "02_loss_bands", "03_prefix_matching_bands", "04_head_score_bands", "05_windows"]
    data = pq.read_table(tmp_path / "bands" / "01_icl_score_bands.parquet").to_pandas()
    ev = pq.read_table(run_dir / "metrics" / "eval.parquet").to_pandas()
    last = ev[ev.step == ev.step.max()]
    assert data["median"].iloc[-1] == pytest.approx(last.icl_score.median())  # the median of the members
    assert data.low.iloc[-1] == pytest.approx(last.icl_score.min())  # min-max band under 5 members
    entries = make_figures([run_dir], tmp_path / "one", only=["icl_score"], member=1, log=lambda _: None)
    assert entries[0].files and "members/1" in pq.read_table(entries[0].files[2]).to_pandas().run.iloc[0]


def test_a_failed_member_stops_alone_and_is_reported_with_its_index(tmp_path):
    """Member 1's directory holds a run that cannot be resumed; member 0 trains; the ensemble exits 1."""
    run_dir = tmp_path / "ens"
    (run_dir / "members" / "1").mkdir(parents=True)
    (run_dir / "members" / "1" / "config.yaml").write_text("seed: 1\n")
    (run_dir / "config.yaml").write_text("seed: 0\nseeds: 2\n")
    proc = run_train("seeds=2", "trainer.max_steps=20", "logger=none", f"resume={run_dir}", run_dir=run_dir)
    assert proc.returncode == 1, proc.stderr[-2000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "failed" and s["finished"] == 1
    assert s["failed"] == [{"member": 1, "seed": 1, "error": s["failed"][0]["error"]}]
    assert "no checkpoint" in s["failed"][0]["error"]
    assert "failed: member 1 (seed 1):" in proc.stdout
    assert json.loads((run_dir / "members" / "0" / "summary.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_non_finite_loss_is_reported_per_member(tmp_path):
    run_dir = tmp_path / "nan"
    proc = run_train("seeds=2", "logger=none", "optim.lr=1e30", "optim.warmup_steps=0",
                     "trainer.gradient_clip_val=null", "trainer.max_steps=50", run_dir=run_dir)
    assert proc.returncode == 1
    s = json.loads((run_dir / "summary.json").read_text())
    assert [f["member"] for f in s["failed"]] == [0, 1]
    assert all(f["error"].startswith("non-finite training loss at step") for f in s["failed"])
    for k in (0, 1):
        index = json.loads((run_dir / "members" / str(k) / "checkpoints" / "index.json").read_text())["checkpoints"]
        assert index  # the good checkpoints before the failure are kept


def test_bad_ensemble_settings_are_one_line_errors(tmp_path, compose_cfg):
    """(seeds=0 and seed_workers=0 are among tests/test_bad_inputs.py's cases.)"""
    from train.config import validate
    from train.ensemble import check_resume
    from train.errors import ConfigError

    with pytest.raises(ConfigError, match="^seeds=2: an ensemble trains each member on one device"):
        validate(compose_cfg("seeds=2", "trainer=ddp"))
    with pytest.raises(ConfigError, match="not an ensemble's directory"):
        check_resume(compose_cfg("seeds=3"), tmp_path)
    (tmp_path / "members").mkdir()
    (tmp_path / "config.yaml").write_text("seed: 0\nseeds: 4\n")
    with pytest.raises(ConfigError, match="^seeds=3: the ensemble being resumed used 4$"):
        check_resume(compose_cfg("seeds=3"), tmp_path)


def test_across_seeds_table_known_answer():
    from train.sweep_summary import across_seeds

    row = dict(n_layers=2, n_heads=4, final_icl_score=None, onset_step=None)
    rows = [{**row, "onset_step": 300, "final_icl_score": -0.5}, {**row, "onset_step": 500, "final_icl_score": -0.7},
            {**row, "final_icl_score": -0.1}, {**row, "n_layers": 1, "final_icl_score": -0.2}]
    lines = across_seeds(rows).splitlines()
    assert lines[2:] == ["| 1 | 4 | 1 | 0/1 | none | -0.200 (-0.200 to -0.200) |",
                         "| 2 | 4 | 3 | 2/3 | 400 (300 to 500) | -0.500 (-0.700 to -0.100) |"]


@pytest.mark.slow
def test_sweep_of_ensembles_summarizes_across_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "train", "-m", "logger=none", "trainer.enable_progress_bar=false",
                           "model.n_layers=1,2", "seeds=2", "trainer.max_steps=10", "checkpoint.enabled=false",
                           f"hydra.sweep.dir={sweep}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = pq.read_table(sweep / "sweep_summary.parquet").to_pylist()
    assert [(r["n_layers"], r["member"], r["seed"], r["status"]) for r in rows] == [
        (1, 0, 0, "finished"), (1, 1, 1, "finished"), (2, 0, 0, "finished"), (2, 1, 1, "finished")]
    md = (sweep / "sweep_summary.md").read_text()
    assert "| 1 | 4 | 2 | 0/2 |" in md and "| 2 | 4 | 2 | 0/2 |" in md


@pytest.mark.slow
def test_quickstart_phase_change_in_every_seed(tmp_path):
    """Three seeds of the quickstart as users run it: each forms an induction head in a phase change."""
    run_dir = tmp_path / "ens"
    proc = run_train("seeds=3", "logger=none", run_dir=run_dir, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["phase_changes"] == 3 and s["with_induction_head"] == 3, s["failed"]
    onset = s["spread"]["onset_step"]
    assert onset["n"] == 3 and onset["min"] <= onset["median"] <= onset["max"] < 1500
    assert f"phase change in 3/3 seeds, onset steps" in proc.stdout


@pytest.mark.slow
def test_a_killed_ensemble_resumes_to_the_uninterrupted_members(tmp_path):
    """SIGKILL to the ensemble mid-run stops its workers; `resume=` continues each member from its last
    checkpoint, and the members end bit-identical to standalone runs of their seeds."""
    import signal
    import time

    run_dir = tmp_path / "ens"
    args = [sys.executable, "-m", "train", "seeds=2", "seed_workers=1", "trainer.max_steps=300", "logger=none",
            "trainer.enable_progress_bar=false"]
    proc = subprocess.Popen([*args, f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    index = run_dir / "members" / "1" / "checkpoints" / "index.json"
    deadline = time.time() + 600
    while time.time() < deadline and not (index.exists() and 128 in [e["step"] for e in json.loads(index.read_text())["checkpoints"]]):
        time.sleep(0.5)
    workers = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert workers
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=120)

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    deadline = time.time() + 30  # the workers see their parent gone and exit (within a second)
    while time.time() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.5)
    assert not any(alive(pid) for pid in workers)
    assert not (run_dir / "members" / "1" / "summary.json").exists() or \
        json.loads((run_dir / "members" / "1" / "summary.json").read_text())["status"] != "finished"
    done = subprocess.run([*args, f"resume={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["finished"] == 2
    solo = tmp_path / "solo"
    assert run_train("seed=1", "trainer.max_steps=300", "logger=none", run_dir=solo).returncode == 0
    a = torch.load(run_dir / "members" / "1" / "checkpoints" / "step=0000300.ckpt", weights_only=True)["state_dict"]
    b = torch.load(solo / "checkpoints" / "step=0000300.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
