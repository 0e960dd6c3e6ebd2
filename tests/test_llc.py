"""`python -m analysis llc`: devinterp's LLC over checkpoints, its stages, its files, its errors."""

import json

import pyarrow.parquet as pq
import pytest

from analysis.__main__ import main
from analysis.llc import LLCSettings, estimate, sequences, stages
from analysis.runs import Run
from tests.conftest import run_train
from tests.wandb_records import summarize

FAST = ["--chains", "2", "--draws", "30"]


def test_llc_of_part_of_the_parameters_is_lower(quickstart_run):
    """Sampling fewer parameters (the others held at the checkpoint) can only lower the LLC: the whole
    model > layer 1 > layer 1's query and key weights, each by more than the estimates' spread."""
    run = Run(quickstart_run)
    model, tokens = run.model(run.steps[-1]), sequences(run, 256)
    fast = dict(chains=2, draws=40, n_sequences=256)
    llcs = [estimate(model, tokens, LLCSettings(params=p, **fast)) for p in ("", r"blocks\.1\.", r"blocks\.1\.attn\.W_[QK]")]
    means = [r["llc_mean"] for r in llcs]
    spread = max(r["llc_std"] for r in llcs)
    assert means[0] > means[1] + 3 * spread and means[1] > means[2] + 3 * spread, llcs
    assert all(abs(r["traces"][:, -10:].mean() - r["traces"][:, 10:20].mean()) < 0.05 for r in llcs)  # flat


def test_stages_of_a_known_curve():
    rows = [{"step": s, "tokens": 10 * s, "llc_mean": y, "llc_std": 0.2}
            for s, y in [(0, -3), (1, 1), (2, 5), (4, 10), (8, 10.1), (16, 30), (32, 25), (64, 18), (128, 18.2)]]
    got = [(st["kind"], st["from_step"], st["to_step"]) for st in stages(rows)]
    assert got == [("rise", 1, 16), ("drop", 16, 64), ("plateau", 64, 128)]
    flat = [{"step": s, "tokens": s, "llc_mean": 5 + 0.1 * (s % 2), "llc_std": 0.2} for s in range(1, 9)]
    assert [st["kind"] for st in stages(flat)] == ["plateau"]


def test_llc_command_writes_its_table_traces_and_figure(quickstart_run, capsys):
    assert main(["llc", str(quickstart_run), "--checkpoints", "256,1000", *FAST]) == 0
    out = quickstart_run / "analysis"
    table = pq.read_table(out / "llc.parquet")
    rows = table.to_pylist()
    assert [r["step"] for r in rows] == [256, 1000] and all(len(r["llc_per_chain"]) == 2 for r in rows)
    assert json.loads(table.schema.metadata[b"settings"])["chains"] == 2
    traces = pq.read_table(out / "llc_traces.parquet").to_pandas()
    assert len(traces) == 2 * 2 * 30 and set(traces.step) == {256, 1000}
    assert (out / "llc_curve.png").exists() and (out / "llc_curve.pdf").exists()
    text = (out / "llc.md").read_text()
    assert "| 256 |" in text and "ICL phase change (summary.json): steps" in text
    assert "step 1000: LLC" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--lr", "0"], "--lr=0.0: must be a positive number"),
    (["--chains", "0"], "--chains=0: must be at least 1"),
    (["--n-sequences", "4", "--batch-size", "8"], "--n-sequences=4: must be at least --batch-size=8"),
    (["--params", "nothing_here"], "--params=nothing_here: matches no parameter"),
    (["--checkpoints", "3"], "no checkpoint at step 3"),
    (["--lr", "10", "--localization", "0"], "the SGLD chains diverged (non-finite loss); lower --lr"),
])
def test_bad_settings_are_one_line_errors(quickstart_run, capsys, args, message):
    assert main(["llc", str(quickstart_run), "--checkpoints", "1000", "--chains", "1", "--draws", "10", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_llc_goes_to_the_runs_wandb_run(tmp_path):
    run = tmp_path / "wb"
    proc = run_train("trainer.max_steps=20", run_dir=run, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(["llc", str(run), "--checkpoints", "16,20", "--chains", "1", "--draws", "10"]) == 0
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the training's, and the LLC's: the same W&B run, resumed
    first, second = (summarize(f) for f in files)
    assert first["id"] == second["id"] and second["finished"]
    assert {"llc/step", "llc/mean", "llc/std"} <= second["history_keys"]
