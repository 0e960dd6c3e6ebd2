"""`python -m train seeds=N`: an ensemble of N runs, member k with seed `seed + k`, trained side by side.

Each member is exactly the standalone run `python -m train <the same overrides> seed=<seed + k>`, in its
own process and its own run directory `RUN_DIR/members/k/` (checkpoints, metrics, summary, W&B run):
its own initialisation, data stream, optimizer state, clipping and schedule, and a failure (a
non-finite loss) that stops it alone. `seed_workers` members train at once, each with
`cores // seed_workers` threads. On a CPU, independent processes are the fastest way to train many
small models: stacking them into batched kernels in one process gains nothing over one thread per model
(scripts/bench_ensemble.py measures both sides). When they finish, the ensemble writes its
summary.json (each member's summary and the spread across seeds) and the metric tables with `member`
and `seed` columns (train/ensemble_summary.py).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .config import validate
from .ensemble_summary import MEMBERS, concat_tables, is_ensemble, member_dir, summarize_ensemble
from .errors import ConfigError
from .rundir import CONFIG, SUMMARY, read_json, write_text

log = logging.getLogger(__name__)
# Overrides the ensemble sets for each member itself.
OWN_KEYS = ("seed", "seeds", "seed_workers", "resume", "logger.wandb.group", "logger.wandb.name",
            "trainer.enable_progress_bar")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def quote(value: str) -> str:
    """A Hydra override value that parses back to `value` (names may hold `,` or `=`). In Hydra's quoted
    strings a backslash escapes only a quote or the backslashes before one."""
    value = re.sub(r'(\\+)(?="|$)', lambda m: m.group(1) * 2, value)
    return '"' + value.replace('"', '\\"') + '"'


def member_overrides(overrides: list[str]) -> list[str]:
    """The command line's overrides without the keys each member gets from the ensemble."""
    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")
    return [o for o in overrides if key(o) not in OWN_KEYS]


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    if not is_ensemble(run_dir):
        raise ConfigError(f"resume={run_dir}: not an ensemble's directory (no {CONFIG} and {MEMBERS}/)")
    saved = OmegaConf.load(run_dir / CONFIG)
    for key in ("seed", "seeds"):
        if saved.get(key) != cfg[key]:
            raise ConfigError(f"{key}={cfg[key]}: the ensemble being resumed used {saved.get(key)}")


def die_with_parent() -> None:
    """In a member process: get SIGTERM when the ensemble's process dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def last_error(console: Path, rc: int) -> str:
    """A failed member's one-line error from its console output, else its exit status."""
    try:
        lines = [line.strip() for line in console.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1].removeprefix("error:").strip() if errors else f"exit status {rc}" + (
        f": {lines[-1]}" if lines else "")


def run_ensemble(cfg: DictConfig, run_dir: Path, overrides: list[str], wandb_identity: tuple[str | None, str],
                 echo=lambda line: print(line, flush=True)) -> dict:
    """Train the members (those not finished yet, when resuming) and write the ensemble's summary."""
    validate(cfg)
    run_dir = Path(run_dir)
    if cfg.resume:
        check_resume(cfg, run_dir)
    elif (run_dir / CONFIG).exists():
        raise ConfigError(f"{run_dir}: already holds a run ({CONFIG}); resume={run_dir} continues it, "
                          "or choose another hydra.run.dir")
    else:
        write_text(run_dir / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    # The data once, here: a text corpus is tokenized and cached before the members start, so they share
    # one cache instead of each building it, and bad data stops the ensemble before any member starts.
    from .build import build_generator

    generator = build_generator(cfg)
    if hasattr(generator, "prepare"):
        generator.prepare()
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    workers = min(cfg.seeds, cfg.seed_workers or cores())
    threads = max(1, cores() // workers)
    group, name = wandb_identity
    group = group or run_dir.name
    base = [sys.executable, "-m", "train", *member_overrides(overrides), "trainer.enable_progress_bar=false",
            f"logger.wandb.group={quote(group)}", f"seeds=1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("HYDRA_FULL_ERROR", None)  # a member reports its errors in one line, as a run does

    pending = []
    for k, seed in enumerate(seeds):
        d = member_dir(run_dir, k)
        done = (d / SUMMARY).exists() and read_json(d / SUMMARY).get("status") == "finished"
        if done:
            continue
        where = f"resume={quote(str(d))}" if (d / CONFIG).exists() else f"hydra.run.dir={quote(str(d))}"
        pending.append((k, [*base, f"seed={seed}", f"logger.wandb.name={quote(f'{name}-seed{seed}')}", where]))
    echo(f"Ensemble of {cfg.seeds} seeds ({seeds[0]}-{seeds[-1]}): {len(pending)} to train, {workers} at a time "
         f"x {threads} thread(s); members in {run_dir / MEMBERS}/")

    started = time.time()
    errors: dict[int, str] = {}
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    queue = list(pending)
    try:
        while queue or running:
            while queue and len(running) < workers:
                k, cmd = queue.pop(0)
                d = member_dir(run_dir, k)
                d.mkdir(parents=True, exist_ok=True)
                with open(d / "console.log", "ab") as console:
                    proc = subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=die_with_parent if sys.platform == "linux" else None)
                running[k] = (proc, time.time())
            time.sleep(0.2)
            for k, (proc, t0) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[k]
                echo(member_line(run_dir, k, seeds[k], rc, time.time() - t0, errors))
    except BaseException:
        for proc, _ in running.values():  # Ctrl-C, SIGTERM: stop the members (their files are atomic)
            proc.terminate()
        for proc, _ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    concat_tables(run_dir, seeds)
    return summarize_ensemble(run_dir, seeds, errors, time.time() - started,
                              {"workers": workers, "threads": threads})


def member_line(run_dir: Path, k: int, seed: int, rc: int, seconds: float, errors: dict[int, str]) -> str:
    """One line as a member ends; its error is kept in `errors`."""
    d = member_dir(run_dir, k)
    head = f"  member {k} (seed {seed}):"
    if rc != 0:
        errors[k] = last_error(d / "console.log", rc)
        return f"{head} failed after {seconds:.0f} s: {errors[k]}"
    s = read_json(d / SUMMARY) if (d / SUMMARY).exists() else {}
    pc = s.get("phase_change")
    window = f"phase change at steps {pc['onset_step']}-{pc['end_step']}" if pc else "no phase change"
    icl = (s.get("final") or {}).get("icl_score")
    return f"{head} finished in {seconds:.0f} s, {window}" + (f", final ICL score {icl:+.3f}" if icl is not None else "")
