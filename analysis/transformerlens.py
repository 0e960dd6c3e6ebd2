"""Export a checkpoint for TransformerLens, and load the export back: as a 4.x `TransformerBridge`
(every scheme; analysis/tl_bridge.py) or a 3.x `HookedTransformer` (the schemes 3.x has).

The file is one `torch.save`d dict of plain types, readable with `torch.load(weights_only=True)`:

    {"format": "induction-harness/transformer-lens", "version": 2,
     "config": "<JSON: the model's spec, the ModelConfig fields of SPEC_KEYS>",
     "state_dict": {TransformerLens parameter name: tensor}}

Version 1 files (whose config is HookedTransformerConfig keyword arguments) still load. Our weights
already use TransformerLens' names and shapes (`train/model.py`). For 3.x the schemes map as follows:

- `shortformer` -> `positional_embedding_type="shortformer"`: both add `W_pos` after `ln1`, to the
  query and key inputs only (Olsson et al. 2022's small models).
- `learned` -> `"standard"` (GPT-2 style, `W_pos` added to the residual stream).
- `rotary` -> `"rotary"` with `rotary_dim=d_head`, `rotary_adjacent_pairs=False`, base 10000: the
  GPT-NeoX halves layout of `train.model.apply_rotary` (pairs `i` and `i + d_head/2`, frequency
  `base^(-2i/d_head)`), which is TransformerLens' non-adjacent convention.
- `none` -> `"standard"` with `W_pos` all zeros: exactly the same function (3.x has no position-free
  scheme).
- `layernorm=pre` -> `normalization_type="LN"`, `none` -> None; `d_mlp > 0` -> `attn_only=False`,
  `act_fn="gelu"` (exact erf GELU, as `torch.nn.functional.gelu`).
- `layernorm=final`, the smeared key and `position_layers` (positions in the first layers only) have no
  3.x counterpart: the 3.x loader refuses them in one line. TransformerLens 4 loads them all.
"""

from __future__ import annotations

import json
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from train.model import AttentionOnlyTransformer
from train.rundir import atomic_write

FORMAT = "induction-harness/transformer-lens"
VERSION = 2
ROTARY_BASE = 10000.0
SPEC_KEYS = ("n_layers", "n_heads", "d_model", "d_head", "n_ctx", "d_vocab", "positional", "layernorm",
             "d_mlp", "smeared_key", "position_layers")


class ExportError(ValueError):
    """A model that has no faithful TransformerLens equivalent, or a file that is not an export."""


def spec_of(model: AttentionOnlyTransformer) -> dict:
    """The model's spec as plain JSON types (what an export's config holds)."""
    c = model.config
    enum = lambda v: getattr(v, "value", v)  # noqa: E731
    return {k: enum(getattr(c, k)) for k in SPEC_KEYS} | {"smeared_key": bool(c.smeared_key), "d_mlp": c.d_mlp or 0}


def spec_from_v1(cfg: dict) -> dict:
    """The spec of a version-1 export (HookedTransformerConfig kwargs written by analysis/transformerlens.py)."""
    pos = cfg.get("positional_embedding_type", "standard")
    if pos not in ("shortformer", "standard", "rotary"):
        raise ExportError(f"positional_embedding_type={pos!r}: not written by this project")
    if pos == "rotary" and (cfg.get("rotary_dim") not in (None, cfg["d_head"]) or cfg.get("rotary_adjacent_pairs")
                            or float(cfg.get("rotary_base", ROTARY_BASE)) != ROTARY_BASE):
        raise ExportError("rotary export with partial / adjacent-pair / non-10000 rotary: not written by this project")
    norm = cfg.get("normalization_type")
    if norm not in ("LN", None):
        raise ExportError(f"normalization_type={norm!r}: not written by this project")
    if not cfg.get("attn_only", False) and cfg.get("act_fn") != "gelu":
        raise ExportError(f"act_fn={cfg.get('act_fn')!r}: not written by this project")
    return {"n_layers": cfg["n_layers"], "n_heads": cfg["n_heads"], "d_model": cfg["d_model"],
            "d_head": cfg["d_head"], "n_ctx": cfg["n_ctx"], "d_vocab": cfg["d_vocab"],
            # version 1 writes `none` as standard positions with W_pos = 0: the same function
            "positional": {"shortformer": "shortformer", "standard": "learned", "rotary": "rotary"}[pos],
            "layernorm": "pre" if norm == "LN" else "none",
            "d_mlp": 0 if cfg.get("attn_only", False) else int(cfg["d_mlp"]),
            "smeared_key": False, "position_layers": None}


def checked_spec(spec: dict) -> dict:
    spec = {k: spec.get(k) for k in SPEC_KEYS}
    spec["d_mlp"] = spec["d_mlp"] or 0
    spec["smeared_key"] = bool(spec["smeared_key"])
    if spec["positional"] not in ("shortformer", "learned", "rotary", "none"):
        raise ExportError(f"positional={spec['positional']!r}: unknown")
    if spec["layernorm"] not in ("pre", "final", "none"):
        raise ExportError(f"layernorm={spec['layernorm']!r}: unknown")
    if spec["position_layers"] is not None and spec["position_layers"] >= spec["n_layers"]:
        spec["position_layers"] = None  # positions in every layer
    return spec


def tl_state_dict(model: AttentionOnlyTransformer) -> dict[str, Tensor]:
    """Our parameters under TransformerLens' (HookedTransformer) names and shapes, every scheme: with
    `ln_final` for layernorm=final, `blocks.{i}.attn.smear_alpha` for the smeared key, and no `W_pos`
    for positional=none (buffers such as masks are rebuilt on load)."""
    s = spec_of(model)
    sd: dict[str, Tensor] = {"embed.W_E": model.W_E}
    if model.W_pos is not None:
        sd["pos_embed.W_pos"] = model.W_pos
    for i, block in enumerate(model.blocks):
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            sd[f"blocks.{i}.attn.{name}"] = getattr(block.attn, name)
        if block.attn.smear_alpha is not None:
            sd[f"blocks.{i}.attn.smear_alpha"] = block.attn.smear_alpha
        if s["layernorm"] == "pre":
            sd[f"blocks.{i}.ln1.w"], sd[f"blocks.{i}.ln1.b"] = block.ln1.weight, block.ln1.bias
        if block.mlp is not None:
            if s["layernorm"] == "pre":
                sd[f"blocks.{i}.ln2.w"], sd[f"blocks.{i}.ln2.b"] = block.ln2.weight, block.ln2.bias
            for name in ("W_in", "b_in", "W_out", "b_out"):
                sd[f"blocks.{i}.mlp.{name}"] = getattr(block.mlp, name)
    if s["layernorm"] != "none":
        sd["ln_final.w"], sd["ln_final.b"] = model.ln_final.weight, model.ln_final.bias
    sd["unembed.W_U"], sd["unembed.b_U"] = model.W_U, model.b_U
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in sd.items()}


def export(model: AttentionOnlyTransformer, out: str | Path) -> Path:
    """Write `model` as a TransformerLens export to `out` (atomically); returns the path."""
    payload = {"format": FORMAT, "version": VERSION, "config": json.dumps(spec_of(model)),
               "state_dict": tl_state_dict(model)}
    out = Path(out)
    atomic_write(out, lambda tmp: torch.save(payload, tmp))
    return out


def read_export(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(spec, state dict) from an export file of either version, loaded with weights_only=True."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{path}: not a loadable export ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ExportError(f"{path}: not a TransformerLens export of this project (no format={FORMAT!r})")
    cfg = json.loads(payload["config"])
    if payload.get("version") == 1:
        return spec_from_v1(cfg), payload["state_dict"]
    if payload.get("version") == 2:
        return checked_spec(cfg), payload["state_dict"]
    raise ExportError(f"{path}: export version {payload.get('version')}, this code reads 1 and 2")


def installed_major() -> int | None:
    """TransformerLens' major version, or None when it is not installed."""
    try:
        return int(version("transformer-lens").split(".")[0])
    except PackageNotFoundError:
        return None


def to_transformer_lens(model: AttentionOnlyTransformer, device: str = "cpu"):
    """`model` in the installed TransformerLens: a 4.x `TransformerBridge` or a 3.x `HookedTransformer`."""
    major = installed_major()
    if major is None:
        raise ExportError("transformer-lens is not installed (pip install 'induction-harness[tl]')")
    if major >= 4:
        from .tl_bridge import to_bridge

        return to_bridge(model, device=device)
    return to_hooked_transformer(model, device)


def load(path: str | Path, device: str = "cpu"):
    """An export file in the installed TransformerLens (as `to_transformer_lens`)."""
    major = installed_major()
    if major is not None and major >= 4:
        from .tl_bridge import load_bridge

        return load_bridge(path, device=device)
    return load_hooked_transformer(path, device)


# --- TransformerLens 3.x ---------------------------------------------------------------------------

def hooked_config(spec: dict) -> dict:
    """`HookedTransformerConfig` keyword arguments describing `spec` (plain JSON types); ExportError
    for what 3.x cannot express."""
    s = spec
    if s["smeared_key"]:
        raise ExportError("model.smeared_key=true: TransformerLens 3.x has no smeared-key attention "
                          "(TransformerLens 4 loads it)")
    if s["position_layers"] is not None and s["position_layers"] < s["n_layers"]:
        raise ExportError(f"model.position_layers={s['position_layers']}: TransformerLens 3.x gives positions to "
                          "every layer (TransformerLens 4 loads it)")
    if s["layernorm"] == "final":
        raise ExportError("model.layernorm=final: TransformerLens 3.x normalises inside every layer or nowhere "
                          "(TransformerLens 4 loads it)")
    positional = {"shortformer": "shortformer", "learned": "standard", "none": "standard",
                  "rotary": "rotary"}[s["positional"]]
    cfg = {
        "n_layers": s["n_layers"], "d_model": s["d_model"], "n_ctx": s["n_ctx"], "d_head": s["d_head"],
        "n_heads": s["n_heads"], "d_vocab": s["d_vocab"], "d_vocab_out": s["d_vocab"],
        "attn_only": s["d_mlp"] == 0, "d_mlp": s["d_mlp"] or None, "act_fn": "gelu" if s["d_mlp"] else None,
        "normalization_type": "LN" if s["layernorm"] == "pre" else None,
        "positional_embedding_type": positional, "eps": 1e-5,
        "default_prepend_bos": False,  # our sequences carry their own BOS (token 0)
    }
    if positional == "rotary":
        cfg.update(rotary_dim=s["d_head"], rotary_base=10000, rotary_adjacent_pairs=False)
    return cfg


def load_hooked_transformer(path: str | Path, device: str = "cpu"):
    """Load an export as a TransformerLens 3.x `HookedTransformer` in eval mode, e.g.

        model = load_hooked_transformer("model.pt")
        logits, cache = model.run_with_cache(tokens)   # tokens [batch, pos], BOS (0) included
        cache["blocks.1.attn.hook_pattern"]            # [batch, head, query, key]

    Its logits equal the harness model's (within float32 rounding). Needs `transformer-lens>=2.15,<4`
    (`pip install 'induction-harness[tl3]'`).
    """
    spec, state = read_export(path)
    try:
        return hooked_transformer(spec, state, device, str(path))
    except ExportError as e:
        raise ExportError(f"{path}: {e}") from None


def to_hooked_transformer(model: AttentionOnlyTransformer, device: str = "cpu"):
    """`model` as a TransformerLens 3.x `HookedTransformer`, without a file."""
    return hooked_transformer(spec_of(model), tl_state_dict(model), device, "the model")


def hooked_transformer(spec: dict, state: dict[str, Tensor], device: str, what: str):
    cfg = hooked_config(spec)
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        raise ExportError("TransformerLens 3.x is not installed (pip install 'induction-harness[tl3]'; "
                          "with 4.x use analysis.tl_bridge.load_bridge)") from None
    state = dict(state)
    if spec["positional"] == "none":
        state["pos_embed.W_pos"] = torch.zeros(spec["n_ctx"], spec["d_model"])  # the same function
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
