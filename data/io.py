"""Small file helpers shared by the data and results packages."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["write_json_atomic", "write_parquet_atomic"]


def _replace_atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_parquet_atomic(frame: pd.DataFrame | pa.Table, path: Path) -> None:
    """Write Parquet to a temporary file beside ``path`` and rename it, so a crash never leaves half a file."""
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    # Pandas metadata embeds the writer's versions, which would make two exports of the same data differ.
    table = table.replace_schema_metadata(None)
    _replace_atomically(path, lambda temporary: pq.write_table(table, temporary))


def write_json_atomic(value: object, path: Path) -> None:
    """Write ``value`` as indented JSON, atomically."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"
    _replace_atomically(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
