"""Mask probability maps of boxes (stages.infer_masks -> the vote stage): one ``.npz`` file, written atomically.

Arrays (N boxes, V views, maps M x M; ``np.load(path, allow_pickle=False)`` opens it):

- ``image_id``, ``label``: unicode [N]; ``score``, ``x_min``, ``y_min``, ``x_max``, ``y_max``: float64 [N]
  (the boxes, normalized xyxy, in output order: the detections columns);
- ``width``, ``height``: int32 [N], the size of each box's image;
- ``probs``: float16 [V, N, M, M], the foreground probability over the box (row 0 = the box's top, column 0 its
  left; a flipped view is flipped back, so every view is in the image's orientation);
- ``views``: unicode [V], e.g. ``["s64", "s64_flip"]`` (unflipped first).

:func:`read_mask_probs` checks names, dtypes and shapes and raises :class:`InputError` naming the file and array.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.errors import InputError
from stages.formats.io import atomic_path

BOX_FIELDS = ("score", "x_min", "y_min", "x_max", "y_max")
ARRAYS = ("image_id", "label", *BOX_FIELDS, "width", "height", "probs", "views")


def write_mask_probs(path: str | os.PathLike, dets: pd.DataFrame, probs: np.ndarray,
                     views: Sequence[str]) -> None:
    """Write ``dets`` (image_id, label, score, x_min, y_min, x_max, y_max, width, height; N rows in output
    order) and ``probs`` [V, N, M, M] (cast to float16) with view names ``views`` (V) atomically to ``path``
    (uncompressed npz: the maps are noise-like in their low bits, and compression would cost the writer and
    every reader CPU)."""
    probs = np.asarray(probs)
    n = len(dets)
    if probs.ndim != 4 or probs.shape[1] != n or probs.shape[2] != probs.shape[3] or probs.shape[0] != len(views):
        raise ValueError(f"probs must be [V={len(views)}, N={n}, M, M], got {probs.shape}")
    arrays = {
        "image_id": np.asarray(dets["image_id"].astype(str).to_numpy(), dtype=str).reshape(n),
        "label": np.asarray(dets["label"].astype(str).to_numpy(), dtype=str).reshape(n),
        **{c: dets[c].to_numpy(np.float64) for c in BOX_FIELDS},
        "width": dets["width"].to_numpy(np.int32), "height": dets["height"].to_numpy(np.int32),
        "probs": probs.astype(np.float16, copy=False), "views": np.asarray(list(views), dtype=str).reshape(-1),
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)


def _load_arrays(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrays ``names`` of the npz at ``path`` (only those are read); :class:`InputError` naming the file (and
    the first missing array) when it is missing, unreadable or lacks one."""
    if not path.exists():
        raise InputError("file not found", file=path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in names if a not in z.files]
            if missing:
                raise InputError(f"not a mask probabilities file: missing array(s) {missing}", file=path,
                                 field=missing[0])
            return {a: z[a] for a in names}
    except InputError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"not a readable npz file: {exc}", file=path) from exc


def read_mask_probs(path: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """(detections frame: image_id, label, score, x_min, y_min, x_max, y_max, width, height; probs float16
    [V, N, M, M]; view names) of a file written by :func:`write_mask_probs`. A missing file, a file that is not
    such an npz, or arrays of the wrong kind or shape raise :class:`InputError` naming the file and array."""
    path = Path(path)
    arrs = _load_arrays(path, ARRAYS)
    probs, views = arrs["probs"], arrs["views"]
    n = len(arrs["image_id"])
    for a in ARRAYS[:-2]:
        if arrs[a].ndim != 1 or len(arrs[a]) != n:
            raise InputError(f"array has shape {arrs[a].shape}, expected ({n},) like image_id", file=path, field=a)
    for a in ("image_id", "label"):
        if arrs[a].dtype.kind != "U":
            raise InputError(f"expected unicode strings, got dtype {arrs[a].dtype}", file=path, field=a)
    for a in (*BOX_FIELDS, "width", "height"):
        if arrs[a].dtype.kind not in "fiu":
            raise InputError(f"expected numbers, got dtype {arrs[a].dtype}", file=path, field=a)
    if views.dtype.kind != "U" or views.ndim != 1:
        raise InputError(f"expected a 1-d array of names, got {views.dtype} {views.shape}", file=path,
                         field="views")
    if probs.dtype != np.float16 or probs.ndim != 4 or probs.shape[:2] != (len(views), n) \
            or probs.shape[2] != probs.shape[3]:
        raise InputError(f"expected float16 [V={len(views)}, N={n}, M, M], got {probs.dtype} {probs.shape}",
                         file=path, field="probs")
    dets = pd.DataFrame({"image_id": arrs["image_id"].astype(object), "label": arrs["label"].astype(object),
                         **{c: arrs[c].astype(np.float64) for c in BOX_FIELDS},
                         "width": arrs["width"].astype(np.int32), "height": arrs["height"].astype(np.int32)})
    return dets, probs, [str(v) for v in views]


def read_image_sizes(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Image id -> (height, width) of the images of the boxes in a file written by :func:`write_mask_probs`,
    read without the maps. Errors as :func:`read_mask_probs`."""
    path = Path(path)
    arrs = _load_arrays(path, ("image_id", "width", "height"))
    ids, w, h = arrs["image_id"], arrs["width"], arrs["height"]
    if ids.dtype.kind != "U" or not ids.shape == w.shape == h.shape or ids.ndim != 1 or w.dtype.kind not in "iu" \
            or h.dtype.kind not in "iu":
        raise InputError(f"image_id, width, height must be [N] strings and integers, got {ids.dtype} {ids.shape}, "
                         f"{w.dtype} {w.shape}, {h.dtype} {h.shape}", file=path, field="width")
    uniq, first = np.unique(ids, return_index=True)
    return {str(i): (int(h[k]), int(w[k])) for i, k in zip(uniq, first)}


__all__ = ["ARRAYS", "read_image_sizes", "read_mask_probs", "write_mask_probs"]
