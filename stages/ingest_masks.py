"""Ingest masks: the segmentation track's ground truth -> validated canonical tables.

Reads the challenge segmentation CSV (``MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,...``),
its mask PNGs, the segmentable class list (MID,name, no header) and the segmentation hierarchy (challenge JSON),
and writes three tables (all three or none)::

    gt_masks       image_id, label, x_min, y_min, x_max, y_max (the CSV's box, normalized), rle (pycocotools'
                   compressed counts of the full-image mask), mask_height, mask_width, mask_path
    seg_classes    the ``classes`` table of the segmentable classes
    seg_hierarchy  the ``hierarchy`` table (child, parent) of the segmentation hierarchy

Checks, each an error naming the file, the line and the field: a mask PNG missing or unreadable, of another size
than its image (the ``images`` table of :mod:`stages.ingest`; ``--resize-masks`` resizes it instead, nearest
neighbour, as the official evaluator does with masks stored at a lower resolution), not binary (values other
than {0, 255} or {0, 1}); a label that is not a class, or not a segmentable one; a box outside [0, 1] or
inverted; an image not in the images table; a MaskPath listed twice; a segmentable class that is not a detection
class; a hierarchy label that is not segmentable. PNGs are decoded in a process pool (``--threads``).

    python -m stages.ingest_masks --masks-csv challenge-2019-train-segmentation.csv --mask-dir masks/ \\
        --images results/ingest/images.parquet --classes results/ingest/classes.parquet \\
        --seg-classes challenge-2019-classes-description-segmentable.csv \\
        --seg-hierarchy challenge-2019-label-segmentable-hierarchy.json --threads 2 \\
        --out-masks results/ingest_masks/gt_masks.parquet --out-classes results/ingest_masks/seg_classes.parquet \\
        --out-hierarchy results/ingest_masks/seg_hierarchy.parquet
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats import openimages as oi
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import atomic_path, read_json, read_table, write_table
from stages.formats.readers import read_classes
from stages.formats.seg_submission import rle_areas

log = logging.getLogger(__name__)

#: PNG modes a mask may have (one channel; 'P' palettes and colour images are rejected)
MASK_MODES = ("1", "L", "I", "I;16")
_CHUNK = 256   # masks per task of the process pool


@dataclass(frozen=True)
class MaskTables:
    gt_masks: pd.DataFrame
    seg_classes: pd.DataFrame
    seg_hierarchy: pd.DataFrame


def _read_mask(path: str, width: int, height: int, resize: bool) -> tuple[str | None, str]:
    """One mask PNG -> (RLE counts of its binary mask at ``width`` x ``height``, "") or (None, the reason)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, size = im.mode, im.size
            if mode not in MASK_MODES:
                return None, f"mask {path} has PNG mode {mode!r}: not a single-channel binary mask"
            arr = np.asarray(im)
    except FileNotFoundError:
        return None, f"mask PNG {path} not found"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return None, f"unreadable mask PNG {path}: {exc}"
    if size != (width, height) and not resize:
        return None, f"mask {path} is {size[0]} x {size[1]} px, its image {width} x {height} px"
    m = arr != 0
    if arr.dtype != bool:
        nz = arr[m]
        if nz.size and not ((nz == 255).all() or (nz == 1).all()):
            vals = np.unique(arr)
            more = " ..." if len(vals) > 6 else ""
            return None, (f"mask {path} is not binary: values {vals[:6].tolist()}{more} "
                          "(need {0, 255} or {0, 1})")
    if size != (width, height):
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 0
    return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode(), ""


def _read_masks(paths: list[str], sizes: np.ndarray, resize: bool) -> tuple[list[str], tuple[int, str] | None]:
    """RLE counts of ``paths`` (``sizes`` (n, 2) width, height each), up to the first bad one: (position,
    reason) or None."""
    out = []
    for i, (path, (w, h)) in enumerate(zip(paths, sizes.tolist())):
        counts, reason = _read_mask(path, w, h, resize)
        if counts is None:
            return out, (i, reason)
        out.append(counts)
    return out, None


def encode_mask_files(paths: Sequence[str], sizes: np.ndarray, *, resize: bool = False, threads: int = 1,
                      log_every: int = 1000, chunk: int = _CHUNK) -> tuple[list[str], int, str]:
    """RLE counts (pycocotools' compressed string) of every mask PNG at its image's size (``sizes`` (n, 2):
    width, height), decoded in ``threads`` processes ``chunk`` masks at a time, a log line every ``log_every``
    masks. Returns ``(counts, position of the first bad mask or -1, its reason)``; nothing more is decoded
    after a bad chunk."""
    n = len(paths)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    chunks = [(list(paths[i:i + chunk]), sizes[i:i + chunk], resize) for i in range(0, n, chunk)]
    t0 = time.perf_counter()
    done, logged, counts = 0, 0, []
    with contextlib.ExitStack() as stack:
        if threads > 1 and len(chunks) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(min(threads, len(chunks))))
            results = pool.map(_read_masks, *zip(*chunks))
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        else:
            results = (_read_masks(*c) for c in chunks)
        for k, (part, err) in enumerate(results):
            if err is not None:
                return [], k * chunk + err[0], err[1]
            counts += part
            done += len(part)
            if log_every > 0 and (done // log_every > logged or done == n):
                logged = done // log_every
                el = time.perf_counter() - t0
                log.info("decoded %d/%d masks (%.0f masks/s, ETA %.0f s)", done, n, done / max(el, 1e-9),
                         (n - done) * el / max(done, 1))
    return counts, -1, ""


def _json_path(obj: Mapping, label: str, here: str = "$") -> str | None:
    """The JSON path of the first node naming ``label`` in a challenge hierarchy, for error messages."""
    for i, sub in enumerate(obj.get("Subcategory", []) or []):
        p = f"{here}.Subcategory[{i}]"
        if isinstance(sub, Mapping):
            if sub.get("LabelName") == label:
                return p
            found = _json_path(sub, label, p)
            if found:
                return found
    return None


def _first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def check_seg_classes(seg_classes: pd.DataFrame, classes: pd.DataFrame, *, source: object,
                      classes_source: object = None) -> None:
    """Every segmentable class is a detection class (else an error naming the CSV line, field MID)."""
    bad = ~seg_classes["label"].isin(set(classes["label"])).to_numpy()
    if bad.any():
        i = _first(bad)
        raise InputError(f"segmentable class {seg_classes['label'].iloc[i]!r} is not a detection class (not in "
                         f"{classes_source or 'the class list'})", file=source, row=i + 1, field="MID")


def read_seg_hierarchy(path: Path, seg_labels: set[str]) -> Hierarchy:
    """The segmentation hierarchy JSON; a label that is not a segmentable class is an error naming its JSON
    path."""
    obj = read_json(path)
    h = Hierarchy.from_json_obj(obj, source=path)
    stray = sorted(set(h.labels) - seg_labels)
    if stray:
        raise InputError(f"hierarchy label {stray[0]!r} is not a segmentable class", file=path,
                         row=_json_path(obj, stray[0]), field="LabelName")
    return h


def ingest_masks(*, masks_csv: Path, mask_dir: Path, seg_classes_csv: Path, seg_hierarchy_json: Path,
                 images: pd.DataFrame, classes: pd.DataFrame | None = None, images_source: object = None,
                 classes_source: object = None, resize: bool = False, threads: int = 1,
                 log_every: int = 1000) -> MaskTables:
    """Validate the segmentation ground truth and encode its masks (see the module docstring). ``images``: the
    ``images`` table (image_id, width, height) every mask's image must be in; ``classes``: the detection
    classes the segmentable ones must be among (None: not checked)."""
    masks_csv, mask_dir = Path(masks_csv), Path(mask_dir)
    seg = oi.read_classes(seg_classes_csv)
    if classes is not None:
        check_seg_classes(seg, classes, source=seg_classes_csv, classes_source=classes_source)
    seg_labels = set(seg["label"])
    h = read_seg_hierarchy(Path(seg_hierarchy_json), seg_labels)
    mb = oi.read_masks_csv(masks_csv)   # boxes in [0, 1], min <= max, non-empty ids and labels: checked there
    labels = mb["label"].to_numpy(dtype=object)
    bad = ~pd.Index(labels).isin(seg_labels)
    if bad.any():
        i = _first(bad)
        lab = labels[i]
        if classes is not None and lab in set(classes["label"]):
            msg = f"label {lab!r} is not segmentable (not in {seg_classes_csv})"
        else:
            msg = f"unknown label (MID) {lab!r}: not in the class list"
        raise InputError(msg, file=masks_csv, row=i + 2, field="LabelName")
    pos = pd.Index(images["image_id"], dtype=object).get_indexer(mb["image_id"].to_numpy(dtype=object))
    if (pos < 0).any():
        i = _first(pos < 0)
        raise InputError(f"image {mb['image_id'].iloc[i]!r} is not in the images table"
                         + (f" ({images_source})" if images_source else ""), file=masks_csv, row=i + 2,
                         field="ImageID")
    dup = mb["mask_path"].duplicated().to_numpy()
    if dup.any():
        i = _first(dup)
        raise InputError(f"MaskPath {mb['mask_path'].iloc[i]!r} listed twice", file=masks_csv, row=i + 2,
                         field="MaskPath")
    width = images["width"].to_numpy(np.int64)[pos]
    height = images["height"].to_numpy(np.int64)[pos]
    paths = [os.path.join(mask_dir, p) for p in mb["mask_path"]]
    log.info("%d masks of %d images, %d segmentable classes; decoding in %d process(es)", len(mb),
             len(np.unique(pos)), len(seg), threads)
    counts, bad_at, reason = encode_mask_files(paths, np.stack([width, height], axis=1), resize=resize,
                                               threads=threads, log_every=log_every)
    if bad_at >= 0:
        raise InputError(reason, file=masks_csv, row=bad_at + 2, field="MaskPath")
    gt = pd.DataFrame({"image_id": mb["image_id"], "label": mb["label"], "x_min": mb["x_min"],
                       "y_min": mb["y_min"], "x_max": mb["x_max"], "y_max": mb["y_max"],
                       "rle": pd.Series(counts, dtype=object), "mask_height": height.astype(np.int32),
                       "mask_width": width.astype(np.int32), "mask_path": mb["mask_path"]})
    return MaskTables(gt_masks=gt, seg_classes=seg, seg_hierarchy=h.to_edges())


def write_all(outputs: Sequence[tuple[Path, pd.DataFrame, str]], *, provenance: Mapping[str, object]) -> None:
    """Write every ``(path, frame, table)`` or none: each is written to a temporary file first, all are renamed
    into place only once every one is written."""
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(path)) for path, _, _ in outputs]
        for tmp, (_, df, name) in zip(tmps, outputs):
            write_table(tmp, df, name, provenance=provenance)


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.ingest_masks", description=__doc__.split("\n\n")[0])
    p.add_argument("--masks-csv", type=Path, required=True, help="challenge segmentation CSV (MaskPath, ImageID, "
                   "LabelName, BoxID, BoxXMin, BoxXMax, BoxYMin, BoxYMax, ...)")
    p.add_argument("--mask-dir", type=Path, required=True, help="folder of the MaskPath PNGs")
    p.add_argument("--images", type=Path, required=True, help="images table (stages.ingest): the image sizes")
    p.add_argument("--classes", type=Path, required=True,
                   help="the detection classes (classes parquet or class-description CSV): the segmentable "
                        "classes must be among them")
    p.add_argument("--seg-classes", type=Path, required=True,
                   help="segmentable class descriptions CSV (MID,name, no header)")
    p.add_argument("--seg-hierarchy", type=Path, required=True, help="segmentation hierarchy JSON")
    p.add_argument("--resize-masks", action="store_true",
                   help="resize a mask PNG of another size than its image to the image's size (nearest "
                        "neighbour) instead of rejecting it")
    p.add_argument("--threads", type=int, default=1, help="processes decoding PNGs (default 1)")
    p.add_argument("--log-every", type=int, default=1000, help="a progress line every N masks")
    p.add_argument("--out-masks", type=Path, required=True, help="gt_masks parquet")
    p.add_argument("--out-classes", type=Path, required=True, help="seg_classes parquet (classes table)")
    p.add_argument("--out-hierarchy", type=Path, required=True, help="seg_hierarchy parquet (hierarchy table)")
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error("need --threads >= 1")
    t0 = time.perf_counter()
    images = read_table(a.images, "images")
    classes = read_classes(a.classes)
    t = ingest_masks(masks_csv=a.masks_csv, mask_dir=a.mask_dir, seg_classes_csv=a.seg_classes,
                     seg_hierarchy_json=a.seg_hierarchy, images=images, classes=classes, images_source=a.images,
                     classes_source=a.classes, resize=a.resize_masks, threads=a.threads, log_every=a.log_every)
    write_all([(a.out_masks, t.gt_masks, "gt_masks"), (a.out_classes, t.seg_classes, "classes"),
               (a.out_hierarchy, t.seg_hierarchy, "hierarchy")],
              provenance={"stage": "ingest_masks", "source": str(a.masks_csv)})
    gt = t.gt_masks
    empty = 0
    if len(gt):
        rles = [{"size": [int(h), int(w)], "counts": c.encode()}
                for c, h, w in zip(gt["rle"], gt["mask_height"], gt["mask_width"])]
        empty = int((rle_areas(rles) == 0).sum())
    if empty:
        log.warning("%d masks are empty (no foreground pixel)", empty)
    print(f"ingest_masks: {len(gt)} masks of {gt['image_id'].nunique()} images, {gt['label'].nunique()} of "
          f"{len(t.seg_classes)} segmentable classes, {empty} empty, {time.perf_counter() - t0:.1f} s -> "
          f"{a.out_masks}")


if __name__ == "__main__":
    raise SystemExit(main())
