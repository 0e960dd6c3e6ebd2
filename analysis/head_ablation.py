"""Head ablations, for any set of heads at once, as `train.model.HeadEdit`s: pure functions on a model
and token tensors (no run directory, no I/O).

A head's output is `z @ W_O[h]`, where `z [batch, head, pos, d_head]` is the pattern-weighted mix
of its values. Every method edits `z` before `W_O` (the layer's shared bias `b_O` is untouched):

- zero ablation: `z_h <- 0` (Olsson et al. 2022's "full ablation" of a head).
- mean ablation: `z_h <- mean of z_h over a reference set of sequences`. By default the mean is taken
  **per position** (over the batch only, `[pos, d_head]`), so position-dependent behaviour such as
  attending to BOS early in the context is kept; `per_position=False` averages over positions too
  (`[d_head]`, one vector for every position).
- pattern-preserving ablation (Olsson et al. 2022, "Model Analysis Table" ablations): record every
  layer's attention pattern on the clean run; rerun with the chosen heads' `z` zeroed and *every*
  layer's pattern frozen to the recording. Later heads then cannot change where they attend, so the
  change in logits is exactly the ablated heads' contribution along all paths that go through values
  and outputs (direct, and via later heads' OV circuits), none through queries and keys. In an
  attention-only model without LayerNorm this is linear: `tests/test_ablation.py` checks it.

Heads are `(layer, head)` pairs. `ablate(model, tokens, heads, method)` returns the ablated logits.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from train.model import AttentionOnlyTransformer, HeadEdit

Head = tuple[int, int]
METHODS = ("zero", "mean", "pattern")


def by_layer(heads: Iterable[Head], n_layers: int, n_heads: int) -> dict[int, list[int]]:
    """`{layer: [head, ...]}`; raises ValueError naming a head outside the model."""
    out: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"head {layer}.{head} is not in a model with {n_layers} layers of {n_heads} heads")
        if head not in out[layer]:
            out[layer].append(head)
    return dict(out)


def _replace_heads(heads: list[int], value: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A `HeadEdit.z` function that sets `z[:, heads]` to `value(z)` (broadcast to the slice)."""

    def edit(z: Tensor) -> Tensor:  # z [batch, head, pos, d_head]
        z = z.clone()
        z[:, heads] = value(z).expand_as(z[:, heads])
        return z

    return edit


def zero_edits(model: AttentionOnlyTransformer, heads: Iterable[Head]) -> dict[int, HeadEdit]:
    """Edits that zero the chosen heads' `z` (their whole output but the shared bias)."""
    s = model.config
    return {layer: HeadEdit(z=_replace_heads(hs, lambda z: z.new_zeros(()))) for layer, hs in
            by_layer(heads, s.n_layers, s.n_heads).items()}


@torch.no_grad()
def record_z(model: AttentionOnlyTransformer, tokens: Tensor) -> list[Tensor]:
    """Every layer's `z [batch, head, pos, d_head]` on a clean run over `tokens`."""
    recorded: list[Tensor | None] = [None] * model.config.n_layers

    def recorder(layer: int) -> Callable[[Tensor], Tensor]:
        def record(z: Tensor) -> Tensor:
            recorded[layer] = z.detach().clone()
            return z

        return record

    model(tokens, edits={layer: HeadEdit(z=recorder(layer)) for layer in range(model.config.n_layers)})
    return recorded  # type: ignore[return-value]


def mean_z(model: AttentionOnlyTransformer, reference: Tensor, per_position: bool = True) -> list[Tensor]:
    """Per layer, the mean of `z` over the reference sequences `[batch, pos]`: `[head, pos, d_head]`
    per position (default), or `[head, 1, d_head]` averaged over positions as well."""
    zs = record_z(model, reference)
    if per_position:
        return [z.mean(dim=0) for z in zs]  # [head, pos, d_head]
    return [z.mean(dim=(0, 2))[:, None] for z in zs]  # [head, 1, d_head]


def mean_edits(model: AttentionOnlyTransformer, heads: Iterable[Head], means: Sequence[Tensor]) -> dict[int, HeadEdit]:
    """Edits that replace the chosen heads' `z` by `means` (from `mean_z`). Per-position means are cut
    to the input's length, so inputs may be shorter than the reference sequences, not longer."""
    s = model.config
    edits = {}
    for layer, hs in by_layer(heads, s.n_layers, s.n_heads).items():
        mean = means[layer][hs]  # [len(hs), pos or 1, d_head]

        def value(z: Tensor, mean: Tensor = mean) -> Tensor:
            if mean.shape[1] != 1 and z.shape[2] > mean.shape[1]:
                raise ValueError(f"input has {z.shape[2]} positions, the reference mean only {mean.shape[1]}")
            return mean[None, :, : z.shape[2]]  # [1, len(hs), pos, d_head]

        edits[layer] = HeadEdit(z=_replace_heads(hs, value))
    return edits


@torch.no_grad()
def clean_patterns(model: AttentionOnlyTransformer, tokens: Tensor) -> list[Tensor]:
    """Every layer's attention pattern `[batch, head, query, key]` on the clean run."""
    return model(tokens, return_patterns=True)[1]


def pattern_edits(model: AttentionOnlyTransformer, heads: Iterable[Head], patterns: Sequence[Tensor]) -> dict[int, HeadEdit]:
    """Pattern-preserving ablation: every layer's pattern frozen to `patterns` (from `clean_patterns`
    on the same tokens), the chosen heads' `z` zeroed."""
    s = model.config
    chosen = by_layer(heads, s.n_layers, s.n_heads)
    zeroed = zero_edits(model, heads)
    return {layer: HeadEdit(pattern=patterns[layer], z=zeroed[layer].z if layer in chosen else None)
            for layer in range(s.n_layers)}


@torch.no_grad()
def ablate(
    model: AttentionOnlyTransformer,
    tokens: Tensor,
    heads: Iterable[Head],
    method: str = "zero",
    means: Sequence[Tensor] | None = None,
) -> Tensor:
    """Logits `[batch, pos, d_vocab]` of `model` on `tokens` with `heads` ablated by `method`
    ("zero", "mean" with `means` from `mean_z`, or "pattern")."""
    heads = list(heads)
    if method == "zero":
        edits = zero_edits(model, heads)
    elif method == "mean":
        if means is None:
            raise ValueError("mean ablation needs `means` (from mean_z on a reference set)")
        edits = mean_edits(model, heads, means)
    elif method == "pattern":
        edits = pattern_edits(model, heads, clean_patterns(model, tokens))
    else:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    return model(tokens, edits=edits or None)
