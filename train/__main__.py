"""`python -m train [overrides]`: train one model (or a sweep with `-m`) and report what happened."""

from __future__ import annotations

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
    except (ConfigError, RunError, NonFiniteLoss) as e:
        if hc.mode == RunMode.MULTIRUN:
            # In a sweep, record the failure in the job's directory and let Hydra go on to the next job.
            if not (run_dir / SUMMARY).exists():
                write_json(run_dir / SUMMARY, {"status": "failed", "error": str(e)})
            raise
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, (ConfigError, RunError)) else 1)
    print_report(summary, run_dir, cfg)


if __name__ == "__main__":
    main()
