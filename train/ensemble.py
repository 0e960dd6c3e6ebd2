"""`python -m train seeds=N`: an ensemble of N runs, member k with seed `seed + k`, trained side by side.

Each member is the standalone run `python -m train <the same overrides> seed=<seed + k>` with its own
run directory `RUN_DIR/members/k/` (checkpoints, metrics, summary, W&B run): its own initialisation,
data stream, optimizer state, clipping and schedule, and a failure (a non-finite loss) that stops it
alone. `seed_workers` worker processes (default: one per core) each take the next member when done with
one, with `cores // seed_workers` threads (one worker: torch's default, as a standalone run); a worker imports torch and Lightning once, not once per
member. On a CPU, independent processes are the fastest way to train many small models: stacked into
batched kernels in one process they gain little over one model (scripts/bench_ensemble.py measures
both). When the members are done, the ensemble writes its summary.json (each member's summary and the
spread across seeds) and the metric tables with `member` and `seed` columns (train/ensemble_summary.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import logging
import multiprocessing
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .config import validate
from .ensemble_summary import MEMBERS, concat_tables, is_ensemble, member_dir, summarize_ensemble
from .environment import usable_cores
from .errors import ConfigError
from .parent_watch import exit_with_parent
from .rundir import CONFIG, SUMMARY, read_json, write_json, write_text


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    if not is_ensemble(run_dir):
        raise ConfigError(f"resume={run_dir}: not an ensemble's directory (no {CONFIG} and {MEMBERS}/)")
    saved = OmegaConf.load(run_dir / CONFIG)
    for key in ("seed", "seeds"):
        if saved.get(key) != cfg[key]:
            raise ConfigError(f"{key}={cfg[key]}: the ensemble being resumed used {saved.get(key)}")


def member_config(cfg: DictConfig, k: int, run_dir: Path, group: str, name: str) -> DictConfig:
    """Member k's config: the ensemble's with `seed + k`, as `python -m train ... seed=<seed + k>` composes
    it (`data.seed` follows `seed`), resuming its own directory if it has started (in a process; a
    stacked ensemble resumes as a whole)."""
    member = copy.deepcopy(cfg)
    member.seed = cfg.seed + k
    member.seeds = 1
    d = member_dir(run_dir, k)
    stacked = cfg.seed_execution == "stacked"
    member.resume = str(d) if (d / CONFIG).exists() and not stacked else None
    if stacked:
        member.seed_execution = "processes"  # its config is a standalone run's
        member.probes.background = False  # measured in line: one copy of the weights, the stack's
    member.logger.wandb.group = group
    member.logger.wandb.name = f"{name}-seed{member.seed}"
    member.trainer.enable_progress_bar = False
    return member


def start_worker(threads: int | None, parent: int) -> None:
    """A worker process: its thread count, and an exit as soon as the ensemble's process is gone (killed
    even by SIGKILL): the member's files are written atomically, and `resume=` continues it."""
    if threads is not None:  # one worker keeps torch's default, as a standalone run does
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)

    exit_with_parent(parent)


def train_member(cfg: DictConfig, run_dir: str) -> str | None:
    """In a worker: one member's run, its console and Python logging in its directory as a run's are.
    Returns None, or the one-line error a standalone run would print."""
    from .__main__ import one_line
    from .run import run

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = logging.FileHandler(run_dir / "train.log")
    log_file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(log_file)
    saved = os.dup(1), os.dup(2)
    with open(run_dir / "console.log", "ab") as console:
        os.dup2(console.fileno(), 1)
        os.dup2(console.fileno(), 2)
    try:
        run(cfg, run_dir)
        return None
    except Exception as e:
        logging.getLogger(__name__).exception("member failed")
        if not (run_dir / SUMMARY).exists():
            write_json(run_dir / SUMMARY, {"status": "failed", "error": f"{type(e).__name__}: {e}"})
        return one_line(e)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        root.removeHandler(log_file)
        log_file.close()


def run_ensemble(cfg: DictConfig, run_dir: Path, wandb_identity: tuple[str | None, str],
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
    workers = min(cfg.seeds, cfg.seed_workers or usable_cores())
    threads = None if workers == 1 else max(1, usable_cores() // workers)
    group, name = wandb_identity
    group = group or run_dir.name
    pending = []
    for k in range(cfg.seeds):
        d = member_dir(run_dir, k)
        if (d / SUMMARY).exists() and read_json(d / SUMMARY).get("status") == "finished":
            continue  # resuming: a finished member is left as it is
        pending.append(k)
    how = ("stacked in one model in this process" if cfg.seed_execution == "stacked"
           else f"{workers} at a time x {threads} thread(s)")
    echo(f"Ensemble of {cfg.seeds} seeds ({seeds[0]}-{seeds[-1]}): {len(pending)} to train, {how}; "
         f"members in {run_dir / MEMBERS}/")

    started = time.time()
    if cfg.seed_execution == "stacked":
        return run_stacked(cfg, run_dir, group, name, pending, generator, echo)
    errors: dict[int, str] = {}
    pool = cf.ProcessPoolExecutor(max(1, min(workers, len(pending))), mp_context=multiprocessing.get_context("spawn"),
                                  initializer=start_worker, initargs=(threads, os.getpid()))
    try:
        futures = {pool.submit(train_member, member_config(cfg, k, run_dir, group, name), str(member_dir(run_dir, k))): k
                   for k in pending}
        for future in cf.as_completed(futures):
            k = futures[future]
            try:
                error = future.result()
            except Exception as e:  # the worker process died (killed, out of memory)
                error = f"its worker process died ({type(e).__name__}: {e})"
            if error:
                errors[k] = error
            echo(member_line(run_dir, k, seeds[k], error, time.time() - started))
    except BaseException:
        # Ctrl-C: stop the members now (their files are written atomically; resume= continues them). A
        # killed ensemble's workers stop themselves (start_worker).
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    concat_tables(run_dir, seeds)
    return summarize_ensemble(run_dir, seeds, errors, time.time() - started,
                              {"workers": workers, "threads": threads})


def run_stacked(cfg: DictConfig, run_dir: Path, group: str, name: str, pending: list[int], generator, echo) -> dict:
    """`seed_execution=stacked`: every member in one model, in this process (train/stacked.py)."""
    import torch

    from .stacked import train_stacked

    started = time.time()
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    members = [member_config(cfg, k, run_dir, group, name) for k in range(cfg.seeds)]
    errors = train_stacked(cfg, run_dir, members, generator) if pending else {}
    for k in range(cfg.seeds):
        echo(member_line(run_dir, k, seeds[k], errors.get(k), time.time() - started))
    concat_tables(run_dir, seeds)
    return summarize_ensemble(run_dir, seeds, errors, time.time() - started,
                              {"workers": 1, "threads": torch.get_num_threads(), "stacked": cfg.seeds})


def member_line(run_dir: Path, k: int, seed: int, error: str | None, elapsed: float) -> str:
    """One line as a member ends."""
    head = f"  member {k} (seed {seed}):"
    if error:
        return f"{head} failed ({elapsed:.0f} s into the ensemble): {error}"
    d = member_dir(run_dir, k)
    s = read_json(d / SUMMARY) if (d / SUMMARY).exists() else {}
    pc = s.get("phase_change")
    window = f"phase change at steps {pc['onset_step']}-{pc['end_step']}" if pc else "no phase change"
    icl = (s.get("final") or {}).get("icl_score")
    return (f"{head} finished in {s.get('wall_time_s', 0):.0f} s, {window}"
            + (f", final ICL score {icl:+.3f}" if icl is not None else ""))
