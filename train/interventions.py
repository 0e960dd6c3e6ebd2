"""Interventions during training (Singh et al. 2024's "artificial optogenetics"): chosen heads ablated,
their attention clamped, or their weights frozen, from one step to another.

    intervene=[{heads: [L0H0], kind: zero, from_step: 0, to_step: 400}]

Kinds, each on the heads named (`L0H1`, or `L0` for every head of layer 0) at training steps
`from_step <= step < to_step` (`to_step: null`: to the end):

- `zero`: the head's output is zero (its mixed values `z`, before `W_O`; the fused attention path).
- `mean`: its output is its mean over the batch, per position (the sequence's own information is gone).
- `previous_token`: its attention pattern is exactly the previous token (position 0: itself).
- `uniform`: its attention pattern is uniform over the keys it may see.
- `frozen_pattern`: its attention pattern is its own batch-mean pattern at the interval's first step.
- `freeze`: its weights (`W_Q`, `W_K`, `W_V`, `W_O` and biases, its slice of each) do not change.

The forward-pass kinds apply to the training batch and to every measurement of the interval (probes,
evaluation set), so the scores logged then describe the intervened model; the `train` table's
`intervened` column counts the interventions active at each step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from omegaconf import MISSING
from torch import Tensor

from .errors import ConfigError
from .model import AttentionOnlyTransformer, HeadEdit

FORWARD_KINDS = ("zero", "mean", "previous_token", "uniform", "frozen_pattern")
KINDS = (*FORWARD_KINDS, "freeze")
PATTERN_KINDS = ("previous_token", "uniform", "frozen_pattern")
HEAD_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")  # indexed by head first
END = 1 << 62  # `to_step: null`: never stops, whatever trainer.max_steps a resumed run sets


@dataclass
class InterventionConfig:
    heads: list[str] = MISSING  # L<layer>H<head>, or L<layer> for all heads of a layer
    kind: str = MISSING  # zero | mean | previous_token | uniform | frozen_pattern | freeze
    from_step: int = 0
    to_step: Optional[int] = None  # exclusive; null: to the end of the run


@dataclass
class Intervention:
    kind: str
    heads: list[tuple[int, int]]
    start: int
    stop: int  # exclusive; END: to the end of the run (and its last measurement)
    state: dict[str, Tensor] = field(default_factory=dict)  # frozen pattern or frozen weights, once taken

    def active(self, step: int) -> bool:
        return self.start <= step < self.stop


def parse_heads(names: list[str], key: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    heads: list[tuple[int, int]] = []
    for name in names:
        m = re.fullmatch(r"L(\d+)(?:H(\d+))?", str(name))
        if m is None:
            raise ConfigError(f"{key}={name}: expected L<layer>H<head> (like L0H1) or L<layer>")
        layer = int(m.group(1))
        head_ids = [int(m.group(2))] if m.group(2) is not None else list(range(n_heads))
        if layer >= n_layers or any(h >= n_heads for h in head_ids):
            raise ConfigError(f"{key}={name}: the model has {n_layers} layers of {n_heads} heads")
        heads += [(layer, h) for h in head_ids if (layer, h) not in heads]
    if not heads:
        raise ConfigError(f"{key}=[]: name at least one head")
    return heads


def parse(specs: Any, n_layers: int, n_heads: int, max_steps: int) -> list[Intervention]:
    """The `intervene` list, checked: one-line errors naming `intervene[i].<key>`."""
    out: list[Intervention] = []
    for i, spec in enumerate(specs or []):
        key = f"intervene[{i}]"
        if spec.kind not in KINDS:
            raise ConfigError(f"{key}.kind={spec.kind}: expected one of {', '.join(KINDS)}")
        heads = parse_heads(list(spec.heads), f"{key}.heads", n_layers, n_heads)
        stop = END if spec.to_step is None else spec.to_step
        if not 0 <= spec.from_step < max_steps:
            raise ConfigError(f"{key}.from_step={spec.from_step}: must be in [0, trainer.max_steps={max_steps})")
        if stop != END and not spec.from_step < stop <= max_steps:
            raise ConfigError(f"{key}.to_step={spec.to_step}: must be after from_step={spec.from_step} and at most "
                              f"trainer.max_steps={max_steps}")
        out.append(Intervention(spec.kind, heads, spec.from_step, stop))
    for i, a in enumerate(out):  # two forward-pass kinds on one head at once: which one holds is unclear
        for j, b in enumerate(out[:i]):
            shared = set(a.heads) & set(b.heads)
            overlap = a.start < b.stop and b.start < a.stop
            if shared and overlap and a.kind in FORWARD_KINDS and b.kind in FORWARD_KINDS:
                layer, head = min(shared)
                end = min(a.stop, b.stop)
                raise ConfigError(f"intervene[{i}].kind={a.kind}: head L{layer}H{head} already has {b.kind} "
                                  f"(intervene[{j}]) from step {max(a.start, b.start)}"
                                  + (f" to {end}" if end != END else ""))
    return out


def previous_token_pattern(t: int, device: torch.device) -> Tensor:
    """`[t, t]`: query i attends to i - 1; query 0 to itself."""
    p = torch.zeros(t, t, device=device)
    p[0, 0] = 1.0
    p[torch.arange(1, t), torch.arange(t - 1)] = 1.0
    return p


def uniform_pattern(t: int, device: torch.device) -> Tensor:
    """`[t, t]`: query i attends equally to keys 0..i."""
    p = torch.ones(t, t, device=device).tril()
    return p / p.sum(dim=-1, keepdim=True)


class Interventions:
    """The run's interventions: head edits for a step's forward passes, and frozen weights."""

    def __init__(self, items: list[Intervention]):
        self.items = items

    def __bool__(self) -> bool:
        return bool(self.items)

    def active(self, step: int) -> list[Intervention]:
        return [iv for iv in self.items if iv.active(step)]

    def edits(self, step: int, record: bool = False) -> dict[int, HeadEdit] | None:
        """The head edits of `step`'s forward passes (None when there are none). A `frozen_pattern`
        intervention takes its pattern from the first training batch of its interval (`record`);
        before that, a measurement sees the head's own pattern."""
        by_layer: dict[int, list[tuple[Intervention, int]]] = {}
        for iv in self.active(step):
            if iv.kind in FORWARD_KINDS:
                for layer, head in iv.heads:
                    by_layer.setdefault(layer, []).append((iv, head))
        if not by_layer:
            return None
        return {layer: self._layer_edit(layer, items, record) for layer, items in by_layer.items()}

    def _layer_edit(self, layer: int, items: list[tuple[Intervention, int]], record: bool) -> HeadEdit:
        zs = [(iv.kind, head) for iv, head in items if iv.kind in ("zero", "mean")]
        pats = [(iv, head) for iv, head in items if iv.kind in PATTERN_KINDS]

        def z_fn(z: Tensor) -> Tensor:  # [batch, head, pos, d_head]
            keep = torch.ones(z.shape[1], device=z.device, dtype=z.dtype)
            mean_heads = [h for kind, h in zs if kind == "mean"]
            for _, h in zs:
                keep[h] = 0.0
            out = z * keep[None, :, None, None]
            if mean_heads:
                means = torch.zeros_like(z)
                means[:, mean_heads] = z[:, mean_heads].mean(dim=0, keepdim=True).expand_as(z[:, mean_heads])
                out = out + means
            return out

        def pattern_fn(pattern: Tensor) -> Tensor:  # [batch, head, query, key]
            t = pattern.shape[-1]
            clamp = pattern.new_zeros((pattern.shape[1], t, t))
            use = torch.zeros(pattern.shape[1], device=pattern.device, dtype=pattern.dtype)
            for iv, h in pats:
                clamp[h] = self._clamp(iv, layer, h, t, pattern, record)
                use[h] = 1.0
            use = use[None, :, None, None]
            return pattern * (1 - use) + clamp[None] * use

        return HeadEdit(z=z_fn if zs else None, pattern_fn=pattern_fn if pats else None)

    def _clamp(self, iv: Intervention, layer: int, head: int, t: int, pattern: Tensor, record: bool) -> Tensor:
        if iv.kind == "previous_token":
            return previous_token_pattern(t, pattern.device)
        if iv.kind == "uniform":
            return uniform_pattern(t, pattern.device)
        key = f"pattern.L{layer}H{head}"
        if key not in iv.state:
            if not record:
                return pattern[:, head].mean(dim=0)
            # The interval's first training batch: this head's own pattern, averaged over the batch.
            iv.state[key] = pattern[:, head].detach().mean(dim=0).clone()
        return iv.state[key][:t, :t].to(pattern.dtype)  # causal rows: the first t keys are the whole row

    # --- freezing --------------------------------------------------------------------------------
    def frozen(self, step: int) -> list[tuple[Intervention, int, int]]:
        return [(iv, layer, head) for iv in self.active(step) if iv.kind == "freeze" for layer, head in iv.heads]

    def zero_frozen_grads(self, model: AttentionOnlyTransformer, step: int) -> None:
        """Before clipping: a frozen head's gradient is zero, so it does not count in the norm."""
        for _, layer, head in self.frozen(step):
            attn = model.blocks[layer].attn
            for name in HEAD_WEIGHTS:
                grad = getattr(attn, name).grad
                if grad is not None:
                    grad[head] = 0.0

    @torch.no_grad()
    def hold_frozen(self, model: AttentionOnlyTransformer, step: int, before_update: bool) -> None:
        """Take the frozen heads' weights before the first update of the interval, and put them back
        after every update (weight decay and Adam's momentum would move them otherwise)."""
        for iv, layer, head in self.frozen(step):
            attn = model.blocks[layer].attn
            for name in HEAD_WEIGHTS:
                key = f"{name}.L{layer}H{head}"
                weight = getattr(attn, name)
                if before_update:
                    iv.state.setdefault(key, weight[head].detach().clone())
                else:
                    weight[head] = iv.state[key]

    # --- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> list[dict[str, Tensor]]:
        return [dict(iv.state) for iv in self.items]

    def load_state_dict(self, states: list[dict[str, Tensor]]) -> None:
        for iv, state in zip(self.items, states):
            iv.state = dict(state)

    def describe(self) -> list[dict]:
        return [{"kind": iv.kind, "heads": [f"L{layer}H{head}" for layer, head in iv.heads], "from_step": iv.start,
                 "to_step": None if iv.stop == END else iv.stop} for iv in self.items]
