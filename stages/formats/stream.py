"""Reading and writing canonical tables in image shards, so a stage's memory stays flat with the input size.

A shard is a contiguous range of image ids (in sorted order) holding about ``rows_per_shard`` rows over all the
files read together; every image lies in exactly one shard. Files written by :class:`TableWriter` are sorted
by image id with small row groups, so reading a shard of them skips the other row groups (parquet statistics).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import stages
from stages.errors import InputError
from stages.formats.io import PROVENANCE_KEY, atomic_path, write_table
from stages.formats.tables import conform

ROW_GROUP = 1 << 16


def _open(path: str | os.PathLike) -> pq.ParquetFile:
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path)
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable parquet file: {exc}", file=path) from exc


def image_shards(paths: Sequence[str | os.PathLike], *, rows_per_shard: int = 1 << 20) -> list[tuple[str, str]]:
    """Inclusive ``(first, last)`` image-id ranges covering every image of ``paths``, ~``rows_per_shard`` rows
    each. Reads only the ``image_id`` column, batch by batch (memory ~ number of distinct images)."""
    counts: list[pd.Series] = []
    for path in paths:
        f = _open(path)
        if "image_id" not in f.schema_arrow.names:
            raise InputError("table has no column 'image_id'", file=path, field="image_id")
        for batch in f.iter_batches(columns=["image_id"], batch_size=1 << 20):
            vc = pc.value_counts(batch.column(0).cast(pa.string()))
            counts.append(pd.Series(vc.field("counts").to_numpy(), index=vc.field("values").to_pandas()))
    if not counts:
        return []
    per_image = pd.concat(counts).groupby(level=0).sum().sort_index()
    ids, cum = per_image.index.to_numpy(), per_image.to_numpy().cumsum()
    shard = (cum - 1) // max(rows_per_shard, 1)
    out = []
    for s in pd.unique(shard):
        sel = ids[shard == s]
        out.append((str(sel[0]), str(sel[-1])))
    return out


def read_shard(path: str | os.PathLike, name: str, first: str, last: str) -> pd.DataFrame:
    """Rows of ``path`` with ``first <= image_id <= last``, conformed to table ``name``."""
    _open(path)
    table = pq.read_table(path, filters=[("image_id", ">=", first), ("image_id", "<=", last)])
    return conform(table.to_pandas(), name, source=path)


def iter_shards(path: str | os.PathLike, name: str, *, rows_per_shard: int = 1 << 20) -> Iterator[pd.DataFrame]:
    for first, last in image_shards([path], rows_per_shard=rows_per_shard):
        yield read_shard(path, name, first, last)


class TableWriter:
    """Append conformed frames of table ``name`` to one parquet file, atomically (renamed on ``close``).

    Use as a context manager; frames should come in increasing image-id order (shards) for row-group pruning.
    """

    def __init__(self, path: str | os.PathLike, name: str, *, provenance: Mapping[str, object] | None = None):
        self.path, self.name, self.provenance = Path(path), name, dict(provenance or {})
        self._ctx = atomic_path(self.path)
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self.rows = 0

    def __enter__(self) -> TableWriter:
        self._tmp = self._ctx.__enter__()
        return self

    def write(self, df: pd.DataFrame) -> None:
        if len(df) == 0:
            return
        df = conform(df.reset_index(drop=True), self.name, source=self.path)
        df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
        table = pa.Table.from_pandas(df, preserve_index=False)
        if self._writer is None:
            prov = {"table": self.name, "columns": list(df.columns), "orchard_version": stages.__version__}
            prov.update(self.provenance)
            meta = dict(table.schema.metadata or {})
            meta[PROVENANCE_KEY] = json.dumps(prov, default=str).encode()
            self._schema = table.schema.with_metadata(meta)
            self._writer = pq.ParquetWriter(self._tmp, self._schema)
        self._writer.write_table(table.cast(self._schema), row_group_size=ROW_GROUP)
        self.rows += len(df)

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if self._writer is not None:
            self._writer.close()
        elif exc_type is None:
            from stages.formats.tables import empty
            write_table(self._tmp, empty(self.name), self.name, provenance=self.provenance)
        return self._ctx.__exit__(exc_type, exc, tb)
