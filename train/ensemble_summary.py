"""What an ensemble did, across its members: `summary.json`, the metric tables with `member` and `seed`
columns, and the end-of-run report (`train/ensemble.py` trains the members)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .rundir import CONFIG, SUMMARY, read_json, read_table, table_path, write_json, write_parquet

MEMBERS = "members"
TABLES = ("train", "heads", "eval")  # concatenated at the ensemble's top; per-token losses stay per member
# Per-member numbers whose spread across seeds summary.json reports.
SPREAD = ("onset_step", "peak_step", "end_step", "onset_tokens", "end_tokens", "icl_drop", "final_icl_score",
          "final_loss", "best_prefix_matching", "best_previous_token", "n_induction_heads", "wall_time_s")


def member_dir(run_dir: str | Path, k: int) -> Path:
    return Path(run_dir) / MEMBERS / str(k)


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / MEMBERS).is_dir() and (Path(path) / CONFIG).exists()


def member_numbers(summary: dict) -> dict[str, Any]:
    """The numbers of one member's summary.json that the spread is taken over (None where absent)."""
    pc = summary.get("phase_change") or {}
    final = summary.get("final") or {}
    heads = summary.get("heads") or []
    later = [h["prefix_matching"] for h in heads if h["layer"] >= 1] or [h["prefix_matching"] for h in heads]
    return {**{k: pc.get(k) for k in ("onset_step", "peak_step", "end_step", "onset_tokens", "end_tokens",
                                      "icl_drop")},
            "final_icl_score": final.get("icl_score"), "final_loss": final.get("loss"),
            "best_prefix_matching": max(later, default=None),
            "best_previous_token": max((h["previous_token"] for h in heads), default=None),
            "n_induction_heads": len(summary.get("induction_heads") or []) if summary.get("heads") is not None else None,
            "wall_time_s": summary.get("wall_time_s")}


def spread(values: list) -> dict[str, Any] | None:
    """n, median, min, max and the 10-90 % range of the values that are not None (None if there are none)."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return None
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return {"n": int(v.size), "median": float(p50), "min": float(v.min()), "max": float(v.max()),
            "p10": float(p10), "p90": float(p90)}


def summarize_ensemble(run_dir: str | Path, seeds: list[int], errors: dict[int, str], wall_time_s: float,
                       execution: dict) -> dict:
    """summary.json of the ensemble: each member's own summary, and the spread of its numbers."""
    members = []
    for k, seed in enumerate(seeds):
        path = member_dir(run_dir, k) / SUMMARY
        s = read_json(path) if path.exists() else {"status": "failed"}
        if k in errors:  # the process failed: its one-line error, as a standalone run prints it
            s = {**s, "status": "failed", "error": errors[k]}
        members.append({"member": k, "seed": seed, **s})
    finished = [m for m in members if m["status"] == "finished"]
    numbers = [member_numbers(m) for m in finished]
    out: dict[str, Any] = {
        "status": "finished" if len(finished) == len(members) else "failed",
        "seeds": seeds,
        "finished": len(finished),
        "phase_changes": sum(m.get("phase_change") is not None for m in finished),
        "with_induction_head": sum(bool(m.get("induction_heads")) for m in finished),
        "spread": {key: spread([n[key] for n in numbers]) for key in SPREAD},
        "failed": [{"member": m["member"], "seed": m["seed"], "error": m.get("error")}
                   for m in members if m["status"] != "finished"],
        "wall_time_s": round(wall_time_s, 1),
        "execution": execution,
        "members": members,
    }
    write_json(Path(run_dir) / SUMMARY, out)
    return out


def concat_tables(run_dir: str | Path, seeds: list[int]) -> None:
    """metrics/{train,heads,eval}.parquet of the ensemble: every member's rows with `member` and `seed`
    first (members that wrote none are left out)."""
    for name in TABLES:
        parts = []
        for k, seed in enumerate(seeds):
            t = read_table(member_dir(run_dir, k), name)
            if t is not None and t.num_rows:
                t = t.add_column(0, "seed", pa.array([seed] * t.num_rows, pa.int64()))
                parts.append(t.add_column(0, "member", pa.array([k] * t.num_rows, pa.int64())))
        if parts:
            write_parquet(table_path(run_dir, name), pa.concat_tables(parts, promote_options="default"))


def _range(s: dict | None, fmt: str) -> str:
    if s is None:
        return "none"
    lo, hi, mid = (format(s[k], fmt) for k in ("min", "max", "median"))
    sep = " to " if s["min"] < 0 or "+" in fmt else "-"  # "-0.5 to -0.3", "+0.01 to +0.02", "300-400"
    return f"{lo}{sep}{hi} (median {mid})" if lo != hi else lo


def report(summary: dict, run_dir: Path) -> str:
    """The end-of-run lines, e.g. "phase change in 16/16 seeds, onset steps 320-410 (median 350)"."""
    n = len(summary["seeds"])
    sp = summary["spread"]
    seeds = summary["seeds"]
    ex = summary["execution"]
    how = (f"stacked x {ex['threads']} thread(s)" if ex.get("stacked")
           else f"{ex['workers']} at a time x {ex['threads'] or 'default'} thread(s)")
    lines = [f"\nEnsemble {summary['status']}: {summary['finished']}/{n} seeds ({seeds[0]}-{seeds[-1]}) finished, "
             f"{how}, {summary['wall_time_s'] / 60:.1f} min"]
    pc = summary["phase_changes"]
    lines.append(f"  phase change in {pc}/{n} seeds" + (
        f", onset steps {_range(sp['onset_step'], '.0f')}, end {_range(sp['end_step'], '.0f')}, "
        f"ICL drop {_range(sp['icl_drop'], '.2f')} nats" if pc else ""))
    lines.append(f"  induction head in {summary['with_induction_head']}/{n} seeds; best prefix matching "
                 f"{_range(sp['best_prefix_matching'], '.2f')}")
    if sp["final_icl_score"]:
        lines.append(f"  final ICL score {_range(sp['final_icl_score'], '+.3f')}, "
                     f"eval loss {_range(sp['final_loss'], '.3f')}")
    for f in summary["failed"]:
        lines.append(f"  failed: member {f['member']} (seed {f['seed']}): {f['error']}")
    lines.append(f"  run directory: {run_dir} (member K: {run_dir / MEMBERS}/K, a run directory of its own)")
    lines.append(f"  figures with bands: python -m analysis figures {run_dir}")
    return "\n".join(lines)
