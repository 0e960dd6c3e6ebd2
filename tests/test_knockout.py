"""Knockout (Crosbie & Shutova 2024): pattern tasks' construction, and top-k vs random-k on a trained run."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from analysis.pattern_tasks import accuracy, labelled_patterns, repeat_completion

ROOT = Path(__file__).resolve().parents[1]
VOCAB = np.arange(1, 40)


def oracle_logits(task, vocab_size=40):
    """Logits that put the answer first (an ideal in-context copier)."""
    logits = torch.zeros(*task.tokens.shape, vocab_size)
    target = task.candidates[torch.arange(len(task.answer)), task.answer]
    logits[task.row, task.pos, target] = 1.0
    return logits


def test_labelled_patterns_construction():
    task = labelled_patterns(VOCAB, 64, 8, np.random.default_rng(0))
    t = task.tokens
    assert t.shape == (8, 64) and (t[:, 0] == 0).all()
    # Each query sits on a pattern's second token; the next token is its label, one of two candidates.
    nxt = t[task.row, task.pos + 1]
    assert (task.candidates[torch.arange(len(nxt)), task.answer] == nxt).all()
    for b, p, label in zip(task.row.tolist(), task.pos.tolist(), nxt.tolist()):
        earlier = [i for i in range(1, p) if t[b, i] == t[b, p] and t[b, i - 1] == t[b, p - 1]]
        assert earlier and all(t[b, i + 1] == label for i in earlier)  # the answer is in the context
    labels = task.candidates[0].tolist()
    assert sorted(set(task.answer.tolist())) == [0, 1] and len(set(labels)) == 2
    assert accuracy(oracle_logits(task), task) == 1.0
    assert abs(accuracy(torch.randn(8, 64, 40), task) - 0.5) < 0.15


def test_repeat_completion_construction():
    task = repeat_completion(VOCAB, 64, 8, np.random.default_rng(0))
    t = task.tokens
    ex = t[0, 1:7].tolist()
    assert ex[:3] == ex[3:] and len(set(ex[:3])) == 3  # a b c a b c
    nxt = t[task.row, task.pos + 1]
    assert (task.candidates[torch.arange(len(nxt)), task.answer] == nxt).all()
    assert (t[task.row, task.pos] == t[task.row, task.pos - 3]).all()  # the current token occurred before
    assert accuracy(oracle_logits(task), task) == 1.0
    assert task.chance == 1 / 3


def test_top_k_knockout_hurts_more_than_random(quickstart_run):
    proc = subprocess.run([sys.executable, "-m", "analysis", "knockout", str(quickstart_run), "--k", "1",
                           "--seeds", "5", "--n-sequences", "128"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = quickstart_run / "analysis"
    summary = {row["condition"]: row for row in pq.read_table(out / "knockout.parquet").to_pylist()}
    runs = pq.read_table(out / "knockout_runs.parquet").to_pylist()
    assert set(summary) == {"clean", "top_1", "random_1"} and summary["random_1"]["n_sets"] == 5
    assert len(runs) == 7 and (out / "knockout.md").read_text().startswith("# Knockout")
    clean, top, rand = summary["clean"], summary["top_1"], summary["random_1"]
    top_head = top["heads"]
    assert all(top_head not in row["heads"] for row in runs if row["condition"] == "random_1")
    for task in ("labelled_patterns", "repeat_completion"):
        assert clean[f"{task}_mean"] > 0.8  # the induction heads solve the tasks from context
        drop_top = clean[f"{task}_mean"] - top[f"{task}_mean"]
        drop_random = clean[f"{task}_mean"] - rand[f"{task}_mean"]
        assert drop_top > drop_random + 0.05, (task, drop_top, drop_random)
    assert top["induction_loss_mean"] > rand["induction_loss_mean"]
