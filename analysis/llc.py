"""The local learning coefficient (LLC) at checkpoints, estimated with devinterp's SGLD sampler, and
the stages its curve marks (Lau et al. 2023; Hoogland et al. 2024, "The developmental landscape of
in-context learning").

At each checkpoint devinterp runs `chains` SGLD chains localized at the checkpoint's weights on
`n_sequences` sequences of the run's own training distribution (a stream of its own, drawn from the
run's seed; each chain its own batch order, so the spread over chains includes the data's), and
estimates LLC = n_beta * (mean sampled loss - loss at the checkpoint). Its loss
traces are kept: a trace that is flat after the first draws is a chain that has reached its
equilibrium; one that keeps rising means the settings are too hot for the estimate to mean much.
"""

from __future__ import annotations

import functools
import gc
import math
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from train.data.synthetic import batch_rng

from .runs import AnalysisError, Run


@dataclass(frozen=True)
class LLCSettings:
    """The sampler's settings (defaults calibrated on the quickstart: docs/llc.md)."""

    lr: float = 1e-3  # SGLD step size (epsilon)
    nbeta: float = 100.0  # inverse temperature n * beta
    localization: float = 1000.0  # gamma: the pull towards the checkpoint's weights
    chains: int = 4
    draws: int = 100
    burnin: int = 0  # SGLD steps before the first draw (devinterp averages them in too)
    batch_size: int = 16
    n_sequences: int = 1024  # sequences of the training distribution the chains sample from
    seed: int = 0  # the chains' noise and batch order
    params: str = ""  # a regular expression: sample only the parameters whose names match (others held)

    def checked(self) -> "LLCSettings":
        for key in ("lr", "nbeta"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise AnalysisError(f"--{key}={value}: must be a positive number")
        if not (math.isfinite(self.localization) and self.localization >= 0):
            raise AnalysisError(f"--localization={self.localization}: must be 0 or more")
        for key in ("chains", "draws", "batch_size"):
            if getattr(self, key) < 1:
                raise AnalysisError(f"--{key.replace('_', '-')}={getattr(self, key)}: must be at least 1")
        if self.burnin < 0:
            raise AnalysisError(f"--burnin={self.burnin}: must be 0 or more")
        if self.params:
            try:
                re.compile(self.params)
            except re.error as e:
                raise AnalysisError(f"--params={self.params}: not a regular expression ({e})") from None
        if self.n_sequences < self.batch_size:
            raise AnalysisError(f"--n-sequences={self.n_sequences}: must be at least --batch-size={self.batch_size}")
        return self


def sequences(run: Run, n: int) -> np.ndarray:
    """`n` sequences of the run's training distribution, from a stream of their own (not the batches
    it trained on, nor its evaluation set)."""
    return np.asarray(run.generator(batch_rng(int(run.cfg.seed), 0, "llc"), n), dtype=np.int64)


def estimate(model: torch.nn.Module, tokens: np.ndarray, s: LLCSettings, what: str = "model") -> dict:
    """devinterp's LLC of `model` on `tokens` `[n, n_ctx]`: mean and spread over chains, each chain's
    estimate, the loss at the weights, and the loss traces `[chain, step]`. A chain that diverges (a
    non-finite loss) is an AnalysisError naming `what`."""
    from datasets import Dataset
    from devinterp.slt import sampler
    from devinterp.slt.llc import llc
    from tqdm.auto import trange

    masks = None
    if s.params:
        names = [n for n, _ in model.named_parameters()]
        masks = {n: None for n in names if re.search(s.params, n)}
        if not masks:
            raise AnalysisError(f"--params={s.params}: matches no parameter (they are {', '.join(names)})")
    data = Dataset.from_dict({"input_ids": tokens}).with_format("torch")
    # devinterp runs gc.collect() around every chain; with torch, datasets and the analysis loaded that
    # scans a million objects (a quarter of the quickstart's sampling time). Frozen, they are skipped.
    gc.freeze()
    # devinterp draws a progress bar per chain; the command prints a line per checkpoint instead.
    quiet = mock.patch.object(sampler, "trange", functools.partial(trange, disable=True))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught, quiet:
        warnings.simplefilter("always")
        result = llc(model, data, {}, param_masks=masks, match_sampling_input_ids_across_chains=False, lr=s.lr, n_beta=s.nbeta, localization=s.localization, num_chains=s.chains,
                     num_draws=s.draws, num_burnin_steps=s.burnin, batch_size=s.batch_size, init_seed=s.seed,
                     device=str(next(model.parameters()).device), output_path=Path(tmp) / "samples.zarr")
        per_chain = np.asarray(result.llc_per_chain.values, dtype=np.float64)
        traces = np.asarray(result.loss_trace.values, dtype=np.float64)
        init_loss = float(result.init_loss)
    failed = [str(w.message) for w in caught if "Chain failed" in str(w.message)]
    if failed or not (np.isfinite(traces).all() and np.isfinite(per_chain).all()):
        raise AnalysisError(f"{what}: the SGLD chains diverged (non-finite loss); lower --lr or raise "
                            f"--localization (now --lr={s.lr}, --localization={s.localization})")
    return {"llc_mean": float(per_chain.mean()), "llc_std": float(per_chain.std(ddof=1)) if len(per_chain) > 1 else 0.0,
            "llc_per_chain": per_chain.tolist(), "init_loss": init_loss, "traces": traces}


def llc_over_checkpoints(run: Run, entries: list[dict], s: LLCSettings, progress=None) -> tuple[list[dict], list[dict]]:
    """Rows `(step, tokens, dense, llc_mean, llc_std, llc_per_chain, init_loss, trace_rise)` per checkpoint,
    and the traces as rows `(step, chain, sgld_step, loss)`. `trace_rise`: the mean loss of the last
    quarter of the draws minus that of the second quarter, over chains (about 0 when the chains are in
    equilibrium)."""
    tokens = sequences(run, s.n_sequences)
    rows, traces = [], []
    for entry in entries:
        r = estimate(run.model(entry), tokens, s, what=f"{run.file('index')}: step {entry['step']}")
        t = r.pop("traces")
        q = max(1, t.shape[1] // 4)
        rows.append({"step": entry["step"], "tokens": entry["tokens"], "dense": bool(entry.get("dense", False)),
                     **r, "trace_rise": float(t[:, -q:].mean() - t[:, q:2 * q].mean())})
        traces += [{"step": entry["step"], "chain": c, "sgld_step": i, "loss": float(v)}
                   for c in range(t.shape[0]) for i, v in enumerate(t[c])]
        if progress is not None:
            progress(rows[-1])
    return rows, traces


def stages(rows: list[dict], rel_tol: float = 0.05) -> list[dict]:
    """The LLC curve's critical points over checkpoints (step 0 left out: at initialization the weights
    are no local minimum and the estimate is meaningless): each local peak or trough, and the stretches
    between them as `rise`, `drop` or `plateau` (a change under `rel_tol` of the curve's range or twice
    the estimate's typical spread over chains, whichever is larger)."""
    pts = sorted((r["step"], r["tokens"], r["llc_mean"], r.get("llc_std", 0.0)) for r in rows if r["step"] > 0)
    if len(pts) < 3:
        return []
    steps, tokens, y, sd = (np.array(c, dtype=np.float64) for c in zip(*pts))
    tol = max(rel_tol * (y.max() - y.min()), 2 * float(np.median(sd)))  # moves inside the chains' spread are noise
    # Zigzag: the turning points once moves of at most tol are ignored.
    turns, trend, extreme = [0], 0, 0
    for i in range(1, len(y)):
        if trend == 0:
            if abs(y[i] - y[0]) > tol:
                trend, extreme = (1 if y[i] > y[0] else -1), i
        elif trend * (y[i] - y[extreme]) >= 0:
            extreme = i
        elif abs(y[i] - y[extreme]) > tol:
            turns.append(extreme)
            trend, extreme = -trend, i
    for i in (extreme, len(y) - 1):
        if i > turns[-1]:
            turns.append(i)
    out = []
    for a, b in zip(turns, turns[1:]):
        change = y[b] - y[a]
        kind = "plateau" if abs(change) <= tol else ("rise" if change > 0 else "drop")
        out.append({"kind": kind, "from_step": int(steps[a]), "to_step": int(steps[b]),
                    "from_tokens": int(tokens[a]), "to_tokens": int(tokens[b]),
                    "llc_from": float(y[a]), "llc_to": float(y[b])})
    return out


def markdown(rows: list[dict], stage_list: list[dict], window: dict | None, s: LLCSettings) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in asdict(s).items())
    lines = [f"# LLC over checkpoints\n\ndevinterp SGLD: {settings}\n",
             "| step | tokens | LLC (mean +- sd over chains) | loss at the weights | trace rise |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']}{' (dense)' if r['dense'] else ''} | {r['tokens']} | {r['llc_mean']:.1f} +- "
                     f"{r['llc_std']:.1f} | {r['init_loss']:.3f} | {r['trace_rise']:+.3f} |")
    lines.append("")
    if window:
        lines.append(f"ICL phase change (summary.json): steps {window['onset_step']}-{window['end_step']}, peak "
                     f"{window['peak_step']}\n")
    else:
        lines.append("ICL phase change (summary.json): none found\n")
    lines.append("Stages of the LLC curve:\n")
    for st in stage_list:
        lines.append(f"- {st['kind']}: steps {st['from_step']}-{st['to_step']}, LLC {st['llc_from']:.1f} -> "
                     f"{st['llc_to']:.1f}{overlap_note(st, window)}")
    for a, b in zip(stage_list, stage_list[1:]):
        if {a["kind"], b["kind"]} == {"rise", "drop"}:
            kind, step = ("peak" if a["kind"] == "rise" else "trough"), a["to_step"]
            inside = window and window["onset_step"] <= step <= window["end_step"]
            lines.append(f"- {kind} at step {step} (LLC {a['llc_to']:.1f}): "
                         f"{'inside' if inside else 'outside'} the ICL window")
    return "\n".join(lines) + "\n"


def overlap_note(stage: dict, window: dict | None) -> str:
    if not window or stage["to_step"] < window["onset_step"] or stage["from_step"] > window["end_step"]:
        return ""
    return " (overlaps the ICL window)"
