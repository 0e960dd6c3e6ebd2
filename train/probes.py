"""Scores, each a pure function on tensors. The live callbacks and the post-hoc analysis both call these.

Conventions: `pattern` is one layer's attention `[batch, head, query, key]`; `tokens` is `[batch, pos]`;
`token_losses` is the next-token loss per position `[..., pos - 1]`, where index `i` is the loss of
predicting token `i + 1` from tokens `0..i`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def per_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy per position: `[batch, pos - 1]`."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none"
    ).view(tokens.shape[0], -1)


def previous_token_score(pattern: Tensor) -> Tensor:
    """Mean attention from each position `i >= 1` to `i - 1`, per head: `[head]`.

    A previous-token head (Olsson et al. 2022, sec. 2) scores near 1.
    """
    prev = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # [batch, head, pos - 1]
    return prev.mean(dim=(0, 2))


def prefix_matching_mask(tokens: Tensor) -> Tensor:
    """`[batch, query, key]`: True where key `j` follows an earlier occurrence of the query's token,
    i.e. `tokens[j - 1] == tokens[i]` with `1 <= j <= i`."""
    t = tokens.shape[1]
    same = tokens[:, :, None] == tokens[:, None, :]  # [batch, query, key-1]: token i equals token j-1
    mask = torch.zeros(tokens.shape[0], t, t, dtype=torch.bool, device=tokens.device)
    mask[:, :, 1:] = same[:, :, :-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril(-1)  # j - 1 < i, so j <= i
    return mask & causal


def prefix_matching_score(pattern: Tensor, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """Olsson et al. (2022, "Prefix matching" in sec. 2): on repeated random tokens, the attention a head
    puts on the tokens just *after* earlier occurrences of the query's token, averaged over every
    query that has such an earlier occurrence (and over the batch). `[head]`; an induction head scores
    near 1. `mask` is `prefix_matching_mask(tokens)`, for callers that reuse a fixed batch."""
    mask = prefix_matching_mask(tokens) if mask is None else mask  # [batch, query, key]
    has_match = mask.any(dim=-1)  # [batch, query]
    on_match = (pattern * mask[:, None]).sum(dim=-1)  # [batch, head, query]
    weights = has_match[:, None].to(pattern.dtype)
    return (on_match * weights).sum(dim=(0, 2)) / weights.sum(dim=(0, 2)).clamp_min(1)


def icl_positions(n_ctx: int, late: int | None = None, early: int | None = None) -> tuple[int, int]:
    """Token indices for the ICL score. Olsson et al. use 500 and 50 in a 512-token context; shorter
    contexts default to the same proportions. Returned as indices into a per-token loss vector."""
    last = n_ctx - 2  # the last index of a `[pos - 1]` loss vector
    late = round(n_ctx * 500 / 512) if late is None else late
    early = round(n_ctx * 50 / 512) if early is None else early
    late, early = min(late, last), min(early, last)
    if not 0 <= early < late:
        raise ValueError(f"icl early={early} and late={late} must satisfy 0 <= early < late < n_ctx - 1")
    return late, early


def icl_score(token_losses: Tensor, late: int, early: int) -> Tensor:
    """In-context-learning score (Olsson et al. 2022, sec. 2): mean loss at token index `late` minus mean
    loss at index `early`. Negative means later tokens are predicted better: more in-context learning."""
    return token_losses[..., late].mean() - token_losses[..., early].mean()


def induction_loss(token_losses: Tensor, rep_len: int) -> Tensor:
    """Mean loss on repeated random tokens (BOS + `rep_len` tokens, repeated) over every token after
    the first repeat: the loss an induction mechanism can bring to zero (Olsson et al. 2022)."""
    return token_losses[..., rep_len:].mean()
