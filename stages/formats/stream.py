"""Reading and writing canonical tables in image shards, so a stage's memory stays flat with the input size.

A shard is a contiguous range of image ids (in sorted order) holding about ``rows_per_shard`` rows over all the
files read together; every image lies in exactly one shard. Files written by :class:`TableWriter` are sorted
by image id with small row groups, so reading a shard of them skips the other row groups (parquet statistics).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.core.errors import InputError
from stages.formats.columns import codes, is_sorted, stable_argsort_int
from stages.formats.io import arrow_table, atomic_path, string_columns, write_table
from stages.formats.tables import conform, empty

ROW_GROUP = 1 << 16

T = TypeVar("T")
U = TypeVar("U")
V = TypeVar("V")


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
    each. A single file sorted by image id in row groups of at most ``rows_per_shard`` rows (what
    :class:`TableWriter` writes) is cut at row-group boundaries from its statistics alone; otherwise only the
    ``image_id`` column is read, batch by batch (memory ~ number of distinct images)."""
    files = [_open(path) for path in paths]
    for path, f in zip(paths, files):
        if "image_id" not in f.schema_arrow.names:
            raise InputError("table has no column 'image_id'", file=path, field="image_id")
    if len(files) == 1:
        cut = _shards_from_statistics(files[0], rows_per_shard)
        if cut is not None:
            return cut
    counts: list[pd.Series] = []
    for f in files:
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


def _id_ranges(f: pq.ParquetFile) -> list[tuple[str, str] | None]:
    """Per row group, its ``(min, max)`` image id from the parquet statistics (None where they are missing)."""
    col = f.schema_arrow.names.index("image_id")
    out: list[tuple[str, str] | None] = []
    for i in range(f.metadata.num_row_groups):
        st = f.metadata.row_group(i).column(col).statistics
        known = st is not None and st.has_min_max and isinstance(st.min, str)
        out.append((st.min, st.max) if known else None)
    return out


def _shards_from_statistics(f: pq.ParquetFile, rows_per_shard: int) -> list[tuple[str, str]] | None:
    """Shards of whole row groups when every row group has image-id statistics, the groups are in increasing
    and disjoint id ranges (no image spans two groups) and none is larger than a shard; else None."""
    groups: list[tuple[str, str, int]] = []
    for i, rng in enumerate(_id_ranges(f)):
        n = f.metadata.row_group(i).num_rows
        if n == 0:
            continue
        if rng is None or n > rows_per_shard or (groups and not groups[-1][1] < rng[0]):
            return None
        groups.append((*rng, n))
    out: list[tuple[str, str]] = []
    first, rows = None, 0
    for lo, hi, n in groups:
        if first is None:
            first = lo
        rows += n
        if rows >= rows_per_shard:
            out.append((first, hi))
            first, rows = None, 0
    if first is not None:
        out.append((first, groups[-1][1]))
    return out


def read_shard(path: str | os.PathLike, name: str, first: str, last: str, *,
               categorical: bool = False) -> pd.DataFrame:
    """Rows of ``path`` with ``first <= image_id <= last`` (in file order), conformed to table ``name``.

    Only the row groups whose image-id statistics overlap the range are read, and only the rows of those that
    straddle its ends are compared. With ``categorical`` the string columns come as pandas Categoricals (read
    as parquet dictionaries: no Python string per row), which the post-processing ops group by their codes.
    """
    f = _open(path)
    if "image_id" not in f.schema_arrow.names:
        raise InputError("table has no column 'image_id'", file=path, field="image_id")
    if categorical:   # the same footer, string columns decoded as dictionaries
        f = pq.ParquetFile(path, metadata=f.metadata, read_dictionary=string_columns(f.schema_arrow))
    groups, edge = [], []
    for i, rng in enumerate(_id_ranges(f)):
        if rng is not None and (rng[1] < first or rng[0] > last):
            continue
        groups.append(i)
        edge.append(rng is None or not (first <= rng[0] and rng[1] <= last))
    table = f.read_row_groups(groups) if groups else f.schema_arrow.empty_table()
    if any(edge):
        mask = np.ones(table.num_rows, dtype=bool)
        pos = 0
        for i, e in zip(groups, edge):
            n = f.metadata.row_group(i).num_rows
            if e:
                ids = pc.cast(table.column("image_id").slice(pos, n), pa.string())
                keep = pc.and_(pc.greater_equal(ids, first), pc.less_equal(ids, last))
                mask[pos: pos + n] = pc.fill_null(keep, True).to_numpy(zero_copy_only=False)  # nulls: conform says
            pos += n
        table = table.filter(mask)
    return conform(table.to_pandas(), name, source=path, keep_categorical=categorical)


def pipeline(items: Iterable[T], load: Callable[[T], U], work: Callable[[U], V],
             save: Callable[[V], None]) -> None:
    """``save(work(load(item)))`` for every item, in order, with the next item's ``load`` and the previous
    result's ``save`` running in background threads while ``work`` runs (parquet reading and writing release
    the GIL). At most three items are in memory at once; an exception in any step stops the loop and is raised.
    """
    with ThreadPoolExecutor(2) as pool:
        it = iter(items)
        nxt = next(it, _END)
        loading = pool.submit(load, nxt) if nxt is not _END else None
        saving = None
        while loading is not None:
            data = loading.result()
            nxt = next(it, _END)
            loading = pool.submit(load, nxt) if nxt is not _END else None
            result = work(data)
            del data
            if saving is not None:
                saving.result()
            saving = pool.submit(save, result)
        if saving is not None:
            saving.result()


_END = object()


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
        df = conform(df.reset_index(drop=True), self.name, source=self.path, keep_categorical=True)
        img, _ = codes(df["image_id"], sort=True)
        if not is_sorted(img):
            df = df.take(stable_argsort_int(img)).reset_index(drop=True)
        table = arrow_table(df, self.name, self.provenance)
        if self._writer is None:
            self._schema = table.schema
            self._writer = pq.ParquetWriter(self._tmp, self._schema, use_dictionary=string_columns(self._schema))
        self._writer.write_table(table.cast(self._schema), row_group_size=ROW_GROUP)
        self.rows += len(df)

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if self._writer is not None:
            self._writer.close()
        elif exc_type is None:
            write_table(self._tmp, empty(self.name), self.name, provenance=self.provenance)
        return self._ctx.__exit__(exc_type, exc, tb)
