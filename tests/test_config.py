"""The default config composes and validates. Bad values, keys and types: tests/test_bad_inputs.py."""

from pathlib import Path

from train.config import validate


def test_default_config_composes_and_validates(compose_cfg):
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.experiment_name == "quickstart"
    assert cfg.model.d_vocab == cfg.data.d_vocab  # taken from the data
    assert cfg.model.positional.value == "shortformer"


def test_every_experiment_composes_and_validates(compose_cfg):
    from tests.conftest import CONF

    names = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))
    assert {"quickstart", "olsson_text", "olsson_text_1l"} <= set(names)
    for name in names:
        cfg = compose_cfg(f"experiment={name}")
        validate(cfg)
        assert cfg.experiment_name == name, name
    text = compose_cfg("experiment=olsson_text")
    assert text.model.embed_std == 1.0 and text.trainer.max_steps == 4000 and text.model.position_layers == 1
