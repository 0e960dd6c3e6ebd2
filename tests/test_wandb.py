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
