"""Export a checkpoint to TransformerLens (3.x `HookedTransformer`), and load the export back.

The file is one `torch.save`d dict of plain types, readable with `torch.load(weights_only=True)`:

    {"format": "induction-harness/transformer-lens", "version": 1,
     "config": "<JSON: HookedTransformerConfig keyword arguments>",
     "state_dict": {TransformerLens parameter name: tensor}}

Our weights already use TransformerLens' names and shapes (`train/model.py`), so the export only
renames modules. The schemes map as follows:

- `shortformer` -> `positional_embedding_type="shortformer"`: both add `W_pos` after `ln1`, to the
  query and key inputs only (Olsson et al. 2022's small models).
- `learned` -> `"standard"` (GPT-2 style, `W_pos` added to the residual stream).
- `rotary` -> `"rotary"` with `rotary_dim=d_head`, `rotary_adjacent_pairs=False`, base 10000: the
  GPT-NeoX halves layout of `train.model.apply_rotary` (pairs `i` and `i + d_head/2`, frequency
  `base^(-2i/d_head)`), which is TransformerLens' non-adjacent convention.
- `none` -> `"standard"` with `W_pos` all zeros: exactly the same function (TransformerLens has no
  position-free scheme). Fine-tuning the exported model would let it learn positions.
- `layernorm=pre` -> `normalization_type="LN"`, `none` -> None (`final`, LayerNorm before the
  unembedding only, has no counterpart: export refuses it); `d_mlp > 0` -> `attn_only=False`,
  `act_fn="gelu"` (exact erf GELU, as `torch.nn.functional.gelu`).
- The smeared key (Olsson et al. 2022) and `position_layers` (positions in the first layers only) have no
  TransformerLens counterpart: export refuses them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor

from train.model import AttentionOnlyTransformer
from train.rundir import atomic_write

FORMAT = "induction-harness/transformer-lens"
VERSION = 1


class ExportError(ValueError):
    """A model that has no faithful TransformerLens equivalent, or a file that is not an export."""


def tl_config(model: AttentionOnlyTransformer) -> dict:
    """`HookedTransformerConfig` keyword arguments describing `model` (plain JSON types)."""
    s = model.config
    if s.smeared_key:
        raise ExportError("model.smeared_key=true: TransformerLens has no smeared-key attention; cannot export")
    if s.position_layers is not None and s.position_layers < s.n_layers:
        raise ExportError(f"model.position_layers={s.position_layers}: TransformerLens gives positions to every "
                          "layer; cannot export")
    if s.layernorm == "final":
        raise ExportError("model.layernorm=final: TransformerLens normalises inside every layer or nowhere; "
                          "cannot export")
    positional = {"shortformer": "shortformer", "learned": "standard", "none": "standard",
                  "rotary": "rotary"}[s.positional]
    cfg = {
        "n_layers": s.n_layers, "d_model": s.d_model, "n_ctx": s.n_ctx, "d_head": s.d_head,
        "n_heads": s.n_heads, "d_vocab": s.d_vocab, "d_vocab_out": s.d_vocab,
        "attn_only": s.d_mlp == 0, "d_mlp": s.d_mlp or None, "act_fn": "gelu" if s.d_mlp else None,
        "normalization_type": "LN" if s.layernorm == "pre" else None,
        "positional_embedding_type": positional, "eps": 1e-5,
        "default_prepend_bos": False,  # our sequences carry their own BOS (token 0)
    }
    if positional == "rotary":
        cfg.update(rotary_dim=s.d_head, rotary_base=10000, rotary_adjacent_pairs=False)
    return cfg


def tl_state_dict(model: AttentionOnlyTransformer) -> dict[str, Tensor]:
    """Our parameters under TransformerLens' names (buffers such as masks are rebuilt on load)."""
    s = model.config
    sd: dict[str, Tensor] = {"embed.W_E": model.W_E}
    if s.positional in ("shortformer", "learned"):
        sd["pos_embed.W_pos"] = model.W_pos
    elif s.positional == "none":
        sd["pos_embed.W_pos"] = torch.zeros(s.n_ctx, s.d_model)
    for i, block in enumerate(model.blocks):
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            sd[f"blocks.{i}.attn.{name}"] = getattr(block.attn, name)
        if s.layernorm == "pre":
            sd[f"blocks.{i}.ln1.w"], sd[f"blocks.{i}.ln1.b"] = block.ln1.weight, block.ln1.bias
        if block.mlp is not None:
            if s.layernorm == "pre":
                sd[f"blocks.{i}.ln2.w"], sd[f"blocks.{i}.ln2.b"] = block.ln2.weight, block.ln2.bias
            for name in ("W_in", "b_in", "W_out", "b_out"):
                sd[f"blocks.{i}.mlp.{name}"] = getattr(block.mlp, name)
    if s.layernorm == "pre":
        sd["ln_final.w"], sd["ln_final.b"] = model.ln_final.weight, model.ln_final.bias
    sd["unembed.W_U"], sd["unembed.b_U"] = model.W_U, model.b_U
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in sd.items()}


def export(model: AttentionOnlyTransformer, out: str | Path) -> Path:
    """Write `model` as a TransformerLens export to `out` (atomically); returns the path."""
    payload = {"format": FORMAT, "version": VERSION, "config": json.dumps(tl_config(model)),
               "state_dict": tl_state_dict(model)}
    out = Path(out)
    atomic_write(out, lambda tmp: torch.save(payload, tmp))
    return out


def read_export(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(HookedTransformerConfig kwargs, state dict) from an export file, loaded with weights_only=True."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{path}: not a loadable export ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ExportError(f"{path}: not a TransformerLens export of this project (no format={FORMAT!r})")
    if payload.get("version") != VERSION:
        raise ExportError(f"{path}: export version {payload.get('version')}, this code reads {VERSION}")
    return json.loads(payload["config"]), payload["state_dict"]


def load_hooked_transformer(path: str | Path, device: str = "cpu"):
    """Load an export written by `export` (or `python -m analysis export-tl`) as a TransformerLens
    `HookedTransformer` in eval mode, e.g.

        model = load_hooked_transformer("model.pt")
        logits, cache = model.run_with_cache(tokens)   # tokens [batch, pos], BOS (0) included
        cache["blocks.1.attn.hook_pattern"]            # [batch, head, query, key]

    Its logits equal the harness model's (within float32 rounding). Needs `transformer-lens>=2.15,<4`.
    """
    cfg, state = read_export(path)
    return hooked_transformer(cfg, state, device, str(path))


def to_hooked_transformer(model: AttentionOnlyTransformer, device: str = "cpu"):
    """`model` as a TransformerLens `HookedTransformer`, without a file."""
    return hooked_transformer(tl_config(model), tl_state_dict(model), device, "the model")


def hooked_transformer(cfg: dict, state: dict[str, Tensor], device: str, what: str):
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        raise ExportError("transformer-lens is not installed (pip install 'transformer-lens>=2.15,<4')") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.x points to TransformerBridge
        model = HookedTransformer(HookedTransformerConfig(**cfg, device=device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing or unexpected:
        raise ExportError(f"{what}: weights do not fit TransformerLens' model "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
