"""Synthetic sequence generators. Token 0 is BOS and starts every sequence.

Each generator is a pure function of a numpy `Generator`, so batch `i` of a run is a function of
`(seed, i)` alone: the stream is reproducible and resumable without saving any iterator state.
"""

from __future__ import annotations

import numpy as np

BOS = 0


def batch_rng(seed: int, index: int, stream: str = "train") -> np.random.Generator:
    """An independent generator for batch `index` of the named stream."""
    salt = {"train": 0, "eval": 1, "probe": 2, "llc": 4}.get(stream, 3)
    return np.random.default_rng([seed, salt, index])


class MarkovCopies:
    """In-weights structure plus in-context structure, the two ingredients of natural text.

    Each sequence is a walk on one fixed random Markov chain over the vocabulary (rows drawn from
    Dirichlet(`concentration`), seeded by `language_seed`, the same for every run), so a model lowers
    its loss by learning bigram statistics. Then `spans_per_seq` spans of `span_len_min..span_len_max`
    tokens are copied from earlier in the sequence to a later random offset (running off the end is
    allowed), so the continuation of a copied span is predictable only by looking back for the
    earlier occurrence of the current token: an induction mechanism. Offsets are random, so no
    positional shortcut predicts the copies; late positions are covered by copies more often than
    early ones, which is what the ICL score measures.
    """

    def __init__(
        self,
        d_vocab: int,
        seq_len: int,
        concentration: float = 1.0,
        spans_per_seq: int = 4,
        span_len_min: int = 8,
        span_len_max: int = 24,
        language_seed: int = 0,
    ):
        self.d_vocab, self.seq_len = d_vocab, seq_len
        self.spans_per_seq, self.span_len_min, self.span_len_max = spans_per_seq, span_len_min, span_len_max
        lang = np.random.default_rng([language_seed, 7])
        n = d_vocab - 1  # BOS is never emitted
        self.transition = lang.dirichlet(np.full(n, concentration), size=n)  # [from, to]
        self._cumulative = self.transition.cumsum(axis=1)
        self._cumulative[:, -1] = 1.0

    def unigram(self) -> np.ndarray:
        """Stationary token frequencies over the full vocabulary (BOS gets 0)."""
        vals, vecs = np.linalg.eig(self.transition.T)
        p = np.abs(np.real(vecs[:, np.argmin(np.abs(vals - 1))]))
        return np.concatenate([[0.0], p / p.sum()])

    def markov(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        n = self.d_vocab - 1
        body = np.empty((batch, self.seq_len - 1), dtype=np.int64)
        state = rng.integers(0, n, size=batch)
        u = rng.random((batch, self.seq_len - 1))
        for t in range(self.seq_len - 1):
            body[:, t] = state
            state = (u[:, t, None] > self._cumulative[state]).sum(axis=1)
        return body + 1

    def __call__(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        body = self.markov(rng, batch)  # [batch, seq_len - 1]
        tokens, _ = copy_spans(rng, body, self.spans_per_seq, self.span_len_min, self.span_len_max)
        return np.concatenate([np.full((batch, 1), BOS, dtype=np.int64), tokens], axis=1)


def copy_spans(
    rng: np.random.Generator, body: np.ndarray, spans_per_seq: int, span_len_min: int, span_len_max: int
) -> tuple[np.ndarray, np.ndarray]:
    """Copy `spans_per_seq` spans of `span_len_min..span_len_max` tokens of each row of `body`
    `[batch, T]` from earlier in the row to a later random offset (running off the end is allowed).

    Returns the tokens `[batch, T]` and `span [batch, T]`: the index of the copy that wrote each
    position, -1 where the token is the original. Later copies overwrite earlier ones, and their
    source may lie inside an earlier copy (everything before a destination is final when it is copied).
    """
    batch, t_body = body.shape
    idx = np.broadcast_to(np.arange(t_body), body.shape).copy()
    span = np.full(body.shape, -1, dtype=np.int64)
    pos = np.arange(t_body)[None, :]
    n = spans_per_seq
    length = rng.integers(span_len_min, span_len_max + 1, size=(batch, n))
    # Destinations in increasing order: everything before a destination is final when it is copied.
    dst = np.sort(rng.integers(span_len_min, t_body, size=(batch, n)), axis=1)
    length = np.minimum(length, dst)  # the source must fit before the destination
    src = (rng.random((batch, n)) * (dst - length + 1)).astype(np.int64)
    for k in range(n):
        d, s, ln = dst[:, k, None], src[:, k, None], length[:, k, None]
        inside = (pos >= d) & (pos < d + ln)
        from_pos = np.clip(pos - d + s, 0, t_body - 1)
        idx = np.where(inside, np.take_along_axis(idx, from_pos, axis=1), idx)
        span = np.where(inside, k, span)
    return np.take_along_axis(body, idx, axis=1), span


class RepeatedTokens:
    """BOS followed by `rep_len` random tokens repeated to fill the sequence (Olsson et al.'s probe
    input: R=25 repeated K=4 times). With `weights`, tokens are drawn from that distribution, which
    can exclude the most and least common tokens by giving them zero weight."""

    def __init__(self, d_vocab: int, seq_len: int, rep_len: int = 25, weights: np.ndarray | None = None):
        self.d_vocab, self.seq_len, self.rep_len = d_vocab, seq_len, rep_len
        self.weights = weights

    def __call__(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        candidates = np.arange(1, self.d_vocab)
        p = None
        if self.weights is not None:
            p = np.asarray(self.weights, dtype=np.float64)[1:]
            p = p / p.sum()
        # Distinct tokens within a repeat, so every earlier occurrence of a token is an exact match.
        draws = [rng.choice(candidates, size=self.rep_len, replace=False, p=p) for _ in range(batch)]
        segment = np.stack(draws)  # [batch, rep_len]
        reps = -(-(self.seq_len - 1) // self.rep_len)
        body = np.tile(segment, (1, reps))[:, : self.seq_len - 1]
        return np.concatenate([np.full((batch, 1), BOS, dtype=np.int64), body], axis=1)


def probe_token_weights(unigram: np.ndarray | None, d_vocab: int, exclude_fraction: float) -> np.ndarray | None:
    """Olsson et al. draw probe tokens excluding the most and least common ones: zero the weight of the
    top and bottom `exclude_fraction` of tokens by frequency (uniform over the rest)."""
    if unigram is None or exclude_fraction <= 0:
        return None
    order = np.argsort(unigram[1:]) + 1  # rarest first, BOS left out
    k = int(len(order) * exclude_fraction)
    keep = order[k : len(order) - k] if k else order
    w = np.zeros(d_vocab)
    w[keep] = 1.0
    return w
