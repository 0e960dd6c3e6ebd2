"""Training throughput of the harness against a plain PyTorch loop and a TransformerLens loop.

Four variants train the quickstart model on the quickstart data stream, each in its own process
(so peak memory is per variant), interleaved and repeated to damp noise from other jobs:

  a  plain PyTorch loop: `build_model`, the same data stream, AdamW, schedule and clipping
  b  the harness (`train.run.run`), probes off
  c  the harness, every per-step probe at every step (default evaluation cadence)
  d  the same model as a TransformerLens `HookedTransformer`, trained by a plain loop that calls
     `run_with_cache` at the cadence of (c) and scores heads with `train.probes`
  e  (c) with its measurements made in the training thread (`probes.background=false`): (c) makes
     them in a worker thread on a copy of the weights, on another core where there is one

tokens/s counts steps `warmup+1..steps` only, by wall time and by CPU time: the process' and its
children's, the harness' DataLoader worker included (with one torch thread, the default, CPU time is
barely disturbed by other jobs on the machine). The plain loops make each batch in line, as a minimal
loop does; the harness makes them in a worker process (`data.num_workers`, default 1), on another
core where there is one: its wall time gains what its CPU time does not. Time to first
step runs to the end of the first optimizer step, from process start (interpreter launch; every
variant imports torch, Lightning and Hydra) and from variant start (imports done, config composed).
`make bench ARGS="--device cuda --precision bf16-mixed --threads 0"`; trailing `key=value` arguments
are Hydra overrides for every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OVERRIDES = ["logger=none", "checkpoint.enabled=false"]
VARIANTS = {"a": "plain PyTorch loop", "b": "harness, probes off", "c": "harness, probes every step",
            "d": "TransformerLens run_with_cache loop", "e": "harness, probes every step, in line"}
EVERY_STEP = ["probes.enabled=true", "probes.every_n_steps=1"]
VARIANT_OVERRIDES = {"a": [], "b": ["probes.enabled=false"], "c": [*EVERY_STEP, "probes.background=true"],
                     "d": EVERY_STEP, "e": [*EVERY_STEP, "probes.background=false"]}
# None: no target, reported beside the others (e/a: what measuring costs without the worker thread).
TARGETS = {"b/a": 0.95, "c/a": 0.90, "c/d": 1.4, "e/a": None}

import lightning as L  # noqa: E402  (after sys.path, so `train` imports from this checkout)
import psutil  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from train import probes  # noqa: E402
from train.build import build_datamodule, build_generator, build_model, probe_tokens  # noqa: E402
from train.head_scores import Heads  # noqa: E402
from train.measurements import Cadence, Measurements  # noqa: E402
from train.config import register  # noqa: E402
from train.data.synthetic import batch_rng  # noqa: E402
from train.module import InductionLM  # noqa: E402


def compose_config(args, variant: str = "a"):
    register()
    overrides = [*DEFAULT_OVERRIDES, *VARIANT_OVERRIDES[variant], f"trainer.max_steps={args.steps}",
                 f"compile={args.compile}", f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
                 *([f"trainer.precision={args.precision}"] if args.precision else []), *args.overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def cpu_time() -> float:
    """CPU seconds of this process and its live children (the harness' data loader workers)."""
    children = sum(sum(c.cpu_times()[:2]) for c in psutil.Process().children(recursive=True))
    return time.process_time() + children


class StepClock(L.Callback):
    """Wall and CPU time at the end of optimizer steps 1, `warmup` and `steps` (a callback for the
    harness, `tick` for the plain loops)."""

    def __init__(self, warmup: int, steps: int, cuda: bool):
        self.warmup, self.steps, self.cuda = warmup, steps, cuda
        self.n = 0
        self.marks: dict[str, tuple[float, float]] = {}  # "first", "warm", "last" -> (wall, cpu)

    def tick(self) -> None:
        self.n += 1
        name = {1: "first", self.warmup: "warm", self.steps: "last"}.get(self.n)
        if name:
            if self.cuda:
                torch.cuda.synchronize()  # only where a time is read, so the GPU queue stays full
            self.marks[name] = (time.time(), cpu_time())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.tick()

    def throughput(self, tokens_per_step: int) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second) over steps `warmup + 1 .. steps`."""
        tokens = (self.steps - self.warmup) * tokens_per_step
        (wall0, cpu0), (wall1, cpu1) = self.marks["warm"], self.marks["last"]
        return tokens / (wall1 - wall0), tokens / (cpu1 - cpu0)


def autocast(cfg, device):
    precision = str(cfg.trainer.precision)
    if precision not in ("32-true", "32", "bf16-mixed"):
        raise SystemExit(f"--precision {precision}: the plain loops support 32-true and bf16-mixed")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def batches(cfg, device):
    """The harness' training stream: batch i is `generator(batch_rng(seed, i))`."""
    generator, seed, batch_size, i = build_generator(cfg), cfg.data.seed, cfg.data.batch_size, 0
    while True:
        yield torch.from_numpy(generator(batch_rng(seed, i), batch_size)).to(device)
        i += 1


def train_loop(model, cfg, device, clock, after_step=None) -> None:
    """A plain loop with the harness' optimizer, schedule (`InductionLM.configure_optimizers`) and
    gradient clipping. `after_step(step, token_losses)` adds per-step work."""
    optim = InductionLM(model, OmegaConf.to_container(cfg.optim), cfg.trainer.max_steps).configure_optimizers()
    opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    stream, mixed, clip = batches(cfg, device), autocast(cfg, device), cfg.trainer.gradient_clip_val
    params = list(model.parameters())
    for step in range(1, cfg.trainer.max_steps + 1):
        tokens = next(stream)
        with mixed:
            losses = probes.per_token_loss(model(tokens), tokens)  # [batch, pos - 1]
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(step, losses.detach())
        clock.tick()


def run_plain(cfg, device, clock) -> dict:
    L.seed_everything(cfg.seed, verbose=False)
    model = build_model(cfg).to(device)
    train_loop(torch.compile(model) if cfg.compile else model, cfg, device, clock)
    return {}


def run_harness(cfg, device, clock) -> dict:
    """`train.run.run` itself, with `clock` appended to the Trainer's callbacks."""
    import train.run

    make_trainer = L.Trainer

    def trainer_with_clock(*args, callbacks=(), **kwargs):
        return make_trainer(*args, callbacks=[*callbacks, clock], **kwargs)

    L.Trainer = trainer_with_clock  # run() looks up `L.Trainer` when called; this process only
    try:
        with tempfile.TemporaryDirectory(prefix="bench-run-") as run_dir:
            summary = train.run.run(cfg, Path(run_dir))
    finally:
        L.Trainer = make_trainer
    return {"summary_status": summary.get("status")}


def lens_model(cfg, ours, device):
    """Our model in the installed TransformerLens (a 4.x TransformerBridge or a 3.x HookedTransformer),
    with the same weights, to train."""
    from analysis.transformerlens import to_transformer_lens

    return to_transformer_lens(ours, str(device)).train().requires_grad_(True)


def run_lens(cfg, device, clock) -> dict:
    L.seed_everything(cfg.seed, verbose=False)
    ours = build_model(cfg).to(device)
    lens = lens_model(cfg, ours, device)
    generator = build_generator(cfg)
    probe = probe_tokens(cfg, generator).to(device)
    eval_tokens = build_datamodule(cfg, generator).eval_tokens().to(device)
    with torch.no_grad():  # the same function as ours, to float precision
        logit_diff = (lens(eval_tokens[:8]) - ours(eval_tokens[:8])).abs().max().item()
    measurements = Measurements.of(cfg.probes, cfg.model.n_ctx, probe, eval_tokens)  # the harness's own
    cadence, flush_every, n_layers = Cadence.of(cfg.probes), cfg.probes.flush_every_n_steps, cfg.model.n_layers
    late, early = measurements.late, measurements.early
    pending: list[torch.Tensor] = []
    only_patterns = lambda name: name.endswith("hook_pattern")  # noqa: E731

    @torch.no_grad()
    def measure(step: int, token_losses: torch.Tensor) -> None:
        """What `Measure` records at a step, with patterns and logits from `run_with_cache`."""
        pending.append(torch.stack([token_losses.mean(), probes.icl_score(token_losses.mean(0), late, early)]))
        due = cadence.at(step)
        if due.scores:
            logits, cache = lens.run_with_cache(probe, names_filter=only_patterns)
            patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(n_layers)]
            heads = Heads(None, probe, measurements.score_weights, logits, patterns)
            pending.extend(v.reshape(-1) for v in measurements.probe_scores(heads).values())
        if due.evaluate:
            pending.extend(v.reshape(-1) for v in measurements.eval_values(probes.per_token_loss(lens(eval_tokens), eval_tokens)).values())
        if step % flush_every == 0:
            torch.cat([x.float() for x in pending]).cpu()  # one host transfer, as the sink does
            pending.clear()

    train_loop(torch.compile(lens) if cfg.compile else lens, cfg, device, clock, after_step=measure)
    return {"lens_vs_ours_max_logit_diff": logit_diff}


def run_variant(args) -> None:
    """Child process: train one variant, write its numbers to `args.result`."""
    cfg = compose_config(args, args.child)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = StepClock(args.warmup, args.steps, cuda)
    variant_start = time.time()
    run = {"a": run_plain, "b": run_harness, "c": run_harness, "d": run_lens, "e": run_harness}[args.child]
    extra = run(cfg, device, clock)
    assert clock.n == args.steps, f"{clock.n} steps timed, expected {args.steps}"
    tokens_per_step = cfg.data.batch_size * cfg.model.n_ctx
    tokens_per_s, tokens_per_cpu_s = clock.throughput(tokens_per_step)
    result = {
        "tokens_per_s": tokens_per_s,
        "tokens_per_cpu_s": tokens_per_cpu_s,
        "torch_threads": torch.get_num_threads(),
        "tokens_per_step": tokens_per_step,
        "timed_steps": args.steps - args.warmup,
        "first_step_s_from_process_start": clock.marks["first"][0] - args.t0,
        "first_step_s_from_variant_start": clock.marks["first"][0] - variant_start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "load_average_1min_at_end": os.getloadavg()[0],
        **extra,
    }
    Path(args.result).write_text(json.dumps(result))


def measure_in_subprocess(variant: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        cmd = [sys.executable, __file__, "--child", variant, "--result", result.name, "--t0", str(time.time()),
               *(f"--{k}={getattr(args, k)}" for k in ("steps", "warmup", "device")),
               *([f"--precision={args.precision}"] if args.precision else []),
               *(["--compile"] if args.compile else []), f"--threads={args.threads}",
               *args.overrides]
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "WANDB_SILENT": "true"}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"variant {variant} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-4000:]}")
        return json.loads(Path(result.name).read_text())


def machine_info(device: str) -> dict:
    from importlib.metadata import version

    info = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "lightning": version("lightning"),
            "load_average_at_start": os.getloadavg()}
    try:
        info["transformer_lens"] = version("transformer-lens")
    except Exception:  # not installed: variant d fails and says so
        info["transformer_lens"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def best_of(runs: list[dict]) -> dict:
    """Each number at its best over the repeats: highest throughput, lowest time and memory."""
    pick = {"tokens_per_s": max, "tokens_per_cpu_s": max, "first_step_s_from_process_start": min,
            "first_step_s_from_variant_start": min, "peak_rss_mib": min, "cuda_max_allocated_mib": min}
    return {key: choose([r[key] for r in runs]) if runs[0][key] is not None else None for key, choose in pick.items()}


def ratios(best: dict, key: str) -> dict:
    out = {}
    for name, target in TARGETS.items():
        num, den = name.split("/")
        if best.get(num, {}).get(key) and best.get(den, {}).get(key):
            value = best[num][key] / best[den][key]
            out[name] = {"value": round(value, 3), "target": target, "met": None if target is None else value >= target}
    return out


def paired_ratios(runs: dict) -> dict:
    """Each ratio within each round (its variants ran minutes apart), and the median over rounds: the
    machine's speed drifts between rounds by more than the differences measured here."""
    out = {}
    for name, target in TARGETS.items():
        num, den = name.split("/")
        if runs.get(num) and runs.get(den):
            per_round = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[num], runs[den])]
            value = statistics.median(per_round)
            out[name] = {"value": round(value, 3), "per_round": [round(r, 3) for r in per_round],
                         "target": target, "met": None if target is None else value >= target}
    return out


def print_table(best: dict, runs: dict, rat: dict, rat_cpu: dict, paired: dict) -> None:
    gpu = any(r["cuda_max_allocated_mib"] is not None for r in best.values())
    print(f"\n{'variant':<40} {'tokens/s':>9} {'all runs':>15} {'tok/CPU-s':>10} {'1st step s':>12} {'peak MiB':>9}"
          + (f" {'GPU MiB':>8}" if gpu else ""))
    for v, r in best.items():
        all_runs = "/".join(f"{x['tokens_per_s']:.0f}" for x in runs[v])
        print(f"{v} {VARIANTS[v]:<38} {r['tokens_per_s']:>9.0f} {all_runs:>15} {r['tokens_per_cpu_s']:>10.0f} "
              f"{r['first_step_s_from_process_start']:>5.1f} /{r['first_step_s_from_variant_start']:>5.1f} "
              f"{r['peak_rss_mib']:>9.0f}" + (f" {r['cuda_max_allocated_mib']:>8.0f}" if gpu else ""))
    print("tokens/s: wall time over steps warm-up..end, best of the repeats; tok/CPU-s: the same over the\n"
          "CPU time of the process and its data loader workers (robust to other jobs when threads=1).\n"
          "1st step s: from process start / from variant start to the end of the first optimizer step.\n"
          "peak MiB: peak RSS of the variant's process; GPU MiB: its peak GPU memory allocated by torch.\n")
    print(f"{'ratio':<6} {'tokens/s':>9} {'tok/CPU-s':>10} {'per round: median':>18} {'rounds':>20}   target")
    word = {True: "met", False: "MISSED", None: "-"}
    for name, r in rat.items():  # the same runs give all three, so each ratio has all three
        c, p = rat_cpu[name], paired[name]
        rounds = "/".join(f"{x:.2f}" for x in p["per_round"])
        verdict = (f">= {r['target']:<5} {word[r['met']]} (best), {word[p['met']]} (per round)"
                   if r["target"] is not None else "(no target)")
        print(f"{name:<6} {r['value']:>9.3f} {c['value']:>10.3f} {p['value']:>18.3f} {rounds:>20}   {verdict}")
    print("tokens/s and tok/CPU-s: ratios of the best rounds; per round: the ratio within each round, and\n"
          "its median over the rounds.")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800, help="training steps per variant")
    ap.add_argument("--warmup", type=int, default=100,
                    help="first steps left out of tokens/s: LR warm-up, first-step set-up, the step-0 metrics "
                         "flush and the early log-spaced evaluations are not steady-state throughput")
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds of a-b-c-d-e: the best round of each variant, and each ratio within each round")
    ap.add_argument("--variants", default="abcde")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default=None, help="e.g. bf16-mixed (default: the config's)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per variant; 0: torch's default. "
                    "1 keeps CPU timings stable when other jobs share the cores")
    ap.add_argument("--out", default="bench/bench.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.batch_size=64")
    args = ap.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        ap.error(f"--warmup={args.warmup} must be at least 1 and below --steps={args.steps}")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        return run_variant(args)
    info, started = machine_info(args.device), time.time()
    cfg = compose_config(args)
    runs: dict[str, list] = {v: [] for v in args.variants}
    for round_ in range(args.repeats):
        for v in args.variants:
            runs[v].append(measure_in_subprocess(v, args))
            print(f"round {round_ + 1}/{args.repeats} {v} {VARIANTS[v]}: "
                  f"{runs[v][-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    best = {v: best_of(r) for v, r in runs.items()}
    rat, rat_cpu, paired = ratios(best, "tokens_per_s"), ratios(best, "tokens_per_cpu_s"), paired_ratios(runs)
    print_table(best, runs, rat, rat_cpu, paired)
    info["load_average_at_end"] = os.getloadavg()
    report = {"machine": info, "args": {k: v for k, v in vars(args).items() if k not in ("child", "result", "t0")},
              "variants": VARIANTS, "default_overrides": DEFAULT_OVERRIDES, "variant_overrides": VARIANT_OVERRIDES,
              "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "runs": runs, "best": best,
              "ratios": rat, "ratios_cpu_time": rat_cpu, "ratios_per_round": paired, "wall_s": time.time() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
