"""Few-shot abstract pattern tasks built from a model's own vocabulary, for the knockout experiment
(Crosbie & Shutova 2024, "Induction heads as an essential mechanism for pattern matching in
in-context learning", who measure few-shot accuracy on abstract pattern tasks with heads ablated).

Each sequence is BOS followed by exemplars of random tokens; the answer at each scored position can
only be found in the context (the tokens are fresh per sequence, so no weight memorises them), and
finding it takes exactly the induction step "find the earlier occurrence of the current token, copy
what followed it" (Olsson et al. 2022). Accuracy is a forced choice among a few candidate tokens that
all appear in the context, so a model that only notices *which* tokens occurred scores at chance.

- `labelled_patterns` (chance 1/2): the context holds K patterns of two tokens `p q`, each followed by
  its label, one of two label tokens `Y`/`N` assigned at random (half the patterns each). The first
  K exemplars show every pattern once; the following exemplars repeat patterns in random order.
  Scored: the label of every repeated exemplar, predicted at its `q`, choosing between `Y` and `N`.
  In-context classification: the label depends only on which earlier pattern the exemplar repeats.
- `repeat_completion` (chance 1/n): exemplars `x_1 .. x_n x_1 .. x_n` of n fresh tokens (the abstract
  pattern XX; n = 8 by default, the shortest copied span of the training data, fewer when the context
  is short). Scored: every token of the second copy after its first, choosing among the exemplar's
  own n tokens (all of them already in the context).

Tokens are drawn like the probe batch: from the data's vocabulary (BOS excluded), without the most
and least common tokens when the data's frequencies are known (`probes.exclude_fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from train.build import probe_vocabulary
from train.data.synthetic import BOS


@dataclass
class PatternTask:
    """`tokens [batch, n_ctx]`; each query `i` is scored at `(row[i], pos[i])`, where the logits
    predict token `pos + 1`, by choosing among `candidates[i]`; `answer[i]` indexes the right one."""

    name: str
    tokens: Tensor
    row: Tensor  # [query]
    pos: Tensor  # [query]
    candidates: Tensor  # [query, n_candidates]
    answer: Tensor  # [query]
    chance: float


def accuracy(logits: Tensor, task: PatternTask) -> float:
    """Share of queries where the correct candidate has the highest logit. `logits [batch, pos, vocab]`."""
    at = logits[task.row, task.pos]  # [query, vocab]
    choice = at.gather(-1, task.candidates).argmax(dim=-1)  # [query]
    return float((choice == task.answer).float().mean())


def labelled_patterns(vocab: np.ndarray, n_ctx: int, batch: int, rng: np.random.Generator,
                      n_patterns: int = 10) -> PatternTask:
    """Exemplars `p q label`; see the module docstring."""
    n_exemplars = (n_ctx - 1) // 3
    # Room to show every pattern once and repeat it about once; distinct tokens for patterns and labels.
    n_patterns = min(n_patterns, n_exemplars // 2, (len(vocab) - 2) // 2)
    if n_patterns < 2:
        raise ValueError(f"labelled_patterns needs n_ctx >= 13 and 6 tokens (n_ctx={n_ctx}, {len(vocab)} tokens)")
    tokens = np.full((batch, n_ctx), BOS, dtype=np.int64)
    rows, poss, cands, answers = [], [], [], []
    for b in range(batch):
        drawn = rng.choice(vocab, size=2 + 2 * n_patterns, replace=False)
        labels, patterns = drawn[:2], drawn[2:].reshape(n_patterns, 2)
        label_of = rng.permutation(np.arange(n_patterns) % 2)  # half Y (0), half N (1)
        order = np.concatenate([rng.permutation(n_patterns), rng.integers(0, n_patterns, n_exemplars - n_patterns)])
        for e, k in enumerate(order):
            start = 1 + 3 * e
            tokens[b, start:start + 3] = [*patterns[k], labels[label_of[k]]]
            if e >= n_patterns:  # a repeat: its label is in the context
                rows.append(b), poss.append(start + 1), cands.append(labels), answers.append(label_of[k])
    return PatternTask("labelled_patterns", torch.from_numpy(tokens), torch.tensor(rows), torch.tensor(poss),
                       torch.from_numpy(np.stack(cands)), torch.tensor(answers), 0.5)


def repeat_completion(vocab: np.ndarray, n_ctx: int, batch: int, rng: np.random.Generator,
                      length: int = 8) -> PatternTask:
    """Exemplars `x_1 .. x_n x_1 .. x_n`; see the module docstring."""
    n = max(2, min(length, (n_ctx - 1) // 4, len(vocab)))  # room for at least two exemplars
    n_exemplars = (n_ctx - 1) // (2 * n)
    if n_exemplars < 1:
        raise ValueError(f"repeat_completion needs n_ctx >= 5 (n_ctx={n_ctx})")
    fresh = len(vocab) >= n * n_exemplars  # distinct tokens across the whole sequence when possible
    tokens = np.full((batch, n_ctx), BOS, dtype=np.int64)
    rows, poss, cands, answers = [], [], [], []
    for b in range(batch):
        drawn = rng.choice(vocab, size=n * n_exemplars, replace=False) if fresh else None
        for e in range(n_exemplars):
            x = drawn[n * e:n * e + n] if fresh else rng.choice(vocab, size=n, replace=False)
            start = 1 + 2 * n * e
            tokens[b, start:start + 2 * n] = [*x, *x]
            for i in range(n - 1):  # at the second x_{i+1}, the next token is x_{i+2}
                rows.append(b), poss.append(start + n + i), cands.append(x), answers.append(i + 1)
    return PatternTask("repeat_completion", torch.from_numpy(tokens), torch.tensor(rows), torch.tensor(poss),
                       torch.from_numpy(np.stack(cands)), torch.tensor(answers), 1 / n)


def build_tasks(cfg, generator, batch: int = 256, seed: int = 0) -> list[PatternTask]:
    """Both tasks for a run's config (`cfg.model`, `cfg.data`, `cfg.probes`), fixed by `seed`."""
    vocab = np.flatnonzero(probe_vocabulary(cfg, generator))  # the probes' tokens, BOS excluded
    rng = np.random.default_rng([seed, 2024])
    n_ctx = cfg.model.n_ctx
    return [labelled_patterns(vocab, n_ctx, batch, rng), repeat_completion(vocab, n_ctx, batch, rng)]
