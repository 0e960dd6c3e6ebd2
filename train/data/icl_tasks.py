"""Synthetic in-context-learning tasks, each with its own transition and a metric that shows it.

Every generator is, like `MarkovCopies`, a pure function of a numpy `Generator`:
`gen(rng, batch) -> int64 [batch, seq_len]`, BOS (0) first. Each also has
`task_batch(rng, n) -> dict` (fixed evaluation inputs, numpy arrays, at least `"tokens"`) and
`task_metrics(logits, batch) -> dict[str, Tensor]` (scalar tensors named `task/...`, left on the
logits' device), which the Measure callback runs on every probe step (`train/callbacks/measure.py`).

Logits are `[batch, pos, d_vocab]`; the logits at index `t` predict token `t + 1`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .synthetic import BOS, copy_spans


def _stationary(transition: np.ndarray) -> np.ndarray:
    """Stationary distribution(s) of row-stochastic matrices `[..., n, n]` -> `[..., n]`."""
    n = transition.shape[-1]
    a = np.swapaxes(transition, -1, -2) - np.eye(n)  # (P^T - I) pi = 0 ...
    a[..., -1, :] = 1.0  # ... with sum(pi) = 1 in place of the last (redundant) equation
    b = np.zeros(transition.shape[:-1])
    b[..., -1] = 1.0
    pi = np.clip(np.linalg.solve(a, b[..., None])[..., 0], 0.0, None)
    return pi / pi.sum(axis=-1, keepdims=True)


def _categorical(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """One draw per row of `p [batch, n]`."""
    c = p.cumsum(axis=-1)
    c[:, -1] = 1.0
    return (rng.random((len(p), 1)) > c).sum(axis=1)


def _kl(p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last axis, with 0 log 0 = 0."""
    return (torch.special.xlogy(p, p) - p * log_q).sum(-1)


# --- 1. ICL Markov chains (Edelman et al. 2024) ---------------------------------------------------


class ICLMarkov:
    """In-context Markov chains: Edelman, Edelman, Goel, Kakade, Malach, Zhang (2024), "The evolution
    of statistical induction heads: in-context learning Markov chains".

    Each sequence has its own transition matrix over `n_states` states (tokens 1..n_states), rows
    drawn fresh from Dirichlet(`alpha`); the first state is drawn from that matrix's stationary
    distribution. Nothing is learnable in weights beyond "states are exchangeable": the model must
    estimate the chain in context. Models pass through uniform -> in-context unigram -> in-context
    bigram predictions (the bigram stage arrives abruptly, with an induction-like head).

    Metrics (later half of each sequence, predictions renormalised over the state tokens):
    `task/kl_uniform`, `task/kl_unigram`, `task/kl_bigram` = KL(estimator || model), averaged over
    positions and sequences, for the uniform distribution and for the in-context unigram and bigram
    estimators with add-`alpha` smoothed counts (add-1, Laplace, for the default alpha=1: the
    Bayes-optimal predictor under the Dirichlet(alpha) prior for the bigram).
    """

    def __init__(self, d_vocab: int, seq_len: int, n_states: int = 3, alpha: float = 1.0):
        self.d_vocab, self.seq_len, self.n_states, self.alpha = d_vocab, seq_len, n_states, alpha

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens `[batch, seq_len]` and each sequence's transition matrix `[batch, from, to]`."""
        k = self.n_states
        transition = rng.dirichlet(np.full(k, self.alpha), size=(batch, k))
        cumulative = transition.cumsum(axis=-1)
        cumulative[..., -1] = 1.0
        state = _categorical(rng, _stationary(transition))
        u = rng.random((batch, self.seq_len - 1))
        rows = np.arange(batch)
        body = np.empty((batch, self.seq_len - 1), dtype=np.int64)
        for t in range(self.seq_len - 1):
            body[:, t] = state
            state = (u[:, t, None] > cumulative[rows, state]).sum(axis=1)
        tokens = np.concatenate([np.full((batch, 1), BOS, dtype=np.int64), body + 1], axis=1)
        return tokens, transition

    def __call__(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        return self.sample(rng, batch)[0]

    def estimators(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """In-context unigram and bigram predictive distributions `[batch, pos, n_states]` for the
        token after each position (index 0, BOS: no context yet), add-`alpha` smoothed."""
        k, a = self.n_states, self.alpha
        x = tokens[:, 1:] - 1  # states [batch, T - 1]
        onehot = np.eye(k)[x]  # [batch, T - 1, k]
        counts = np.concatenate([np.zeros_like(onehot[:, :1]), onehot.cumsum(axis=1)], axis=1)  # states seen
        unigram = (counts + a) / (counts.sum(-1, keepdims=True) + k * a)
        pairs = onehot[:, :-1, :, None] * onehot[:, 1:, None, :]  # [batch, T - 2, from, to]
        # At token index t the transitions seen are x_1 -> x_2 ... x_{t-1} -> x_t.
        seen = np.concatenate([np.zeros_like(pairs[:, :2]), pairs.cumsum(axis=1)], axis=1)  # [batch, T, k, k]
        current = np.concatenate([np.zeros((len(x), 1), dtype=np.int64), x], axis=1)  # state at index t
        row = np.take_along_axis(seen, current[:, :, None, None], axis=2)[:, :, 0]  # [batch, T, k]
        bigram = (row + a) / (row.sum(-1, keepdims=True) + k * a)
        bigram[:, 0] = 1.0 / k
        return unigram, bigram

    def task_batch(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        tokens, _ = self.sample(rng, n)
        unigram, bigram = self.estimators(tokens)
        positions = np.arange(self.seq_len // 2, self.seq_len - 1)  # later half, each with a next token
        return {"tokens": tokens, "positions": positions,
                "unigram": unigram[:, positions].astype(np.float32),
                "bigram": bigram[:, positions].astype(np.float32)}

    def task_metrics(self, logits: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        k = self.n_states
        log_q = F.log_softmax(logits[:, batch["positions"], 1:k + 1].float(), dim=-1)  # over states only
        uniform = torch.full_like(log_q, 1.0 / k)
        return {"task/kl_uniform": _kl(uniform, log_q).mean(),
                "task/kl_unigram": _kl(batch["unigram"], log_q).mean(),
                "task/kl_bigram": _kl(batch["bigram"], log_q).mean()}


# --- 2. Global bigram + per-sequence triggers (Bietti et al. 2023) ----------------------------------


class BigramTriggers:
    """Bietti, Cabannes, Bouchacourt, Jegou, Bottou (2023), "Birth of a transformer: a memory
    viewpoint": a global bigram model plus in-context trigger -> output associations.

    One fixed bigram model over tokens 1..d_vocab-1 (rows from Dirichlet(`concentration`), seeded by
    `language_seed`, as in MarkovCopies). The `n_triggers` most frequent tokens under its stationary
    distribution are triggers (the paper draws triggers among the most likely tokens). Each sequence
    draws an output token per trigger from the stationary distribution restricted to the non-trigger
    tokens; whenever a trigger appears, the next token is its output, otherwise the next token follows
    the bigram. The first token is drawn from the stationary distribution. The global bigram is
    learned in weights first; the trigger outputs need an induction head.

    Metrics: `task/trigger_accuracy`, top-1 accuracy (whole vocabulary) of the output after a
    trigger's second and later occurrences; `task/bigram_loss`, the cross-entropy of the model's
    next-token distribution against the true bigram row at non-trigger positions (its floor is the
    bigram's entropy), and `task/bigram_kl`, the same minus that entropy (KL(bigram || model)).
    """

    def __init__(self, d_vocab: int, seq_len: int, n_triggers: int = 5, concentration: float = 1.0,
                 language_seed: int = 0):
        self.d_vocab, self.seq_len, self.n_triggers = d_vocab, seq_len, n_triggers
        lang = np.random.default_rng([language_seed, 11])
        n = d_vocab - 1  # BOS is never emitted
        self.transition = lang.dirichlet(np.full(n, concentration), size=n)  # [from, to], tokens 1..n
        self.stationary = _stationary(self.transition)
        self.triggers = np.sort(np.argsort(-self.stationary, kind="stable")[:n_triggers] + 1)  # token ids
        self.trigger_index = np.full(d_vocab, -1, dtype=np.int64)  # token -> its trigger slot, or -1
        self.trigger_index[self.triggers] = np.arange(n_triggers)
        p_out = self.stationary.copy()
        p_out[self.triggers - 1] = 0.0
        self.output_p = p_out / p_out.sum()
        self._cumulative = self.transition.cumsum(axis=1)
        self._cumulative[:, -1] = 1.0

    def unigram(self) -> np.ndarray:
        """Stationary frequencies of the bigram over the full vocabulary (BOS 0), for the probes."""
        return np.concatenate([[0.0], self.stationary])

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens `[batch, seq_len]` and each sequence's output tokens `[batch, n_triggers]`."""
        n_out = len(self.output_p)
        outputs = (rng.random((batch, self.n_triggers, 1)) > self.output_p.cumsum()[:n_out - 1]).sum(-1) + 1
        token = _categorical(rng, np.broadcast_to(self.stationary, (batch, n_out))) + 1
        u = rng.random((batch, self.seq_len - 1))
        rows = np.arange(batch)
        body = np.empty((batch, self.seq_len - 1), dtype=np.int64)
        for t in range(self.seq_len - 1):
            body[:, t] = token
            following = (u[:, t, None] > self._cumulative[token - 1]).sum(axis=1) + 1
            slot = self.trigger_index[token]
            token = np.where(slot >= 0, outputs[rows, np.maximum(slot, 0)], following)
        tokens = np.concatenate([np.full((batch, 1), BOS, dtype=np.int64), body], axis=1)
        return tokens, outputs

    def __call__(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        return self.sample(rng, batch)[0]

    def task_batch(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        tokens, outputs = self.sample(rng, n)
        slot = self.trigger_index[tokens]  # [n, T]
        is_trigger = slot >= 0
        # Second and later occurrence of the same trigger in the sequence (its output was seen).
        onehot = (slot[:, :, None] == np.arange(self.n_triggers)) & is_trigger[:, :, None]
        earlier = (onehot.cumsum(axis=1) - onehot)[np.arange(n)[:, None], np.arange(self.seq_len), np.maximum(slot, 0)]
        repeat = is_trigger & (earlier > 0)
        repeat[:, -1] = False  # no next token to predict
        target = np.where(repeat, np.take_along_axis(outputs, np.maximum(slot, 0), axis=1), 0)
        bigram = np.zeros((self.d_vocab, self.d_vocab), dtype=np.float32)  # [from, to]; BOS row unused
        bigram[1:, 1:] = self.transition
        nontrigger = ~is_trigger
        nontrigger[:, 0] = False  # after BOS comes the stationary draw, not a bigram row
        return {"tokens": tokens, "trigger_mask": repeat, "trigger_target": target,
                "bigram_mask": nontrigger, "bigram": bigram}

    def task_metrics(self, logits: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        tokens, trig, bg = batch["tokens"], batch["trigger_mask"], batch["bigram_mask"]
        hit = (logits.argmax(-1) == batch["trigger_target"])[trig].float()
        p = batch["bigram"][tokens[bg]]  # true next-token distributions [m, d_vocab]
        log_q = F.log_softmax(logits[bg].float(), dim=-1)
        cross_entropy = -(p * log_q).sum(-1)
        return {"task/trigger_accuracy": hit.mean(), "task/bigram_loss": cross_entropy.mean(),
                "task/bigram_kl": _kl(p, log_q).mean()}


# --- 3. In-context classification (Reddy 2023; Chan et al. 2022) ------------------------------------


class ICLClassification:
    """In-context classification with bursty, Zipf-distributed classes: Reddy (2023), "The mechanistic
    basis of data dependence and abrupt learning in an in-context classification task", after Chan et
    al. (2022), "Data distributional properties drive emergent in-context learning in transformers".

    A sequence is BOS, `n_pairs` exemplar pairs (item, label), a query item and its label (padded with BOS
    up to `seq_len`). Tokens: 1..n_labels are labels, then `items_per_class` item tokens per class for
    each of `n_classes` training classes, then one item token per each of `n_novel_classes` novel classes,
    which never appear in training. With `model.freeze_embedding` every token is a fixed random vector, as
    Reddy's items and labels are, so a novel item is drawn from the same distribution as the trained ones;
    with learned embeddings the novel ones stay at their initialisation. Each training class has a fixed
    label (seeded by `language_seed`); class frequencies follow Zipf(`zipf_alpha`) (p_k ~ k^-alpha; 0 is
    uniform). The context holds n_pairs / `burstiness` distinct classes (drawn by frequency, without
    replacement), `burstiness` times each, in random order; each occurrence uses one of its class's item
    tokens at random, which with probability `noise` is replaced by a uniformly random training item token
    (input noise: the pair then carries a wrong item). With probability `p_bursty` the query's class is
    one of the context classes, else a class absent from the context (drawn by frequency). Training uses
    every position's loss, so exemplar labels after the first of their class are in-context predictable
    too. With probability `p_relabel` a training sequence's classes get fresh distinct labels instead
    (Chan et al.'s "dynamic meaning", taken to a whole sequence: memory then conflicts with the context).

    Metrics, at the query, as the argmax among the label tokens, on noise-free sequences (the fixed
    batch is split in thirds):
    `task/icl_accuracy` (Reddy's and Chan's in-context measure) on sequences of novel classes only,
    the query's class in the context, with distinct labels drawn at random per sequence, so nothing in
    weights helps or conflicts: only matching the query item to its exemplars and copying their label
    works (a label merely present in the context scores burstiness / n_pairs);
    `task/iwl_accuracy` on training sequences whose query class is absent from the context, with the
    fixed labels (in-weights learning);
    `task/icl_relabel_accuracy` on training-class sequences whose query class is in the context, with
    fresh labels per sequence (distinct, the query's never its own fixed label), so the context
    conflicts with the memorised label.
    """

    def __init__(self, d_vocab: int, seq_len: int, n_pairs: int = 8, n_classes: int = 128, n_labels: int = 16,
                 items_per_class: int = 1, burstiness: int = 4, p_bursty: float = 0.9, zipf_alpha: float = 0.0,
                 noise: float = 0.0, n_novel_classes: int = 64, p_relabel: float = 0.0, language_seed: int = 0):
        self.d_vocab, self.seq_len, self.n_pairs = d_vocab, seq_len, n_pairs
        self.n_classes, self.n_labels, self.items_per_class = n_classes, n_labels, items_per_class
        self.burstiness, self.p_bursty, self.noise = burstiness, p_bursty, noise
        self.n_novel_classes, self.p_relabel = n_novel_classes, p_relabel
        self.novel_start = 1 + n_labels + n_classes * items_per_class  # first novel item token
        lang = np.random.default_rng([language_seed, 13])
        self.class_label = lang.integers(0, n_labels, size=n_classes)  # label index of each class
        weights = np.arange(1, n_classes + 1, dtype=np.float64) ** -zipf_alpha
        self.class_p = weights / weights.sum()
        self.query_pos = 2 * n_pairs + 1  # token index of the query item; its label follows

    def label_token(self, label: np.ndarray) -> np.ndarray:
        return label + 1

    def sample(self, rng: np.random.Generator, batch: int, bursty: np.ndarray | None = None,
               relabel: bool | np.ndarray | None = None, noise: float | None = None,
               novel: bool = False) -> np.ndarray:
        """One batch. `bursty [batch]` forces whether the query class is in the context (default: with
        probability p_bursty); `relabel` (bool or `[batch]`) gives sequences' classes fresh labels
        (default: each with probability p_relabel); `novel` draws the classes uniformly among the novel
        ones (one item token each, never noisy), with fresh distinct labels per sequence."""
        m, b = self.n_pairs // self.burstiness, self.burstiness
        noise = 0.0 if novel else self.noise if noise is None else noise
        # Classes by frequency without replacement (Gumbel top-k): the first m are the context's, the
        # next one is a frequency-weighted draw among the classes absent from the context.
        n_pool = self.n_novel_classes if novel else self.n_classes
        log_p = np.zeros(n_pool) if novel else np.log(self.class_p)
        keys = log_p + rng.gumbel(size=(batch, n_pool))
        order = np.argsort(-keys, axis=1)[:, :m + 1]
        if bursty is None:
            bursty = rng.random(batch) < self.p_bursty
        slots = rng.permuted(np.tile(np.repeat(np.arange(m), b), (batch, 1)), axis=1)  # [batch, n_pairs]
        query_slot = np.where(bursty, rng.integers(0, m, size=batch), m)
        slots = np.concatenate([slots, query_slot[:, None]], axis=1)  # [batch, n_pairs + 1]
        classes = np.take_along_axis(order, slots, axis=1)
        if novel:
            items = self.novel_start + classes
        else:
            items = 1 + self.n_labels + classes * self.items_per_class + rng.integers(0, self.items_per_class,
                                                                                       size=classes.shape)
            swap = rng.random(classes.shape) < noise
            random_items = 1 + self.n_labels + rng.integers(0, self.n_classes * self.items_per_class,
                                                            size=classes.shape)
            items = np.where(swap, random_items, items)
        if relabel is None:
            relabel = rng.random(batch) < self.p_relabel if self.p_relabel > 0 else False
        relabel = np.broadcast_to(np.asarray(relabel, bool) | novel, (batch,))
        if novel:
            labels = np.zeros_like(classes)
        else:
            labels = self.class_label[classes]
        if relabel.any():
            # Fresh distinct labels per class slot; a training query class's fixed label sorts last, unused.
            keys = rng.random((batch, self.n_labels))
            if not novel:
                keys[np.arange(batch), labels[:, -1]] = np.inf
            fresh = np.argsort(keys, axis=1)[:, :m + 1]
            labels = np.where(relabel[:, None], np.take_along_axis(fresh, slots, axis=1), labels)
        tokens = np.full((batch, self.seq_len), BOS, dtype=np.int64)
        tokens[:, 1:self.query_pos + 2:2] = items
        tokens[:, 2:self.query_pos + 2:2] = self.label_token(labels)
        return tokens

    def __call__(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        return self.sample(rng, batch)

    def task_batch(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """Thirds: novel classes in context (icl), training classes absent (iwl), training classes in
        context with fresh labels (relabel)."""
        n_icl, n_iwl = (n + 2) // 3, (n + 1) // 3
        n_rel = n - n_icl - n_iwl
        icl = self.sample(rng, n_icl, bursty=np.ones(n_icl, bool), novel=True)
        iwl = self.sample(rng, n_iwl, bursty=np.zeros(n_iwl, bool), relabel=False, noise=0.0)
        rel = self.sample(rng, n_rel, bursty=np.ones(n_rel, bool), relabel=True, noise=0.0)
        kind = np.repeat(np.arange(3), [n_icl, n_iwl, n_rel])
        return {"tokens": np.concatenate([icl, iwl, rel]), "icl": kind == 0, "iwl": kind == 1, "relabel": kind == 2}

    def task_metrics(self, logits: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        q = self.query_pos
        guess = logits[:, q, 1:self.n_labels + 1].argmax(-1) + 1
        hit = (guess == batch["tokens"][:, q + 1]).float()
        return {"task/icl_accuracy": hit[batch["icl"]].mean(), "task/iwl_accuracy": hit[batch["iwl"]].mean(),
                "task/icl_relabel_accuracy": hit[batch["relabel"]].mean()}


# --- 4. Random tokens with copied spans: the minimal induction task ---------------------------------


class RandomCopies:
    """Uniform random tokens with `spans_per_seq` spans copied to later random offsets (the copy logic
    of MarkovCopies, `synthetic.copy_spans`), without MarkovCopies' in-weights structure: the minimal
    induction task (Olsson et al. 2022's repeated random tokens, at random offsets). With `distinct`,
    the original tokens of a sequence are drawn without replacement (needs d_vocab - 1 >= seq_len - 1),
    so only copies repeat a token and a one-token induction head predicts every copied token.

    Metrics: `task/copy_accuracy` (top-1) and `task/copy_loss` (cross-entropy) at the copied tokens
    after the first of each copy (whose predecessor belongs to the same copy).
    """

    def __init__(self, d_vocab: int, seq_len: int, spans_per_seq: int = 4, span_len_min: int = 8,
                 span_len_max: int = 24, distinct: bool = True):
        self.d_vocab, self.seq_len, self.distinct = d_vocab, seq_len, distinct
        self.spans_per_seq, self.span_len_min, self.span_len_max = spans_per_seq, span_len_min, span_len_max

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens `[batch, seq_len]` and the copy index of each token (-1: original; BOS: -1)."""
        t = self.seq_len - 1
        if self.distinct:
            body = np.argsort(rng.random((batch, self.d_vocab - 1)), axis=1)[:, :t] + 1
        else:
            body = rng.integers(1, self.d_vocab, size=(batch, t))
        tokens, span = copy_spans(rng, body.astype(np.int64), self.spans_per_seq, self.span_len_min, self.span_len_max)
        first = np.full((batch, 1), BOS, dtype=np.int64)
        return np.concatenate([first, tokens], axis=1), np.concatenate([first - 1, span], axis=1)

    def __call__(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        return self.sample(rng, batch)[0]

    def task_batch(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        tokens, span = self.sample(rng, n)
        # Logits at t predict token t + 1: count it when t and t + 1 come from the same copy.
        mask = np.zeros_like(tokens, dtype=bool)
        mask[:, :-1] = (span[:, 1:] >= 0) & (span[:, 1:] == span[:, :-1])
        return {"tokens": tokens, "copy_mask": mask}

    def task_metrics(self, logits: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mask = batch["copy_mask"][:, :-1]
        target = batch["tokens"][:, 1:][mask]
        pred = logits[:, :-1][mask].float()
        return {"task/copy_accuracy": (pred.argmax(-1) == target).float().mean(),
                "task/copy_loss": F.cross_entropy(pred, target)}
