"""Build the pieces of a run from a validated config."""

from __future__ import annotations

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .data.datamodule import StreamDataModule
from .data.synthetic import RepeatedTokens, batch_rng, probe_token_weights
from .model import AttentionOnlyTransformer, ModelConfig

COMMON_DATA_KEYS = ("_target_", "batch_size", "seed", "eval_size", "eval_seed", "num_workers")


def build_generator(cfg: DictConfig):
    """Instantiate the data option's generator with its own keys, the vocabulary and the context."""
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in COMMON_DATA_KEYS}
    return hydra.utils.instantiate({"_target_": cfg.data._target_, **kwargs, "seq_len": cfg.model.n_ctx})


def build_datamodule(cfg: DictConfig, generator=None) -> StreamDataModule:
    generator = generator or build_generator(cfg)
    d = cfg.data
    return StreamDataModule(generator, d.batch_size, d.seed, d.eval_size, d.eval_seed, d.num_workers)


def build_model(cfg: DictConfig) -> AttentionOnlyTransformer:
    return AttentionOnlyTransformer(ModelConfig.from_node(cfg.model))


def probe_vocabulary(cfg: DictConfig, generator=None) -> np.ndarray:
    """Weights `[d_vocab]` of the tokens probes draw from: the data's tokens without BOS, excluding the
    most and least common ones when the data's token frequencies are known (Olsson et al.)."""
    unigram = generator.unigram() if hasattr(generator, "unigram") else None
    weights = probe_token_weights(unigram, cfg.model.d_vocab, cfg.probes.exclude_fraction)
    if weights is None:
        weights = np.zeros(cfg.model.d_vocab)
        weights[1:cfg.data.d_vocab] = 1.0
    return weights


def probe_tokens(cfg: DictConfig, generator=None) -> torch.Tensor:
    """The fixed probe batch: BOS + `rep_len` random tokens repeated to fill the context."""
    p = cfg.probes
    gen = RepeatedTokens(cfg.model.d_vocab, cfg.model.n_ctx, p.rep_len, probe_vocabulary(cfg, generator))
    return torch.from_numpy(gen(batch_rng(p.seed, 0, "probe"), p.n_sequences))


def task_batch(cfg: DictConfig, generator) -> dict[str, torch.Tensor] | None:
    """The fixed batch of the generator's task metrics (`task_metrics`, train/data/icl_tasks.py), drawn
    once from the probe seed; None when the data option has none."""
    if not hasattr(generator, "task_metrics"):
        return None
    batch = generator.task_batch(batch_rng(cfg.probes.seed, 0, "task"), cfg.probes.task_size)
    return {key: torch.as_tensor(np.asarray(value)) for key, value in batch.items()}
