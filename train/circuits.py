"""The costlier per-head scores of a model, assembled from the pure functions in `train.probes`.

Run at the evaluation cadence and at every checkpoint (weights-based eigenvalue scores, and the copying
score, which needs every head's output on the probe batch). Used live by the measurement callback and
post hoc by `analysis`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import probes
from .model import AttentionOnlyTransformer, HeadEdit


@torch.no_grad()
def head_outputs(model: AttentionOnlyTransformer, tokens: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Every head's direct output `[batch, head, pos, d_model]` and pattern, per layer."""
    zs: list[Tensor] = []

    def keep(z: Tensor) -> Tensor:
        zs.append(z)
        return z

    n = len(model.blocks)
    _, patterns = model(tokens, return_patterns=True, edits={l: HeadEdit(z=keep) for l in range(n)})
    outs = [torch.einsum("bhtd,hdm->bhtm", z, block.attn.W_O) for z, block in zip(zs, model.blocks)]
    return outs, patterns


@torch.no_grad()
def costly_head_scores(model: AttentionOnlyTransformer, tokens: Tensor, previous_token: Tensor) -> dict[str, Tensor]:
    """`[layer, head]` maps: copying (Olsson et al.), ov_copying (OV eigenvalues) and induction_qk
    (QK eigenvalues with keys read through the strongest previous-token head of any earlier layer;
    NaN in layer 0). `previous_token [layer, head]` picks that head."""
    ln_w = model.ln_final.weight if isinstance(model.ln_final, torch.nn.LayerNorm) else None
    unembed = probes.direct_unembed(model.W_U, ln_w)
    outs, patterns = head_outputs(model, tokens)
    copying = torch.stack([probes.copying_score(o, p, tokens, unembed) for o, p in zip(outs, patterns)])
    attn = [b.attn for b in model.blocks]
    ov = torch.stack([probes.ov_copying_score(model.W_E, a.W_V, a.W_O, model.W_U) for a in attn])
    qk = torch.full_like(ov, float("nan"))
    for layer in range(1, len(attn)):
        earlier = previous_token[:layer]
        src_layer, src_head = divmod(int(earlier.flatten().argmax()), earlier.shape[1])
        src = attn[src_layer]
        qk[layer] = probes.induction_qk_score(model.W_E, attn[layer].W_Q, attn[layer].W_K,
                                              src.W_V[src_head], src.W_O[src_head])
    return {"copying": copying, "ov_copying": ov, "induction_qk": qk}
