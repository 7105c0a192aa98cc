"""OpenImages Challenge files <-> canonical tables. The only module that knows the CSV column names and order.

Every reader validates and raises :class:`~stages.core.errors.InputError` naming the file, the line (header = line 1)
and the column as the user sees it in the file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.errors import InputError
from stages.formats.tables import BOX_COLUMNS, check_boxes, check_labels, conform

BBOX_COLUMNS = ["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax",
                "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"]
BBOX_REQUIRED = ["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf"]
LABEL_COLUMNS = ["ImageID", "Source", "LabelName", "Confidence"]
MASK_COLUMNS = ["MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax",
                "PredictedIoU", "Clicks"]
SUBMISSION_COLUMNS = ["ImageId", "PredictionString"]
SEG_SUBMISSION_COLUMNS = ["ImageID", "ImageWidth", "ImageHeight", "PredictionString"]

#: canonical box column -> OpenImages CSV column
BOX_NAMES = {"x_min": "XMin", "x_max": "XMax", "y_min": "YMin", "y_max": "YMax"}
_FLAGS = {"IsOccluded": "is_occluded", "IsTruncated": "is_truncated", "IsDepiction": "is_depiction",
          "IsInside": "is_inside"}


def _read_csv(path: str | os.PathLike, required: Iterable[str], *, header: bool = True,
              names: list[str] | None = None) -> pd.DataFrame:
    """Read a CSV as strings; check the header and that every row has the header's field count."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, header=0 if header else None, names=names,
                         engine="c", on_bad_lines="error")
    except pd.errors.ParserError as exc:
        msg = str(exc)
        line = None
        if " line " in msg:
            try:
                line = int(msg.split(" line ")[1].split(",")[0])
            except ValueError:
                line = None
        raise InputError(f"malformed CSV: {msg}", file=path, row=line) from exc
    except pd.errors.EmptyDataError as exc:
        raise InputError("empty file (no header)", file=path, row=1) from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text: {exc}", file=path) from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}; header has {list(df.columns)}", file=path, row=1,
                         field=missing[0])
    return df


def _lines(n: int, header: bool = True) -> np.ndarray:
    return np.arange(n) + (2 if header else 1)


def _numeric(df: pd.DataFrame, col: str, path: object, *, integer: bool = False) -> np.ndarray:
    v = pd.to_numeric(df[col].str.strip(), errors="coerce")
    bad = v.isna().to_numpy()
    if integer:
        bad |= ~bad & (v.fillna(0) % 1 != 0).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"not a{'n integer' if integer else ' number'}: {df[col].iloc[i]!r}", file=path,
                         row=int(_lines(len(df))[i]), field=col)
    return v.to_numpy(dtype=np.int64 if integer else np.float64)


def _check_ids(df: pd.DataFrame, col: str, path: object) -> None:
    empty = (df[col].str.strip().str.len() == 0).to_numpy()
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise InputError("empty image id", file=path, row=int(_lines(len(df))[i]), field=col)


def _check_binary(df: pd.DataFrame, col: str, v: np.ndarray, path: object) -> None:
    bad = (v != 0) & (v != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"must be 0 or 1, got {df[col].iloc[i]!r}", file=path, row=int(_lines(len(df))[i]),
                         field=col)


# ----- readers ----------------------------------------------------------------------------------------------
def read_classes(path: str | os.PathLike) -> pd.DataFrame:
    """``MID,name`` with no header -> ``classes`` table. Duplicate MIDs are an error (names may repeat)."""
    df = _read_csv(path, [], header=False, names=["label", "name"])
    df.index = pd.RangeIndex(len(df))
    lines = _lines(len(df), header=False)
    empty = (df["label"].str.len() == 0).to_numpy()
    if empty.any():
        raise InputError("empty MID", file=path, row=int(lines[np.flatnonzero(empty)[0]]), field="MID")
    dup = df["label"].duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise InputError(f"duplicate MID {df['label'].iloc[i]!r}", file=path, row=int(lines[i]), field="MID")
    return conform(df, "classes", source=path)


def read_boxes(path: str | os.PathLike, *, known_labels: set[str] | None = None) -> pd.DataFrame:
    """``…-detection-bbox.csv`` -> ``boxes`` table (xyxy_norm)."""
    df = _read_csv(path, BBOX_REQUIRED)
    _check_ids(df, "ImageID", path)
    check_labels(df["LabelName"], known_labels, source=path, rows=_lines(len(df)), field="LabelName")
    out = pd.DataFrame({"image_id": df["ImageID"], "label": df["LabelName"]})
    for ours, theirs in BOX_NAMES.items():
        out[ours] = _numeric(df, theirs, path)
    check_boxes(out, source=path, rows=_lines(len(df)), names=BOX_NAMES)
    g = _numeric(df, "IsGroupOf", path, integer=True)
    _check_binary(df, "IsGroupOf", g, path)
    out["is_group_of"] = g.astype(bool)
    for theirs, ours in _FLAGS.items():
        if theirs in df.columns:
            # OpenImages uses -1 for "unknown" in these flags
            out[ours] = _numeric(df.assign(**{theirs: df[theirs].replace("", "-1")}), theirs, path,
                                 integer=True).astype(np.int8)
    return conform(out, "boxes", source=path)


def read_image_labels(path: str | os.PathLike, *, known_labels: set[str] | None = None) -> pd.DataFrame:
    """``…-human-imagelabels.csv`` -> ``image_labels`` (confidence 1 verified present, 0 verified absent)."""
    df = _read_csv(path, ["ImageID", "LabelName", "Confidence"])
    _check_ids(df, "ImageID", path)
    check_labels(df["LabelName"], known_labels, source=path, rows=_lines(len(df)), field="LabelName")
    conf = _numeric(df, "Confidence", path)
    bad = (conf != 0) & (conf != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"verified labels have Confidence 0 or 1, got {df['Confidence'].iloc[i]!r}",
                         file=path, row=int(_lines(len(df))[i]), field="Confidence")
    out = pd.DataFrame({"image_id": df["ImageID"], "label": df["LabelName"], "confidence": conf.astype(np.int8)})
    return conform(out, "image_labels", source=path)


def read_masks_csv(path: str | os.PathLike, *, known_labels: set[str] | None = None) -> pd.DataFrame:
    """``…-segmentation.csv`` -> boxes of the mask instances with ``mask_path`` (relative to the mask dir)."""
    df = _read_csv(path, ["MaskPath", "ImageID", "LabelName", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax"])
    _check_ids(df, "ImageID", path)
    check_labels(df["LabelName"], known_labels, source=path, rows=_lines(len(df)), field="LabelName")
    names = {"x_min": "BoxXMin", "x_max": "BoxXMax", "y_min": "BoxYMin", "y_max": "BoxYMax"}
    out = pd.DataFrame({"image_id": df["ImageID"], "label": df["LabelName"]})
    for ours, theirs in names.items():
        out[ours] = _numeric(df, theirs, path)
    check_boxes(out, source=path, rows=_lines(len(df)), names=names)
    out["is_group_of"] = False
    out["mask_path"] = df["MaskPath"]
    return conform(out, "boxes", source=path)


# ----- writers ----------------------------------------------------------------------------------------------
def boxes_to_csv_frame(boxes: pd.DataFrame, source: str = "orchard") -> pd.DataFrame:
    """``boxes`` table -> the challenge's bbox CSV columns (XMin, XMax, YMin, YMax order)."""
    out = pd.DataFrame({"ImageID": boxes["image_id"], "Source": source, "LabelName": boxes["label"],
                        "Confidence": 1})
    for ours, theirs in [("x_min", "XMin"), ("x_max", "XMax"), ("y_min", "YMin"), ("y_max", "YMax")]:
        out[theirs] = boxes[ours].map(lambda v: f"{v:.6f}")
    for theirs, ours in _FLAGS.items():
        out[theirs] = boxes[ours].astype(int) if ours in boxes else 0
    out["IsGroupOf"] = boxes["is_group_of"].astype(int)
    return out[BBOX_COLUMNS]


def prediction_strings(dets: pd.DataFrame, *, decimals: int = 6) -> pd.Series:
    """``detections`` -> Series image_id -> "LabelName Confidence XMin YMin XMax YMax ..." (vectorized)."""
    if len(dets) == 0:
        return pd.Series([], dtype=object, name="PredictionString")
    fmt = f"%.{decimals}f"
    parts = [dets["label"].astype(str)]
    for c in ["score", *BOX_COLUMNS]:
        parts.append(pd.Series(np.char.mod(fmt, dets[c].to_numpy(np.float64)), index=dets.index))
    one = parts[0].str.cat(parts[1:], sep=" ")
    return one.groupby(dets["image_id"].to_numpy(), sort=True).agg(" ".join).rename("PredictionString")


def detection_submission(dets: pd.DataFrame, image_ids: Iterable[str]) -> pd.DataFrame:
    """The Kaggle detection submission: one row per test image (empty string when nothing was detected)."""
    ids = pd.Index(sorted(set(image_ids)), dtype=object, name="ImageId")
    ps = prediction_strings(dets).reindex(ids).fillna("")
    return pd.DataFrame({"ImageId": ids, "PredictionString": ps.to_numpy()})


def read_detection_submission(path: str | os.PathLike, *, known_labels: set[str] | None = None) -> pd.DataFrame:
    """A Kaggle detection submission -> ``detections`` table. Errors name the line and the prediction."""
    df = _read_csv(path, SUBMISSION_COLUMNS)
    ids, toks_all, counts = [], [], []
    for i, (img, ps) in enumerate(zip(df["ImageId"], df["PredictionString"])):
        toks = ps.split()
        if len(toks) % 6:
            raise InputError(f"PredictionString has {len(toks)} fields, not a multiple of 6 "
                             "(LabelName Confidence XMin YMin XMax YMax)", file=path, row=i + 2,
                             field="PredictionString")
        toks_all.extend(toks)
        counts.append(len(toks) // 6)
        ids.append(img)
    arr = np.array(toks_all, dtype=object).reshape(-1, 6)
    line_of = np.repeat(np.arange(len(counts)) + 2, counts)
    out = pd.DataFrame({"image_id": np.repeat(np.array(ids, dtype=object), counts), "label": arr[:, 0]})
    for j, col in enumerate(["score", "x_min", "y_min", "x_max", "y_max"], start=1):
        v = pd.to_numeric(pd.Series(arr[:, j]), errors="coerce").to_numpy(np.float64)
        bad = np.isnan(v)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise InputError(f"prediction {k}: {col} is not a number: {arr[k, j]!r}", file=path,
                             row=int(line_of[k]), field="PredictionString")
        out[col] = v
    check_labels(out["label"], known_labels, source=path, rows=line_of, field="PredictionString")
    check_boxes(out, source=path, rows=line_of, names={c: f"PredictionString:{c}" for c in BOX_COLUMNS})
    return conform(out, "detections", source=path)


def write_csv(path: str | os.PathLike, df: pd.DataFrame, *, header: bool = True) -> None:
    from stages.formats.io import atomic_path

    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, header=header, quoting=csv.QUOTE_MINIMAL)


def known(classes: pd.DataFrame) -> set[str]:
    return set(classes["label"])



