import pytest

from train.config import ConfigError, validate
from tests.conftest import run_train


def test_default_config_composes_and_validates(compose_cfg):
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.experiment_name == "quickstart"
    assert cfg.model.d_vocab == cfg.data.d_vocab  # taken from the data
    assert cfg.model.positional.value == "shortformer"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.d_model=65"], "model.d_model"),
        (["model.n_layers=0"], "model.n_layers"),
        (["model.n_heads=-2"], "model.n_heads"),
        (["optim.lr=0"], "optim.lr"),
        (["optim.schedule=exotic"], "optim.schedule"),
        (["trainer.max_steps=0"], "trainer.max_steps"),
        (["data.batch_size=0"], "data.batch_size"),
        (["model.n_ctx=32"], "probes.rep_len"),  # probes need 1 + 2 * 25 tokens
        (["probes.every_n_steps=0"], "probes.every_n_steps"),
        (["model.positional=rotary", "model.d_head=7"], "model.d_head"),
        (["data.span_len_min=30", "data.span_len_max=20"], "data.span_len_min"),
        (["logger.wandb.mode=sometimes"], "logger.wandb.mode"),
    ],
)
def test_impossible_values_name_the_key(compose_cfg, overrides, key):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.n_layer=2", "n_layer"),  # typo in a key
        ("model.n_layers=two", "n_layers"),  # wrong type
        ("model.positional=absolute", "positional"),  # not an option
        ("data=nonexistent", "data"),  # unknown group option
    ],
)
def test_hydra_rejects_typos_with_the_key(compose_cfg, override, fragment):
    with pytest.raises(Exception, match=fragment):
        compose_cfg(override)


def test_cli_bad_value_is_one_line_and_nonzero(tmp_path):
    proc = run_train("model.d_model=65", "logger=none", run_dir=tmp_path / "run", timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: model.d_model=65"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_non_finite_loss_stops_the_run_and_keeps_good_checkpoints(tmp_path):
    import json

    import torch

    run = tmp_path / "nan"
    proc = run_train("logger=none", "optim.lr=1e30", "optim.warmup_steps=0", "trainer.gradient_clip_val=null",
                     "trainer.max_steps=200", "probes.flush_every_n_steps=5", run_dir=run, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: non-finite training loss at step")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["error"]
    index = json.loads((run / "checkpoints" / "index.json").read_text())["checkpoints"]
    assert index, "the checkpoints before the failure are kept"
    for entry in index:
        state = torch.load(run / "checkpoints" / entry["file"], weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())
