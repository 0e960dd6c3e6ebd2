"""Scores, each a pure function on tensors. The live callbacks and the post-hoc analysis both call these.

Conventions: `pattern` is one layer's attention `[batch, head, query, key]`; `tokens` is `[batch, pos]`;
`token_losses` is the next-token loss per position `[..., pos - 1]`, where index `i` is the loss of
predicting token `i + 1` from tokens `0..i`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def per_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy per position: `[batch, pos - 1]`."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none"
    ).view(tokens.shape[0], -1)


def eval_losses(model, tokens: Tensor, max_logits: int = 1 << 24, edits=None) -> Tensor:
    """`per_token_loss` of `tokens [batch, pos]` in chunks of at most `max_logits` logits (64 MiB in
    fp32), so a large evaluation set with a large vocabulary never holds all its logits at once.
    `edits`: head edits of every forward pass (`train.model.HeadEdit`)."""
    return chunked_losses(lambda chunk: model(chunk, edits=edits), tokens, model.config.d_vocab, max_logits)


def chunked_losses(forward, tokens: Tensor, d_vocab: int, max_logits: int = 1 << 24) -> Tensor:
    """`per_token_loss` of `forward(chunk)` over chunks of `tokens` of at most `max_logits` logits."""
    rows = max(1, max_logits // (tokens.shape[1] * d_vocab))
    return torch.cat([per_token_loss(forward(chunk), chunk) for chunk in tokens.split(rows)])


def weighted_attention(pattern: Tensor, weights: Tensor) -> Tensor:
    """`sum_{batch, query, key} pattern * weights` per head: `[..., head]` for weights
    `[..., batch, query, key]`. The attention scores below are this with their own weights; a caller
    that measures a fixed batch at every step stacks the weights once and gets every score in one op."""
    return torch.einsum("bhqk,...bqk->...h", pattern.float(), weights.float())  # float: 1/n in bf16 is coarse


def previous_token_weights(batch: int, t: int, device: torch.device | None = None) -> Tensor:
    """`[batch, query, key]`: the mean over the batch and over queries `i >= 1` of key `i - 1`."""
    return torch.ones(t - 1, device=device).diag(-1)[None].expand(batch, t, t) / (batch * (t - 1))


def previous_token_score(pattern: Tensor) -> Tensor:
    """Mean attention from each position `i >= 1` to `i - 1`, per head: `[head]`.

    A previous-token head (Olsson et al. 2022, sec. 2) scores near 1.
    """
    return weighted_attention(pattern, previous_token_weights(pattern.shape[0], pattern.shape[-1], pattern.device))


def prefix_matching_mask(tokens: Tensor) -> Tensor:
    """`[batch, query, key]`: True where key `j` follows an earlier occurrence of the query's token,
    i.e. `tokens[j - 1] == tokens[i]` with `1 <= j <= i`."""
    t = tokens.shape[1]
    same = tokens[:, :, None] == tokens[:, None, :]  # [batch, query, key-1]: token i equals token j-1
    mask = torch.zeros(tokens.shape[0], t, t, dtype=torch.bool, device=tokens.device)
    mask[:, :, 1:] = same[:, :, :-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril(-1)  # j - 1 < i, so j <= i
    return mask & causal


def prefix_matching_weights(tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """`[batch, query, key]`: `prefix_matching_mask(tokens)` (or `mask`) divided by the number of
    queries (over the batch) that have an earlier occurrence of their token."""
    mask = prefix_matching_mask(tokens) if mask is None else mask
    return mask.float() / mask.any(dim=-1).sum().clamp_min(1)


def prefix_matching_score(pattern: Tensor, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """Olsson et al. (2022, "Prefix matching" in sec. 2): on repeated random tokens, the attention a head
    puts on the tokens just *after* earlier occurrences of the query's token, averaged over every
    query that has such an earlier occurrence (and over the batch). `[head]`; an induction head scores
    near 1. `mask` is `prefix_matching_mask(tokens)`, for callers that reuse a fixed batch."""
    return weighted_attention(pattern, prefix_matching_weights(tokens, mask))


def icl_positions(n_ctx: int, late: int | None = None, early: int | None = None,
                  span: float = 2.0) -> tuple[slice, slice]:
    """The two windows of token indices the ICL score compares, as slices into a per-token loss vector
    `[pos - 1]`. Centred (in log position) on Olsson et al.'s indices 500 and 50 of a 512-token context,
    scaled to `n_ctx` unless given; each window spans a factor `span` around its centre, positions
    `c / sqrt(span)` to `c * sqrt(span)`, as the paper plots loss against log position. `span=1` is the
    paper's single positions."""
    last = n_ctx - 2  # the last index of a `[pos - 1]` loss vector
    late = round(n_ctx * 500 / 512) if late is None else late
    early = round(n_ctx * 50 / 512) if early is None else early
    late, early = min(late, last), min(early, last)
    if not 0 <= early < late:
        raise ValueError(f"icl early={early} and late={late} must satisfy 0 <= early < late < n_ctx - 1")
    if span < 1:
        raise ValueError(f"span={span} must be at least 1 (1: single positions)")

    r = math.sqrt(span)
    lo = slice(math.ceil(early / r), min(last, math.floor(early * r)) + 1)
    hi = slice(math.ceil(late / r), min(last, math.floor(late * r)) + 1)
    if lo.stop > hi.start:
        raise ValueError(f"icl windows {lo.start}-{lo.stop - 1} and {hi.start}-{hi.stop - 1} overlap: "
                         f"span={span} is too wide for early={early}, late={late}")
    return hi, lo


def icl_score(token_losses: Tensor, late: slice | int, early: slice | int) -> Tensor:
    """In-context-learning score (Olsson et al. 2022, sec. 2): mean loss over the `late` token indices
    minus mean loss over the `early` ones (`icl_positions`; the paper uses single indices). Negative
    means later tokens are predicted better: more in-context learning."""
    return token_losses[..., late].mean() - token_losses[..., early].mean()


def induction_loss(token_losses: Tensor, rep_len: int) -> Tensor:
    """Mean loss on repeated random tokens (BOS + `rep_len` tokens, repeated) over the tokens an
    induction mechanism can predict (Olsson et al. 2022): every token after the first repeat, except
    the second repeat's first token, whose predecessor (the first repeat's last token) never occurred
    before. Index `i` predicts token `i + 1`, so that is indices `rep_len + 1` on."""
    return token_losses[..., rep_len + 1:].mean()


def _eigen_positivity(m: Tensor) -> Tensor:
    """sum(lambda) / sum(|lambda|) over the eigenvalues of square matrices `[..., n, n]`."""
    eig = torch.linalg.eigvals(m.double())
    return (eig.real.sum(-1) / eig.abs().sum(-1).clamp_min(1e-12)).float()


def ov_copying_score(W_E: Tensor, W_V: Tensor, W_O: Tensor, W_U: Tensor) -> Tensor:
    """Weight-based copying (Elhage et al. 2021, "Copying / primarily positive eigenvalues"): the share of
    positive eigenvalue mass of each head's full OV circuit W_E W_V W_O W_U, sum(lambda) / sum(|lambda|),
    in [-1, 1]; a copying head is near 1. Shapes: W_E `[vocab, model]`, W_V `[head, model, d_head]`,
    W_O `[head, d_head, model]`, W_U `[model, vocab]`; returns `[head]`. The nonzero eigenvalues of
    W_E W_V W_O W_U equal those of W_O W_U W_E W_V `[d_head, d_head]`, which is what is computed."""
    small = W_O @ (W_U @ W_E) @ W_V  # [head, d_head, d_head]
    return _eigen_positivity(small)


def induction_qk_score(W_E: Tensor, W_Q: Tensor, W_K: Tensor, W_V_prev: Tensor, W_O_prev: Tensor) -> Tensor:
    """K-composition with a previous-token head, by eigenvalues (Elhage et al. 2021; Olsson et al. 2022):
    the QK circuit of each later head with its keys read through the earlier head's OV circuit,
    W_E W_Q (W_E W_V' W_O' W_K)^T, is positive-definite-like (score near 1) when a query attends to keys
    whose *previous* token equals its own token: an induction head. Returns `[head]` of the later layer.
    W_Q, W_K `[head, model, d_head]`; W_V_prev `[model, d_head']`, W_O_prev `[d_head', model]` of one earlier
    head (or a sum of heads' W_V W_O written as W_V_prev @ W_O_prev)."""
    ov = W_V_prev @ W_O_prev  # [model, model]
    q = W_E @ W_Q  # [head, vocab, d_head]
    k = W_E @ ov @ W_K  # [head, vocab, d_head]
    small = k.transpose(-1, -2) @ q  # [head, d_head, d_head]: same nonzero eigenvalues as q k^T
    return _eigen_positivity(small)


def k_composition_score(W_Q: Tensor, W_K: Tensor, W_V_prev: Tensor, W_O_prev: Tensor) -> Tensor:
    """K-composition (Elhage et al. 2021): ||W_QK W_OV^T||_F / (||W_QK||_F ||W_OV||_F), how much a later
    head's keys read what an earlier head wrote. W_Q, W_K `[head, model, d_head]` of the later layer;
    W_V_prev `[head', model, d_head']`, W_O_prev `[head', d_head', model]`. Returns `[head, head']`."""
    qk = W_Q @ W_K.transpose(-1, -2)  # [head, model, model]
    ov = W_V_prev @ W_O_prev  # [head', model, model]
    comp = torch.einsum("hab,gcb->hgac", qk, ov)  # W_QK W_OV^T, [head, head', model, model]
    norm = qk.flatten(1).norm(dim=-1)[:, None] * ov.flatten(1).norm(dim=-1)[None, :]
    return comp.flatten(2).norm(dim=-1) / norm.clamp_min(1e-12)


def copying_score(head_out: Tensor, pattern: Tensor, tokens: Tensor, unembed: Tensor) -> Tensor:
    """Olsson et al.'s copying score, from a forward pass on random tokens: each head's direct
    contribution to the residual stream, mapped through the unembedding `unembed [model, vocab]`; the
    mean logit is subtracted and a ReLU applied (how much each token is raised); `share` is the part of
    that raise that goes to the tokens the head attends to. The score is `(share - chance) / (1 - chance)`
    averaged over queries, where `chance` is the share a raise spread evenly over the vocabulary would
    give: a head that copies what it attends to scores 1, one whose raise is unrelated to its attention
    scores near 0 (a raw share, or its [-1, 1] rescaling, would read near -1 for such a head with a
    large vocabulary), one that raises only tokens it does not attend to scores below 0.

    "Attended to" is weighted: each vocabulary token counts with its attention mass relative to the most
    attended token, so a head spreading attention evenly over several tokens and raising all of them
    copies as fully as one attending to a single token.

    head_out `[batch, head, pos, model]`, pattern `[batch, head, query, key]`, tokens `[batch, pos]`."""
    logits = head_out @ unembed  # [batch, head, pos, vocab]
    raise_ = (logits - logits.mean(-1, keepdim=True)).relu()
    index = tokens[:, None, None, :].expand_as(pattern)
    mass = torch.zeros_like(raise_).scatter_add_(-1, index, pattern)  # attention per vocab token
    weight = mass / mass.amax(-1, keepdim=True).clamp_min(1e-12)
    total = raise_.sum(-1)
    chance = weight.mean(-1)  # [batch, head, query]
    share = torch.where(total > 0, (weight * raise_).sum(-1) / total.clamp_min(1e-12), chance)
    return ((share - chance) / (1 - chance).clamp_min(1e-12)).mean(dim=(0, 2))


def direct_unembed(W_U: Tensor, ln_weight: Tensor | None = None) -> Tensor:
    """The linear part of the path from the residual stream to the logits, `[model, vocab]`: the final
    LayerNorm's centring and gain, then the unembedding. (The LayerNorm's per-position scale is
    positive and shared by all tokens, so it does not change which tokens are raised.)"""
    if ln_weight is None:
        return W_U
    d = W_U.shape[0]
    centre = torch.eye(d, dtype=W_U.dtype, device=W_U.device) - 1.0 / d  # x -> x - mean(x)
    return centre @ (ln_weight[:, None] * W_U)
