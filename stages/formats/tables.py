"""Canonical tables: the one owner of their columns and dtypes.

Boxes are ``xyxy_norm`` everywhere: x_min, y_min, x_max, y_max in [0, 1] of the image's width/height.
Only :mod:`stages.formats.openimages` knows that OpenImages CSVs order them XMin, XMax, YMin, YMax.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from stages.core.errors import InputError

BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
#: the label of a ``sampling`` row drawn without a class (an image without a box under uniform sampling)
NO_CLASS = ""

#: name -> (required columns with dtypes, optional columns with dtypes)
SCHEMAS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "boxes": (
        {"image_id": "object", "label": "object", "x_min": "float64", "y_min": "float64",
         "x_max": "float64", "y_max": "float64", "is_group_of": "bool"},
        {"is_occluded": "int8", "is_truncated": "int8", "is_depiction": "int8", "is_inside": "int8",
         "mask_path": "object"},
    ),
    "image_labels": ({"image_id": "object", "label": "object", "confidence": "int8"}, {}),
    "images": ({"image_id": "object", "path": "object", "width": "int32", "height": "int32"}, {}),
    "classes": ({"label": "object", "name": "object"}, {}),
    # one row per edge of the class DAG; the root is not a class and never appears
    "hierarchy": ({"child": "object", "parent": "object"}, {}),
    "splits": ({"image_id": "object", "split": "object"}, {}),
    # the training draw (stages.sample): probability of each (image, class) pair of the train split, summing
    # to 1; label NO_CLASS for an image drawn without a class
    "sampling": ({"image_id": "object", "label": "object", "weight": "float64"}, {}),
    "detections": (
        {"image_id": "object", "label": "object", "score": "float64", "x_min": "float64",
         "y_min": "float64", "x_max": "float64", "y_max": "float64"},
        {"model": "object", "scale": "int32", "flip": "bool"},
    ),
    # detections + full-image COCO RLE (the "counts" string; size from images.width/height)
    "masks": (
        {"image_id": "object", "label": "object", "score": "float64", "x_min": "float64",
         "y_min": "float64", "x_max": "float64", "y_max": "float64", "rle": "object",
         "mask_height": "int32", "mask_width": "int32"},
        {"model": "object"},
    ),
}


def empty(name: str, *, optional: bool = False) -> pd.DataFrame:
    """An empty table with the right columns and dtypes."""
    req, opt = SCHEMAS[name]
    cols = dict(req) | (dict(opt) if optional else {})
    return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in cols.items()})


def conform(df: pd.DataFrame, name: str, *, source: object = None, keep_categorical: bool = False) -> pd.DataFrame:
    """Return ``df`` restricted to the table's columns, cast to their dtypes, or raise :class:`InputError`.

    Missing required columns, unknown dtypes that cannot be cast, and NaN in required columns are errors.
    Extra columns that the schema does not know are dropped. With ``keep_categorical`` a string column that
    comes as a pandas Categorical stays one (its codes make grouping and sorting millions of rows cheap; see
    :func:`stages.formats.stream.read_shard`); otherwise string columns are plain ``object``.
    """
    req, opt = SCHEMAS[name]
    missing = [c for c in req if c not in df.columns]
    if missing:
        raise InputError(f"table {name!r} is missing column(s) {missing}", file=source, field=missing[0])
    out = {}
    for col, dtype in list(req.items()) + [(c, d) for c, d in opt.items() if c in df.columns]:
        s = df[col]
        if col in req and s.isna().any():
            row = int(np.flatnonzero(s.isna().to_numpy())[0])
            raise InputError(f"empty value in table {name!r}", file=source, row=f"row {row}", field=col)
        if dtype == "object" and keep_categorical and isinstance(s.dtype, pd.CategoricalDtype):
            cats = s.cat.categories
            out[col] = (s if cats.dtype == object else s.cat.rename_categories(cats.astype(str))).array
            continue
        try:
            s = s.astype(dtype, copy=False) if dtype != "object" else s.astype(str).astype(object)
            out[col] = s.to_numpy()  # positional (copied once below): the input's index (e.g. after filtering) is irrelevant
        except (TypeError, ValueError) as exc:
            raise InputError(f"cannot read as {dtype}: {exc}", file=source, field=col) from exc
    return pd.DataFrame(out, index=pd.RangeIndex(len(df)))


def check_boxes(df: pd.DataFrame, *, source: object = None, rows: np.ndarray | None = None,
                names: Mapping[str, str] | None = None) -> None:
    """Raise :class:`InputError` unless every box lies in [0, 1] with min <= max.

    ``rows`` maps positions to the row numbers to report (e.g. CSV line numbers); ``names`` maps our column
    names to the names the user sees in ``source`` (e.g. ``x_min`` -> ``XMin``).
    """
    names = names or {}
    for col in BOX_COLUMNS:
        v = df[col].to_numpy(dtype=np.float64)
        bad = ~np.isfinite(v) | (v < 0.0) | (v > 1.0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(f"coordinate {float(v[i])!r} outside [0, 1]", file=source,
                             row=int(rows[i]) if rows is not None else f"row {i}", field=names.get(col, col))
    for lo, hi in (("x_min", "x_max"), ("y_min", "y_max")):
        bad = df[lo].to_numpy() > df[hi].to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(f"{names.get(lo, lo)} {float(df[lo].iloc[i])!r} > {names.get(hi, hi)} "
                             f"{float(df[hi].iloc[i])!r}",
                             file=source, row=int(rows[i]) if rows is not None else f"row {i}",
                             field=names.get(lo, lo))
