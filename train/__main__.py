"""`python -m train [overrides]`: train one model (or a sweep with `-m`) and report what happened."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .config import register
from .errors import ConfigError, NonFiniteLoss, RunError
from .report import print_report

register()

# Asked for tracebacks (`HYDRA_FULL_ERROR=1`)? Read before `cli` sets it for Hydra.
FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"


def one_line(e: BaseException) -> str:
    """An error as one line that starts with the key or file it is about: ours, Hydra's, OmegaConf's."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    text = str(e)
    if isinstance(e, OSError) and not isinstance(e, MissingConfigException):
        text = f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)
    elif isinstance(cause, OmegaConfBaseException) and cause.full_key:
        text = f"{cause.full_key}: {str(cause.msg).splitlines()[0]}"
        hint = re.search(r"use (\+\S+)", str(e))  # a key that is not in the schema
        if hint:
            text += f" (a new key needs a +: {hint.group(1)})"
    elif isinstance(e, OverrideParseException):
        text = f"{e.override}: {e.message.splitlines()[0]}"
    elif isinstance(e, MissingConfigException):
        found = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
        options = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)+)", text)
        if found:
            text = f"{found.group(1)}={found.group(2)}: no such option"
            if options:
                names = [n.strip() for n in options.group(1).splitlines() if not n.strip().endswith("_schema")]
                text += f" (options: {', '.join(names)})"
    return " ".join(text.split()) or type(e).__name__


def remove_unstarted(run_dir: Path) -> None:
    """A run that failed before it started leaves no directory behind: remove the files Hydra wrote
    for it, if they are all the directory holds."""
    from .rundir import CONFIG

    if (run_dir / CONFIG).exists() or not run_dir.is_dir():
        return
    sub = HydraConfig.get().output_subdir or ".hydra"
    hydra_files = {Path(sub) / n for n in ("config.yaml", "hydra.yaml", "overrides.yaml")} | {Path("train.log")}
    present = {p.relative_to(run_dir) for p in run_dir.rglob("*") if p.is_file() or p.is_symlink()}
    if not present <= hydra_files:
        return
    for rel in present:
        (run_dir / rel).unlink(missing_ok=True)
    for d in (run_dir / sub, run_dir):
        try:
            d.rmdir()
        except OSError:
            pass


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # Heavy imports after Hydra has parsed the command line, so `--help` and typos answer at once.
    from omegaconf.errors import OmegaConfBaseException

    from .rundir import SUMMARY, write_json
    from .run import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        if cfg.seeds > 1:
            return main_ensemble(cfg, run_dir, hc)
        summary = run(cfg, run_dir)
    except Exception as e:
        if hc.mode == RunMode.MULTIRUN:
            # In a sweep, one failing job must not stop the others: record the failure in the job's
            # directory (the sweep summary lists it, and the sweep exits non-zero) and go on.
            logging.getLogger(__name__).exception("job failed")
            print(f"error: job {hc.job.num} ({hc.job.override_dirname}): {e}", file=sys.stderr)
            if not (run_dir / SUMMARY).exists():
                write_json(run_dir / SUMMARY, {"status": "failed", "error": f"{type(e).__name__}: {e}"})
            return
        expected = (ConfigError, RunError, NonFiniteLoss, OSError, OmegaConfBaseException)
        if isinstance(e, expected):
            remove_unstarted(run_dir)
        if not isinstance(e, expected) or FULL_ERROR:
            raise
        # An unwritable directory or a full disk: name the file.
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1 if isinstance(e, (NonFiniteLoss, OSError)) else 2)
    print_report(summary, run_dir, cfg)


def main_ensemble(cfg: DictConfig, run_dir: Path, hc) -> None:
    """`seeds=N`: the members as standalone runs side by side (train/ensemble.py); exit 1 if one failed."""
    from .ensemble import run_ensemble
    from .ensemble_summary import report
    from .loggers import job_identity

    # W&B: the members of one ensemble are one group (in a sweep, one group per job), so W&B's grouped
    # charts show each configuration's seeds as a mean line and a band.
    group, name, _ = job_identity(cfg, run_dir)
    if hc.mode == RunMode.MULTIRUN:
        group = f"{group}/{name}"
    elif group in (None, cfg.experiment_name):
        group = run_dir.name
    summary = run_ensemble(cfg, run_dir, (group, name))  # its errors: as a run's, in `main`
    print(report(summary, run_dir))
    if summary["status"] != "finished" and hc.mode != RunMode.MULTIRUN:
        sys.exit(1)  # in a sweep, the sweep summary lists the failed members and exits non-zero


def cli() -> None:
    """`main`, with Hydra's own errors (an unknown key, a wrong type, an unwritable run directory)
    reported like ours: one line naming the key or file, exit code 2 (1 for a file system error)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing a multi-line report
    try:
        main()
    except (HydraException, OmegaConfBaseException, ConfigError, OSError) as e:
        if FULL_ERROR:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1 if isinstance(e, OSError) and not isinstance(e, HydraException) else 2)


if __name__ == "__main__":
    cli()
