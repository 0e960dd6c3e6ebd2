"""`python -m train [overrides]`: train one model (or a sweep with `-m`) and report what happened."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .config import ConfigError, register
from .report import print_report

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # Heavy imports after Hydra has parsed the command line, so `--help` and typos answer at once.
    from .callbacks.measure import NonFiniteLoss
    from .load import RunError
    from .rundir import SUMMARY, write_json
    from .run import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
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
        expected = (ConfigError, RunError, NonFiniteLoss, OSError)
        if not isinstance(e, expected) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # An unwritable directory or a full disk: name the file.
        message = f"{e.filename or ''}: {e.strerror or e}" if isinstance(e, OSError) else str(e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(e, (ConfigError, RunError)) else 1)
    print_report(summary, run_dir, cfg)


if __name__ == "__main__":
    main()
