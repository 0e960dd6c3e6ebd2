"""W&B offline: one finished run per job, grouped and named from the config, every step logged."""

from tests.conftest import run_train
from tests.wandb_records import summarize


def test_offline_wandb_run_is_finished_grouped_and_per_step(tmp_path):
    run = tmp_path / "wb"
    proc = run_train("trainer.max_steps=30", "logger.wandb.tags=[demo]", "checkpoint.enabled=false",
                     "probes.heatmap_every_n_steps=10", run_dir=run, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    s = summarize(files[0])
    assert s["finished"]
    assert s["group"] == "quickstart" and s["name"] == "wb" and s["tags"] == ["demo", "n_layers=2", "n_heads=4"]
    assert sorted(set(s["global_steps"])) == list(range(31))  # steps 0..30, none thinned out
    assert {"loss", "icl_score", "prefix_matching/L1H0", "previous_token/L0H0", "eval/icl_score"} <= s["history_keys"]
    assert "wandb sync" in proc.stdout
    heatmaps = list(files[0].parent.glob("files/media/images/heads/scores_*.png"))
    assert len(heatmaps) == 4  # steps 0, 10, 20, 30


def test_csv_logger_works_without_wandb(tmp_path):
    run = tmp_path / "csv"
    proc = run_train("trainer.max_steps=10", "logger=csv", "checkpoint.enabled=false", run_dir=run, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (run / "wandb").exists()
    metrics = (run / "csv" / "metrics.csv").read_text().splitlines()
    assert "prefix_matching/L1H0" in metrics[0]


def test_a_run_prints_only_its_bar_and_report(tmp_path):
    """The console of a default run (W&B offline, the progress bar on): the harness's bar and report,
    no library notices, tips, deprecations or extra bars; Lightning's notices stay in train.log."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    run = tmp_path / "quiet"
    proc = subprocess.run([sys.executable, "-m", "train", f"hydra.run.dir={run}", "trainer.max_steps=5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    before_report = out.split("Run finished")[0]
    bars = [line for line in before_report.replace("\r", "\n").splitlines() if line.strip()]
    assert bars and all(line.startswith("train:") for line in bars), bars[:5]
    assert "Run finished: 5 steps" in proc.stdout
    assert "GPU available" in (run / "train.log").read_text()
