"""Atomic writes and parquet with provenance. Every stage writes through here: a killed job leaves no file
that looks complete (a temporary sibling is renamed over the target only once it is fully written)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import stages
from stages.core.errors import InputError
from stages.formats.tables import SCHEMAS, conform

PROVENANCE_KEY = b"orchard"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates 0600; give the file the permissions a plain open() would (shared cluster results)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: object) -> object:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


def read_json(path: str | os.PathLike) -> object:
    """A JSON file, or :class:`InputError` naming the file (and line) when it is missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON: {exc.msg}", file=path, row=exc.lineno) from exc


def config_hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_table(path: str | os.PathLike, df: pd.DataFrame, name: str, *,
                provenance: Mapping[str, object] | None = None) -> None:
    """Write a canonical table as parquet, conformed to its schema, with provenance in the file metadata.

    The metadata key ``orchard`` holds JSON: table name, columns, code version and whatever the stage passes
    (stage, model, config hash...). DuckDB (``parquet_kv_metadata``), pyarrow and pandas users can read it.
    """
    df = conform(df, name, source=path, keep_categorical=True)
    table = arrow_table(df, name, provenance)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=1 << 20, use_dictionary=string_columns(table.schema))


def arrow_table(df: pd.DataFrame, name: str, provenance: Mapping[str, object] | None = None) -> pa.Table:
    """``df`` (conformed) as an arrow table with plain ``string`` columns (categoricals are cast) and the
    ``orchard`` provenance as the only schema metadata (no pandas metadata: readers get a RangeIndex)."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    fields = [pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type)
              for f in table.schema]
    prov = {"table": name, "columns": list(df.columns), "orchard_version": stages.__version__}
    prov.update(provenance or {})
    schema = pa.schema(fields, metadata={PROVENANCE_KEY: json.dumps(prov, default=str).encode()})
    return table.cast(schema) if table.schema != schema else table.replace_schema_metadata(schema.metadata)


def string_columns(schema: pa.Schema) -> list[str]:
    """Columns to dictionary-encode in parquet: the strings (ids, labels). Trying a dictionary on float
    columns, pyarrow's default, costs most of a write and gains nothing."""
    return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


def read_table(path: str | os.PathLike, name: str, *, columns: list[str] | None = None,
               categorical: bool = False, image_ids: Collection[str] | None = None) -> pd.DataFrame:
    """Read a canonical table and conform it to its schema (clear error if it is not that table).

    ``columns``: only those, not conformed; their strings come as pandas ``ArrowDtype`` strings (no Python
    object per row; ``isin``, ``factorize``, comparisons and :func:`stages.formats.columns.positions` run in
    arrow: what columns of millions of rows need). ``categorical``: string columns come as pandas
    Categoricals (read as parquet dictionaries). ``image_ids``: only the rows of these images, filtered by
    arrow while reading."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path)
    try:
        strings = string_columns(pq.read_schema(path)) if categorical else []
        rows = None if image_ids is None else \
            pc.field("image_id").isin(pa.array(np.asarray(list(image_ids), dtype=object), pa.string()))
        table = pq.read_table(path, columns=columns, read_dictionary=strings, filters=rows)
        df = table.to_pandas(types_mapper=_ARROW_STRINGS.get if columns is not None and not categorical else None)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable parquet file: {exc}", file=path) from exc
    if columns is not None:
        return df
    return conform(df, name, source=path, keep_categorical=categorical)


_ARROW_STRINGS = {pa.string(): pd.ArrowDtype(pa.string()), pa.large_string(): pd.ArrowDtype(pa.large_string())}


def read_provenance(path: str | os.PathLike) -> dict:
    """The ``orchard`` provenance of a parquet file written by :func:`write_table` ({} when it has none)."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path)
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable parquet file: {exc}", file=path) from exc
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


__all__ = ["SCHEMAS", "atomic_path", "config_hash", "read_json", "read_provenance", "read_table", "write_json",
           "write_table", "write_text"]
