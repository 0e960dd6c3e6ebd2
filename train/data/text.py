"""Text data: documents -> tokens -> fixed-length windows that start with BOS, cached on disk.

Pipeline (each step in its own module):

    corpus.documents      hub dataset | local text/JSON/Parquet files | the Python standard library
    split_documents       train / held-out, by document (a document's hash decides: deterministic)
    tokenize.get_tokenizer  bytes, or a byte-level BPE trained on the training documents
    pack                  per split: documents joined by BOS, cut into rows of BOS + (seq_len - 1) tokens

The packed `[N, seq_len]` arrays are cached under `cache_dir/<key>/ctx<seq_len>/` as .npy files read
back as memory maps; `<key>` hashes the corpus fingerprint (file names, sizes, mtimes, or hub name,
config, split, revision), the caps, the tokenizer settings and the split, so a second run with the
same settings starts at once and a changed file rebuilds. Every file is written atomically (temp +
rename) and `meta.json` last, so a killed run never leaves a cache that looks complete.

Training batch i is drawn with `batch_rng(seed, i)`: `batch` random rows of the training split
(`windows="packed"`), or `batch` windows at random offsets of its token stream (`windows="random"`,
so a token is seen at every position of the context); the fixed evaluation set is windows at random
offsets of the held-out split (`TextData.eval_batch`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ConfigError
from ..rundir import atomic_write, read_json, write_json
from . import corpus as corpus_mod
from .corpus import CorpusConfig
from .tokenize import BOS, get_tokenizer

log = logging.getLogger(__name__)
CACHE_VERSION = 2
DEFAULT_CACHE = "~/.cache/induction-harness"


def split_documents(docs: Sequence[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Train / held-out by document: the `heldout_fraction` of documents with the smallest
    hash(seed, text) are held out (at least one, never all). Identical documents share a hash, so
    they land in the same split. Order within each split is the corpus order."""
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"data.heldout_fraction={heldout_fraction}: must be strictly between 0 and 1")
    n = len(docs)
    if n < 2:
        raise ConfigError(f"data.heldout_fraction={heldout_fraction}: the corpus has {n} document; the "
                          "train/held-out split is by document and needs at least 2")
    salt = f"{seed}\0".encode()
    h = [hashlib.blake2b(salt + d.encode("utf-8", errors="replace"), digest_size=8).digest() for d in docs]
    k = min(n - 1, max(1, round(heldout_fraction * n)))
    cut = sorted(h)[k - 1]
    held = [hi <= cut for hi in h]
    if all(held):  # every document identical
        raise ConfigError(f"data.heldout_fraction={heldout_fraction}: all documents are identical; "
                          "no split by document is possible")
    return [d for d, x in zip(docs, held) if not x], [d for d, x in zip(docs, held) if x]


def pack(docs_ids: Sequence[np.ndarray], seq_len: int) -> np.ndarray:
    """Join documents with BOS and cut into rows of BOS + (seq_len - 1) tokens; drop the remainder.
    Returns `[N, seq_len]` (N may be 0)."""
    body = seq_len - 1
    pieces: list[np.ndarray] = []
    for i, ids in enumerate(docs_ids):
        if i:
            pieces.append(np.array([BOS], dtype=np.int32))
        pieces.append(np.asarray(ids, dtype=np.int32))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    n = len(stream) // body
    rows = stream[: n * body].reshape(n, body)
    return np.concatenate([np.full((n, 1), BOS, dtype=np.int32), rows], axis=1)


def stream_of(rows: np.ndarray) -> np.ndarray:
    """The token stream that packed rows were cut from: their leading BOS dropped (the BOS between
    documents stays)."""
    return np.ascontiguousarray(rows[:, 1:]).reshape(-1)


def windows_at(stream: np.ndarray, offsets: np.ndarray, seq_len: int) -> np.ndarray:
    """BOS + the `seq_len - 1` tokens of `stream` from each offset: `[len(offsets), seq_len]` int64."""
    body = np.asarray(stream[offsets[:, None] + np.arange(seq_len - 1)], dtype=np.int64)
    return np.concatenate([np.full((len(offsets), 1), BOS, dtype=np.int64), body], axis=1)


def _stream_len(docs_ids: Sequence[np.ndarray]) -> int:
    return sum(len(x) for x in docs_ids) + max(len(docs_ids) - 1, 0)


class TextData:
    """A text-data generator for `StreamDataModule`: `__call__(rng, batch)`, `eval_batch(rng, n)` and
    `unigram()`. Construction only records the settings; the corpus is loaded, tokenized and packed
    (or read from the cache) on first use, inside the run, so errors surface as one-line
    `ConfigError`s."""

    def __init__(self, d_vocab: int, seq_len: int, tokenizer: str = "bpe", heldout_fraction: float = 0.05,
                 split_seed: int = 0, cache_dir: Optional[str] = None, bpe_min_frequency: int = 2,
                 windows: str = "packed", **corpus):
        self.d_vocab, self.seq_len, self.kind, self.windows = d_vocab, seq_len, tokenizer, windows
        self.heldout_fraction, self.split_seed, self.bpe_min_frequency = heldout_fraction, split_seed, bpe_min_frequency
        self.cache_root = Path(os.path.expanduser(cache_dir or os.environ.get("INDUCTION_HARNESS_CACHE") or DEFAULT_CACHE))
        self.spec = CorpusConfig(**corpus)
        self.spec.datasets_cache = self.spec.datasets_cache or str(self.cache_root / "datasets")
        self._train: Optional[np.ndarray] = None
        self._heldout: Optional[np.ndarray] = None
        self._counts: Optional[np.ndarray] = None
        self._train_stream: Optional[np.ndarray] = None
        self.meta: dict = {}
        self._key: Optional[str] = None
        self.built = False  # True when this instance built the cache (not read it)

    def __getstate__(self) -> dict:
        # A loader worker started by spawn (macOS, Windows) gets a pickled copy: it reopens the
        # memory-mapped cache rather than receiving the whole corpus through a pipe.
        return {**self.__dict__, "_train": None, "_heldout": None, "_counts": None, "_train_stream": None}

    # --- the generator protocol -------------------------------------------------------------------

    def __call__(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        if self.windows == "random":
            if self._train_stream is None:  # one copy per process, made on first use
                self._train_stream = stream_of(self.train_rows)
            offsets = rng.integers(0, len(self._train_stream) - self.seq_len + 2, size=batch)
            return windows_at(self._train_stream, offsets, self.seq_len)
        train = self.train_rows
        rows = rng.integers(0, len(train), size=batch)
        return np.asarray(train[rows], dtype=np.int64)  # [batch, seq_len]

    def eval_batch(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` windows of BOS + (seq_len - 1) held-out tokens at distinct random offsets of the held-out
        stream. Random offsets put every held-out token at every position alike, so a model without
        in-context learning has the same expected loss early and late in the window: the ICL score
        of a fixed evaluation set carries no offset set by which text sits at which position."""
        stream = stream_of(self.heldout_rows)
        body = self.seq_len - 1
        starts = len(stream) - body + 1
        if n > starts:
            raise ConfigError(f"data.eval_size={n}: the held-out split has only {len(stream)} tokens, too few "
                              f"for {n} distinct windows of {body}; lower data.eval_size or raise "
                              "data.heldout_fraction")
        return windows_at(stream, np.sort(rng.choice(starts, size=n, replace=False)), self.seq_len)

    def unigram(self) -> np.ndarray:
        """Token frequencies in the training split over the full vocabulary (`d_vocab`); BOS gets 0."""
        self.prepare()
        p = np.zeros(self.d_vocab)
        p[: len(self._counts)] = self._counts
        p[BOS] = 0.0
        return p / max(p.sum(), 1.0)

    @property
    def train_rows(self) -> np.ndarray:
        self.prepare()
        return self._train

    @property
    def heldout_rows(self) -> np.ndarray:
        self.prepare()
        return self._heldout

    # --- the cache --------------------------------------------------------------------------------

    def key(self) -> str:
        """Hash of everything the packed arrays depend on, except the context length."""
        if self._key is None:
            self._key = self._compute_key()
        return self._key

    def _compute_key(self) -> str:
        tok = {"kind": self.kind}
        if self.kind == "bpe":
            tok.update(d_vocab=self.d_vocab, min_frequency=self.bpe_min_frequency)
        material = {"version": CACHE_VERSION, "corpus": corpus_mod.fingerprint(self.spec), "tokenizer": tok,
                    "split": {"heldout_fraction": self.heldout_fraction, "seed": self.split_seed}}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]

    @property
    def corpus_dir(self) -> Path:
        return self.cache_root / self.key()

    def prepare(self) -> None:
        """Read the packed arrays from the cache, building it first if needed."""
        if self._train is not None:
            return
        from .tokenize import check

        check(self.kind, self.d_vocab)
        corpus_dir = self.corpus_dir
        pack_dir = corpus_dir / f"ctx{self.seq_len}"
        if not self._load(pack_dir):
            try:
                self._build(corpus_dir, pack_dir)
            except PermissionError as e:
                raise ConfigError(f"data.cache_dir={self.cache_root}: cannot write the token cache: {e}") from None
            if not self._load(pack_dir):
                raise RuntimeError(f"{pack_dir}: the cache just written cannot be read back")
        if self.meta.get("vocab_size", 0) > self.d_vocab:
            raise ConfigError(f"data.d_vocab={self.d_vocab}: the cached tokenizer has {self.meta['vocab_size']} ids")

    def _load(self, pack_dir: Path) -> bool:
        meta_path = pack_dir / "meta.json"
        if not meta_path.exists():
            return False
        try:
            meta = read_json(meta_path)
            train = np.load(pack_dir / "train.npy", mmap_mode="r")
            heldout = np.load(pack_dir / "heldout.npy", mmap_mode="r")
            counts = np.load(pack_dir / "counts.npy")
        except (OSError, ValueError):
            return False
        if train.ndim != 2 or train.shape[1] != self.seq_len or heldout.shape[1:] != (self.seq_len,):
            return False
        self._train, self._heldout, self._counts, self.meta = train, heldout, counts, meta
        return True

    def _build(self, corpus_dir: Path, pack_dir: Path) -> None:
        spec, what = self.spec, corpus_mod.describe(self.spec)
        log.info("text data: building the token cache for %s in %s", what, pack_dir)
        docs = corpus_mod.documents(spec)
        train_docs, held_docs = split_documents(docs, self.heldout_fraction, self.split_seed)
        tok = get_tokenizer(self.kind, self.d_vocab, train_docs, corpus_dir / "tokenizer.json",
                            self.bpe_min_frequency, alphabet_docs=docs)
        train_ids, held_ids = tok.encode(train_docs), tok.encode(held_docs)
        total = _stream_len(train_ids) + _stream_len(held_ids)
        if total < self.seq_len - 1:
            raise ConfigError(f"{what}: the corpus is {total} tokens, shorter than one sequence "
                              f"(model.n_ctx={self.seq_len})")
        train, held = pack(train_ids, self.seq_len), pack(held_ids, self.seq_len)
        if len(train) == 0:
            raise ConfigError(f"{what}: the training split is {_stream_len(train_ids)} tokens, shorter than one "
                              f"sequence (model.n_ctx={self.seq_len}); lower data.heldout_fraction or add text")
        if len(held) == 0:
            raise ConfigError(f"data.heldout_fraction={self.heldout_fraction}: the held-out split ({len(held_docs)} "
                              f"documents, {_stream_len(held_ids)} tokens) is shorter than one sequence "
                              f"(model.n_ctx={self.seq_len}); raise it or add text")
        dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        counts = np.bincount(train[:, 1:].ravel(), minlength=tok.vocab_size).astype(np.int64)
        _save_npy(pack_dir / "train.npy", train.astype(dtype))
        _save_npy(pack_dir / "heldout.npy", held.astype(dtype))
        _save_npy(pack_dir / "counts.npy", counts)
        meta = {
            "key": corpus_dir.name, "corpus": what, "tokenizer": self.kind, "vocab_size": tok.vocab_size,
            "d_vocab": self.d_vocab, "seq_len": self.seq_len,
            "documents": {"train": len(train_docs), "heldout": len(held_docs)},
            "characters": {"train": sum(map(len, train_docs)), "heldout": sum(map(len, held_docs))},
            "tokens": {"train": int(train.size), "heldout": int(held.size)},
            "sequences": {"train": len(train), "heldout": len(held)},
        }
        write_json(corpus_dir / "corpus.json", corpus_mod.fingerprint(spec))
        write_json(pack_dir / "meta.json", meta)  # last: marks the cache complete
        self.built = True
        log.info("text data: %d train / %d held-out sequences of %d tokens, vocabulary %d",
                 len(train), len(held), self.seq_len, tok.vocab_size)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
