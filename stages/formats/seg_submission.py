"""The segmentation submission's EncodedMask (COCO RLE, zlib, base64) and its reader -> ``masks`` table.

``ImageID,ImageWidth,ImageHeight,PredictionString``; each prediction is ``LabelName Confidence EncodedMask``.
"""

from __future__ import annotations

import base64
import binascii
import os
import zlib

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from stages.core.errors import InputError
from stages.formats.openimages import SEG_SUBMISSION_COLUMNS, _read_csv
from stages.formats.tables import check_labels, conform


def encode_counts(counts: bytes) -> str:
    """COCO RLE ``counts`` bytes (pycocotools' compressed string, e.g. from
    :func:`stages.ops.masks.vote_masks`) -> EncodedMask text: base64(zlib(counts))."""
    return base64.b64encode(zlib.compress(counts, zlib.Z_BEST_COMPRESSION)).decode()


def encode_mask(mask: np.ndarray) -> str:
    """Binary [h, w] mask -> EncodedMask text."""
    return encode_counts(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"])


def decode_counts(encoded: str) -> bytes:
    """EncodedMask text -> COCO RLE ``counts`` bytes (no pixel decoding). Raises ValueError if malformed."""
    try:
        return zlib.decompress(base64.b64decode(encoded, validate=True))
    except (binascii.Error, zlib.error) as exc:
        raise ValueError(str(exc)) from exc


def read_segmentation_submission(path: str | os.PathLike, *, known_labels: set[str] | None = None
                                 ) -> pd.DataFrame:
    """A segmentation submission -> ``masks`` table; boxes are the masks' bounding boxes (normalized)."""
    df = _read_csv(path, SEG_SUBMISSION_COLUMNS)
    rows: dict[str, list] = {c: [] for c in ["image_id", "label", "score", "rle", "mask_height", "mask_width"]}
    lines = []
    for i, (img, w, h, ps) in enumerate(zip(df["ImageID"], df["ImageWidth"], df["ImageHeight"],
                                            df["PredictionString"])):
        line = i + 2
        try:
            w, h = int(w), int(h)
        except ValueError as exc:
            raise InputError("ImageWidth/ImageHeight must be integers", file=path, row=line,
                             field="ImageWidth") from exc
        toks = ps.split()
        if len(toks) % 3:
            raise InputError(f"PredictionString has {len(toks)} fields, not a multiple of 3 "
                             "(LabelName Confidence EncodedMask)", file=path, row=line, field="PredictionString")
        for k in range(0, len(toks), 3):
            lab, sc, enc = toks[k:k + 3]
            try:
                score = float(sc)
                counts = decode_counts(enc)
            except ValueError as exc:
                raise InputError(f"prediction {k // 3}: bad Confidence or EncodedMask: {exc}", file=path,
                                 row=line, field="PredictionString") from exc
            for c, v in zip(rows, [img, lab, score, counts.decode(), h, w]):
                rows[c].append(v)
            lines.append(line)
    out = pd.DataFrame(rows)
    check_labels(out["label"], known_labels, source=path, rows=lines, field="PredictionString")
    if len(out):
        rles = [{"size": [h, w], "counts": c.encode()} for c, h, w in
                zip(out["rle"], out["mask_height"], out["mask_width"])]
        bb = np.asarray(mask_utils.toBbox(rles), dtype=np.float64).reshape(-1, 4)
        W = out["mask_width"].to_numpy(np.float64)
        H = out["mask_height"].to_numpy(np.float64)
        out["x_min"], out["y_min"] = bb[:, 0] / W, bb[:, 1] / H
        out["x_max"], out["y_max"] = (bb[:, 0] + bb[:, 2]) / W, (bb[:, 1] + bb[:, 3]) / H
    else:
        for c in ["x_min", "y_min", "x_max", "y_max"]:
            out[c] = np.zeros(0)
    return conform(out, "masks", source=path)


_AREA_CHUNK = 255   # pycocotools 2.0.11 + numpy 2: mask.area() of more than 255 RLEs overflows a uint8 count


def rle_areas(rles: list[dict]) -> np.ndarray:
    """Foreground pixels of each COCO RLE (``{"size": [h, w], "counts": bytes}``), int64 ``[n]``, without
    decoding: ``pycocotools.mask.area`` taken 255 at a time."""
    out = np.zeros(len(rles), dtype=np.int64)
    for i in range(0, len(rles), _AREA_CHUNK):
        out[i:i + _AREA_CHUNK] = np.asarray(mask_utils.area(rles[i:i + _AREA_CHUNK])).reshape(-1)
    return out
