"""The data behind a figure as one Arrow table (written beside the figure as Parquet)."""

from __future__ import annotations

import pyarrow as pa


def to_table(rows: list[dict]) -> pa.Table:
    """Rows of dicts as a table; a key missing from a row is null there (column order: first seen)."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return pa.table({k: pa.array([row.get(k) for row in rows]) for k in keys}) if keys else pa.table({})
