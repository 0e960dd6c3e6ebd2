"""A finished run as the analysis commands see it: config, checkpoints, summary, fixed token sets.

Everything is read from the run directory (docs/run-directory.md) through `train.load.RunDir`; errors
are `AnalysisError`s whose one-line message names the file, which `python -m analysis` prints as
`error: ...` with exit code 2.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from train import probes
from train.build import build_datamodule, build_generator, probe_tokens
from train.data.synthetic import batch_rng
from train.errors import RunError
from train.load import RunDir

ANALYSIS = "analysis"  # results go to RUN_DIR/analysis/


class AnalysisError(ValueError):
    """Bad input to an analysis command; the message names the file or argument."""


class Run(RunDir):
    """A run directory with what the analysis commands derive from it: its fixed token sets rebuilt
    from their seeds, and the selections of checkpoints and heads that commands take."""

    @property
    def out_dir(self) -> Path:
        return self.path / ANALYSIS

    def tl_model(self, step: int, device: str = "cpu"):
        """The model at a checkpoint step in the installed TransformerLens: a 4.x `TransformerBridge` or a
        3.x `HookedTransformer`."""
        from .transformerlens import to_transformer_lens

        return to_transformer_lens(self.model(step), device)

    @cached_property
    def generator(self):
        return build_generator(self.cfg)

    @cached_property
    def eval_tokens(self) -> torch.Tensor:
        """The run's fixed evaluation set `[eval_size, n_ctx]` (rebuilt from its seed)."""
        return build_datamodule(self.cfg, self.generator).eval_tokens()

    @cached_property
    def reference_tokens(self) -> torch.Tensor:
        """A reference set for mean ablation: batch 1 of the evaluation stream (the evaluation set is
        batch 0), so the same distribution as the evaluation set, but different sequences."""
        draw = getattr(self.generator, "eval_batch", self.generator)
        return torch.from_numpy(draw(batch_rng(self.cfg.data.eval_seed, 1, "eval"), self.cfg.data.eval_size))

    @cached_property
    def probe_tokens(self) -> torch.Tensor:
        """The fixed probe batch (BOS + `rep_len` random tokens, repeated)."""
        return probe_tokens(self.cfg, self.generator)

    @property
    def icl_positions(self) -> tuple[slice, slice]:
        p = self.cfg.probes
        return probes.icl_positions(self.cfg.model.n_ctx, p.icl_late, p.icl_early, p.icl_span)

    @property
    def shape(self) -> tuple[int, int]:
        return self.cfg.model.n_layers, self.cfg.model.n_heads

    def nearest_checkpoint(self, step: int) -> dict:
        return min(self.checkpoints, key=lambda e: (abs(e["step"] - step), e["step"]))

    def select_checkpoints(self, spec: str) -> list[dict]:
        """`all`, `last`, or comma-separated steps that must each have a checkpoint."""
        if spec == "all":
            return list(self.checkpoints)
        if spec == "last":
            return [self.checkpoints[-1]]
        by_step = {e["step"]: e for e in self.checkpoints}
        chosen = []
        for part in spec.split(","):
            try:
                step = int(part)
            except ValueError:
                raise AnalysisError(f"--checkpoints {spec}: expected all, last or steps like 0,100,1000") from None
            if step not in by_step:
                have = ", ".join(str(s) for s in by_step)
                raise AnalysisError(f"{self.file('index')}: no checkpoint at step {step} (have {have})")
            chosen.append(by_step[step])
        return chosen

    def select_heads(self, spec: str) -> list[tuple[int, int]]:
        """`all`, `induction` (summary.json's induction heads), or `L.H,...` like `1.0,1.3`."""
        n_layers, n_heads = self.shape
        if spec == "all":
            return [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
        if spec == "induction":
            if self.summary is None:
                raise AnalysisError(f"{self.file('summary')}: not found (has the run finished?)")
            heads = [(h["layer"], h["head"]) for h in self.summary["induction_heads"]]
            if not heads:
                raise AnalysisError(f"{self.file('summary')}: names no induction head")
            return heads
        heads = []
        for part in spec.split(","):
            try:
                layer, head = (int(x) for x in part.split("."))
            except ValueError:
                raise AnalysisError(f"--heads {spec}: expected all, induction or LAYER.HEAD,... like 1.0,1.3") from None
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise AnalysisError(f"--heads {part}: the run's model has {n_layers} layers of {n_heads} heads")
            heads.append((layer, head))
        return heads

    def heads_table(self):
        """`metrics/heads.parquet` (per-step, per-head scores) as a pyarrow Table."""
        table = self.table("heads")
        if table is None or table.num_rows == 0:
            raise AnalysisError(f"{self.file('heads')}: not found or empty (probes disabled?)")
        return table


def member_path(path: str | Path, member: int | None) -> Path:
    """`path` itself, or member `member` of the ensemble (`python -m train seeds=N`) at `path`."""
    from omegaconf import OmegaConf

    from train.ensemble_summary import is_ensemble, member_dir
    from train.rundir import CONFIG

    path = Path(path)
    if not is_ensemble(path):
        if member is not None:
            raise AnalysisError(f"--member {member}: {path} is a single run, not an ensemble (seeds=N)")
        return path
    n = int(OmegaConf.load(path / CONFIG).seeds)
    if member is None:
        raise AnalysisError(f"{path}: an ensemble of {n} seeds: choose one with --member K (0-{n - 1})")
    if not 0 <= member < n:
        raise AnalysisError(f"--member {member}: {path} has members 0-{n - 1}")
    return member_dir(path, member)


def open_run(path: str | Path, member: int | None = None) -> Run:
    """Open a run directory (or member `member` of an ensemble); AnalysisError (naming the missing file)
    if it is not one."""
    path = member_path(path, member)
    if not path.is_dir():
        raise AnalysisError(f"{path}: no such run directory")
    try:
        run = Run(path)
        run.cfg  # noqa: B018 (read now: a directory without a config is no run)
        return run
    except RunError as e:
        raise AnalysisError(str(e)) from None
