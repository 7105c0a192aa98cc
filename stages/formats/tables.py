"""Canonical tables: the one owner of their columns and dtypes.

Boxes are ``xyxy_norm`` everywhere: x_min, y_min, x_max, y_max in [0, 1] of the image's width/height.
Only :mod:`stages.formats.openimages` knows that OpenImages CSVs order them XMin, XMax, YMin, YMax.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

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
    # box_annotated False: an image with image-level labels only (no box is annotated; the absence of a box means
    # nothing); plain_background: a single object on a plain background. Absent columns mean True / False.
    "images": ({"image_id": "object", "path": "object", "width": "int32", "height": "int32"},
               {"box_annotated": "bool", "plain_background": "bool"}),
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
    # ground-truth instance masks (stages.ingest_masks): the segmentation CSV's box (BoxXMin.., normalized),
    # the full-image mask as COCO RLE (pycocotools' compressed "counts" string) at mask_height x mask_width
    # (the image's size), and the PNG it was read from (relative to the mask folder)
    "gt_masks": (
        {"image_id": "object", "label": "object", "x_min": "float64", "y_min": "float64", "x_max": "float64",
         "y_max": "float64", "rle": "object", "mask_height": "int32", "mask_width": "int32",
         "mask_path": "object"},
        {},
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


def check_labels(labels: pd.Series | np.ndarray | Sequence[str], known: Collection[str] | None = None, *,
                 source: object = None, rows: np.ndarray | Sequence[object] | None = None, field: str = "label"
                 ) -> None:
    """Raise :class:`InputError` at the first empty label, or label not in ``known`` (None: any non-empty label
    is fine), naming ``source``, its row and ``field``. ``rows`` maps positions to the rows to report (e.g. CSV
    line numbers; None entries report no row); by default ``row i``. Each distinct label is looked up once
    (categorical columns through their categories)."""
    values = labels if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels, dtype=object), dtype=object)
    if isinstance(values.dtype, pd.CategoricalDtype):
        code, uniq = values.cat.codes.to_numpy(), pd.Index(values.cat.categories, dtype=object)
    else:
        code, uniq = pd.factorize(values.to_numpy(dtype=object), use_na_sentinel=True)
        uniq = pd.Index(uniq, dtype=object)
    bad = ~(uniq.map(lambda v: isinstance(v, str) and v != "").to_numpy(dtype=bool))
    if known is not None:
        bad |= ~uniq.isin(known)
    bad_rows = np.append(bad, True)[code]  # code -1 (missing value) is bad too
    if not bad_rows.any():
        return
    i = int(np.flatnonzero(bad_rows)[0])
    lab = values.iloc[i]
    row = f"row {i}" if rows is None else rows[i]
    row = int(row) if isinstance(row, (int, np.integer)) else row
    if isinstance(lab, str) and lab:
        raise InputError(f"unknown label (MID) {lab!r}: not in the class list", file=source, row=row, field=field)
    raise InputError("empty label", file=source, row=row, field=field)


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
