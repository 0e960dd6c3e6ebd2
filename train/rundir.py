"""The run directory on disk: layout, and writes that are atomic (temp file + rename).

A killed run leaves every file either at its previous complete version or at its new complete one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics"
CHECKPOINTS = "checkpoints"
INDEX = "checkpoints/index.json"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then rename the temp file over `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        err = named(e, path)
        if err is e:
            raise
        raise err from e


def named(e: BaseException, path: str | Path) -> BaseException:
    """An OSError that names `path` (a failing write, e.g. a full disk, often names no file, or the
    temp file); any other exception as it is."""
    if not isinstance(e, OSError) or (e.filename and not str(e.filename).endswith(".tmp")):
        return e
    return OSError(e.errno, e.strerror or str(e), str(path))


def write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def write_parquet(path: str | Path, table: pa.Table) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def table_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / METRICS / f"{name}.parquet"


def read_table(run_dir: str | Path, name: str) -> pa.Table | None:
    """A metrics table (`train`, `heads`, `eval`, `eval_token_losses`), or None if not written yet."""
    path = table_path(run_dir, name)
    return pq.read_table(path) if path.exists() else None


class Table:
    """Rows kept in memory as Arrow chunks and rewritten atomically as one Parquet file on `flush`.

    Each `append` converts only its own rows; `flush` concatenates the chunks (no copy) and writes them,
    so a long run's flushes do not re-convert its whole history.

    On resume, `load(up_to_step)` keeps the rows at or before the checkpoint's step: later rows are
    recomputed, identically, by the resumed run.
    """

    def __init__(self, path: Path):
        self.path = path
        self.chunks: list[pa.Table] = []
        self.dirty = False

    def load(self, up_to_step: int) -> None:
        if not self.path.exists():
            return
        table = pq.read_table(self.path)
        self.chunks = [table.filter(pa.compute.less_equal(table["step"], up_to_step))]

    def append(self, rows: list[dict] | dict[str, Any]) -> None:
        """Add rows, given as records or as columns (equal-length lists or arrays); a key missing from
        some rows (or from earlier rows) is null there."""
        if isinstance(rows, list):  # records: every key of any row (from_pylist reads only the first's)
            keys = dict.fromkeys(key for row in rows for key in row)
            rows = {key: [row.get(key) for row in rows] for key in keys}
        chunk = pa.table(rows)
        if chunk.num_rows:
            self.chunks.append(chunk)
            self.dirty = True

    def table(self) -> pa.Table | None:
        """Every row so far as one table (None before the first row)."""
        if not self.chunks:
            return None
        if len(self.chunks) > 1:
            self.chunks = [pa.concat_tables(self.chunks, promote_options="default")]
        return self.chunks[0]

    def columns(self) -> dict[str, list]:
        """Every row so far, column by column, as Python lists ({} before the first row)."""
        table = self.table()
        return table.to_pydict() if table is not None else {}

    def flush(self) -> None:
        if self.dirty:
            write_parquet(self.path, self.table())
            self.dirty = False
