"""Reading finished (or running) runs back: config, checkpoints, models, metrics (`RunDir`). Used by
`analysis`.

Checkpoints are loaded with `weights_only=True`: a checkpoint file from someone else cannot run code.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import torch
from omegaconf import DictConfig, OmegaConf

from .build import build_model
from .config import Config, register
from .errors import RunError
from .model import AttentionOnlyTransformer
from .rundir import CHECKPOINTS, CONFIG, INDEX, SUMMARY, read_json, read_table, table_path



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


class RunDir:
    """A run directory read back: its config, summary, checkpoints, models and metric tables. Every
    reader of run directories (analysis, figures, sweep summaries) goes through this class, so the
    layout (`train/rundir.py`) is spelled in one place. Each part is read once, on first use."""

    def __init__(self, path: str | Path, cfg: DictConfig | None = None):
        self.path = Path(path)
        self._cfg = cfg
        self._tables: dict[str, pa.Table | None] = {}
        self._models: dict[int, AttentionOnlyTransformer] = {}

    @property
    def cfg(self) -> DictConfig:
        if self._cfg is None:
            self._cfg = load_config(self.path)
        return self._cfg

    def file(self, part: str) -> Path:
        """The path of a part: `config`, `summary`, `index`, or a metrics table's name."""
        fixed = {"config": CONFIG, "summary": SUMMARY, "index": INDEX}
        return self.path / fixed[part] if part in fixed else table_path(self.path, part)

    def is_run(self) -> bool:
        """A run directory, or a sweep job's directory that Hydra made (the job may have failed early)."""
        return self.file("config").exists() or (self.path / ".hydra").is_dir()

    def saved_config(self) -> DictConfig | None:
        """The config as saved, untyped: `config.yaml`, else Hydra's copy of a job that never started."""
        for path in (self.path / CONFIG, self.path / ".hydra" / "config.yaml"):
            if path.exists():
                return OmegaConf.load(path)
        return None

    @cached_property
    def summary(self) -> dict | None:
        path = self.file("summary")
        return read_json(path) if path.exists() else None

    @cached_property
    def checkpoints(self) -> list[dict]:
        """Index entries `{"step", "tokens", "file", "path"}`, oldest first; RunError if there are none."""
        entries = checkpoints(self.path)
        if not entries:
            raise RunError(f"{self.file('index')}: lists no checkpoint")
        return entries

    @property
    def steps(self) -> list[int]:
        """The steps that have a checkpoint, oldest first."""
        return [e["step"] for e in self.checkpoints]

    def entry(self, step: int) -> dict:
        for e in self.checkpoints:
            if e["step"] == step:
                return e
        raise RunError(f"{self.file('index')}: no checkpoint at step {step} (have {', '.join(map(str, self.steps))})")

    def model(self, step: int | dict) -> AttentionOnlyTransformer:
        """The model at a checkpoint step (or index entry), in eval mode (kept for the next call)."""
        entry = step if isinstance(step, dict) else self.entry(step)
        if entry["step"] not in self._models:
            self._models[entry["step"]] = load_model(entry["path"], self.cfg)
        return self._models[entry["step"]]

    def models(self, steps: list[int] | None = None) -> Iterator[tuple[int, AttentionOnlyTransformer]]:
        """`(step, model)` for every checkpoint (or `steps`), each loaded when reached and not kept."""
        for step in self.steps if steps is None else steps:
            yield step, load_model(self.entry(step)["path"], self.cfg)

    def metrics(self, name: str):
        """A metrics table as a pandas DataFrame (`train`, `heads`, `eval`, `eval_token_losses`)."""
        table = self.table(name)
        if table is None:
            raise RunError(f"{self.file(name)}: not found (not written yet, or probes disabled)")
        return table.to_pandas()

    def table(self, name: str) -> pa.Table | None:
        """A metrics table (`train`, `heads`, `eval`, `eval_token_losses`), or None if not written."""
        if name not in self._tables:
            self._tables[name] = read_table(self.path, name)
        return self._tables[name]

    def stored_token_losses(self, step: int) -> torch.Tensor | None:
        """Per-token losses `[eval_size, n_ctx - 1]` of the evaluation set stored at `step`, if any."""
        table = self.table("eval_token_losses")
        if table is None:
            return None
        rows = [i for i, s in enumerate(table["step"].to_pylist()) if s == step]
        if not rows:
            return None
        flat = torch.tensor(table["token_losses"][rows[-1]].as_py(), dtype=torch.float32)
        return flat.view(self.cfg.data.eval_size, self.cfg.model.n_ctx - 1)
