"""Per-head scores `[layer, head]` of a model on the fixed probe batch, in one registry.

A score is a function of `Heads` (one forward pass's patterns, logits and what the scores share,
each computed on first use) registered with `@head_score(name)`; `costly=True` scores run only at the
circuits cadence and at checkpoints. A new score is one function, its registration and its test: the
callback measures it, the `heads` table gets its column, W&B gets `name/L{layer}H{head}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
from torch import Tensor

from . import probes
from .model import AttentionOnlyTransformer, HeadEdit


@dataclass(frozen=True)
class HeadScore:
    fn: Callable[["Heads"], Tensor]
    costly: bool


HEAD_SCORES: dict[str, HeadScore] = {}


def head_score(name: str, costly: bool = False):
    def register(fn: Callable[["Heads"], Tensor]) -> Callable[["Heads"], Tensor]:
        HEAD_SCORES[name] = HeadScore(fn, costly)
        return fn
    return register


def names(costly: bool) -> list[str]:
    return [name for name, score in HEAD_SCORES.items() if score.costly == costly]


class Heads:
    """One model on one probe batch. `logits` and `patterns` may come from elsewhere (a TransformerLens
    cache, in the benchmark); `score_weights [2, batch, q, k]`, the previous-token and prefix-matching
    weights of the batch, are computed once by a caller that measures the same batch at every step."""

    def __init__(self, model: AttentionOnlyTransformer | None, tokens: Tensor, score_weights: Tensor | None = None,
                 logits: Tensor | None = None, patterns: list[Tensor] | None = None,
                 edits: dict[int, HeadEdit] | None = None):
        self.model, self.tokens, self.edits = model, tokens, edits
        self._weights, self._logits, self._patterns = score_weights, logits, patterns
        self.values: dict[str, Tensor] = {}

    def score(self, name: str) -> Tensor:
        if name not in self.values:
            self.values[name] = HEAD_SCORES[name].fn(self)
        return self.values[name]

    def _forward(self) -> None:
        self._logits, self._patterns = self.model(self.tokens, return_patterns=True, edits=self.edits)

    @property
    def logits(self) -> Tensor:
        if self._logits is None:
            self._forward()
        return self._logits

    @property
    def patterns(self) -> list[Tensor]:
        if self._patterns is None:
            self._forward()
        return self._patterns

    @cached_property
    def attention(self) -> Tensor:
        """`[2, layer, head]`: both attention scores of every head in one op."""
        weights = self._weights
        if weights is None:
            b, t = self.tokens.shape
            weights = torch.stack([probes.previous_token_weights(b, t, self.tokens.device),
                                   probes.prefix_matching_weights(self.tokens)])
        stacked = torch.stack(self.patterns, 1).flatten(1, 2)  # [batch, layer*head, q, k]
        return probes.weighted_attention(stacked, weights).view(2, len(self.patterns), -1)

    @cached_property
    def outputs(self) -> tuple[list[Tensor], list[Tensor]]:
        return head_outputs(self.model, self.tokens, self.edits)


@torch.no_grad()
def head_outputs(model: AttentionOnlyTransformer, tokens: Tensor,
                 edits: dict[int, HeadEdit] | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Every head's direct output `[batch, head, pos, d_model]` and pattern, per layer (with `edits`
    applied first)."""
    zs: list[Tensor] = []

    def keeper(edit: HeadEdit | None) -> HeadEdit:
        def keep(z: Tensor) -> Tensor:
            z = edit.z(z) if edit is not None and edit.z is not None else z
            zs.append(z)
            return z
        return HeadEdit(edit.pattern if edit else None, edit.pattern_fn if edit else None, keep)

    n = len(model.blocks)
    _, patterns = model(tokens, return_patterns=True, edits={l: keeper((edits or {}).get(l)) for l in range(n)})
    outs = [torch.einsum("bhtd,hdm->bhtm", z, block.attn.W_O) for z, block in zip(zs, model.blocks)]
    return outs, patterns


@head_score("previous_token")
def previous_token(h: Heads) -> Tensor:
    """Mean attention to the previous position (Olsson et al. 2022)."""
    return h.attention[0]


@head_score("prefix_matching")
def prefix_matching(h: Heads) -> Tensor:
    """Mean attention to the token after an earlier occurrence of the query's token (Olsson et al.)."""
    return h.attention[1]


@head_score("copying", costly=True)
def copying(h: Heads) -> Tensor:
    """How much a head's direct output raises the logits of the tokens it attends to (Olsson et al.)."""
    model = h.model
    ln_w = model.ln_final.weight if isinstance(model.ln_final, torch.nn.LayerNorm) else None
    unembed = probes.direct_unembed(model.W_U, ln_w)
    outs, patterns = h.outputs
    return torch.stack([probes.copying_score(o, p, h.tokens, unembed) for o, p in zip(outs, patterns)])


@head_score("ov_copying", costly=True)
def ov_copying(h: Heads) -> Tensor:
    """Positivity of the eigenvalues of W_E W_V W_O W_U (Elhage et al. 2021)."""
    m = h.model
    return torch.stack([probes.ov_copying_score(m.W_E, b.attn.W_V, b.attn.W_O, m.W_U) for b in m.blocks])


@head_score("induction_qk", costly=True)
def induction_qk(h: Heads) -> Tensor:
    """QK eigenvalue positivity with keys read through the strongest previous-token head of any earlier
    layer (Elhage et al. 2021); NaN in layer 0."""
    m, prev = h.model, h.score("previous_token")
    attn = [b.attn for b in m.blocks]
    qk = torch.full(prev.shape, float("nan"), device=prev.device)
    for layer in range(1, len(attn)):
        earlier = prev[:layer]
        src_layer, src_head = divmod(int(earlier.flatten().argmax()), earlier.shape[1])
        src = attn[src_layer]
        qk[layer] = probes.induction_qk_score(m.W_E, attn[layer].W_Q, attn[layer].W_K,
                                              src.W_V[src_head], src.W_O[src_head])
    return qk


@torch.no_grad()
def costly_head_scores(model: AttentionOnlyTransformer, tokens: Tensor, previous_token: Tensor) -> dict[str, Tensor]:
    """Every costly score of `model` on `tokens`, given the step's `previous_token [layer, head]`."""
    h = Heads(model, tokens)
    h.values["previous_token"] = previous_token
    return {name: h.score(name) for name in names(costly=True)}
