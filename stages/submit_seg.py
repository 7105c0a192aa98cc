"""Submit segmentation: final instance masks -> the segmentation submission, one row per test image, checked by
reading it back before it is renamed into place.

``ImageID,ImageWidth,ImageHeight,PredictionString``; each prediction is ``LabelName Confidence EncodedMask``
(:func:`stages.formats.seg_submission.encode_counts`: the full-image COCO RLE, zlib-compressed, base64), the
predictions of an image by decreasing confidence; an image without a mask gets an empty PredictionString. Only
the segmentable classes are submitted (masks of other classes are left out and counted), masks with no
foreground pixel are left out, and ``--max-per-image`` keeps the best-scoring masks of each image::

    python -m stages.submit_seg --masks test_masks.parquet --images results/ingest/test_images.parquet \\
        --seg-classes results/ingest_masks/seg_classes.parquet --out segmentation.csv [--max-per-image 100]
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats import openimages as oi
from stages.formats.io import atomic_path, read_table
from stages.formats.readers import read_classes
from stages.formats.seg_submission import encode_counts, read_segmentation_submission, rle_areas
from stages.formats.tables import check_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegSubmission:
    """``rows``: ImageID, ImageWidth, ImageHeight, PredictionString (one per test image, sorted by ImageID);
    ``masks``: the submitted masks in file order (the ``masks`` columns plus ``area``, ``encoded``);
    ``stats``: counts of what was kept and left out."""

    rows: pd.DataFrame
    masks: pd.DataFrame
    stats: dict


def _rles(masks: pd.DataFrame) -> list[dict]:
    return [{"size": [int(h), int(w)], "counts": c.encode() if isinstance(c, str) else c}
            for c, h, w in zip(masks["rle"], masks["mask_height"], masks["mask_width"])]


def segmentation_submission(*, masks: pd.DataFrame, images: pd.DataFrame, seg_labels: Collection[str],
                            max_per_image: int | None = None, source: object = None,
                            decimals: int = 6) -> SegSubmission:
    """The submission of ``masks`` (the ``masks`` table: detections columns + rle, mask_height, mask_width) for
    the test ``images`` (image_id, width, height). A mask of an image that is not a test image, or whose size
    is not its image's, is an :class:`InputError` naming ``source``, the row and the field."""
    if max_per_image is not None and max_per_image < 1:
        raise ValueError(f"max_per_image must be >= 1, got {max_per_image}")
    check_labels(masks["label"], None, source=source)
    score = masks["score"].to_numpy(np.float64)
    bad = ~np.isfinite(score)
    if bad.any():
        raise InputError("score is not a finite number", file=source, row=f"row {int(np.flatnonzero(bad)[0])}",
                         field="score")
    ids = pd.Index(images["image_id"].to_numpy(dtype=object))
    if ids.has_duplicates:
        raise InputError(f"image {ids[ids.duplicated()][0]!r} listed twice in the test images", field="image_id")
    pos = ids.get_indexer(masks["image_id"].to_numpy(dtype=object))
    if (pos < 0).any():
        i = int(np.flatnonzero(pos < 0)[0])
        raise InputError(f"mask of image {masks['image_id'].iloc[i]!r}, which is not a test image", file=source,
                         row=f"row {i}", field="image_id")
    for col, img_col in (("mask_height", "height"), ("mask_width", "width")):
        want = images[img_col].to_numpy(np.int64)[pos]
        got = masks[col].to_numpy(np.int64)
        bad = got != want
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(f"mask of image {masks['image_id'].iloc[i]!r} is {masks['mask_width'].iloc[i]} x "
                             f"{masks['mask_height'].iloc[i]} px, the image {images['width'].iloc[pos[i]]} x "
                             f"{images['height'].iloc[pos[i]]} px", file=source, row=f"row {i}", field=col)
    seg = pd.Index(list(seg_labels), dtype=object)
    segmentable = masks["label"].isin(seg).to_numpy()
    area = np.zeros(len(masks), dtype=np.int64)
    if segmentable.any():
        area[segmentable] = rle_areas(_rles(masks[segmentable]))
    keep = segmentable & (area > 0)
    order = np.flatnonzero(keep)
    order = order[np.lexsort((-score[order], pos[order]))]   # by image, then decreasing score
    capped = 0
    if max_per_image is not None and len(order):
        p = pos[order]
        start = np.r_[0, np.flatnonzero(np.diff(p)) + 1]
        rank = np.arange(len(p)) - np.repeat(start, np.diff(np.r_[start, len(p)]))
        capped = int((rank >= max_per_image).sum())
        order = order[rank < max_per_image]
    kept = masks.iloc[order].reset_index(drop=True)
    kept["area"] = area[order]
    kept["encoded"] = pd.Series([encode_counts(c.encode() if isinstance(c, str) else c) for c in kept["rle"]],
                                dtype=object)
    kpos = pos[order]
    one = pc.binary_join_element_wise(pa.array(kept["label"].to_numpy(dtype=object), pa.string()),
                                      oi.fixed_decimals(kept["score"].to_numpy(np.float64), decimals),
                                      pa.array(kept["encoded"].to_numpy(dtype=object), pa.string()), " ")
    offsets = np.zeros(len(ids) + 1, np.int32)
    np.cumsum(np.bincount(kpos, minlength=len(ids)), out=offsets[1:])
    ps = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), one), " ")
    rows = pd.DataFrame({"ImageID": ids.to_numpy(), "ImageWidth": images["width"].to_numpy(np.int64),
                         "ImageHeight": images["height"].to_numpy(np.int64),
                         "PredictionString": ps.to_numpy(zero_copy_only=False)})
    by_id = np.argsort(rows["ImageID"].to_numpy(dtype=object), kind="stable")
    rows = rows.iloc[by_id].reset_index(drop=True)
    rank_of = np.empty(len(ids), np.int64)
    rank_of[by_id] = np.arange(len(ids))
    kept = kept.iloc[np.argsort(rank_of[kpos], kind="stable")].reset_index(drop=True)
    stats = {"images": len(ids), "images_with_masks": int(len(np.unique(kpos))), "masks": len(kept),
             "masks_in": len(masks), "not_segmentable": int((~segmentable).sum()),
             "empty": int((segmentable & (area == 0)).sum()), "over_max_per_image": capped}
    if stats["not_segmentable"]:
        log.info("%d masks of %d classes that are not segmentable left out", stats["not_segmentable"],
                 masks["label"][~segmentable].nunique())
    if stats["empty"]:
        log.info("%d empty masks left out", stats["empty"])
    return SegSubmission(rows=rows, masks=kept, stats=stats)


def to_csv_bytes(rows: pd.DataFrame) -> bytes:
    """The submission file's bytes (header + one line per row; ImageID quoted where CSV needs it)."""
    if not len(rows):
        return (",".join(oi.SEG_SUBMISSION_COLUMNS) + "\n").encode()
    cols = [oi._csv_field(pa.array(rows["ImageID"].to_numpy(dtype=object), pa.string())),
            pc.cast(pa.array(rows["ImageWidth"].to_numpy(np.int64)), pa.string()),
            pc.cast(pa.array(rows["ImageHeight"].to_numpy(np.int64)), pa.string()),
            pa.array(rows["PredictionString"].to_numpy(dtype=object), pa.string())]
    lines = pc.binary_join_element_wise(*cols, ",")
    return ("\n".join([",".join(oi.SEG_SUBMISSION_COLUMNS), *lines.to_pylist()]) + "\n").encode()


def check_round_trip(path: Path, sub: SegSubmission, *, decimals: int = 6) -> None:
    """Read ``path`` back and compare with ``sub``: every test image once with its size, and every mask's
    label, confidence, RLE (after decode_counts), size and area (pycocotools) equal to the source's. A
    difference is a bug (RuntimeError)."""
    head = oi._read_csv(path, oi.SEG_SUBMISSION_COLUMNS)
    for col in ("ImageID", "ImageWidth", "ImageHeight"):
        want = sub.rows[col].astype(str).to_numpy()
        if not np.array_equal(head[col].to_numpy(dtype=object).astype(str), want):
            raise RuntimeError(f"segmentation submission round trip: column {col} differs from the source")
    back = read_segmentation_submission(path)
    src = sub.masks
    if len(back) != len(src):
        raise RuntimeError(f"segmentation submission round trip: {len(back)} masks read back, {len(src)} written")
    for col in ("image_id", "label", "rle"):
        if not np.array_equal(back[col].to_numpy(dtype=object), src[col].astype(str).to_numpy(dtype=object)):
            raise RuntimeError(f"segmentation submission round trip: {col} differs from the source")
    for col in ("mask_height", "mask_width"):
        if not np.array_equal(back[col].to_numpy(np.int64), src[col].to_numpy(np.int64)):
            raise RuntimeError(f"segmentation submission round trip: {col} differs from the source")
    if len(back) and not np.array_equal(rle_areas(_rles(back)), src["area"].to_numpy(np.int64)):
        raise RuntimeError("segmentation submission round trip: a mask's area differs from the source")
    if np.abs(back["score"].to_numpy(np.float64) - src["score"].to_numpy(np.float64)).max(initial=0.0) > \
            0.51 * 10.0 ** -decimals:
        raise RuntimeError("segmentation submission round trip: a confidence differs from the source")


def write_segmentation_submission(path: Path, sub: SegSubmission) -> None:
    """Write the file next to ``path``, check it by reading it back (:func:`check_round_trip`), then rename it
    into place."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(to_csv_bytes(sub.rows))
        check_round_trip(tmp, sub)


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.submit_seg", description=__doc__.split("\n\n")[0])
    p.add_argument("--masks", type=Path, required=True, nargs="+", help="masks parquet(s) (detections columns + "
                   "rle, mask_height, mask_width) of the test images: one file or its image shards")
    p.add_argument("--images", type=Path, required=True, help="the test images table (image_id, width, height)")
    p.add_argument("--seg-classes", type=Path, required=True,
                   help="the segmentable classes (seg_classes parquet or class-description CSV)")
    p.add_argument("--max-per-image", type=int, default=None,
                   help="keep at most this many masks per image, the best-scoring (default: all)")
    p.add_argument("--out", type=Path, required=True, help="segmentation submission CSV")
    a = p.parse_args(argv)
    if a.max_per_image is not None and a.max_per_image < 1:
        p.error("need --max-per-image >= 1")
    masks = pd.concat([read_table(m, "masks") for m in a.masks], ignore_index=True)
    images = read_table(a.images, "images")
    seg = read_classes(a.seg_classes)
    sub = segmentation_submission(masks=masks, images=images, seg_labels=seg["label"],
                                  max_per_image=a.max_per_image,
                                  source=", ".join(map(str, a.masks)))
    write_segmentation_submission(a.out, sub)
    s = sub.stats
    print(f"submit_seg: {s['images']} images ({s['images_with_masks']} with masks), {s['masks']} masks; left out: "
          f"{s['not_segmentable']} not segmentable, {s['empty']} empty, {s['over_max_per_image']} over "
          f"--max-per-image -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
