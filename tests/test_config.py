"""The default config composes and validates. Bad values, keys and types: tests/test_bad_inputs.py."""

from train.config import validate


def test_default_config_composes_and_validates(compose_cfg):
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.experiment_name == "quickstart"
    assert cfg.model.d_vocab == cfg.data.d_vocab  # taken from the data
    assert cfg.model.positional.value == "shortformer"
