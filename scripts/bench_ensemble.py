"""Many seeds at once, side by side in one invocation, per-step probes on: for N in --n (default 1,4,16),
the quickstart with --steps steps per seed (default 300) run N times

  processes  `python -m train seeds=N` (each member a standalone run in a worker process),
  stacked    `python -m train seeds=N seed_execution=stacked` (every member in one model, one process),
  parallel   N single runs as parallel processes (a Hydra multirun with the joblib launcher, one job per
             core, one thread each): the best alternative on the same cores,

each against one run (`python -m train`, N=1's row): wall time of the whole command (process start to
exit, set-up included), total tokens/s, seed-runs per hour, and ratios.

    make bench                                                # also runs this
    python scripts/bench_ensemble.py --n 1,4,16
    python scripts/bench_ensemble.py --ways stacked --n 1,16,64 --steps 200 trainer=gpu   # on a GPU
    python scripts/bench_ensemble.py --n 4 --steps 100 model.n_layers=3   # trailing key=value: Hydra overrides
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["logger=none", "trainer.enable_progress_bar=false"]


def cores() -> int:
    from train.environment import usable_cores

    return usable_cores()


def timed(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:6])} ... failed:\n{proc.stderr[-2000:]}")
    return wall


def tokens_per_step(overrides: list[str]) -> int:
    from hydra import compose, initialize_config_dir

    from train.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return cfg.data.batch_size * cfg.model.n_ctx


def one_run(steps: int, extra: list[str], out: Path) -> float:
    return timed([sys.executable, "-m", "train", *COMMON, f"trainer.max_steps={steps}", *extra, f"hydra.run.dir={out}"])


def ensemble(n: int, steps: int, extra: list[str], out: Path, execution: str) -> float:
    return timed([sys.executable, "-m", "train", *COMMON, f"trainer.max_steps={steps}", f"seeds={n}",
                  f"seed_execution={execution}", *extra, f"hydra.run.dir={out}"])


def parallel(n: int, steps: int, extra: list[str], out: Path) -> float:
    """N single runs: a multirun over seeds, `cores` joblib jobs at once, one thread each."""
    jobs = min(n, cores())
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores() // jobs))}
    return timed([sys.executable, "-m", "train", "-m", *COMMON, f"trainer.max_steps={steps}",
                  f"seed={','.join(map(str, range(n)))}", "hydra/launcher=local_parallel",
                  f"hydra.launcher.n_jobs={jobs}", *extra, f"hydra.sweep.dir={out}"], env)


WAYS = ("processes", "stacked", "parallel")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="1,4,16", help="ensemble sizes (default 1,4,16)")
    ap.add_argument("--steps", type=int, default=300, help="steps per seed (default 300)")
    ap.add_argument("--ways", default=",".join(WAYS), help=f"which of {', '.join(WAYS)} (default all)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = ap.parse_args()
    sizes = [int(x) for x in args.n.split(",")]
    ways = args.ways.split(",")
    if unknown := set(ways) - set(WAYS):
        sys.exit(f"error: --ways {args.ways}: unknown {', '.join(sorted(unknown))} (choose from {', '.join(WAYS)})")
    tps = tokens_per_step(args.overrides)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one = one_run(args.steps, args.overrides, Path(tmp) / "one")
        for n in sizes:
            row = {"n": n, "tokens": n * args.steps * tps}
            for way in ways:
                if n == 1:
                    row[way] = one  # one seed is one run, whichever way
                elif way == "parallel":
                    row[way] = parallel(n, args.steps, args.overrides, Path(tmp) / f"par{n}")
                else:
                    row[way] = ensemble(n, args.steps, args.overrides, Path(tmp) / f"{way}{n}", way)
            rows.append(row)
    one_rate = args.steps * tps / one
    print(f"{cores()} cores; quickstart, {args.steps} steps per seed, {tps} tokens per step, per-step probes on; "
          f"wall time of the whole command; one run: {one:.1f} s, {one_rate:,.0f} tokens/s\n")
    base = "parallel" if "parallel" in ways else None
    head = ["N"] + [f"{w} (s)" for w in ways] + [f"{w} seed-runs/h" for w in ways if w != "parallel"] + \
           [f"{w} / one run (tokens/s)" for w in ways] + ([f"{w} / parallel" for w in ways if w != base] if base else [])
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [str(r["n"])] + [f"{r[w]:.1f}" for w in ways] + \
                [f"{3600 * r['n'] / r[w]:.0f}" for w in ways if w != "parallel"] + \
                [f"{r['tokens'] / r[w] / one_rate:.2f}x" for w in ways] + \
                ([f"{r[base] / r[w]:.2f}x" for w in ways if w != base] if base else [])
        print("| " + " | ".join(cells) + " |")
    print("\n" + json.dumps([{**r, "one_run_s": round(one, 1)} for r in rows]))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
