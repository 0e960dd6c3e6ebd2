"""Where text comes from: documents (strings) from the Hugging Face hub, local files, or the Python
standard library's own source (the default corpus: on every machine, no download).

Each source is described by a JSON-able *fingerprint* computed without reading the text (file names,
sizes and mtimes; or the hub name, config, split and revision), so the packed-token cache can be found
before any document is loaded. Every failure is a `ConfigError` whose message starts with the key or
the file at fault.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ..errors import ConfigError

SOURCES = ("stdlib", "files", "hub")
FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".py": "text", ".json": "json",
           ".jsonl": "json", ".parquet": "parquet"}
# Not the standard library (installed packages), or not plain modern Python (tests, test data).
STDLIB_EXCLUDE = ("site-packages/*", "dist-packages/*", "test/*", "*/test/*", "*/tests/*", "*/idle_test/*")


@dataclass
class CorpusConfig:
    """What to read: the fields of the text data options that choose the documents (the text schema,
    `train.config.TextDataConfig`, extends this)."""

    source: str = "stdlib"  # stdlib (the Python standard library's .py files) | files | hub
    dataset: Optional[str] = None  # hub: dataset name, e.g. roneneldan/TinyStories
    dataset_config: Optional[str] = None  # hub: config name, e.g. wikitext-103-raw-v1
    split: str = "train"  # hub: the split to read (held-out documents are split off it)
    revision: Optional[str] = None  # hub: a commit or tag (pin it: the cache key names it)
    streaming: bool = True  # hub: stream rather than download everything (use with max_chars)
    data_files: list[str] = field(default_factory=list)  # files: paths or globs
    file_format: Optional[str] = None  # files: text | json | parquet; default from the extension
    text_column: str = "text"  # hub, json, parquet: the column holding the text
    sample_by: str = "paragraph"  # text files: a document is a line | paragraph | document (file)
    stdlib_exclude: list[str] = field(default_factory=lambda: list(STDLIB_EXCLUDE))  # stdlib: globs
    max_docs: Optional[int] = None  # read at most this many documents
    max_chars: Optional[int] = None  # read at most this many characters (the last document is cut)
    datasets_cache: Optional[str] = None  # where `datasets` keeps its Arrow copy of local files (default: cache_dir/datasets)


def check(spec: CorpusConfig) -> None:
    """Cheap checks that need no reading."""
    if spec.source not in SOURCES:
        raise ConfigError(f"data.source={spec.source}: expected one of {', '.join(SOURCES)}")
    for key in ("max_docs", "max_chars"):
        value = getattr(spec, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key}={value}: must be at least 1 (or null for no cap)")
    if spec.source == "hub" and not spec.dataset:
        raise ConfigError("data.dataset: required with data.source=hub (a hub dataset name)")
    if spec.source == "files":
        if not spec.data_files:
            raise ConfigError("data.data_files: required with data.source=files (paths or globs)")
        if spec.sample_by not in ("line", "paragraph", "document"):
            raise ConfigError(f"data.sample_by={spec.sample_by}: expected line, paragraph or document")


def fingerprint(spec: CorpusConfig) -> dict:
    """Identifies the documents `documents(spec)` would return, without reading them."""
    check(spec)
    caps = {"max_docs": spec.max_docs, "max_chars": spec.max_chars}
    if spec.source == "hub":
        return {"source": "hub", "dataset": spec.dataset, "config": spec.dataset_config, "split": spec.split,
                "revision": spec.revision, "text_column": spec.text_column, **caps}
    if spec.source == "files":
        files = local_files(spec.data_files)
        return {"source": "files", "format": file_format(spec, files), "text_column": spec.text_column,
                "sample_by": spec.sample_by, "files": [_stat(p) for p in files], **caps}
    root = stdlib_root()
    return {"source": "stdlib", "root": str(root), "files": [_stat(p, root) for p in stdlib_files(spec)], **caps}


def documents(spec: CorpusConfig) -> list[str]:
    """The corpus as a list of non-empty documents, in a deterministic order, capped."""
    check(spec)
    if spec.source == "hub":
        docs = _capped(_hub_texts(spec), spec)
    elif spec.source == "files":
        docs = _capped(_file_texts(spec), spec)
    else:
        docs = _capped((_read(p) for p in stdlib_files(spec)), spec)
    if not docs:
        raise ConfigError(f"{describe(spec)}: the corpus is empty (no non-blank text)")
    return docs


def describe(spec: CorpusConfig) -> str:
    """The key (and value) that names this corpus in an error message."""
    if spec.source == "hub":
        return f"data.dataset={spec.dataset}"
    if spec.source == "files":
        return f"data.data_files={list(spec.data_files)}"
    return f"data.source=stdlib ({stdlib_root()})"


# --- the standard library -------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files(spec: CorpusConfig) -> list[Path]:
    """The standard library's .py files, sorted by relative path, minus `stdlib_exclude` (a directory
    the globs exclude is not even walked: site-packages can be large)."""
    root = stdlib_root()
    excluded = lambda rel: any(fnmatch.fnmatch(rel, pattern) for pattern in spec.stdlib_exclude)  # noqa: E731
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames if not excluded(prefix + d + "/")]
        for name in filenames:
            rel = prefix + name
            if name.endswith(".py") and not excluded(rel) and os.path.isfile(os.path.join(dirpath, name)):
                out.append(rel)
    return [root / rel for rel in sorted(out)]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# --- local files ----------------------------------------------------------------------------------


def local_files(patterns: Iterable[str]) -> list[Path]:
    """Expand paths and globs in order; a path or glob that names no file is an error."""
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise ConfigError(f"data.data_files: no file matches {pattern}")
            files.extend(matches)
        elif Path(pattern).is_file():
            files.append(Path(pattern))
        else:
            raise ConfigError(f"data.data_files: no such file: {pattern}")
    return [p.resolve() for p in files]


def file_format(spec: CorpusConfig, files: list[Path]) -> str:
    if spec.file_format:
        if spec.file_format not in ("text", "json", "parquet"):
            raise ConfigError(f"data.file_format={spec.file_format}: expected text, json or parquet")
        return spec.file_format
    formats = set()
    for p in files:
        fmt = FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise ConfigError(f"{p}: cannot tell the file format from the extension; set data.file_format")
        formats.add(fmt)
    if len(formats) > 1:
        raise ConfigError(f"data.data_files: mixes formats ({', '.join(sorted(formats))}); use one")
    return formats.pop()


def _file_texts(spec: CorpusConfig) -> Iterator[str]:
    import datasets

    files = local_files(spec.data_files)
    fmt = file_format(spec, files)
    kwargs = {"sample_by": spec.sample_by, "keep_linebreaks": True} if fmt == "text" else {}
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(fmt, data_files=[str(p) for p in files], split="train",
                                   cache_dir=spec.datasets_cache, **kwargs)
    except Exception as e:  # a malformed file: name it, in one line
        raise ConfigError(f"{_first_named(files, e)}: cannot be read as {fmt}: {_one_line(e)}") from None
    column = "text" if fmt == "text" else spec.text_column
    if column not in ds.column_names:
        raise ConfigError(f"data.text_column={column}: not a column of {files[0]} "
                          f"(columns: {', '.join(ds.column_names)})")
    yield from _as_texts(ds, column, spec)


# --- the hub --------------------------------------------------------------------------------------


def _hub_texts(spec: CorpusConfig) -> Iterator[str]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.split,
                                   streaming=spec.streaming, revision=spec.revision)
    except ConnectionError:
        why = "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set" if _offline() else "the hub cannot be reached"
        raise ConfigError(f"data.dataset={spec.dataset}: cannot load it: offline ({why}) and not in the local "
                          "datasets cache; use data=text_files or data=text_stdlib") from None
    except Exception as e:  # unknown name, config or split, gated dataset ...
        raise ConfigError(f"data.dataset={spec.dataset}: {_one_line(e)}") from None
    column = spec.text_column
    names = ds.column_names or []
    if names and column not in names:
        raise ConfigError(f"data.text_column={column}: not a column of {spec.dataset} (columns: {', '.join(names)})")
    yield from _as_texts(ds, column, spec)


def _offline() -> bool:
    import datasets.config

    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) or any(
        os.environ.get(f, "").lower() in ("1", "true", "yes", "on") for f in flags)


def _as_texts(ds, column: str, spec: CorpusConfig) -> Iterator[str]:
    for row in ds:
        text = row.get(column)
        if text is not None and not isinstance(text, str):
            raise ConfigError(f"data.text_column={column}: holds {type(text).__name__}, not text")
        yield text or ""


# --- helpers --------------------------------------------------------------------------------------


def _capped(texts: Iterable[str], spec: CorpusConfig) -> list[str]:
    """Non-blank documents up to `max_docs` documents and `max_chars` characters."""
    docs: list[str] = []
    chars = 0
    for text in texts:
        if spec.max_docs is not None and len(docs) >= spec.max_docs:
            break
        if spec.max_chars is not None and chars >= spec.max_chars:
            break
        if not text.strip():
            continue
        if spec.max_chars is not None:
            text = text[: spec.max_chars - chars]
        docs.append(text)
        chars += len(text)
    return docs


def _stat(path: Path, root: Optional[Path] = None) -> list:
    st = path.stat()
    return [str(path.relative_to(root)) if root else str(path), st.st_size, st.st_mtime_ns]


def _first_named(files: list[Path], e: Exception) -> str:
    text = str(e)
    for p in files:
        if str(p) in text or p.name in text:
            return str(p)
    return str(files[0]) if len(files) == 1 else f"data.data_files={[str(p) for p in files]}"


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]
