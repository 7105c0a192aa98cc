"""Readers shared by several stages: the class list in either of its forms (the OpenImages class-description CSV or
the ``classes`` table, chosen by extension), the metric JSON that :mod:`stages.evaluate` writes
(``{"mAP": float|null, "per_class": {MID: {"name", "ap", "n_gt", "n_det", "n_tp"}}, ...}``), and the metric's
inputs (boxes, image-level labels, predictions: raw OpenImages files or canonical tables, validated; the image
ids of a split)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.errors import InputError
from stages.formats import openimages as oi
from stages.formats.io import read_json, read_table
from stages.formats.tables import check_boxes, check_labels


def read_classes(path: str | os.PathLike) -> pd.DataFrame:
    """The ``classes`` table (label, name) from a parquet table or an OpenImages class-description CSV."""
    return read_table(path, "classes") if _ext(path) == ".parquet" else oi.read_classes(path)


def read_class_names(path: str | os.PathLike) -> dict[str, str]:
    """MID -> display name (see :func:`read_classes`)."""
    df = read_classes(path)
    return dict(zip(df["label"], df["name"]))


def _number(v: object, path: object, row: str, field: str) -> float | None:
    """A metric value: a number, or None for null / NaN (no ground truth)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InputError(f"{field} is not a number: {v!r}", file=path, row=row, field=field)
    return None if math.isnan(v) else float(v)


def read_metrics(path: str | os.PathLike) -> dict:
    """A metric JSON, checked: ``mAP`` and ``per_class`` present, every per-class ``ap`` a number or null.
    ``ap`` values come back as float or None (NaN is read as None)."""
    obj = read_json(path)
    if not isinstance(obj, dict) or "mAP" not in obj:
        raise InputError("no 'mAP' key", file=path, field="mAP")
    per = obj.get("per_class")
    if not isinstance(per, dict):
        raise InputError("no 'per_class' object", file=path, field="per_class")
    checked = {}
    for mid, rec in per.items():
        if not isinstance(rec, dict) or "ap" not in rec:
            raise InputError("per-class entry without 'ap'", file=path, row=f"per_class.{mid}", field="ap")
        checked[mid] = {**rec, "ap": _number(rec["ap"], path, f"per_class.{mid}", "ap")}
    return {**obj, "mAP": _number(obj["mAP"], path, "$", "mAP"), "per_class": checked}


def read_class_aps(path: str | os.PathLike) -> dict[str, float | None]:
    """``{MID: AP}`` of a metric JSON (None: the class has no ground truth in the evaluated images)."""
    return {mid: rec["ap"] for mid, rec in read_metrics(path)["per_class"].items()}


def _ext(path: str | os.PathLike) -> str:
    return Path(path).suffix.lower()


def _subset(path: str | os.PathLike, name: str, image_ids: np.ndarray | None) -> pd.DataFrame:
    """A table, or only its rows of ``image_ids`` (a validation split's ground truth: a tenth of the table)."""
    # a filtered subset reads best as plain strings; a whole table of millions of rows as dictionaries
    return read_table(path, name, image_ids=image_ids, categorical=image_ids is None)


def read_boxes(path: str | os.PathLike, known: set[str], image_ids: np.ndarray | None = None) -> pd.DataFrame:
    if _ext(path) != ".parquet":
        return oi.read_boxes(path, known_labels=known, categorical=True)
    df = _subset(path, "boxes", image_ids)
    check_labels(df["label"], known, source=path)
    check_boxes(df, source=path)
    return df


def read_image_labels(path: str | os.PathLike, known: set[str], image_ids: np.ndarray | None = None
                      ) -> pd.DataFrame:
    if _ext(path) != ".parquet":
        return oi.read_image_labels(path, known_labels=known, categorical=True)
    df = _subset(path, "image_labels", image_ids)
    check_labels(df["label"], known, source=path)
    bad = ~df["confidence"].isin([0, 1]).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError("confidence must be 0 or 1", file=path, row=f"row {i}", field="confidence")
    return df


def read_predictions(path: str | os.PathLike, known: set[str], *, table: str = "detections") -> pd.DataFrame:
    """Kaggle submission CSV or a ``detections``/``masks`` parquet, validated (MIDs, coordinates)."""
    if _ext(path) != ".parquet":
        if table == "masks":
            from stages.formats.seg_submission import read_segmentation_submission

            return read_segmentation_submission(path, known_labels=known)
        return oi.read_detection_submission(path, known_labels=known, categorical=True)
    df = read_table(path, table, categorical=table == "detections")
    check_labels(df["label"], known, source=path)
    check_boxes(df, source=path)
    bad = ~np.isfinite(df["score"].to_numpy(np.float64))
    if bad.any():
        raise InputError("score is not a finite number", file=path, row=f"row {int(np.flatnonzero(bad)[0])}",
                         field="score")
    return df


def split_image_ids(path: str | os.PathLike, split: str) -> np.ndarray:
    sp = read_table(path, "splits", columns=["image_id", "split"])
    ids = sp.loc[(sp["split"] == split).to_numpy(), "image_id"].to_numpy(dtype=object)
    if not len(ids):
        raise InputError(f"no image in split {split!r} (splits present: {sorted(sp['split'].unique())})",
                         file=path, field="split")
    return ids
