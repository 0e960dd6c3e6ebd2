"""Structured configs: the schema of every config group, and the checks Hydra's types cannot express.

Hydra validates types and key names against these dataclasses, so a typo or a wrong type fails at
start with the key's name. `validate` adds the cross-field checks (shapes, positive sizes, probe
lengths) with the same one-line style.
"""

from __future__ import annotations

import copy
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from .data.corpus import CorpusConfig
from .errors import ConfigError
from .interventions import InterventionConfig
from .model_config import ModelConfig


@dataclass
class DataConfig:
    """Fields every data option has; `_target_` names the generator class."""

    _target_: str = MISSING
    d_vocab: int = 64  # vocabulary size including BOS (token 0)
    batch_size: int = 32  # sequences per training step
    seed: int = II("seed")  # seeds the training stream: batch i depends on (seed, i) only
    eval_size: int = 128  # sequences in the fixed evaluation set
    eval_seed: int = 1234  # the evaluation set is shared by every run that shares this seed
    # DataLoader worker processes making training batches beside the training process (0: in it).
    # The batches, and so the run, are the same for any number.
    num_workers: int = 1


@dataclass
class MarkovCopiesConfig(DataConfig):
    _target_: str = "train.data.synthetic.MarkovCopies"
    concentration: float = 1.0  # Dirichlet concentration of the Markov chain's rows (lower: peakier)
    spans_per_seq: int = 4  # copied spans per sequence
    span_len_min: int = 8
    span_len_max: int = 24
    language_seed: int = 0  # seeds the Markov chain itself, shared across runs


@dataclass
class RepeatedTokensConfig(DataConfig):
    _target_: str = "train.data.synthetic.RepeatedTokens"
    rep_len: int = 25  # random tokens per repeat


@dataclass
class ICLMarkovConfig(DataConfig):
    """In-context Markov chains (Edelman et al. 2024); see train/data/icl_tasks.py."""

    _target_: str = "train.data.icl_tasks.ICLMarkov"
    d_vocab: int = 4  # BOS + the states
    n_states: int = 3  # states per chain (tokens 1..n_states); the paper's 3
    alpha: float = 1.0  # Dirichlet concentration of each sequence's transition rows


@dataclass
class BigramTriggersConfig(DataConfig):
    """A global bigram plus per-sequence trigger -> output pairs (Bietti et al. 2023)."""

    _target_: str = "train.data.icl_tasks.BigramTriggers"
    n_triggers: int = 5  # the most frequent tokens of the bigram become triggers
    concentration: float = 1.0  # Dirichlet concentration of the bigram's rows
    language_seed: int = 0  # seeds the bigram, shared across runs


@dataclass
class ICLClassificationConfig(DataConfig):
    """In-context classification with bursty Zipfian classes (Reddy 2023; Chan et al. 2022)."""

    _target_: str = "train.data.icl_tasks.ICLClassification"
    d_vocab: int = 209  # at least 1 + n_labels + n_classes * items_per_class + n_novel_classes
    n_pairs: int = 8  # exemplar (item, label) pairs before the query; needs 2 * n_pairs + 3 <= model.n_ctx
    n_classes: int = 128
    n_labels: int = 16  # label tokens 1..n_labels; each class has a fixed one
    items_per_class: int = 1  # item tokens per class (an occurrence picks one at random)
    burstiness: int = 4  # B: each context class appears B times (n_pairs / B classes)
    p_bursty: float = 0.9  # probability the query's class is in the context
    zipf_alpha: float = 0.0  # class frequencies ~ rank^-zipf_alpha (0: uniform)
    noise: float = 0.0  # probability an item token is replaced by a random item token
    n_novel_classes: int = 64  # held-out classes (one item token each, never trained) for task/icl_accuracy
    p_relabel: float = 0.0  # probability a training sequence's classes get fresh labels (not their fixed ones)
    language_seed: int = 0  # seeds the class -> label map, shared across runs


@dataclass
class RandomCopiesConfig(DataConfig):
    """Random tokens with spans copied to later offsets: the minimal induction task."""

    _target_: str = "train.data.icl_tasks.RandomCopies"
    spans_per_seq: int = 4  # copied spans per sequence
    span_len_min: int = 8
    span_len_max: int = 24
    distinct: bool = True  # original tokens drawn without replacement (needs d_vocab >= n_ctx)


@dataclass
class TextDataConfig(CorpusConfig, DataConfig):
    """Text through Hugging Face `datasets` (see train/data/text.py); the fields that choose the
    documents are `CorpusConfig`'s. `d_vocab` is the tokenizer's vocabulary plus BOS: 257 for bytes,
    the BPE's size for bpe."""

    _target_: str = "train.data.text.TextData"
    d_vocab: int = 512
    tokenizer: str = "bpe"  # bpe (byte-level, trained on the training documents) | byte (d_vocab 257)
    bpe_min_frequency: int = 2  # BPE: a pair must occur this often to be merged
    heldout_fraction: float = 0.05  # share of documents held out; the evaluation set comes from them
    split_seed: int = 0  # which documents are held out
    # Training sequences: packed (random rows of BOS + tokens cut from the split, the same few
    # positions for a token every time) | random (BOS + a window at a random offset of the split's
    # token stream, fresh every batch)
    windows: str = "packed"
    cache_dir: str = "${oc.env:INDUCTION_HARNESS_CACHE,'~/.cache/induction-harness'}"  # tokenizer + packed arrays


@dataclass
class TrainerConfig:
    """Arguments of `lightning.Trainer`."""

    max_steps: int = 1500
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"  # "bf16-mixed" on a GPU
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    deterministic: bool = False
    enable_progress_bar: bool = True


@dataclass
class OptimConfig:
    lr: float = 5e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "constant"  # after warm-up: constant, cosine or linear decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1


@dataclass
class ProbesConfig:
    enabled: bool = True  # false: only the training loss and ICL score are recorded
    every_n_steps: int = 1  # per-head scores and ICL every this many steps
    n_sequences: int = 4  # probe batch: BOS + rep_len random tokens, repeated (more: smoother scores, slower steps)
    rep_len: int = 20  # R; Olsson et al. use 25, repeated 4 times (needs n_ctx >= 101)
    exclude_fraction: float = 0.02  # drop this share of most and of least common tokens from probes
    seed: int = 0  # the probe batch is fixed by this seed
    eval_every_n_steps: int = 50  # the fixed evaluation set: this often, log-spaced before, and at checkpoints
    circuits_every_n_steps: int = 100  # copying / OV / QK-composition scores (and at checkpoints; 0: only there)
    flush_every_n_steps: int = 100  # metrics reach the run directory and W&B this often
    background: bool = True  # measure in a worker thread on a copy of the weights (with more than one core)
    heatmap_every_n_steps: int = 500  # per-head score heatmap to W&B as an image (0: never)
    task_size: int = 64  # sequences in the fixed batch of a data option's task metrics (task/...)
    icl_late: Optional[int] = None  # token index; default n_ctx * 500/512 (Olsson et al.)
    icl_early: Optional[int] = None  # token index; default n_ctx * 50/512
    # The ICL score averages the loss over the positions within this factor of each index (late/sqrt(span)
    # to late*sqrt(span)), so its evaluation noise is small; 1: the paper's single positions.
    icl_span: float = 2.0
    induction_threshold: float = 0.5  # prefix-matching score that makes a head an induction head
    previous_token_threshold: float = 0.5  # previous-token score that makes a previous-token head


@dataclass
class PhaseConfig:
    smooth: float = 0.15  # Gaussian smoothing width of the ICL curve, in natural-log tokens
    threshold: float = 0.25  # the window is where dICL/dlog(tokens) is below this share of its peak
    # nats; a smaller ICL improvement across the window is no phase change. Above the few hundredths
    # every model, the 1-layer control too, gains from in-context token frequencies in its first steps.
    min_drop: float = 0.1
    min_step: int = 0  # search from this step on


@dataclass
class CheckpointConfig:
    enabled: bool = True
    log_spaced: bool = True  # steps 0, 1, 2, 4, 8, ... (Pythia)
    every_n_steps: int = 500  # plus every this many steps; 0 disables the linear schedule
    save_last: bool = True  # also at the final step
    # Dense checkpoints through the phase change: the evaluations so far are watched with the summary's
    # detector (phase.*); from when a window that reaches the newest of them has fallen by
    # dense_start_fraction * phase.min_drop until a later evaluation shows it over, a checkpoint every
    # dense_every_n_steps (at most dense_max of them in a run).
    dense: bool = True
    dense_every_n_steps: int = 20
    dense_start_fraction: float = 0.5
    dense_max: int = 100


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"  # offline (no account needed), online, or disabled
    project: str = "induction-heads"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 30.0  # seconds to wait for W&B online before continuing offline


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    csv: bool = False  # also a Lightning CSVLogger under the run directory


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    phase: PhaseConfig = field(default_factory=PhaseConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    experiment_name: str = "default"
    seed: int = 0  # model initialisation and the data stream
    # N > 1: an ensemble of N runs, member k with seed `seed + k`, each the same run as a standalone one
    # with that seed, trained side by side under one run directory (train/ensemble.py).
    seeds: int = 1
    seed_workers: Optional[int] = None  # members trained at once (default: one per CPU core, at most N)
    # How: "processes" (each member a standalone run in a worker process; fastest on a CPU) or "stacked"
    # (all members in one model with a leading member dimension, one pass for all; for a GPU).
    seed_execution: str = "processes"
    resume: Optional[str] = None  # a run directory to continue from its last checkpoint
    compile: bool = False  # torch.compile the model
    # Heads ablated, clamped or frozen during training (train/interventions.py), e.g.
    # 'intervene=[{heads: [L0H0], kind: zero, from_step: 0, to_step: 400}]'
    intervene: list[InterventionConfig] = field(default_factory=list)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(group="data", name="markov_copies_schema", node=MarkovCopiesConfig)
    cs.store(group="data", name="repeated_tokens_schema", node=RepeatedTokensConfig)
    cs.store(group="data", name="text_schema", node=TextDataConfig)
    cs.store(group="data", name="icl_markov_schema", node=ICLMarkovConfig)
    cs.store(group="data", name="bigram_triggers_schema", node=BigramTriggersConfig)
    cs.store(group="data", name="icl_classification_schema", node=ICLClassificationConfig)
    cs.store(group="data", name="random_copies_schema", node=RandomCopiesConfig)
    if not OmegaConf.has_resolver("uid"):
        # Unique per job, so runs started in the same second never share a directory.
        OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True)
        OmegaConf.register_new_resolver("or_default", lambda value, default: value or default)


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: {why}")


def leaves(node: Any, prefix: str) -> dict[str, Any]:
    """`{"group.key": value}` for every leaf under `node` (a config node or a plain value)."""
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in leaves(sub, f"{prefix}.{key}").items()}
    return {prefix: getattr(node, "value", node)}


# What the members of a stacked ensemble share: one model shape, one data generator (each member its
# own stream, from `data.seed`), one optimizer and one training loop; probes, phase and checkpoints are
# each member's own.
STACK_SHARES = ("model", "data", "optim", "trainer")


def check_stackable(cfg: DictConfig) -> None:
    """One line naming the first shared key that differs between the members (a key interpolated from
    the seed, such as `data.language_seed=${seed}`): such members can only train as processes."""

    def shared(member: DictConfig) -> dict[str, Any]:
        return {key: value for group in STACK_SHARES
                for key, value in leaves(OmegaConf.to_container(member[group], resolve=True), group).items()
                if key != "data.seed"}

    first = shared(cfg)  # resolvers such as ${now:...} resolve once here; the copy keeps their values
    member = copy.deepcopy(cfg)
    for seed in range(cfg.seed + 1, cfg.seed + cfg.seeds):
        member.seed = seed
        for key, value in shared(member).items():
            if str(value) != str(first[key]):
                raise ConfigError(f"{key}: {first[key]} for seed {cfg.seed} but {value} for seed {seed}; the "
                                  "members of a stacked ensemble share one model, data generator and optimizer "
                                  "(seed_execution=processes trains them apart)")


def validate(cfg: DictConfig) -> None:
    """Cross-field checks; raises ConfigError naming the first bad key."""
    m, d, p, o, t = cfg.model, cfg.data, cfg.probes, cfg.optim, cfg.trainer
    ModelConfig.from_node(m)
    _require(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be at least 1")
    _require(d.eval_size >= 1, "data.eval_size", d.eval_size, "must be at least 1")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be 0 (batches made in the training "
             "process) or more")
    _require(d.d_vocab <= m.d_vocab, "data.d_vocab", d.d_vocab, f"exceeds model.d_vocab={m.d_vocab}")
    if "span_len_min" in d:
        _require(1 <= d.span_len_min <= d.span_len_max, "data.span_len_min", d.span_len_min,
                 f"must be between 1 and data.span_len_max={d.span_len_max}")
        _require(d.span_len_min < m.n_ctx - 1, "data.span_len_min", d.span_len_min,
                 f"must be shorter than the context (model.n_ctx={m.n_ctx})")
        _require(d.spans_per_seq >= 0, "data.spans_per_seq", d.spans_per_seq, "must be 0 or more")
    if "windows" in d:
        _require(d.windows in ("packed", "random"), "data.windows", d.windows, "expected packed or random")
    if "concentration" in d:
        _require(d.concentration > 0, "data.concentration", d.concentration, "must be positive")
    validate_icl_task(d, m)
    if "rep_len" in d:
        _require(1 <= d.rep_len < d.d_vocab, "data.rep_len", d.rep_len,
                 f"must be between 1 and data.d_vocab-1={d.d_vocab - 1}")
    _require(o.lr > 0, "optim.lr", o.lr, "must be positive")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be 0 or more")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be 0 or more")
    _require(o.schedule in ("constant", "cosine", "linear"), "optim.schedule", o.schedule,
             "expected constant, cosine or linear")
    _require(all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "each must be in [0, 1)")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _require(t.max_steps >= 1, "trainer.max_steps", t.max_steps, "must be at least 1")
    _require(t.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", t.accumulate_grad_batches,
             "must be at least 1")
    _require(t.gradient_clip_val is None or t.gradient_clip_val >= 0, "trainer.gradient_clip_val",
             t.gradient_clip_val, "must be 0 or more (or null: no clipping)")
    for key in ("every_n_steps", "eval_every_n_steps", "flush_every_n_steps", "n_sequences", "task_size"):
        _require(p[key] >= 1, f"probes.{key}", p[key], "must be at least 1")
    for key in ("circuits_every_n_steps", "heatmap_every_n_steps"):
        _require(p[key] >= 0, f"probes.{key}", p[key], "must be 0 (off) or more")
    _require(p.rep_len >= 3, "probes.rep_len", p.rep_len,
             "must be at least 3 (with 2, the token after the previous occurrence is the previous token, "
             "and a previous-token head scores as an induction head)")
    _require(1 + 2 * p.rep_len <= m.n_ctx, "probes.rep_len", p.rep_len,
             f"needs a context of 1 + 2 * rep_len = {1 + 2 * p.rep_len} tokens; model.n_ctx={m.n_ctx}")
    _require(p.rep_len <= m.d_vocab - 1, "probes.rep_len", p.rep_len,
             f"needs that many distinct tokens; model.d_vocab={m.d_vocab}")
    _require(0 <= p.exclude_fraction < 0.5, "probes.exclude_fraction", p.exclude_fraction, "must be in [0, 0.5)")
    from .probes import icl_positions

    try:
        icl_positions(m.n_ctx, p.icl_late, p.icl_early, p.icl_span)
    except ValueError as e:
        raise ConfigError(f"probes.icl_late/icl_early/icl_span: {e}") from None
    from .interventions import parse

    parse(cfg.intervene, m.n_layers, m.n_heads, t.max_steps)
    _require(cfg.checkpoint.every_n_steps >= 0, "checkpoint.every_n_steps", cfg.checkpoint.every_n_steps,
             "must be 0 (off) or more")
    c = cfg.checkpoint
    _require(c.dense_every_n_steps >= 1, "checkpoint.dense_every_n_steps", c.dense_every_n_steps, "must be at least 1")
    _require(0 < c.dense_start_fraction <= 1, "checkpoint.dense_start_fraction", c.dense_start_fraction,
             "must be in (0, 1]")
    _require(c.dense_max >= 0, "checkpoint.dense_max", c.dense_max, "must be 0 (none) or more")
    _require(cfg.seeds >= 1, "seeds", cfg.seeds, "must be at least 1")
    _require(cfg.seed_workers is None or cfg.seed_workers >= 1, "seed_workers", cfg.seed_workers,
             "must be at least 1 (or null: one per CPU core)")
    _require(cfg.seed_execution in ("processes", "stacked"), "seed_execution", cfg.seed_execution,
             "expected processes or stacked")
    if cfg.seeds > 1:
        _require(t.devices in (1, "1", "auto") and t.strategy == "auto", "seeds", cfg.seeds,
                 "an ensemble trains each member on one device; use trainer.devices=1 (no DDP)")
    if cfg.seeds > 1 and cfg.seed_execution == "stacked":
        # Each of these acts on one model at a time, or couples the members (fp16's loss scaler skips
        # every member's step when one overflows).
        _require(not cfg.intervene, "intervene", "[...]", "a stacked ensemble trains without interventions; "
                 "use seed_execution=processes")
        _require(not cfg.compile, "compile", cfg.compile, "a stacked ensemble is not compiled; use compile=false")
        _require(cfg.seed_workers is None, "seed_workers", cfg.seed_workers,
                 "a stacked ensemble trains every member in this process; leave seed_workers unset")
        _require(str(t.precision) not in ("16", "16-mixed"), "trainer.precision", t.precision,
                 "fp16's loss scaling would couple the members of a stacked ensemble; use bf16-mixed or 32")
        check_stackable(cfg)
    _require(cfg.logger.wandb.mode in ("offline", "online", "disabled"), "logger.wandb.mode",
             cfg.logger.wandb.mode, "expected offline, online or disabled")
    _require(cfg.logger.wandb.init_timeout > 0, "logger.wandb.init_timeout", cfg.logger.wandb.init_timeout,
             "must be positive (seconds)")


def validate_icl_task(d: DictConfig, m: DictConfig) -> None:
    """The in-context-learning tasks' checks (train/data/icl_tasks.py), by the keys each one has."""
    if "n_states" in d:  # icl_markov
        _require(d.n_states >= 2, "data.n_states", d.n_states, "must be at least 2")
        _require(d.d_vocab >= d.n_states + 1, "data.d_vocab", d.d_vocab,
                 f"must be at least data.n_states + 1 = {d.n_states + 1} (BOS and the states)")
        _require(d.alpha > 0, "data.alpha", d.alpha, "must be positive")
    if "n_triggers" in d:  # bigram_triggers
        _require(1 <= d.n_triggers <= d.d_vocab - 2, "data.n_triggers", d.n_triggers,
                 f"must be between 1 and data.d_vocab - 2 = {d.d_vocab - 2} (outputs are non-trigger tokens)")
    if "n_pairs" in d:  # icl_classification
        _require(d.n_pairs >= 1, "data.n_pairs", d.n_pairs, "must be at least 1")
        _require(2 * d.n_pairs + 3 <= m.n_ctx, "data.n_pairs", d.n_pairs,
                 f"needs 2 * n_pairs + 3 = {2 * d.n_pairs + 3} tokens (BOS, pairs, query, label); "
                 f"model.n_ctx={m.n_ctx}")
        _require(d.burstiness >= 1, "data.burstiness", d.burstiness, "must be at least 1")
        _require(d.n_pairs % d.burstiness == 0, "data.burstiness", d.burstiness,
                 f"must divide data.n_pairs={d.n_pairs}")
        classes = d.n_pairs // d.burstiness
        _require(d.n_labels >= max(2, classes + 2), "data.n_labels", d.n_labels,
                 f"must be at least n_pairs / burstiness + 2 = {classes + 2} (fresh labels per context class)")
        _require(d.n_classes > classes, "data.n_classes", d.n_classes,
                 f"must exceed n_pairs / burstiness = {classes} (a query class absent from the context)")
        _require(d.items_per_class >= 1, "data.items_per_class", d.items_per_class, "must be at least 1")
        _require(d.n_novel_classes >= classes, "data.n_novel_classes", d.n_novel_classes,
                 f"must be at least n_pairs / burstiness = {classes} (the in-context test's classes)")
        need = 1 + d.n_labels + d.n_classes * d.items_per_class + d.n_novel_classes
        _require(d.d_vocab >= need, "data.d_vocab", d.d_vocab,
                 f"must be at least 1 + n_labels + n_classes * items_per_class + n_novel_classes = {need}")
        for key in ("p_bursty", "noise", "p_relabel"):
            _require(0 <= d[key] <= 1, f"data.{key}", d[key], "must be in [0, 1]")
        _require(d.zipf_alpha >= 0, "data.zipf_alpha", d.zipf_alpha, "must be 0 or more")
    if "distinct" in d and d.distinct:  # random_copies
        _require(d.d_vocab >= m.n_ctx, "data.d_vocab", d.d_vocab,
                 f"must be at least model.n_ctx={m.n_ctx} for distinct tokens (or set data.distinct=false)")
