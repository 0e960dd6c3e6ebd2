import numpy as np
import torch

from train.data.datamodule import StreamDataModule
from train.data.synthetic import BOS, MarkovCopies, RepeatedTokens, batch_rng, probe_token_weights


def test_markov_copies_is_deterministic_and_well_formed():
    gen = MarkovCopies(d_vocab=32, seq_len=64)
    a = gen(batch_rng(3, 5), 16)
    b = gen(batch_rng(3, 5), 16)
    c = gen(batch_rng(3, 6), 16)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (16, 64)
    assert (a[:, 0] == BOS).all() and (a[:, 1:] > 0).all() and (a < 32).all()


def test_markov_copies_has_in_weights_and_in_context_structure():
    gen = MarkovCopies(d_vocab=32, seq_len=128, spans_per_seq=4, span_len_min=8, span_len_max=12)
    x = gen(batch_rng(0, 0), 256)[:, 1:]
    # In weights: bigram counts follow the fixed chain (a token's successor is far from uniform).
    counts = np.zeros((31, 31))
    np.add.at(counts, (x[:, :-1].ravel() - 1, x[:, 1:].ravel() - 1), 1)
    rows = counts[counts.sum(1) > 200]
    top_share = (rows.max(1) / rows.sum(1)).mean()
    assert top_share > 3 / 31
    # In context: 4-grams recur inside a sequence far more often than chance, late in the sequence,
    # and never within the first span_len_min tokens (a copy needs a source before it).
    def recurring(seq, start, stop, n=4):
        seen, hits = set(), 0
        for i in range(len(seq) - n + 1):
            gram = tuple(seq[i:i + n])
            if start <= i < stop and gram in seen:
                hits += 1
            seen.add(gram)
        return hits

    late = sum(recurring(s, 96, 120) for s in x)
    early = sum(recurring(s, 0, 8) for s in x)
    assert early == 0 and late > 0.1 * 24 * len(x)
    # No copies, no recurrence: the control has almost none.
    plain = MarkovCopies(d_vocab=32, seq_len=128, spans_per_seq=0)(batch_rng(0, 0), 256)[:, 1:]
    assert sum(recurring(s, 96, 120) for s in plain) < 0.2 * late


def test_repeated_tokens_repeat_exactly_with_distinct_tokens():
    x = RepeatedTokens(d_vocab=50, seq_len=101, rep_len=25)(batch_rng(0, 0, "probe"), 4)
    assert x.shape == (4, 101) and (x[:, 0] == BOS).all()
    for s in x:
        body = s[1:]
        assert len(set(body[:25])) == 25
        np.testing.assert_array_equal(body[:25], body[25:50])
        np.testing.assert_array_equal(body[:25], body[75:100])


def test_probe_weights_exclude_most_and_least_common():
    unigram = np.array([0.0, 0.5, 0.2, 0.1, 0.1, 0.06, 0.04])
    w = probe_token_weights(unigram, 7, exclude_fraction=1 / 6)
    assert w[1] == 0 and w[6] == 0 and w[0] == 0
    assert w[2:6].tolist() == [1, 1, 1, 1]
    x = RepeatedTokens(d_vocab=7, seq_len=9, rep_len=4, weights=w)(batch_rng(0, 0, "probe"), 8)
    assert set(np.unique(x[:, 1:])) <= {2, 3, 4, 5}


def test_stream_resumes_at_its_position():
    gen = MarkovCopies(d_vocab=16, seq_len=16)
    dm = StreamDataModule(gen, batch_size=4, seed=7, eval_size=8, eval_seed=1)
    it = iter(dm.train_dataloader())
    batches = [dm.on_before_batch_transfer(next(it), 0) for _ in range(5)]
    assert [b["index"] for b in batches] == [0, 1, 2, 3, 4]
    state = dm.state_dict()
    fresh = StreamDataModule(gen, batch_size=4, seed=7, eval_size=8, eval_seed=1)
    fresh.load_state_dict(state)
    nxt = fresh.on_before_batch_transfer(next(iter(fresh.train_dataloader())), 0)
    assert nxt["index"] == 5
    torch.testing.assert_close(nxt["tokens"], torch.from_numpy(gen(batch_rng(7, 5), 4)))
    # The evaluation set depends on its own seed only.
    other = StreamDataModule(gen, batch_size=4, seed=99, eval_size=8, eval_seed=1)
    torch.testing.assert_close(dm.eval_tokens(), other.eval_tokens())


def test_loader_workers_make_the_same_stream_in_order():
    gen = MarkovCopies(d_vocab=16, seq_len=16)
    dm = StreamDataModule(gen, batch_size=4, seed=7, eval_size=8, eval_seed=1, num_workers=2)
    dm.load_state_dict({"next_batch": 5})  # a resumed run: every worker starts from the saved position
    it = iter(dm.train_dataloader())
    batches = [dm.on_before_batch_transfer(next(it), 0) for _ in range(7)]
    assert [b["index"] for b in batches] == list(range(5, 12))
    for b in batches:
        torch.testing.assert_close(b["tokens"], torch.from_numpy(gen(batch_rng(7, b["index"]), 4)))
    assert dm.state_dict() == {"next_batch": 12}


def test_a_spawned_loader_worker_makes_the_same_stream():
    """Spawn and forkserver (macOS, Windows, joblib's processes, Python 3.14) pickle the stream."""
    gen = MarkovCopies(d_vocab=16, seq_len=16)
    dm = StreamDataModule(gen, batch_size=4, seed=7, eval_size=8, eval_seed=1, num_workers=1)
    dm.load_state_dict({"next_batch": 3})
    loader = dm.train_dataloader()
    loader.multiprocessing_context = "spawn"
    it = iter(loader)
    batches = [dm.on_before_batch_transfer(next(it), 0) for _ in range(2)]
    assert [b["index"] for b in batches] == [3, 4]
    torch.testing.assert_close(batches[1]["tokens"], torch.from_numpy(gen(batch_rng(7, 4), 4)))
