"""The runs a figure set compares: found on disk (run or sweep directories), labelled and read once.

A model's label comes from its config ("1L", "2L", "1L smeared", "2L MLP"); when two runs would share
one, the config keys that tell them apart are added ("2L 8h", "2L seed1"), then the directory name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from train.errors import RunError
from train.load import RunDir, load_config

from ..runs import AnalysisError

REQUIRED = ("train", "eval")  # metrics every figure set needs; the others only some figures


class RunData(RunDir):
    """A run in a figure set: its label and colour beside what `RunDir` reads. Compared and hashed by
    identity: one object per run."""

    def __init__(self, path: Path, cfg: DictConfig, label: str = "", color: str = "C0"):
        super().__init__(path, cfg)
        self.label, self.color = label, color

    @property
    def n_layers(self) -> int:
        return int(self.cfg.model.n_layers)

    @property
    def smeared(self) -> bool:
        return bool(self.cfg.model.smeared_key)

    @property
    def mlp(self) -> bool:
        return int(self.cfg.model.d_mlp or 0) > 0

    @property
    def is_vanilla_1l(self) -> bool:
        return self.n_layers == 1 and not self.smeared and not self.mlp

    @property
    def phase_change(self) -> dict | None:
        return (self.summary or {}).get("phase_change")

    def columns(self, name: str, *cols: str, positive_tokens: bool = False) -> dict[str, np.ndarray]:
        """Columns of a metrics table as arrays (nulls as NaN), optionally only rows with tokens > 0."""
        t = self.table(name)
        out = {c: np.asarray(t[c].to_numpy(zero_copy_only=False), dtype=np.float64) for c in cols}
        if positive_tokens:
            keep = out["tokens"] > 0
            out = {c: v[keep] for c, v in out.items()}
        return out

    def head_classes(self) -> dict[tuple[int, int], str]:
        """`(layer, head) -> class` from summary.json (`other` for every head when it has none)."""
        heads = (self.summary or {}).get("heads") or []
        return {(h["layer"], h["head"]): h["class"] for h in heads}


def base_label(cfg: DictConfig) -> str:
    label = f"{cfg.model.n_layers}L"
    if cfg.model.smeared_key:
        label += " smeared"
    if int(cfg.model.d_mlp or 0) > 0:
        label += " MLP"
    return label


def _distinguish(runs: list[RunData]) -> None:
    """Make labels unique: add the config keys that differ within a group of equal labels."""
    keys = (("experiment_name", "{}"), ("model.n_heads", "{}h"), ("model.d_model", "d{}"), ("model.n_ctx", "ctx{}"),
            ("model.positional", "{}"), ("seed", "seed{}"), ("data.seed", "data{}"))
    groups: dict[str, list[RunData]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    for group in groups.values():
        if len(group) < 2:
            continue
        for key, fmt in keys:
            values = [OmegaConf.select(r.cfg, key) for r in group]
            if len({str(v) for v in values}) > 1:
                for r, v in zip(group, values):
                    r.label += " " + fmt.format(getattr(v, "value", v))
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label += f" ({r.path.name})"


def _sort_key(path: Path):
    head = path.name.split("_")[0]
    return (int(head) if head.isdigit() else 1 << 30, path.name)


def expand(paths: list[str | Path]) -> tuple[list[Path], list[str]]:
    """Run directories from run or sweep directories (a sweep holds one run directory per job).

    A missing directory, or one that holds no run, is an AnalysisError. A sweep job that did not get
    as far as its metrics is left out with a note (returned), so one failed job does not block a sweep.
    """
    found: list[Path] = []
    notes: list[str] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise AnalysisError(f"{p}: no such run or sweep directory")
        if RunDir(p).file("config").exists():
            found.append(p)
            continue
        jobs = sorted((d for d in p.iterdir() if d.is_dir() and RunDir(d).is_run()),
                      key=_sort_key)
        if not jobs:
            raise AnalysisError(f"{RunDir(p).file('config')}: not found (not a run directory, nor a sweep of run directories)")
        for job in jobs:
            job_run = RunDir(job)
            missing = [f for f in (job_run.file("config"), *map(job_run.file, REQUIRED)) if not f.exists()]
            if missing:
                notes.append(f"{job}: left out ({missing[0].relative_to(job)} not found; did the job fail?)")
            else:
                found.append(job)
    if not found:
        raise AnalysisError(f"{paths[0]}: no run with metrics in it")
    return found, notes


def open_runs(paths: list[str | Path], log=print) -> list[RunData]:
    """Open, check and label the runs under `paths` (run or sweep directories), in the order given."""
    dirs, notes = expand(paths)
    for note in notes:
        log(f"note: {note}")
    runs, seen = [], set()
    for d in dirs:
        if d.resolve() in seen:
            continue
        seen.add(d.resolve())
        try:
            cfg = load_config(d)
        except RunError as e:
            raise AnalysisError(str(e)) from None
        run = RunData(d, cfg, base_label(cfg))
        for name in REQUIRED:
            t = run.table(name)
            if t is None:
                raise AnalysisError(f"{run.file(name)}: not found (a run without metrics; did it start?)")
            if t.num_rows == 0:
                raise AnalysisError(f"{run.file(name)}: empty")
        runs.append(run)
    _distinguish(runs)
    for i, r in enumerate(runs):
        r.color = f"C{i % 10}"
    return runs
