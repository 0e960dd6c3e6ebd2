"""The short human summary printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def _tokens(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def print_report(summary: dict, run_dir: Path, cfg: DictConfig) -> None:
    if not summary:
        return
    lines = [f"\nRun {summary['status']}: {summary['steps']} steps, {_tokens(summary['tokens'])} tokens"]
    pc = summary.get("phase_change")
    if pc:
        lines.append(
            f"  phase change: steps {pc['onset_step']}-{pc['end_step']} (peak {pc['peak_step']}), "
            f"tokens {_tokens(pc['onset_tokens'])}-{_tokens(pc['end_tokens'])}, "
            f"ICL score {pc['icl_at_onset']:+.2f} -> {pc['icl_at_end']:+.2f} nats"
        )
    else:
        lines.append("  phase change: none detected")
    ind = summary.get("induction_heads", [])
    lines.append("  induction heads: " + (", ".join(
        f"L{h['layer']}H{h['head']} (prefix matching {h['prefix_matching']:.2f})" for h in ind) or "none"))
    prev = summary.get("previous_token_heads", [])
    lines.append("  previous-token heads: " + (", ".join(
        f"L{h['layer']}H{h['head']} ({h['previous_token']:.2f})" for h in prev) or "none"))
    final = summary.get("final", {})
    if final.get("icl_score") is not None:
        lines.append(f"  final ICL score {final['icl_score']:+.3f} nats, eval loss {final['loss']:.3f}")
    lines.append(f"  run directory: {run_dir}")
    w = cfg.logger.wandb
    if w.enabled and w.mode == "offline":
        lines.append(f"  W&B: wandb sync {run_dir}/wandb/offline-run-*   (uploads the offline run)")
    elif w.enabled and w.mode == "online":
        lines.append(f"  W&B: project {w.project}, run {run_dir.name}")
    print("\n".join(lines))
