"""Reading finished (or running) runs back: config, checkpoints, models. Used by `analysis`.

Checkpoints are loaded with `weights_only=True`: a checkpoint file from someone else cannot run code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .build import build_model
from .config import Config, register
from .model import AttentionOnlyTransformer
from .rundir import CHECKPOINTS, CONFIG, INDEX, read_json


class RunError(ValueError):
    """A run directory or checkpoint that cannot be read; the message names the file."""


def load_config(run_dir: str | Path) -> DictConfig:
    """The run's resolved config, typed by the schema (so `model.positional` is an enum again)."""
    register()
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise RunError(f"{path}: not found (is {run_dir} a run directory?)")
    schema = OmegaConf.structured(Config)
    saved = OmegaConf.load(path)
    schema.data = saved.data  # the data option's own schema is not needed to read it back
    if isinstance(saved.model.get("layernorm"), bool):  # runs saved when it was on/off: on meant every layer
        saved.model.layernorm = "pre" if saved.model.layernorm else "none"
    return OmegaConf.merge(schema, {k: v for k, v in saved.items() if k != "data"})


def checkpoints(run_dir: str | Path) -> list[dict]:
    """Index entries `{"step", "tokens", "file"}` of every checkpoint, oldest first; `path` added."""
    index = Path(run_dir) / INDEX
    if not index.exists():
        raise RunError(f"{index}: not found (the run saved no checkpoint)")
    entries = read_json(index)["checkpoints"]
    return [{**e, "path": Path(run_dir) / CHECKPOINTS / e["file"]} for e in entries]


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, foreign pickles that would run code, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{path}: not a loadable checkpoint ({first})") from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise RunError(f"{path}: not a checkpoint of this harness (no state_dict)")
    return state


def load_model(path: str | Path, cfg: DictConfig) -> AttentionOnlyTransformer:
    """The model saved in checkpoint `path` of a run with config `cfg`, in eval mode on the CPU."""
    state = read_checkpoint(path)["state_dict"]
    model = build_model(cfg)
    weights = {k.removeprefix("model.").replace("_orig_mod.", ""): v for k, v in state.items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise RunError(f"{path}: weights do not match the run's model config ({str(e).splitlines()[0]})") from None
    return model.eval()
