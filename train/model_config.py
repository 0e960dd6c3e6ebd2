"""The model's config: every option of `AttentionOnlyTransformer`, its derived fields and its checks.

One dataclass serves as Hydra's schema of the `model` group (so a typo or a wrong type fails at start
with the key's name), as the model's constructor argument, and as what loading, export and the
benchmark read. A new model option is one field here, the model code that uses it, and its test.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

from omegaconf import II, DictConfig, OmegaConf

from .errors import ConfigError


class Positional(str, Enum):  # a str, so `cfg.positional == "rotary"` reads as it looks
    shortformer = "shortformer"  # positions enter queries and keys only (Olsson et al.), the default
    learned = "learned"  # learned positions added to the residual stream (GPT-2)
    rotary = "rotary"  # rotary embeddings on queries and keys
    none = "none"  # no position information at all


class LayerNorm(str, Enum):
    pre = "pre"  # before each layer (and its MLP) and before the unembedding (TransformerLens), the default
    final = "final"  # before the unembedding only: the residual stream keeps its scale through the layers
    none = "none"


@dataclass
class ModelConfig:
    n_layers: int = 2  # attention layers
    n_heads: int = 4  # heads per layer
    d_model: int = 64  # residual stream width
    d_head: Optional[int] = None  # per-head width; default d_model // n_heads
    n_ctx: int = 64  # context length (training sequences are this long)
    d_vocab: int = II("data.d_vocab")  # vocabulary size, taken from the data by default
    positional: Positional = Positional.shortformer
    layernorm: LayerNorm = LayerNorm.pre
    d_mlp: int = 0  # 0: attention-only; > 0: an MLP of this width after each attention layer
    smeared_key: bool = False  # per-head trainable key smearing (Olsson et al.)
    init_std: Optional[float] = None  # weight init std; default 0.8 / sqrt(d_model) (TransformerLens)
    embed_std: Optional[float] = None  # init std of W_E and W_pos; default init_std
    freeze_embedding: bool = False  # keep W_E at its random init (fixed random token vectors)
    # shortformer/rotary: positions enter the attention of the first N layers only (None: every layer).
    # With 1, later layers can attend by position only through what layer 0 wrote.
    position_layers: Optional[int] = None

    @classmethod
    def from_node(cls, node: DictConfig | dict[str, Any]) -> "ModelConfig":
        """The checked config from the composed `model` node (interpolations resolved) or a plain dict."""
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(node) - names)
        if unknown:
            raise ConfigError(f"model.{unknown[0]}: not a model option")
        return cls(**node).checked()

    def checked(self) -> "ModelConfig":
        """A copy with the derived fields filled in (`d_head`) and enum fields typed; raises ConfigError
        naming the first bad key."""
        try:
            positional, layernorm = Positional(self.positional), LayerNorm(self.layernorm)
        except ValueError:
            bad = "positional" if self.positional not in [p.value for p in Positional] else "layernorm"
            options = Positional if bad == "positional" else LayerNorm
            raise ConfigError(f"model.{bad}={getattr(self, bad)}: expected one of "
                              f"{', '.join(o.value for o in options)}") from None
        for key in ("n_layers", "n_heads", "d_model", "n_ctx"):
            _require(getattr(self, key) >= 1, key, getattr(self, key), "must be at least 1")
        if self.d_head is None:
            _require(self.d_model % self.n_heads == 0, "d_model", self.d_model,
                     f"must be divisible by model.n_heads={self.n_heads} (or set model.d_head)")
        else:
            _require(self.d_head >= 1, "d_head", self.d_head, "must be at least 1")
        d_head = self.d_head or self.d_model // self.n_heads
        if positional == Positional.rotary:
            _require(d_head % 2 == 0, "d_head", d_head, "must be even for rotary positions")
        if self.position_layers is not None:
            _require(positional in (Positional.shortformer, Positional.rotary), "position_layers",
                     self.position_layers, f"applies to shortformer and rotary positions, not {positional.value}")
            _require(self.position_layers >= 1, "position_layers", self.position_layers, "must be at least 1")
        for key in ("init_std", "embed_std"):
            value = getattr(self, key)
            _require(value is None or value > 0, key, value, "must be positive (or null: the default)")
        _require(self.d_mlp >= 0, "d_mlp", self.d_mlp, "must be 0 (attention-only) or positive")
        _require(isinstance(self.d_vocab, int) and self.d_vocab >= 3, "d_vocab", self.d_vocab,
                 "must be at least 3 (BOS and two tokens)")
        _require(self.n_ctx >= 8, "n_ctx", self.n_ctx, "must be at least 8 for the probes to mean anything")
        return dataclasses.replace(self, d_head=d_head, positional=positional, layernorm=layernorm)


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"model.{key}={value.value if isinstance(value, Enum) else value}: {why}")
