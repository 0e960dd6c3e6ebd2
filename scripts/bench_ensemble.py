"""Many seeds at once: an ensemble (`python -m train seeds=N`) against N single runs as parallel
processes (a Hydra multirun with the joblib launcher, one job per core, one thread each), both on the
same cores, side by side in one invocation, per-step probes on.

For N in --n (default 1,4,16): the quickstart with --steps steps per seed (default 300); wall time of
the whole command (process start to exit, set-up included), total tokens/s and seed-runs per hour.
N=1 is one run with every core (the ensemble's path is then the plain run). Optionally (--stacked) the
forward and backward pass of N stacked models in one process (`torch.func.stack_module_state` + `vmap`)
against one model, same threads: what stacked kernels would gain on this machine.

    make bench-ensemble                                   # or: python scripts/bench_ensemble.py --n 1,4,16
    python scripts/bench_ensemble.py --n 4 --steps 100 trainer=gpu   # trailing key=value: Hydra overrides
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


def ensemble(n: int, steps: int, extra: list[str], out: Path) -> float:
    return timed([sys.executable, "-m", "train", *COMMON, f"trainer.max_steps={steps}", f"seeds={n}", *extra,
                  f"hydra.run.dir={out}"])


def parallel(n: int, steps: int, extra: list[str], out: Path) -> float:
    """N single runs: a multirun over seeds, `cores` joblib jobs at once, one thread each."""
    jobs = min(n, cores())
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores() // jobs))}
    return timed([sys.executable, "-m", "train", "-m", *COMMON, f"trainer.max_steps={steps}",
                  f"seed={','.join(map(str, range(n)))}", "hydra/launcher=local_parallel",
                  f"hydra.launcher.n_jobs={jobs}", *extra, f"hydra.sweep.dir={out}"], env)


def stacked(n: int, overrides: list[str], steps: int = 20) -> tuple[float, float]:
    """Tokens/s of the forward+backward pass: N models stacked with vmap, and one model; same threads."""
    import torch
    from hydra import compose, initialize_config_dir
    from torch.func import functional_call, grad, stack_module_state, vmap

    from train.build import build_model
    from train.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    b, t, v = cfg.data.batch_size, cfg.model.n_ctx, cfg.model.d_vocab
    models = [build_model(cfg) for _ in range(n)]
    params, buffers = stack_module_state(models)
    base = models[0]

    def loss(p, bu, tokens):
        logits = functional_call(base, (p, bu), (tokens,))
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), tokens[:, 1:].reshape(-1))

    step_n = vmap(grad(loss), in_dims=(0, 0, 0))
    tokens_n = torch.randint(1, v, (n, b, t))
    one = models[0]

    def rate(fn, count: int) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return count * b * t * steps / (time.perf_counter() - t0)

    def single():
        one.zero_grad(set_to_none=True)
        logits = one(tokens_n[0])
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), tokens_n[0, :, 1:].reshape(-1)).backward()

    return rate(lambda: step_n(params, buffers, tokens_n), n), rate(single, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="1,4,16", help="ensemble sizes (default 1,4,16)")
    ap.add_argument("--steps", type=int, default=300, help="steps per seed (default 300)")
    ap.add_argument("--stacked", action="store_true", help="also time stacked (vmap) kernels in one process")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = ap.parse_args()
    sizes = [int(x) for x in args.n.split(",")]
    tps = tokens_per_step(args.overrides)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one = ensemble(1, args.steps, args.overrides, Path(tmp) / "one")
        for n in sizes:
            e = one if n == 1 else ensemble(n, args.steps, args.overrides, Path(tmp) / f"ens{n}")
            p = one if n == 1 else parallel(n, args.steps, args.overrides, Path(tmp) / f"par{n}")
            tokens = n * args.steps * tps
            rows.append({"n": n, "ensemble_s": round(e, 1), "parallel_s": round(p, 1),
                         "ensemble_tokens_per_s": round(tokens / e), "parallel_tokens_per_s": round(tokens / p),
                         "ensemble_seed_runs_per_hour": round(3600 * n / e, 1),
                         "ensemble_over_parallel": round(p / e, 3), "ensemble_over_one_run": round(tokens / e / (args.steps * tps / one), 2)})
    print(f"{cores()} cores; quickstart, {args.steps} steps per seed, {tps} tokens per step, per-step probes on; "
          f"wall time of the whole command\n")
    print("| N | ensemble (s) | N parallel processes (s) | ensemble tokens/s | ensemble seed-runs/h | "
          "ensemble / parallel | ensemble / one run (tokens/s) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['ensemble_s']} | {r['parallel_s']} | {r['ensemble_tokens_per_s']:,} | "
              f"{r['ensemble_seed_runs_per_hour']} | {r['ensemble_over_parallel']:.2f}x | {r['ensemble_over_one_run']:.2f}x |")
    if args.stacked:
        import torch

        print(f"\nstacked kernels, forward + backward, {torch.get_num_threads()} thread(s):")
        for n in sizes:
            s, single = stacked(n, args.overrides)
            print(f"  N={n}: {s:,.0f} tokens/s stacked vs {single:,.0f} one model: {s / single:.2f}x")
            rows.append({"n": n, "stacked_tokens_per_s": round(s), "one_model_tokens_per_s": round(single)})
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
