"""Attention-only transformer, the model family of Olsson et al. (2022) and Elhage et al. (2021).

A plain `nn.Module`: no Lightning, no hooks framework. Weights use TransformerLens' names and shapes
(`W_Q [head, d_model, d_head]`, `W_O [head, d_head, d_model]`, ...) so circuits can be read directly
and exported without reshaping.

Training takes the fused path (`scaled_dot_product_attention`). Asking for attention patterns, or
editing heads (ablations), takes the explicit path, which computes the same function.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model_config import LayerNorm, ModelConfig, Positional  # noqa: F401 (the model's option types)



@dataclass
class HeadEdit:
    """How one layer's heads are changed in a forward pass (ablations, `analysis.head_ablation`).

    `pattern`: attention pattern `[batch, head, query, key]` used instead of the computed one.
    `pattern_fn`: a function `pattern -> pattern` applied to the computed one (clamping chosen heads).
    `z`: a function `z [batch, head, pos, d_head] -> z`, applied to the heads' mixed values before W_O.
    An edit of `z` alone keeps the fused attention path; an edit of the pattern takes the explicit one.
    """

    pattern: Tensor | None = None
    pattern_fn: Callable[[Tensor], Tensor] | None = None
    z: Callable[[Tensor], Tensor] | None = None


def rotary_tables(n_ctx: int, d_head: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin tables `[n_ctx, d_head]` for rotary embeddings, halves layout (GPT-NeoX)."""
    freqs = base ** (-torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)  # [d_head/2]
    angles = torch.arange(n_ctx, dtype=torch.float32)[:, None] * freqs[None, :]  # [n_ctx, d_head/2]
    angles = torch.cat([angles, angles], dim=-1)  # [n_ctx, d_head]
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x [batch, head, pos, d_head]` by position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    t = x.shape[-2]
    return x * cos[:t] + rotated * sin[:t]


@functools.lru_cache(maxsize=8)
def causal_bias(t: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """`[t, t]`: 0 on and below the diagonal, -inf above it (keys after the query). Added to the
    attention scores inside the score matmul; cached, as probes call this at every step."""
    return torch.full((t, t), float("-inf"), dtype=dtype, device=device).triu(1)


def project(x: Tensor, weights: tuple[Tensor, ...], biases: tuple[Tensor, ...]) -> Tensor:
    """`x [batch, pos, d_model]` through several `[head, d_model, d_head]` maps (W_Q, W_K, ...) with
    their `[head, d_head]` biases in one matrix product, which costs less than one per map (the probes
    run a small forward pass at every step, where per-op overhead dominates). Returns
    `[n_maps, batch, head, pos, d_head]`."""
    (b, t, m), (h, _, d) = x.shape, weights[0].shape
    w = torch.cat(weights).permute(1, 0, 2).reshape(m, -1)  # [d_model, n_maps * head * d_head]
    y = torch.addmm(torch.cat(biases).flatten(), x.reshape(b * t, m), w)
    return y.view(b, t, len(weights), h, d).permute(2, 0, 3, 1, 4)


class Attention(nn.Module):
    def __init__(self, n_heads: int, d_model: int, d_head: int, smeared_key: bool):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        self.W_Q = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_K = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_V = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_O = nn.Parameter(torch.empty(n_heads, d_head, d_model))
        self.b_Q = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_K = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_V = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_O = nn.Parameter(torch.zeros(d_model))
        # Smeared key (Olsson et al. 2022): k_j <- sigmoid(a) k_j + (1 - sigmoid(a)) k_{j-1}, per head.
        self.smear_alpha = nn.Parameter(torch.zeros(n_heads)) if smeared_key else None

    def smear(self, k: Tensor) -> Tensor:
        """Mix each key with the previous position's key; the first key is unchanged."""
        b, h, t, d = k.shape
        s = torch.sigmoid(self.smear_alpha)[:, None]  # [head, 1]
        # Mixed as rows of one head each, `[head, batch * (pos-1) * d_head]`: the gradient of each head's
        # mixing weight then sums one contiguous row, in the same order whatever layout the gradient
        # arrives in (a model alone, or a stack of models under `vmap`, train/stacked.py).
        later, earlier = (part.transpose(0, 1).reshape(h, -1) for part in (k[:, :, 1:], k[:, :, :-1]))
        mixed = (s * later + (1 - s) * earlier).view(h, b, t - 1, d).transpose(0, 1)
        return torch.cat([k[:, :, :1], mixed], dim=2)

    def forward(
        self,
        x_qk: Tensor,
        x_v: Tensor,
        rotary: tuple[Tensor, Tensor] | None = None,
        need_pattern: bool = False,
        edit: HeadEdit | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Queries and keys read `x_qk`, values `x_v` (the same tensor unless shortformer positions are
        added to queries and keys), `[batch, pos, d_model]`; returns (output `[batch, pos, d_model]`,
        pattern or None)."""
        if x_qk is x_v:
            q, k, v = project(x_v, (self.W_Q, self.W_K, self.W_V), (self.b_Q, self.b_K, self.b_V))
        else:
            q, k = project(x_qk, (self.W_Q, self.W_K), (self.b_Q, self.b_K))
            (v,) = project(x_v, (self.W_V,), (self.b_V,))
        if self.smear_alpha is not None:
            k = self.smear(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)

        pattern = None
        if need_pattern or (edit is not None and (edit.pattern is not None or edit.pattern_fn is not None)):
            if edit is not None and edit.pattern is not None:
                pattern = edit.pattern
            else:
                b, h, t, _ = q.shape
                # One fused op for scale, causal mask and scores: probes take this path at every step.
                scores = torch.baddbmm(causal_bias(t, q.device, q.dtype), q.reshape(b * h, t, -1),
                                       k.reshape(b * h, t, -1).transpose(-1, -2), alpha=self.d_head ** -0.5)
                pattern = scores.softmax(dim=-1).view(b, h, t, t)  # [batch, head, query, key]
                if edit is not None and edit.pattern_fn is not None:
                    pattern = edit.pattern_fn(pattern)
            z = pattern @ v  # [batch, head, pos, d_head]
        else:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if edit is not None and edit.z is not None:
            z = edit.z(z)
        b, h, t, d = z.shape
        out = torch.addmm(self.b_O, z.transpose(1, 2).reshape(b * t, h * d), self.W_O.reshape(h * d, -1))
        return out.view(b, t, -1), pattern  # [batch, pos, d_model]


class AffineLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` with its gain and bias applied outside the fused kernel. The fused kernel sums the
    gain's and bias's gradients over positions in its own order, which `vmap` (stacked ensembles,
    train/stacked.py) replaces with another: applied as a product and a sum, they get the same gradients,
    bit for bit, in a model alone and in a stack of models."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, None, None, self.eps) * self.weight + self.bias


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(d_model, d_mlp))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_out = nn.Parameter(torch.empty(d_mlp, d_model))
        self.b_out = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x @ self.W_in + self.b_in) @ self.W_out + self.b_out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inner = cfg.layernorm == "pre"
        self.ln1 = AffineLayerNorm(cfg.d_model) if inner else nn.Identity()
        self.attn = Attention(cfg.n_heads, cfg.d_model, cfg.d_head, cfg.smeared_key)
        self.ln2 = AffineLayerNorm(cfg.d_model) if (inner and cfg.d_mlp) else nn.Identity()
        self.mlp = MLP(cfg.d_model, cfg.d_mlp) if cfg.d_mlp else None

    def forward(self, x, qk_pos, rotary, need_pattern, edit):
        h = self.ln1(x)
        hq = h if qk_pos is None else h + qk_pos  # shortformer: positions enter queries and keys only
        attn_out, pattern = self.attn(hq, h, rotary, need_pattern, edit)
        x = x + attn_out
        if self.mlp is not None:
            x = x + self.mlp(self.ln2(x))
        return x, pattern


class AttentionOnlyTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config.checked()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.W_pos = (
            nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
            if cfg.positional in ("shortformer", "learned")
            else None
        )
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = AffineLayerNorm(cfg.d_model) if cfg.layernorm != "none" else nn.Identity()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))
        if cfg.positional == "rotary":
            cos, sin = rotary_tables(cfg.n_ctx, cfg.d_head)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.reset_parameters()
        # Fixed random token vectors, as Reddy (2023)'s items and labels: an unseen token is then drawn
        # from the same distribution as the trained ones.
        self.W_E.requires_grad_(not cfg.freeze_embedding)

    def reset_parameters(self) -> None:
        # TransformerLens' default: N(0, 0.8 / sqrt(d_model)) for every matrix, zero biases.
        std = self.config.init_std or 0.8 / math.sqrt(self.config.d_model)
        embeddings = {"W_E", "W_pos"}
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=(self.config.embed_std or std) if name in embeddings else std)

    def forward(
        self,
        tokens: Tensor,
        return_patterns: bool = False,
        edits: dict[int, HeadEdit] | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """`tokens [batch, pos]` -> logits `[batch, pos, d_vocab]`.

        With `return_patterns`, also the attention pattern of every layer, `[batch, head, query, key]`.
        `edits` maps a layer index to a `HeadEdit` (used by ablations).
        """
        t = tokens.shape[1]
        # Not `W_E[tokens]`: its backward on the CPU adds rows with atomic adds from several threads, in
        # an order that changes from run to run; `embedding`'s backward sums each row in a fixed order.
        x = F.embedding(tokens, self.W_E)  # [batch, pos, d_model]
        qk_pos, rotary = None, None
        if self.config.positional == "learned":
            x = x + self.W_pos[:t]
        elif self.config.positional == "shortformer":
            qk_pos = self.W_pos[:t]
        elif self.config.positional == "rotary":
            rotary = (self.rotary_cos, self.rotary_sin)
        patterns = []
        for layer, block in enumerate(self.blocks):
            edit = edits.get(layer) if edits else None
            if layer == self.config.position_layers:
                qk_pos, rotary = None, None  # later layers see order only through earlier layers' outputs
            x, pattern = block(x, qk_pos, rotary, return_patterns, edit)
            patterns.append(pattern)
        logits = self.ln_final(x) @ self.W_U + self.b_U
        return (logits, patterns) if return_patterns else logits
