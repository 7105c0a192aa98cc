"""Fast integer views of table columns: codes of string columns (categorical or not) and a stable radix
argsort, so that grouping and sorting millions of rows never goes through Python strings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def codes(values: pd.Series | np.ndarray, *, sort: bool = False) -> tuple[np.ndarray, int]:
    """``(int64 codes, number of distinct values)`` of a string column; with ``sort`` the codes follow the
    values' sorted order. Categorical columns use their codes (no pass over the strings)."""
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        c = values.cat.codes.to_numpy().astype(np.int64)
        if len(c) and c.min() < 0:
            raise ValueError("missing value in a categorical column")
        cats = values.cat.categories
        if sort and not cats.is_monotonic_increasing:
            rank = np.empty(len(cats), np.int64)
            rank[cats.argsort()] = np.arange(len(cats))
            c = rank[c]
        return c, len(cats)
    c, u = pd.factorize(np.asarray(values, dtype=object), sort=sort)
    return c.astype(np.int64), len(u)


def stable_argsort_int(keys: np.ndarray, max_key: int | None = None) -> np.ndarray:
    """Stable argsort of non-negative integer ``keys``: least-significant-digit passes over 16-bit digits
    (numpy's stable sort of 16-bit keys is a radix sort, O(M) per pass)."""
    keys = np.asarray(keys, dtype=np.int64)
    if max_key is None:
        max_key = int(keys.max()) if len(keys) else 0
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    shift = 16
    while max_key >> shift:
        digit = ((keys[order] >> shift) & 0xFFFF).astype(np.uint16)
        order = order[np.argsort(digit, kind="stable")]
        shift += 16
    return order


def is_sorted(codes_: np.ndarray) -> bool:
    return bool(len(codes_) < 2 or (codes_[1:] >= codes_[:-1]).all())


def concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """``pd.concat`` that keeps a column categorical when it is categorical in every frame (the categories are
    unioned; plain ``pd.concat`` falls back to Python strings when they differ)."""
    frames = [f for f in frames if len(f.columns)]
    if len(frames) > 1 and any(len(f) for f in frames):   # empty frames add no rows (and no dtype surprises)
        frames = [f for f in frames if len(f)]
    if len(frames) == 1:
        return frames[0].reset_index(drop=True)
    cat_cols = [c for c in frames[0].columns
                if all(c in f.columns and isinstance(f[c].dtype, pd.CategoricalDtype) for f in frames)]
    out = pd.concat([f.drop(columns=cat_cols) for f in frames], ignore_index=True)
    for c in cat_cols:
        out[c] = pd.api.types.union_categoricals([f[c] for f in frames])
    return out[list(frames[0].columns) + [c for c in out.columns if c not in frames[0].columns]]


def positions(values: pd.Series | np.ndarray, index: pd.Index) -> np.ndarray:
    """int64 positions of ``values`` in ``index`` (-1 where absent), hashing each distinct value once
    (categorical columns through their categories only; arrow string columns in arrow)."""
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.ArrowDtype):
        pos = pc.index_in(values.array.__arrow_array__(), value_set=pa.array(np.asarray(index, dtype=object),
                                                                               values.dtype.pyarrow_dtype))
        return pc.fill_null(pos, -1).to_numpy().astype(np.int64)
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        c, uniq = values.cat.codes.to_numpy(), values.cat.categories
    else:
        c, uniq = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=True)
    return np.append(index.get_indexer(uniq), -1).astype(np.int64)[c]
