"""Text data: every loading path on small files the tests write, the caches, the split, and bad input."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train.config import validate
from train.errors import ConfigError
from train.data import tokenize
from train.data.corpus import CorpusConfig, documents, stdlib_files
from train.data.synthetic import BOS, batch_rng
from train.data.text import TextData, pack, split_documents

from tests.conftest import run_train

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def paragraphs(n: int, words: int = 60, seed: int = 0) -> list[str]:
    """`n` distinct paragraphs of pseudo-text, each with a repeated phrase (in-context structure)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        body = list(rng.choice(WORDS, size=words))
        phrase = body[:6]
        out.append(f"doc{i} " + " ".join(body + phrase + body[6:12]) + ".")
    return out


def text_data(tmp_path: Path, **kwargs) -> TextData:
    kwargs.setdefault("d_vocab", tokenize.BYTE_VOCAB)
    kwargs.setdefault("seq_len", 32)
    kwargs.setdefault("tokenizer", "byte")
    kwargs.setdefault("heldout_fraction", 0.25)
    return TextData(cache_dir=str(tmp_path / "cache"), **kwargs)


def check_rows(rows: np.ndarray, seq_len: int, d_vocab: int) -> None:
    assert rows.dtype == np.int64 and rows.ndim == 2 and rows.shape[1] == seq_len
    assert (rows[:, 0] == BOS).all()
    assert rows.min() >= 0 and rows.max() < d_vocab


# --- loading paths --------------------------------------------------------------------------------


def test_text_files_one_document_per_paragraph(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(20)))
    data = text_data(tmp_path, source="files", data_files=[str(path)])
    x = data(batch_rng(0, 0), 8)
    check_rows(x, 32, 257)
    assert data.meta["documents"]["train"] + data.meta["documents"]["heldout"] == 20
    assert "doc" in tokenize.ByteTokenizer().decode(data.train_rows[:4].ravel())


def test_json_and_parquet_files_with_a_text_column(tmp_path):
    docs = paragraphs(12)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)))
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": docs, "id": list(range(12))}), parquet)
    loaded = []
    for path in (jsonl, parquet):
        spec = CorpusConfig(source="files", data_files=[str(path)], text_column="body",
                          datasets_cache=str(tmp_path / "hf"))
        loaded.append(documents(spec))
        data = text_data(tmp_path, source="files", data_files=[str(path)], text_column="body")
        check_rows(data(batch_rng(0, 0), 4), 32, 257)
    assert loaded[0] == loaded[1] == docs


def test_bpe_on_local_files_fits_the_vocabulary(tmp_path):
    path = tmp_path / "corpus.md"
    path.write_text("\n\n".join(paragraphs(40)))
    data = text_data(tmp_path, source="files", data_files=[str(path)], tokenizer="bpe", d_vocab=300)
    check_rows(data(batch_rng(0, 0), 8), 32, 300)
    tok = tokenize.BpeTokenizer.load(data.corpus_dir / "tokenizer.json")
    assert tok.vocab_size <= 300
    row = data.train_rows[0]
    assert tok.decode(row).startswith("doc")  # the first window starts at the first document
    u = data.unigram()
    assert u.shape == (300,) and u[BOS] == 0 and abs(u.sum() - 1) < 1e-9


def test_stdlib_corpus_with_a_small_cap(tmp_path):
    files = stdlib_files(CorpusConfig())
    root = files[0].parent
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and stdlib_files(CorpusConfig()) == files  # deterministic order
    assert not any("site-packages" in str(f) or "/test/" in str(f) for f in files)
    data = text_data(tmp_path, source="stdlib", max_chars=60_000, tokenizer="bpe", d_vocab=320, seq_len=64,
                     heldout_fraction=0.3)
    check_rows(data(batch_rng(0, 0), 4), 64, 320)
    assert data.meta["characters"]["train"] + data.meta["characters"]["heldout"] == 60_000
    assert data.meta["documents"]["heldout"] >= 1
    again = text_data(tmp_path, source="stdlib", max_chars=60_000, tokenizer="bpe", d_vocab=320, seq_len=64,
                      heldout_fraction=0.3)
    assert again.key() == data.key()


# --- caching --------------------------------------------------------------------------------------


def test_second_construction_reads_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(30)))
    kwargs = dict(source="files", data_files=[str(path)], tokenizer="bpe", d_vocab=300)
    first = text_data(tmp_path, **kwargs)
    first.prepare()
    trained = tokenize.TRAIN_COUNT
    tok_mtime = (first.corpus_dir / "tokenizer.json").stat().st_mtime_ns
    meta_mtime = (first.corpus_dir / "ctx32" / "meta.json").stat().st_mtime_ns
    assert first.built

    def no_reading(spec):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr("train.data.corpus.documents", no_reading)
    second = text_data(tmp_path, **kwargs)
    np.testing.assert_array_equal(second(batch_rng(0, 3), 8), first(batch_rng(0, 3), 8))
    assert not second.built and tokenize.TRAIN_COUNT == trained
    assert (first.corpus_dir / "ctx32" / "meta.json").stat().st_mtime_ns == meta_mtime
    monkeypatch.undo()
    # Another context length repacks but reuses the trained tokenizer.
    third = text_data(tmp_path, **{**kwargs, "seq_len": 16})
    third.prepare()
    assert third.built and tokenize.TRAIN_COUNT == trained
    assert (first.corpus_dir / "tokenizer.json").stat().st_mtime_ns == tok_mtime
    # A changed file is a different corpus.
    path.write_text("\n\n".join(paragraphs(30, seed=1)))
    assert text_data(tmp_path, **kwargs).key() != first.key()


# --- split and determinism ------------------------------------------------------------------------


def test_split_is_by_document_and_deterministic(tmp_path):
    # Each document is one distinct letter repeated, so a byte says which document it came from.
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("N") + 1)]
    path = tmp_path / "letters.txt"
    path.write_text("\n\n".join(ch * 50 for ch in letters))
    data = text_data(tmp_path, source="files", data_files=[str(path)], seq_len=16)
    train_bytes = set(np.unique(data.train_rows)) - {BOS}
    held_bytes = set(np.unique(data.heldout_rows)) - {BOS}
    newline = ord("\n") + 1
    assert held_bytes and train_bytes and not (train_bytes & held_bytes) - {newline}
    docs = [ch * 50 for ch in letters]
    train, held = split_documents(docs, 0.25, seed=0)
    assert split_documents(docs, 0.25, seed=0) == (train, held)
    assert len(held) == 10 and not set(train) & set(held)
    assert split_documents(docs, 0.25, seed=1) != (train, held)


def test_batches_are_deterministic_and_eval_comes_from_the_heldout_split(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(40)))
    a = text_data(tmp_path, source="files", data_files=[str(path)])
    b = text_data(tmp_path, source="files", data_files=[str(path)])
    np.testing.assert_array_equal(a(batch_rng(7, 5), 16), b(batch_rng(7, 5), 16))
    assert not np.array_equal(a(batch_rng(7, 5), 16), a(batch_rng(7, 6), 16))
    ev = a.eval_batch(batch_rng(1, 0, "eval"), 6)
    np.testing.assert_array_equal(ev, b.eval_batch(batch_rng(1, 0, "eval"), 6))
    # Each evaluation window is BOS + a contiguous stretch of the held-out stream, at distinct offsets.
    stream = np.asarray(a.heldout_rows)[:, 1:].ravel().tolist()
    assert (ev[:, 0] == BOS).all() and len({tuple(r) for r in ev}) == 6
    for row in ev[:, 1:].tolist():
        assert any(stream[i:i + len(row)] == row for i in range(len(stream) - len(row) + 1))


def test_random_training_windows_are_a_function_of_seed_and_step(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(40)))
    a = text_data(tmp_path, source="files", data_files=[str(path)], windows="random")
    b = text_data(tmp_path, source="files", data_files=[str(path)], windows="random")
    np.testing.assert_array_equal(a(batch_rng(7, 5), 64), b(batch_rng(7, 5), 64))
    assert not np.array_equal(a(batch_rng(7, 5), 64), a(batch_rng(7, 6), 64))
    assert not np.array_equal(a(batch_rng(7, 5), 64), a(batch_rng(8, 5), 64))
    # Each window is BOS + a contiguous stretch of the training stream, starting anywhere in it (packed
    # rows start only at multiples of seq_len - 1).
    stream = np.asarray(a.train_rows)[:, 1:].ravel()
    starts = []
    for row in a(batch_rng(7, 5), 64):
        assert row[0] == BOS and len(row) == 32
        hits = [i for i in np.flatnonzero(stream == row[1]) if np.array_equal(stream[i:i + 31], row[1:])]
        assert hits
        starts.append(hits[0])
    assert len({s % 31 for s in starts}) > 10
    assert len(stream) - 31 >= max(starts)


def test_pack_joins_documents_with_bos_into_windows_that_start_with_bos():
    rows = pack([np.array([5, 6, 7]), np.array([8, 9])], seq_len=4)
    np.testing.assert_array_equal(rows, [[0, 5, 6, 7], [0, 0, 8, 9]])


# --- bad input: one line naming the file or key, nothing half-written -----------------------------


def assert_clean(cache: Path) -> None:
    """No temp files and no pack that looks complete."""
    assert not list(cache.rglob("*.tmp"))
    assert not list(cache.rglob("meta.json"))


def test_a_build_killed_midway_leaves_no_complete_looking_cache(tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(30)))
    kwargs = dict(source="files", data_files=[str(path)], tokenizer="bpe", d_vocab=300)
    import train.data.text as text_mod

    real_save, calls = text_mod._save_npy, []

    def dying_save(target, array):
        calls.append(target)
        if len(calls) == 2:  # the held-out array: die in the middle of writing it
            def write(tmp):
                Path(tmp).write_bytes(b"partial")
                raise KeyboardInterrupt

            text_mod.atomic_write(target, write)
        real_save(target, array)

    monkeypatch.setattr(text_mod, "_save_npy", dying_save)
    with pytest.raises(KeyboardInterrupt):
        text_data(tmp_path, **kwargs).prepare()
    assert_clean(tmp_path / "cache")
    monkeypatch.undo()
    trained = tokenize.TRAIN_COUNT
    again = text_data(tmp_path, **kwargs)
    check_rows(again(batch_rng(0, 0), 4), 32, 300)
    assert again.built and tokenize.TRAIN_COUNT == trained  # the finished tokenizer was kept


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.data_files: no such file: .*nope.txt$"):
        text_data(tmp_path, source="files", data_files=[str(tmp_path / "nope.txt")]).prepare()
    with pytest.raises(ConfigError, match=r"^data.data_files: no file matches"):
        text_data(tmp_path, source="files", data_files=[str(tmp_path / "*.jsonl")]).prepare()
    assert_clean(tmp_path / "cache")


def test_empty_corpus(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n\n   \n\n")
    with pytest.raises(ConfigError, match=r"^data.data_files=.*blank.txt.*: the corpus is empty"):
        text_data(tmp_path, source="files", data_files=[str(path)]).prepare()
    assert_clean(tmp_path / "cache")


def test_corpus_shorter_than_one_sequence(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("one\n\ntwo\n\nthree")
    with pytest.raises(ConfigError, match=r"^data.data_files=.*short.txt.*shorter than one sequence \(model.n_ctx=32\)"):
        text_data(tmp_path, source="files", data_files=[str(path)]).prepare()
    assert_clean(tmp_path / "cache")


def test_single_document_cannot_be_split(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("x" * 500)
    with pytest.raises(ConfigError, match=r"^data.heldout_fraction=.*1 document"):
        text_data(tmp_path, source="files", data_files=[str(path)], sample_by="document").prepare()


def test_missing_text_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"content": d}) for d in paragraphs(4)))
    with pytest.raises(ConfigError, match=r"^data.text_column=text: not a column of .*rows.jsonl \(columns: content\)"):
        text_data(tmp_path, source="files", data_files=[str(path)]).prepare()


def test_unknown_hub_dataset_while_offline(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    data = text_data(tmp_path, source="hub", dataset="nobody/no-such-dataset", max_chars=1000)
    with pytest.raises(ConfigError, match=r"^data.dataset=nobody/no-such-dataset: cannot load it: offline") as e:
        data.prepare()
    assert "\n" not in str(e.value)
    assert_clean(tmp_path / "cache")


def test_tokenizer_vocabulary_mismatch(tmp_path, compose_cfg):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(10)))
    with pytest.raises(ConfigError, match=r"^data.d_vocab=256: the byte tokenizer needs 257"):
        text_data(tmp_path, source="files", data_files=[str(path)], d_vocab=256).prepare()
    with pytest.raises(ConfigError, match=r"^data.d_vocab=200: a byte-level BPE needs at least 258"):
        text_data(tmp_path, source="files", data_files=[str(path)], tokenizer="bpe", d_vocab=200).prepare()
    with pytest.raises(ConfigError, match=r"^data.tokenizer=wordpiece"):
        text_data(tmp_path, source="files", data_files=[str(path)], tokenizer="wordpiece").prepare()
    assert_clean(tmp_path / "cache")
    cfg = compose_cfg("data=text_stdlib", "model.d_vocab=256")  # data.d_vocab stays 512
    with pytest.raises(ConfigError, match=r"^data.d_vocab=512: exceeds model.d_vocab=256"):
        validate(cfg)


def test_eval_set_larger_than_the_heldout_split(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(20)))
    data = text_data(tmp_path, source="files", data_files=[str(path)])
    with pytest.raises(ConfigError, match=r"^data.eval_size=100000: the held-out split has only"):
        data.eval_batch(batch_rng(0, 0, "eval"), 100_000)


def test_text_configs_compose(compose_cfg):
    for option in ("text_stdlib", "text_stdlib_bytes", "text_files", "text_hub"):
        cfg = compose_cfg(f"data={option}")
        assert cfg.data._target_ == "train.data.text.TextData"
    for name, layers, smeared, position_layers in (
            ("olsson_text", 2, False, 1), ("olsson_text_1l", 1, False, 1),
            ("olsson_text_3l", 3, False, 1), ("olsson_text_smeared", 1, True, 1)):
        cfg = compose_cfg(f"experiment={name}")
        validate(cfg)
        assert (cfg.model.n_layers, cfg.model.smeared_key, cfg.data.source) == (layers, smeared, "stdlib")
        assert cfg.model.position_layers == position_layers
        assert cfg.model.d_vocab == cfg.data.d_vocab
        assert (cfg.model.n_heads, cfg.model.n_ctx, cfg.data.windows, cfg.phase.min_step) == (2, 256, "random", 0)


# --- end to end -----------------------------------------------------------------------------------


def test_train_on_local_text_end_to_end(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(80)))
    common = [f"data.cache_dir={tmp_path / 'cache'}", "logger=none", "data.eval_size=8",
              "data.heldout_fraction=0.2", "data.d_vocab=300", "checkpoint.enabled=false"]
    proc = run_train("data=text_files", f"data.data_files=[{path}]", "trainer.max_steps=20", *common,
                     run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["final"]["loss"] > 0
    assert list((tmp_path / "cache").rglob("meta.json"))
    # A bad input is one line on stderr and exit status 2.
    proc = run_train("data=text_files", f"data.data_files=[{tmp_path / 'missing.txt'}]", "trainer.max_steps=2",
                     *common, run_dir=tmp_path / "bad")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.data_files: no such file:")


def test_text_run_with_random_windows_resumes_exactly(tmp_path):
    from tests.test_resume import assert_same_run

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(80)))
    common = ["data=text_files", f"data.data_files=[{path}]", f"data.cache_dir={tmp_path / 'cache'}", "logger=none",
              "data.eval_size=8", "data.heldout_fraction=0.2", "data.d_vocab=300", "data.windows=random",
              "checkpoint.every_n_steps=10", "probes.eval_every_n_steps=5", "probes.flush_every_n_steps=7"]
    full, half = tmp_path / "full", tmp_path / "half"
    assert run_train(*common, "trainer.max_steps=30", run_dir=full).returncode == 0
    assert run_train(*common, "trainer.max_steps=15", run_dir=half).returncode == 0
    proc = run_train(*common, "trainer.max_steps=30", f"resume={half}", run_dir=half)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(full, half, 30)


# --- the ICL score on text ------------------------------------------------------------------------


def test_icl_score_noise_on_a_model_without_in_context_learning(tmp_path, compose_cfg):
    """A bigram model of the training split predicts each token from the one before it only: its true
    ICL score is 0. On evaluation sets drawn as `olsson_text` draws them (its context, size and windows;
    byte tokens of the standard library, quick to build), the score's spread across independent draws
    stays below 0.03 nats; the paper's single-position form spreads several times wider."""
    import torch

    from train import probes

    cfg = compose_cfg("experiment=olsson_text")
    n_ctx, eval_size = cfg.model.n_ctx, cfg.data.eval_size
    data = text_data(tmp_path, source="stdlib", max_chars=4_000_000, seq_len=n_ctx, heldout_fraction=0.05)
    train = np.asarray(data.train_rows, dtype=np.int64)
    counts = np.ones((data.d_vocab, data.d_vocab))
    np.add.at(counts, (train[:, :-1].ravel(), train[:, 1:].ravel()), 1)
    log_p = torch.from_numpy(np.log(counts / counts.sum(1, keepdims=True)))

    def spread(span: float) -> tuple[float, float]:
        late, early = probes.icl_positions(n_ctx, cfg.probes.icl_late, cfg.probes.icl_early, span)
        scores = []
        for seed in range(8):
            tokens = torch.from_numpy(data.eval_batch(batch_rng(seed, 0, "eval"), eval_size))
            losses = -log_p[tokens[:, :-1], tokens[:, 1:]]  # [eval, pos - 1]
            scores.append(float(probes.icl_score(losses, late, early)))
        return float(np.mean(scores)), float(np.std(scores))

    mean, std = spread(cfg.probes.icl_span)
    assert std < 0.03 and abs(mean) < 0.03, (mean, std)
    assert spread(1.0)[1] > 2 * std


@pytest.mark.slow
def test_an_ensemble_on_text_tokenizes_once_for_all_members(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(80)))
    run_dir = tmp_path / "ens"
    proc = run_train("seeds=2", "data=text_files", f"data.data_files=[{path}]", f"data.cache_dir={tmp_path / 'cache'}",
                     "logger=none", "data.eval_size=8", "data.heldout_fraction=0.2", "data.d_vocab=300",
                     "checkpoint.enabled=false", "trainer.max_steps=5", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["finished"] == 2
    assert len(list((tmp_path / "cache").rglob("meta.json"))) == 1
    # The ensemble built the cache before its members started; they read it.
    assert "text data:" in (run_dir / "train.log").read_text()
    assert all("text data:" not in (run_dir / "members" / k / "train.log").read_text() for k in ("0", "1"))
