"""Tokenizers for text data: raw bytes, or a byte-level BPE trained here with `tokenizers`.

Model token ids are the tokenizer's ids plus one: id 0 is BOS, which no text can produce (no special
token is registered in the tokenizer, so a literal "<bos>" in a document is just text).

- byte: id = byte + 1; `d_vocab` must be at least 257.
- bpe: a byte-level BPE (GPT-2's pre-tokenizer and byte-to-character map) with at most `d_vocab - 1`
  entries, its merges trained on the training documents; cached as `tokenizer.json` so a second run
  does not retrain. Its alphabet is the bytes that occur in the corpus (both splits), not all 256:
  every id then stands for real text, so probes drawn at random from the vocabulary use tokens the
  model has seen. A byte that never occurs in the corpus is dropped if later text contains it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ConfigError
from ..rundir import write_text

BOS = 0
KINDS = ("bpe", "byte")
BYTE_VOCAB = 257  # 256 bytes + BOS


def check(kind: str, d_vocab: int) -> None:
    """The vocabulary the config promises (`data.d_vocab`) must hold the tokenizer's."""
    if kind not in KINDS:
        raise ConfigError(f"data.tokenizer={kind}: expected one of {', '.join(KINDS)}")
    if kind == "byte" and d_vocab < BYTE_VOCAB:
        raise ConfigError(f"data.d_vocab={d_vocab}: the byte tokenizer needs {BYTE_VOCAB} ids (256 bytes + BOS)")
    if kind == "bpe" and d_vocab < BYTE_VOCAB + 1:
        raise ConfigError(f"data.d_vocab={d_vocab}: a byte-level BPE needs at least {BYTE_VOCAB + 1} ids "
                          "(256 bytes, BOS and one merge)")
    if d_vocab > np.iinfo(np.int32).max:
        raise ConfigError(f"data.d_vocab={d_vocab}: too large")


class ByteTokenizer:
    """UTF-8 bytes, shifted by one for BOS."""

    vocab_size = BYTE_VOCAB

    def encode(self, docs: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(d.encode("utf-8"), dtype=np.uint8).astype(np.int32) + 1 for d in docs]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) - 1 for i in ids if i != BOS).decode("utf-8", errors="replace")


class BpeTokenizer:
    """A `tokenizers.Tokenizer` (byte-level BPE); model ids are its ids plus one."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size() + 1  # + BOS

    @classmethod
    def train(cls, docs: Sequence[str], d_vocab: int, min_frequency: int = 2,
              alphabet_docs: Optional[Sequence[str]] = None) -> "BpeTokenizer":
        """Merges from `docs`; the alphabet from the bytes of `alphabet_docs` (default `docs`)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=d_vocab - 1, min_frequency=min_frequency, show_progress=False,
            initial_alphabet=byte_alphabet(alphabet_docs if alphabet_docs is not None else docs),
            special_tokens=[],
        )
        tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BpeTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        write_text(path, self.tok.to_str())  # atomic: temp file + rename

    def encode(self, docs: Sequence[str], chunk: int = 256) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        for i in range(0, len(docs), chunk):
            for enc in encode(list(docs[i:i + chunk])):
                out.append(np.asarray(enc.ids, dtype=np.int32) + 1)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) - 1 for i in ids if i != BOS])


def byte_alphabet(docs: Sequence[str]) -> list[str]:
    """The byte-level characters (GPT-2's byte-to-unicode map) of the bytes that occur in `docs`."""
    chars = set()
    for d in docs:
        chars.update(d)
    present = set()
    for c in chars:
        present.update(c.encode("utf-8", errors="replace"))
    table = _bytes_to_unicode()
    return [table[b] for b in sorted(present)]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (as used by ByteLevel)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# How many times a BPE was trained in this process (tests check the cache by it, not by timing).
TRAIN_COUNT = 0


def get_tokenizer(kind: str, d_vocab: int, train_docs: Optional[Sequence[str]], path: Optional[Path],
                  min_frequency: int = 2, alphabet_docs: Optional[Sequence[str]] = None):
    """The tokenizer for `kind`: byte, or a BPE loaded from `path` if cached there, else trained on
    `train_docs` (alphabet from `alphabet_docs`) and saved to `path`. Its vocabulary must fit in
    `d_vocab`."""
    global TRAIN_COUNT
    check(kind, d_vocab)
    if kind == "byte":
        return ByteTokenizer()
    if path is not None and path.exists():
        try:
            tok = BpeTokenizer.load(path)
        except Exception:  # unreadable: train it again (the rewrite is atomic)
            tok = None
        if tok is not None:
            _check_fits(tok, d_vocab, path)
            return tok
    if train_docs is None:
        raise ValueError("no cached tokenizer and no documents to train one on")
    tok = BpeTokenizer.train(train_docs, d_vocab, min_frequency, alphabet_docs)
    TRAIN_COUNT += 1
    _check_fits(tok, d_vocab, path)
    if path is not None:
        tok.save(path)
    return tok


def _check_fits(tok, d_vocab: int, path: Optional[Path]) -> None:
    if tok.vocab_size > d_vocab:
        where = f" ({path})" if path else ""
        raise ConfigError(f"data.d_vocab={d_vocab}: the tokenizer{where} has {tok.vocab_size} ids "
                          f"including BOS; raise data.d_vocab (and model.d_vocab) to at least that")
