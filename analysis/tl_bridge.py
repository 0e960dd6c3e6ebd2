"""Our model as a TransformerLens 4.x `TransformerBridge`, every scheme (analysis/transformerlens.py
holds the export file and the 3.x path).

TransformerLens 4 has no `HookedTransformer`: every model is a `TransformerBridge` around an `nn.Module`,
through an architecture adapter that maps the module's submodules onto TransformerLens' slots (`embed`,
`pos_embed`, `blocks.{i}.ln1/attn/ln2/mlp`, `ln_final`, `unembed`). Its own small-model path,
`TransformerBridge.boot_native`, knows learned and rotary positions only, pairs rotary dimensions
adjacently and has one norm type for every slot: it cannot express our default (shortformer) model,
`layernorm=final`, `position_layers` or the smeared key. So this module takes the route TransformerLens
4 documents for architectures it does not ship:

    ArchitectureAdapterFactory.register_adapter(ARCHITECTURE, HarnessArchitectureAdapter)
    build_bridge_from_module(HarnessModel(spec), ARCHITECTURE, tl_config=TransformerBridgeConfig(...))

`HarnessModel` computes `train.model.AttentionOnlyTransformer`'s function with the submodules the
bridge's components wrap (`nn.Embedding`, `nn.Linear`), like TransformerLens 4's own native model;
tests/test_tl_bridge.py holds it to our logits (1e-4) and patterns (1e-5) for every scheme. Weights go
in through TransformerLens' converter for HookedTransformer-style state dicts (`convert_tl_checkpoint`).

Hooks (no compatibility mode needed): `hook_embed`, `hook_pos_embed`, `blocks.{i}.hook_resid_pre/mid/post`,
`blocks.{i}.attn.hook_q/k/v/z` (`[batch, pos, head, d_head]`), `blocks.{i}.attn.hook_pattern` (`[batch,
head, query, key]`; edits there change the output), `hook_rot_q/k` (rotary), `ln*.hook_scale`,
`blocks.{i}.attn.smear.hook_out` (smeared key, `[batch, head, pos, d_head]`). As for TransformerLens 4's
own native model: `hook_attn_scores` fires with the pattern (post-softmax), and
`set_use_split_qkv_input` / `set_use_attn_result` raise NotImplementedError. With shortformer positions
`hook_q/k` include `W_pos`, as in 3.x.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.model import rotary_tables

from .transformerlens import ROTARY_BASE, checked_spec, read_export, spec_of, tl_state_dict
from .transformerlens import ExportError

ARCHITECTURE = "InductionHarnessTransformer"
EPS = 1e-5


class HalvesRotary(nn.Module):
    """Rotary on `[batch, head, pos, d_head]`, pairing dims i and i + d_head/2 (`train.model.apply_rotary`).
    TL4's NativeRotary pairs (2i, 2i+1) and ignores cfg.rotary_adjacent_pairs, hence this module."""

    cos_cached: Tensor
    sin_cached: Tensor

    def __init__(self, n_ctx: int, d_head: int):
        super().__init__()
        cos, sin = rotary_tables(n_ctx, d_head, ROTARY_BASE)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def apply_rope(self, x: Tensor, position_ids: Optional[Tensor]) -> Tensor:
        if position_ids is None:
            cos, sin = self.cos_cached[: x.shape[-2]], self.sin_cached[: x.shape[-2]]
        else:
            cos, sin = self.cos_cached[position_ids].unsqueeze(1), self.sin_cached[position_ids].unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class SmearKey(nn.Module):
    """Smeared key (Olsson et al. 2022), `train.model.Attention.smear`: k_j <- s k_j + (1 - s) k_{j-1},
    s = sigmoid(weight) per head; the first key unchanged. A submodule (parameter named `weight`) so the
    bridge maps it (`blocks.{i}.attn.smear.weight` in `bridge.state_dict()`) and hooks it
    (`blocks.{i}.attn.smear.hook_in/hook_out`, `[batch, head, pos, d_head]`)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_heads))

    def forward(self, k: Tensor) -> Tensor:
        s = torch.sigmoid(self.weight)[None, :, None, None]
        return torch.cat([k[:, :, :1], s * k[:, :, 1:] + (1 - s) * k[:, :, :-1]], dim=2)


class HarnessAttention(nn.Module):
    """Causal attention returning `(out, pattern)`. Queries and keys read `hidden_states + qk_pos` when
    this layer takes shortformer positions, values read `hidden_states`; the smeared key mixes each key
    with the previous one before rotary. `accepts_pattern_fn`: TL4's AttentionBridge then passes its
    `hook_pattern` in as `pattern_fn`, applied before the value product, so pattern edits take effect."""

    accepts_pattern_fn = True

    def __init__(self, spec: dict, positional: bool, rotary: Optional[HalvesRotary]):
        super().__init__()
        h, d, m = spec["n_heads"], spec["d_head"], spec["d_model"]
        self.n_heads, self.d_head = h, d
        self.q, self.k, self.v = (nn.Linear(m, h * d) for _ in range(3))
        self.o = nn.Linear(h * d, m)
        if spec["smeared_key"]:
            self.smear = SmearKey(h)
        self.takes_qk_pos = positional and spec["positional"] == "shortformer"
        self.rotary = rotary if positional else None
        self._rot_hooks: Optional[tuple[Callable, Callable]] = None  # set by the adapter (hook_rot_q/k)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, qk_pos: Optional[Tensor] = None,
                pattern_fn: Optional[Callable[[Tensor], Tensor]] = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        b, t, _ = hidden_states.shape
        x_qk = hidden_states + qk_pos if (self.takes_qk_pos and qk_pos is not None) else hidden_states
        split = lambda y: y.view(b, t, self.n_heads, self.d_head).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x_qk)), split(self.k(x_qk)), split(self.v(hidden_states))
        if hasattr(self, "smear"):
            k = self.smear(k)
        if self.rotary is not None:
            q, k = self.rotary.apply_rope(q, position_ids), self.rotary.apply_rope(k, position_ids)
            if self._rot_hooks is not None:
                q, k = self._rot_hooks[0](q), self._rot_hooks[1](k)
        scores = (q @ k.transpose(-1, -2)) * self.d_head ** -0.5
        mask = torch.ones(t, t, dtype=torch.bool, device=scores.device).triu(1)
        if attention_mask is not None and attention_mask.dim() == 2:  # HF padding mask, 1 = keep
            mask = mask | ~attention_mask.bool()[:, None, None, :]
        pattern = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        pattern = pattern.masked_fill(mask, 0.0)  # fully masked (padding) rows: 0, not NaN
        if pattern_fn is not None:
            pattern = pattern_fn(pattern)
        z = (pattern @ v).transpose(1, 2).reshape(b, t, self.n_heads * self.d_head)
        return self.o(z), pattern


class HarnessMLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(d_model, d_mlp), nn.Linear(d_mlp, d_model)

    def forward(self, hidden_states: Tensor, **kwargs: Any) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(hidden_states)))  # exact erf GELU, as train.model


def _norm(spec: dict, inner: bool) -> nn.Module:
    on = spec["layernorm"] == "pre" if inner else spec["layernorm"] != "none"
    return nn.LayerNorm(spec["d_model"], eps=EPS) if on else nn.Identity()


class HarnessBlock(nn.Module):
    def __init__(self, spec: dict, positional: bool, rotary: Optional[HalvesRotary]):
        super().__init__()
        self.ln1 = _norm(spec, inner=True)
        self.attn = HarnessAttention(spec, positional, rotary)
        if spec["d_mlp"]:
            self.ln2 = _norm(spec, inner=True)
            self.mlp = HarnessMLP(spec["d_model"], spec["d_mlp"])

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, qk_pos: Optional[Tensor] = None,
                **kwargs: Any) -> tuple[Tensor]:
        attn_out, _ = self.attn(self.ln1(hidden_states), attention_mask=attention_mask,
                                position_ids=position_ids, qk_pos=qk_pos)
        hidden_states = hidden_states + attn_out
        if hasattr(self, "mlp"):
            hidden_states = hidden_states + self.mlp(self.ln2(hidden_states))
        return (hidden_states,)


class HarnessModel(nn.Module):
    """`train.model.AttentionOnlyTransformer`'s function with TL4-bridgeable submodules. Attribute names
    avoid the bridge's slot names (embed, pos_embed, blocks, ln_final, unembed), as TL4's NativeModel."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec = checked_spec(spec)
        self.tok_embed = nn.Embedding(spec["d_vocab"], spec["d_model"])
        has_pos = spec["positional"] in ("shortformer", "learned")
        self.pos = nn.Embedding(spec["n_ctx"], spec["d_model"]) if has_pos else None
        rotary = HalvesRotary(spec["n_ctx"], spec["d_head"]) if spec["positional"] == "rotary" else None
        k = spec["position_layers"]
        self.layers = nn.ModuleList(HarnessBlock(spec, k is None or i < k, rotary) for i in range(spec["n_layers"]))
        self.ln_out = _norm(spec, inner=False)
        self.head = nn.Linear(spec["d_model"], spec["d_vocab"], bias=True)

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                **kwargs: Any) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("exactly one of input_ids or inputs_embeds")
        x = self.tok_embed(input_ids) if input_ids is not None else inputs_embeds
        b, t = x.shape[:2]
        if t > self.spec["n_ctx"]:
            raise ValueError(f"input length {t} exceeds n_ctx={self.spec['n_ctx']}")
        if position_ids is None:
            position_ids = torch.arange(t, device=x.device).unsqueeze(0).expand(b, -1)
        qk_pos = None
        if self.pos is not None:
            pos = self.pos(position_ids)
            if self.spec["positional"] == "learned":
                x = x + pos
            else:
                qk_pos = pos  # shortformer: queries and keys only, added after ln1
        for block in self.layers:
            (x,) = block(x, attention_mask=attention_mask, position_ids=position_ids, qk_pos=qk_pos)
        return self.head(self.ln_out(x))


# --------------------------------------------------------------------------------------------------
# The architecture adapter and the bridge.


def _adapter_class():
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
    from transformer_lens.model_bridge.generalized_components import (
        AttentionBridge, BlockBridge, EmbeddingBridge, LinearBridge, MLPBridge, NormalizationBridge,
        PosEmbedBridge, UnembeddingBridge)
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    class HarnessArchitectureAdapter(ArchitectureAdapter):
        """Maps `HarnessModel` onto TL4's slots. Flags set so compatibility-mode weight processing stays exact:
        folding ln1 into W_Q/W_K is wrong when shortformer positions are added after ln1, and centering
        W_pos is wrong when W_pos does not write to the residual stream, so both are off for shortformer."""

        supports_kv_cache = False  # HarnessModel keeps no KV cache: generate() recomputes the prefix

        def __init__(self, cfg: Any) -> None:
            super().__init__(cfg)
            spec = cfg.harness_spec
            shortformer = spec["positional"] == "shortformer"
            self.supports_fold_ln = not shortformer
            self.supports_center_writing_weights = not shortformer
            self.weight_processing_conversions = {**self._qkvo_weight_conversions(include_biases=True)}

            def norm(name: str, on: bool):
                return NormalizationBridge(name=name, config=cfg) if on else GeneralizedComponent(name=name, config=cfg)

            inner = spec["layernorm"] == "pre"
            attn = {"q": LinearBridge(name="q"), "k": LinearBridge(name="k"), "v": LinearBridge(name="v"),
                    "o": LinearBridge(name="o")}
            if spec["smeared_key"]:
                attn["smear"] = GeneralizedComponent(name="smear", config=cfg)
            block = {"ln1": norm("ln1", inner), "attn": AttentionBridge(name="attn", config=cfg, submodules=attn)}
            if spec["d_mlp"]:
                block["ln2"] = norm("ln2", inner)
                block["mlp"] = MLPBridge(name="mlp", submodules={"in": LinearBridge(name="fc_in"),
                                                                 "out": LinearBridge(name="fc_out")})
            block_bridge = BlockBridge(name="layers", config=cfg, submodules=block)
            if not spec["d_mlp"]:  # no ln2 / mlp to alias (as TL4's native adapter)
                block_bridge.hook_aliases = {k: v for k, v in block_bridge.hook_aliases.items()
                                             if k not in ("hook_resid_mid", "hook_mlp_out")}
            mapping: dict = {"embed": EmbeddingBridge(name="tok_embed")}
            if spec["positional"] in ("shortformer", "learned"):
                mapping["pos_embed"] = PosEmbedBridge(name="pos")
            mapping["blocks"] = block_bridge
            mapping["ln_final"] = norm("ln_out", spec["layernorm"] != "none")
            mapping["unembed"] = UnembeddingBridge(name="head")
            self.component_mapping = mapping

        def setup_hook_compatibility(self, bridge: Any) -> None:
            """Let rotary layers fire `blocks.{i}.attn.hook_rot_q/k` (TL4 creates them for rotary configs
            but only its own attention reimplementations fire them)."""
            for block in getattr(bridge, "blocks", []):
                attn = block.attn
                original = attn.original_component
                if isinstance(original, HarnessAttention) and hasattr(attn, "hook_rot_q"):
                    object.__setattr__(original, "_rot_hooks", (attn.hook_rot_q, attn.hook_rot_k))

    return HarnessArchitectureAdapter


_registered = False


def register() -> None:
    """Register the adapter with TL4's factory under ARCHITECTURE (idempotent)."""
    global _registered
    if not _registered:
        from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory

        ArchitectureAdapterFactory.register_adapter(ARCHITECTURE, _adapter_class())
        _registered = True


def bridge_config(spec: dict):
    """The `TransformerBridgeConfig` describing `spec` (TL-style fields for TL4's analysis code)."""
    from transformer_lens.config import TransformerBridgeConfig

    spec = checked_spec(spec)
    pos = {"shortformer": "shortformer", "learned": "standard", "rotary": "rotary", "none": "none"}[spec["positional"]]
    cfg = TransformerBridgeConfig(
        d_model=spec["d_model"], d_head=spec["d_head"], n_layers=spec["n_layers"], n_ctx=spec["n_ctx"],
        n_heads=spec["n_heads"], d_vocab=spec["d_vocab"], d_vocab_out=spec["d_vocab"],
        architecture=ARCHITECTURE, model_name="induction-harness",
        attn_only=spec["d_mlp"] == 0, d_mlp=spec["d_mlp"] or None, act_fn="gelu",
        # layernorm=final: no norm inside the blocks; ln_final is still a LayerNorm (the adapter maps
        # it). "LN" would make weight processing fold/centre as if every block normalised its input.
        normalization_type="LN" if spec["layernorm"] == "pre" else None,
        positional_embedding_type=pos, eps=EPS,
        rotary_dim=spec["d_head"] if pos == "rotary" else None, rotary_base=int(ROTARY_BASE),
        rotary_adjacent_pairs=False,
        default_prepend_bos=True,  # with the digit tokenizer: BOS = token 0, as our sequences start
        init_weights=False, dtype=torch.float32,
    )
    cfg.harness_spec = spec  # read by HarnessArchitectureAdapter
    return cfg


def digit_tokenizer(d_vocab: int):
    """A word-level HF tokenizer: token i <-> the string `str(i)` for i >= 1, whitespace-separated, token 0
    <-> "<bos>", prepended as BOS (our sequences start with 0). Lets TL4's string APIs (`to_tokens`,
    `head_detector.detect_head`) run: `bridge.to_tokens("5 9 3 5 9 3")` -> `[[0, 5, 9, 3, 5, 9, 3]]`.
    (Token 0 cannot be spelled "0": HF splits text on special-token strings, so "40" would become 4, 0.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, **{str(i): i for i in range(1, d_vocab)}}
    vocab.update({"<unk>": d_vocab, "<eos>": d_vocab + 1})  # outside the model's vocabulary: never fed to it
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>",
                                   unk_token="<unk>", add_bos_token=True, name_or_path="induction-harness-digits")


def bridge_from_state(spec: dict, state: dict[str, Tensor], *, tokenizer: Any = "digits",
                      compatibility_mode: bool | str = False, device: str = "cpu"):
    """A `TransformerBridge` computing the model given by `spec` and a TransformerLens-3 state dict.

    `compatibility_mode`: False (default: raw weights, logits equal ours), "no_processing" (legacy
    hook/component aliases, weights untouched) or True (also HookedTransformer's load-time processing:
    fold_ln, centering, fold_value_biases; logits then differ from ours by a per-position constant).
    """
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    spec = checked_spec(spec)
    register()
    cfg = bridge_config(spec)
    module = HarnessModel(spec)
    if tokenizer == "digits":
        tokenizer = digit_tokenizer(spec["d_vocab"])
    bridge = build_bridge_from_module(module, ARCHITECTURE, tl_config=cfg, tokenizer=tokenizer,
                                      dtype=torch.float32, model_name="induction-harness")
    state = dict(state)
    # convert_tl_checkpoint knows HookedTransformer's parameter names only: rename ours ourselves
    smear = {k.replace(".smear_alpha", ".smear.weight"): state.pop(k) for k in list(state) if k.endswith(".smear_alpha")}
    if spec["positional"] == "none":
        state.pop("pos_embed.W_pos", None)  # version 1 writes zeros
    try:
        bridge.load_state_dict({**convert_tl_checkpoint(state, cfg), **smear}, strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ExportError(f"weights do not fit the model spec: {e}") from None
    if torch.device(device) != torch.device("cpu"):
        bridge = bridge.to(device)  # (prints "Moving model to device")
    bridge.eval()
    if compatibility_mode:
        with warnings.catch_warnings():
            # shortformer: "...does not support fold_ln / center_writing_weights" (by design, see the adapter)
            warnings.filterwarnings("ignore", message=".*does not support (fold_ln|center_writing_weights)")
            bridge.enable_compatibility_mode(disable_warnings=True,
                                             no_processing=compatibility_mode == "no_processing")
    return bridge


def to_bridge(model: Any, **kwargs: Any):
    """`model` (a `train.model.AttentionOnlyTransformer`) as a TL4 `TransformerBridge` in eval mode.
    Every scheme of ours converts; keyword arguments as `bridge_from_state`."""
    return bridge_from_state(spec_of(model), tl_state_dict(model), **kwargs)


def load_bridge(path: str | Path, **kwargs: Any):
    """An export file (`python -m analysis export-tl`, any version) as a `TransformerBridge`; keyword
    arguments as `bridge_from_state`."""
    spec, state = read_export(path)
    return bridge_from_state(spec, state, **kwargs)
