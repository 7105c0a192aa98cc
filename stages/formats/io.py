"""Atomic writes and parquet with provenance. Every stage writes through here: a killed job leaves no file
that looks complete (a temporary sibling is renamed over the target only once it is fully written)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.core.errors import InputError
from stages.core.provenance import code_version
from stages.formats.tables import SCHEMAS, conform

PROVENANCE_KEY = b"orchard"

log = logging.getLogger(__name__)


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


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB blocks (weights files run to hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_table(path: str | os.PathLike, df: pd.DataFrame, name: str, *,
                provenance: Mapping[str, object] | None = None) -> None:
    """Write a canonical table as parquet, conformed to its schema, with provenance in the file metadata.

    The metadata key ``orchard`` holds JSON: table name, columns, the code that wrote it (``code``: git commit and
    dirty flag, or the package version; see :mod:`stages.core.provenance`) and whatever the stage passes (stage,
    model, config hash...). DuckDB (``parquet_kv_metadata``), pyarrow and pandas users can read it.
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
    prov = {"table": name, "columns": list(df.columns), "code": code_version()}
    prov.update(provenance or {})
    schema = pa.schema(fields, metadata={PROVENANCE_KEY: json.dumps(prov, default=str).encode()})
    return table.cast(schema) if table.schema != schema else table.replace_schema_metadata(schema.metadata)


def string_columns(schema: pa.Schema) -> list[str]:
    """Columns to dictionary-encode in parquet: the strings (ids, labels). Trying a dictionary on float
    columns, pyarrow's default, costs most of a write and gains nothing."""
    return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


def _read_parquet(path: Path, read):
    """``read(path)`` (a pyarrow reader), with a missing or unreadable file as :class:`InputError`."""
    if not path.exists():
        raise InputError("file not found", file=path)
    try:
        return read(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable parquet file: {exc}", file=path) from exc


def _provenance(schema: pa.Schema, path: Path) -> dict:
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        log.warning("%s: unreadable provenance metadata ignored", path)
        return {}


def read_table(path: str | os.PathLike, name: str, *, columns: list[str] | None = None,
               categorical: bool = False, image_ids: Collection[str] | None = None) -> pd.DataFrame:
    """Read a canonical table and conform it to its schema (clear error if it is not that table).

    ``columns``: only those, not conformed; their strings come as pandas ``ArrowDtype`` strings (no Python
    object per row; ``isin``, ``factorize``, comparisons and :func:`stages.formats.columns.positions` run in
    arrow: what columns of millions of rows need). ``categorical``: string columns come as pandas
    Categoricals (read as parquet dictionaries). ``image_ids``: only the rows of these images, filtered by
    arrow while reading."""
    path = Path(path)

    def read(p: Path) -> pa.Table:
        strings = string_columns(pq.read_schema(p)) if categorical else []
        rows = None if image_ids is None else \
            pc.field("image_id").isin(pa.array(np.asarray(list(image_ids), dtype=object), pa.string()))
        return pq.read_table(p, columns=columns, read_dictionary=strings, filters=rows)

    table = _read_parquet(path, read)
    df = table.to_pandas(types_mapper=_ARROW_STRINGS.get if columns is not None and not categorical else None)
    if columns is not None:
        return df
    return conform(df, name, source=path, keep_categorical=categorical)


_ARROW_STRINGS = {pa.string(): pd.ArrowDtype(pa.string()), pa.large_string(): pd.ArrowDtype(pa.large_string())}


def read_provenance(path: str | os.PathLike) -> dict:
    """The ``orchard`` provenance of a parquet file written by :func:`write_table` ({} when it has none)."""
    path = Path(path)
    return _provenance(_read_parquet(path, pq.read_schema), path)


#: tables tried, in this order, when a file's metadata does not name its table (most specific first)
_GUESS_ORDER = ("gt_masks", "masks", "detections", "boxes", "image_labels", "images", "sampling", "splits", "hierarchy",
                "classes")


def read_canonical(path: str | os.PathLike) -> tuple[str, pd.DataFrame, dict]:
    """Read any canonical parquet file: (table name, conformed frame, provenance dict).

    The table is the one the file's ``orchard`` metadata names, else the first schema whose required columns
    the file has. A missing file, a file that is not parquet, or one that matches no table is an
    :class:`InputError`.
    """
    path = Path(path)
    table = _read_parquet(path, pq.read_table)
    prov = _provenance(table.schema, path)
    df = table.to_pandas()
    name = prov.get("table")
    if name not in SCHEMAS:
        name = next((n for n in _GUESS_ORDER if set(SCHEMAS[n][0]) <= set(df.columns)), None)
    if name is None:
        raise InputError(f"not a canonical table: columns {list(df.columns)} match none of {sorted(SCHEMAS)}",
                         file=path)
    return name, conform(df, name, source=path), prov


__all__ = ["file_sha256", "SCHEMAS", "atomic_path", "config_hash", "read_canonical", "read_json", "read_provenance", "read_table",
           "write_json", "write_table", "write_text"]
