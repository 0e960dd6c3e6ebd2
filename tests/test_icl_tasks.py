"""The in-context-learning task suite (train/data/icl_tasks.py): statistics of each generator, each
task metric on hand-made logits, the config checks, the wiring into the Measure callback, and (slow)
the transitions themselves."""

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_train
from train.build import build_generator, build_model, probe_tokens, task_batch
from train.config import validate
from train.errors import ConfigError
from train.data.icl_tasks import BigramTriggers, ICLClassification, ICLMarkov, RandomCopies
from train.data.synthetic import BOS, batch_rng, copy_spans

EXPERIMENTS = ("icl_markov", "bigram_triggers", "icl_classification", "random_copies", "random_copies_1l")


def as_torch(batch):
    return {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}


def logits_from_probs(probs: np.ndarray, offset: int, d_vocab: int) -> torch.Tensor:
    """Logits `[..., d_vocab]` whose softmax over tokens offset.. is `probs`; other tokens get junk."""
    out = torch.randn(*probs.shape[:-1], d_vocab) * 5
    out[..., offset:offset + probs.shape[-1]] = torch.log(torch.as_tensor(probs, dtype=torch.float32))
    return out


# --- icl_markov -----------------------------------------------------------------------------------


def test_icl_markov_follows_each_sequences_own_chain():
    gen = ICLMarkov(d_vocab=4, seq_len=4001, n_states=3)
    tokens, transition = gen.sample(batch_rng(0, 0), 4)
    assert tokens.shape == (4, 4001) and (tokens[:, 0] == BOS).all()
    assert set(np.unique(tokens[:, 1:])) <= {1, 2, 3}
    for x, p in zip(tokens[:, 1:] - 1, transition):
        counts = np.zeros((3, 3))
        np.add.at(counts, (x[:-1], x[1:]), 1)
        seen = counts.sum(1) > 300
        np.testing.assert_allclose((counts / counts.sum(1, keepdims=True).clip(1))[seen], p[seen], atol=0.08)
    assert not np.allclose(transition[0], transition[1])  # a fresh matrix per sequence
    np.testing.assert_array_equal(gen(batch_rng(0, 0), 4), tokens)  # a function of the rng only


def test_icl_markov_first_state_is_stationary():
    from train.data.icl_tasks import _stationary

    gen = ICLMarkov(d_vocab=4, seq_len=3, n_states=3)
    tokens, transition = gen.sample(batch_rng(1, 0), 20000)
    pi = _stationary(transition)  # [batch, 3]
    np.testing.assert_allclose(np.einsum("bi,bij->bj", pi, transition), pi, atol=1e-9)
    first = np.eye(3)[tokens[:, 1] - 1]
    np.testing.assert_allclose(first.mean(0), pi.mean(0), atol=0.015)
    # Per sequence, not just on average: the chosen state's probability matches E_pi[pi].
    assert abs(pi[np.arange(len(pi)), tokens[:, 1] - 1].mean() - (pi ** 2).sum(1).mean()) < 0.01


def test_icl_markov_estimators_by_hand():
    gen = ICLMarkov(d_vocab=4, seq_len=6, n_states=3, alpha=1.0)
    unigram, bigram = gen.estimators(np.array([[BOS, 1, 2, 1, 2, 1]]))
    # After states 0 1 0 1 0: counts (3, 2, 0), add-1 -> (4, 3, 1) / 8; from state 0, seen 0->1 twice.
    np.testing.assert_allclose(unigram[0, 5], [4 / 8, 3 / 8, 1 / 8])
    np.testing.assert_allclose(bigram[0, 5], [1 / 5, 3 / 5, 1 / 5])
    np.testing.assert_allclose(bigram[0, 1], [1 / 3] * 3)  # nothing seen yet from the first state


def test_icl_markov_metrics_on_known_predictors():
    gen = ICLMarkov(d_vocab=5, seq_len=64, n_states=3)  # one unused token: renormalised away
    batch = gen.task_batch(batch_rng(0, 0, "task"), 32)
    pos = batch["positions"]
    assert pos.min() >= 32 and pos.max() == 62
    tb = as_torch(batch)
    unigram, bigram = gen.estimators(batch["tokens"])
    for name, probs in (("kl_bigram", bigram), ("kl_unigram", unigram), ("kl_uniform", np.full_like(bigram, 1 / 3))):
        m = gen.task_metrics(logits_from_probs(probs, 1, 5), tb)
        assert set(m) == {"task/kl_uniform", "task/kl_unigram", "task/kl_bigram"}
        assert m[f"task/{name}"].dim() == 0 and abs(m[f"task/{name}"].item()) < 1e-5
        others = [v.item() for k, v in m.items() if k != f"task/{name}"]
        assert min(others) > 1e-3


# --- bigram_triggers ------------------------------------------------------------------------------


def test_triggers_are_followed_by_their_per_sequence_output():
    gen = BigramTriggers(d_vocab=32, seq_len=256, n_triggers=3)
    assert gen.stationary[gen.triggers - 1].min() >= np.delete(gen.stationary, gen.triggers - 1).max()
    tokens, outputs = gen.sample(batch_rng(0, 0), 64)
    assert (tokens[:, 0] == BOS).all() and (tokens[:, 1:] >= 1).all() and (tokens < 32).all()
    assert not np.isin(outputs, gen.triggers).any()
    n_follow = 0
    for x, out in zip(tokens, outputs):
        for k, trig in enumerate(gen.triggers):
            after = x[1:][x[:-1] == trig]
            assert (after == out[k]).all()
            n_follow += len(after)
    assert n_follow > 64 * 3
    assert len({tuple(o) for o in outputs}) > 32  # fresh outputs per sequence
    # Everywhere else the global bigram: a common non-trigger token's successors follow its row.
    tok = int(np.argsort(-gen.stationary)[gen.n_triggers]) + 1
    many, _ = gen.sample(batch_rng(0, 1), 512)
    succ = many[:, 1:][many[:, :-1] == tok]
    emp = np.bincount(succ, minlength=32)[1:] / len(succ)
    assert len(succ) > 2000 and np.abs(emp - gen.transition[tok - 1]).max() < 0.05


def test_trigger_metrics_on_known_predictors():
    gen = BigramTriggers(d_vocab=32, seq_len=128, n_triggers=3)
    batch = gen.task_batch(batch_rng(0, 0, "task"), 32)
    tb = as_torch(batch)
    assert batch["trigger_mask"].sum() > 20
    # Masked positions are repeated triggers, and the target follows them in the tokens.
    toks, mask = batch["tokens"], batch["trigger_mask"]
    np.testing.assert_array_equal(toks[:, 1:][mask[:, :-1]], batch["trigger_target"][mask])
    # The ideal model: the true bigram everywhere, the output after a repeated trigger.
    probs = gen.transition[np.clip(toks - 1, 0, None)]  # [n, T, 31]
    logits = logits_from_probs(probs, 1, 32)
    logits[..., 0] = -1e4
    target = torch.as_tensor(batch["trigger_target"])
    logits[tb["trigger_mask"]] = -1e4
    logits[tb["trigger_mask"], target[tb["trigger_mask"]]] = 0.0
    m = gen.task_metrics(logits, tb)
    assert m["task/trigger_accuracy"].item() == 1.0
    assert abs(m["task/bigram_kl"].item()) < 1e-4
    p = gen.transition[toks[batch["bigram_mask"]] - 1]
    entropy = -(p * np.log(p)).sum(-1).mean()
    assert m["task/bigram_loss"].item() == pytest.approx(entropy, rel=1e-4)
    # A model that knows nothing: chance accuracy and a KL of log(31) minus the entropy.
    m0 = gen.task_metrics(torch.zeros_like(logits), tb)
    assert m0["task/trigger_accuracy"].item() < 0.2
    assert m0["task/bigram_loss"].item() == pytest.approx(math.log(32), rel=1e-5)


# --- icl_classification ---------------------------------------------------------------------------


def classification(**kw):
    args = dict(d_vocab=1 + 8 + 40 * 2 + 16, seq_len=21, n_pairs=8, n_classes=40, n_labels=8, items_per_class=2,
                burstiness=4, p_bursty=0.75, zipf_alpha=1.0, noise=0.0, n_novel_classes=16)
    return ICLClassification(**{**args, **kw})


def decode(gen, tokens):
    """Classes `[batch, n_pairs + 1]` and label indices of the items and labels of each sequence (novel
    classes as n_classes + their index)."""
    items = tokens[:, 1:gen.query_pos + 2:2]
    labels = tokens[:, 2:gen.query_pos + 2:2] - 1
    trained = (items - 1 - gen.n_labels) // gen.items_per_class
    return np.where(items >= gen.novel_start, gen.n_classes + items - gen.novel_start, trained), labels


def test_classification_burstiness_and_fixed_labels():
    gen = classification()
    assert gen.novel_start == 1 + 8 + 80
    tokens = gen(batch_rng(0, 0), 4000)
    assert tokens.shape == (4000, 21) and (tokens[:, 0] == BOS).all() and (tokens[:, 19:] == BOS).all()
    classes, labels = decode(gen, tokens)
    assert classes.max() < 40  # novel classes never appear in training
    assert (labels == gen.class_label[classes]).all()  # labels are fixed per class in training
    for row in classes[:200, :-1]:
        _, counts = np.unique(row, return_counts=True)
        assert counts.tolist() == [4, 4]  # n_pairs / B classes, B times each
    in_ctx = (classes[:, -1:] == classes[:, :-1]).any(1)
    assert abs(in_ctx.mean() - 0.75) < 0.03
    freq = np.bincount(classes[:, :-1].ravel(), minlength=40)
    assert freq[0] > 3 * freq[20]  # Zipf: common classes are common


def test_classification_noise_replaces_items():
    kw = dict(items_per_class=1, d_vocab=1 + 8 + 40 + 16)
    clean = classification(**kw)(batch_rng(0, 0), 2000)
    noisy_gen = classification(**kw, noise=0.5)
    noisy = noisy_gen(batch_rng(0, 0), 2000)
    items, labels = slice(1, 19, 2), slice(2, 20, 2)
    np.testing.assert_array_equal(clean[:, labels], noisy[:, labels])  # labels keep the true class's
    changed = (clean[:, items] != noisy[:, items]).mean()
    assert abs(changed - 0.5 * (1 - 1 / 40)) < 0.02  # a uniformly random item token, half the time
    # ... a training item token: noise never reaches the novel classes.
    assert (noisy[:, items] > 8).all() and (noisy[:, 1:20] < noisy_gen.novel_start).all()


def test_classification_p_relabel_gives_fresh_labels_to_some_sequences():
    gen = classification(p_relabel=0.3, p_bursty=1.0)
    classes, labels = decode(gen, gen(batch_rng(0, 0), 4000))
    fixed = (labels == gen.class_label[classes]).all(1)
    assert abs((~fixed).mean() - 0.3) < 0.03  # (the query class never keeps its fixed label)
    for c, lab in zip(classes[~fixed][:200], labels[~fixed][:200]):  # consistent within the sequence
        assert len({(a, b) for a, b in zip(c, lab)}) == len(set(c)) == len(set(lab))
    np.testing.assert_array_equal(classification()(batch_rng(0, 0), 8),  # p_relabel=0: the same stream
                                  classification(p_relabel=0.0)(batch_rng(0, 0), 8))


def test_classification_task_batch_thirds():
    gen = classification(noise=0.3)  # the evaluation sequences are noise-free all the same
    batch = gen.task_batch(batch_rng(0, 0, "task"), 64)
    tokens = batch["tokens"]
    classes, labels = decode(gen, tokens)
    icl, iwl, rel = batch["icl"], batch["iwl"], batch["relabel"]
    assert (icl.sum(), iwl.sum(), rel.sum()) == (22, 21, 21) and (icl ^ iwl ^ rel).all()
    # In context (Reddy, Chan): novel classes only, one item token each, query class present, its
    # context label copied to the query, and each class of a sequence has its own random label.
    novel_items = tokens[icl, 1:gen.query_pos + 1:2]
    assert (novel_items >= gen.novel_start).all() and (novel_items < gen.novel_start + 16).all()
    assert (tokens[~icl, 1:gen.query_pos + 1:2] < gen.novel_start).all()
    for c, lab in zip(classes[icl], labels[icl]):
        assert (c[:-1] == c[-1]).any()
        assert (lab[:-1][c[:-1] == c[-1]] == lab[-1]).all()
        assert len({(a, b) for a, b in zip(c, lab)}) == len(set(c)) == len(set(lab)) == 2
    assert len({tuple(lab) for lab in labels[icl]}) > 10  # labels drawn per sequence
    # In weights: query class absent from the context, fixed labels everywhere, no noise.
    assert not (classes[iwl, -1:] == classes[iwl, :-1]).any()
    assert (labels[iwl] == gen.class_label[classes[iwl]]).all()
    for row in classes[iwl | rel, :-1]:
        assert sorted(np.unique(row, return_counts=True)[1]) == [4, 4]
    # Relabelled: training classes in context with fresh labels, never the query's fixed label.
    for c, lab in zip(classes[rel], labels[rel]):
        assert (c[:-1] == c[-1]).any() and c.max() < 40
        assert (lab[:-1][c[:-1] == c[-1]] == lab[-1]).all()
        assert lab[-1] != gen.class_label[c[-1]]
        assert len({(a, b) for a, b in zip(c, lab)}) == len(set(c)) == len(set(lab))


def test_classification_metrics_on_known_predictors():
    gen = classification()
    n = 3000
    batch = gen.task_batch(batch_rng(0, 0, "task"), n)
    tb = as_torch(batch)
    classes, labels = decode(gen, batch["tokens"])
    q = gen.query_pos

    def predicting(label_idx):
        logits = torch.randn(n, 21, gen.d_vocab)
        logits[:, q, 1:gen.n_labels + 1] = -10.0
        logits[torch.arange(n), q, torch.as_tensor(label_idx) + 1] = 10.0
        m = gen.task_metrics(logits, tb)
        assert set(m) == {"task/icl_accuracy", "task/iwl_accuracy", "task/icl_relabel_accuracy"}
        return {k[5:]: v.item() for k, v in m.items()}

    in_ctx = ~batch["iwl"]
    first = np.argmax(classes[:, :-1] == classes[:, -1:], axis=1)  # the query's class's first exemplar
    fixed_label = gen.class_label[np.minimum(classes[:, -1], 39)]  # (meaningless for novel classes)
    fixed = predicting(fixed_label)  # pure in-weights
    assert fixed["iwl_accuracy"] == 1.0 and fixed["icl_relabel_accuracy"] == 0.0
    assert fixed["icl_accuracy"] < 0.25
    copied = predicting(np.where(in_ctx, labels[np.arange(n), first], fixed_label))  # copy when possible
    assert copied == {"icl_accuracy": 1.0, "iwl_accuracy": 1.0, "icl_relabel_accuracy": 1.0}
    # Any label of the context, at random: B / n_pairs = 1/2 of the in-context queries.
    any_label = predicting(labels[np.arange(n), np.random.default_rng(0).integers(0, 8, size=n)])
    assert abs(any_label["icl_accuracy"] - 0.5) < 0.05 and abs(any_label["icl_relabel_accuracy"] - 0.5) < 0.05
    chance = predicting(np.random.default_rng(1).integers(0, gen.n_labels, size=n))
    for key in ("icl_accuracy", "iwl_accuracy", "icl_relabel_accuracy"):
        assert abs(chance[key] - 1 / gen.n_labels) < 0.04


# --- random_copies --------------------------------------------------------------------------------


def test_copy_spans_copy_from_earlier():
    rng = batch_rng(0, 0)
    body = np.broadcast_to(np.arange(200), (64, 200)).copy()  # each token names its source position
    tokens, span = copy_spans(rng, body, 4, 8, 24)
    pos = np.arange(200)
    assert (tokens[span < 0] == np.broadcast_to(pos, tokens.shape)[span < 0]).all()
    assert (tokens[span >= 0] < np.broadcast_to(pos, tokens.shape)[span >= 0]).all()  # from earlier
    same = (span[:, 1:] >= 0) & (span[:, 1:] == span[:, :-1])
    assert same.sum() > 64 * 4 * 5
    # Inside a copy, each pair of tokens is a pair of consecutive tokens from before it: its source.
    for b, t in zip(*np.nonzero(same)):
        earlier = np.flatnonzero(tokens[b, :t] == tokens[b, t])
        assert len(earlier) and (tokens[b, earlier + 1] == tokens[b, t + 1]).any()


def test_random_copies_are_exact_and_predictable_by_induction():
    gen = RandomCopies(d_vocab=64, seq_len=64, distinct=True)
    plain = RandomCopies(d_vocab=64, seq_len=64, spans_per_seq=0)(batch_rng(0, 0), 16)
    assert all(len(set(row[1:])) == 63 for row in plain)  # distinct before copying
    batch = gen.task_batch(batch_rng(0, 0, "task"), 64)
    tokens, mask = batch["tokens"], batch["copy_mask"]
    assert (tokens[:, 0] == BOS).all() and mask.sum() > 64 * 20 and not mask[:, -1].any()
    for x, m in zip(tokens, mask):
        for t in np.flatnonzero(m):  # the token after an earlier occurrence of x[t] is x[t + 1]
            earlier = np.flatnonzero(x[:t] == x[t])
            assert len(earlier) and (x[earlier + 1] == x[t + 1]).any()


def test_copy_metrics_on_known_predictors():
    gen = RandomCopies(d_vocab=64, seq_len=64)
    batch = as_torch(gen.task_batch(batch_rng(0, 0, "task"), 32))
    tokens = batch["tokens"]
    perfect = torch.full((32, 64, 64), -10.0)
    perfect[:, :-1].scatter_(2, tokens[:, 1:, None], 10.0)
    m = gen.task_metrics(perfect, batch)
    assert m["task/copy_accuracy"].item() == 1.0 and m["task/copy_loss"].item() < 1e-6
    m0 = gen.task_metrics(torch.zeros(32, 64, 64), batch)
    assert m0["task/copy_loss"].item() == pytest.approx(math.log(64), rel=1e-5)


# --- configuration, wiring ------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiments_build_and_measure(compose_cfg, name):
    cfg = compose_cfg(f"experiment={name}")
    validate(cfg)
    gen = build_generator(cfg)
    x = gen(batch_rng(0, 0), 3)
    assert x.shape == (3, cfg.model.n_ctx) and x.dtype == np.int64 and x.max() < cfg.model.d_vocab
    probe_tokens(cfg, gen)  # the prefix-matching probes fit the vocabulary
    batch = task_batch(cfg, gen)
    assert batch["tokens"].shape == (cfg.probes.task_size, cfg.model.n_ctx)
    metrics = gen.task_metrics(build_model(cfg)(batch["tokens"]), batch)
    assert metrics and all(k.startswith("task/") and v.dim() == 0 and torch.isfinite(v) for k, v in metrics.items())


@pytest.mark.parametrize("overrides, key", [
    (("data=icl_classification", "model.n_ctx=19", "data.n_pairs=9"), "data.n_pairs=9"),
    (("data=icl_classification", "model.n_ctx=19", "data.burstiness=3"), "data.burstiness=3"),
    (("data=icl_classification", "model.n_ctx=19", "data.n_labels=3"), "data.n_labels=3"),
    (("data=icl_classification", "model.n_ctx=19", "data.n_classes=200"), "data.d_vocab=209"),
    (("data=icl_classification", "model.n_ctx=19", "data.n_novel_classes=1"), "data.n_novel_classes=1"),
    (("data=icl_classification", "model.n_ctx=19", "data.p_bursty=1.5"), "data.p_bursty=1.5"),
    (("data=icl_markov", "data.n_states=5", "probes.rep_len=3"), "data.d_vocab=4"),
    (("data=icl_markov", "data.alpha=0", "probes.rep_len=3"), "data.alpha=0.0"),
    (("data=bigram_triggers", "data.n_triggers=63"), "data.n_triggers=63"),
    (("data=bigram_triggers", "data.concentration=0"), "data.concentration=0.0"),
    (("data=random_copies", "model.n_ctx=128"), "data.d_vocab=64"),
    (("data=random_copies", "data.span_len_min=30", "data.span_len_max=20"), "data.span_len_min=30"),
    (("experiment=icl_markov", "probes.rep_len=4"), "probes.rep_len=4"),
    (("experiment=random_copies", "probes.task_size=0"), "probes.task_size=0"),
])
def test_config_errors_name_the_key(compose_cfg, overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*overrides))
    assert str(e.value).startswith(key + ":")


def test_task_metrics_reach_train_parquet(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train("experiment=random_copies", "logger=none", "trainer.max_steps=6", "probes.every_n_steps=2",
                     "checkpoint.enabled=false", run_dir=run_dir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(run_dir / "metrics" / "train.parquet").to_pydict()
    acc = dict(zip(table["step"], table["task/copy_accuracy"]))
    assert [s for s, v in acc.items() if v is not None] == [0, 2, 4, 6]
    assert all(0 <= acc[s] <= 1 for s in (0, 2, 4, 6)) and table["task/copy_loss"][0] > 3


# --- the transitions (slow: minutes each on 2 CPU cores) ------------------------------------------


def final_and_first(run_dir, key):
    table = pq.read_table(run_dir / "metrics" / "train.parquet").to_pydict()
    values = [v for v in table[key] if v is not None]
    return values[0], values[-1]


@pytest.mark.slow
def test_random_copies_two_layers_learn_to_copy_one_layer_does_not(tmp_path):
    common = ("experiment=random_copies", "logger=none", "trainer.max_steps=800", "checkpoint.enabled=false")
    for layers, run_dir in ((2, tmp_path / "l2"), (1, tmp_path / "l1")):
        proc = run_train(*common, f"model.n_layers={layers}", run_dir=run_dir, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    first, last2 = final_and_first(tmp_path / "l2", "task/copy_accuracy")
    _, last1 = final_and_first(tmp_path / "l1", "task/copy_accuracy")
    assert first < 0.1 and last2 > 0.9 and last1 < 0.3
