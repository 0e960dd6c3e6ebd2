"""What an ablation does to the quantities Olsson et al. (2022) measure: mean loss, per-token losses and
the ICL score on the fixed evaluation set, and the induction loss on the probe batch. Each score is
the one defined in `train.probes`; this module only runs the (ablated) model.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from train import probes
from train.model import AttentionOnlyTransformer

from .head_ablation import Head, ablate, mean_z
from .runs import Run


@torch.no_grad()
def token_losses(model: AttentionOnlyTransformer, tokens: Tensor, heads: Iterable[Head] = (), method: str = "zero",
                 means: Sequence[Tensor] | None = None) -> Tensor:
    """Per-token losses `[batch, pos - 1]` with `heads` ablated (none: the clean model)."""
    heads = list(heads)
    if not heads:
        return probes.eval_losses(model, tokens)
    # In chunks, as the live evaluation: a large set and vocabulary never hold all their logits at once.
    return probes.chunked_losses(lambda chunk: ablate(model, chunk, heads, method, means), tokens,
                                 model.config.d_vocab)


class Evaluator:
    """Scores one checkpoint's model, clean or with heads ablated, on a run's fixed token sets."""

    def __init__(self, run: Run, model: AttentionOnlyTransformer, method: str = "zero"):
        self.run, self.model, self.method = run, model, method
        self.late, self.early = run.icl_positions
        # Mean ablation: z averaged over the run's reference set, per position (see analysis.head_ablation).
        self.means = mean_z(model, run.reference_tokens) if method == "mean" else None

    def __call__(self, heads: Iterable[Head] = ()) -> dict:
        """`{"loss", "icl_score", "induction_loss", "token_losses" [eval, pos - 1]}` with `heads` ablated."""
        heads = list(heads)
        losses = token_losses(self.model, self.run.eval_tokens, heads, self.method, self.means)
        probe = token_losses(self.model, self.run.probe_tokens, heads, self.method, self.means)
        return {
            "loss": float(losses.mean()),
            "icl_score": float(probes.icl_score(losses, self.late, self.early)),
            "induction_loss": float(probes.induction_loss(probe, self.run.cfg.probes.rep_len)),
            "token_losses": losses,
        }


def before_after_vector(run: Run) -> tuple[Tensor | None, dict]:
    """Olsson et al. (2022)'s before-and-after vector: the evaluation set's per-token losses at the
    checkpoint nearest the phase change's end minus at the one nearest its onset, flattened and scaled
    to unit length. Returns (vector or None, info with the steps used, the norm, or why it is None)."""
    pc = (run.summary or {}).get("phase_change")
    if not pc:
        why = "no summary.json" if run.summary is None else "summary.json reports no phase change"
        return None, {"reason": why}
    onset, end = run.nearest_checkpoint(pc["onset_step"]), run.nearest_checkpoint(pc["end_step"])
    if onset["step"] == end["step"]:
        return None, {"reason": f"onset and end share the checkpoint at step {onset['step']}"}

    def losses(entry: dict) -> Tensor:
        stored = run.stored_token_losses(entry["step"])
        return stored if stored is not None else token_losses(run.model(entry), run.eval_tokens)

    diff = (losses(end) - losses(onset)).flatten()
    norm = float(diff.norm())
    if norm == 0:
        return None, {"reason": "per-token losses are identical at onset and end"}
    return diff / norm, {"onset_step": onset["step"], "end_step": end["step"], "norm": norm}
