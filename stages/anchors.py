"""Anchors by k-means on training boxes with the IoU distance d = 1 - IoU of (w, h) pairs centred together.

The boxes are first scaled to the size the detector sees them at (torchvision's ``GeneralizedRCNNTransform``
resizes the shorter side to ``min_size`` unless the longer side would exceed ``max_size``). The k cluster
centres give the aspect ratios (h / w, torchvision's convention); sizes per FPN level are ``stride × scale`` for
each of ``scales`` (the paper: scales 8, 11, 14 on strides 4…64), so the output plugs into
``AnchorGenerator(sizes=out["sizes"], aspect_ratios=out["aspect_ratios"])`` with the same anchor count on every
level (what torchvision's RPN head needs).

    python -m stages.anchors --boxes boxes.parquet --images images.parquet --splits splits.parquet \
        --split train --k 6 --out anchors.json
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats.columns import positions
from stages.formats.io import read_table, write_json
from stages.formats.tables import BOX_COLUMNS

log = logging.getLogger(__name__)

DEFAULT_STRIDES = (4, 8, 16, 32, 64)
DEFAULT_SCALES = (8.0, 11.0, 14.0)


def wh_iou(wh: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """IoU of boxes of sizes ``wh`` (N, 2) with ``centres`` (K, 2), all centred at one point -> (N, K)."""
    inter = np.minimum(wh[:, None, 0], centres[None, :, 0]) * np.minimum(wh[:, None, 1], centres[None, :, 1])
    union = (wh[:, 0] * wh[:, 1])[:, None] + (centres[:, 0] * centres[:, 1])[None, :] - inter
    return inter / np.maximum(union, 1e-12)


def kmeans_iou(wh: np.ndarray, *, k: int, seed: int = 0, max_iter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """k-means of (w, h) pairs under d = 1 - IoU: k-means++ seeding, assignment by highest IoU, centres by the
    per-cluster median (robust; YOLOv2's choice). An emptied cluster is re-seeded with the worst-fit box.

    Returns (centres (k, 2) sorted by h / w then area, assignment (N,) indices into the sorted centres).
    Deterministic for a seed.
    """
    wh = np.asarray(wh, dtype=np.float64)
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"wh must have shape (N, 2), got {wh.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(wh) < k:
        raise ValueError(f"need at least k={k} boxes, got {len(wh)}")
    if (wh <= 0).any():
        raise ValueError("box widths and heights must be positive")
    rng = np.random.default_rng(seed)
    centres = np.empty((k, 2))
    centres[0] = wh[rng.integers(len(wh))]
    dist = 1.0 - wh_iou(wh, centres[:1])[:, 0]
    for j in range(1, k):
        p = dist ** 2
        total = p.sum()
        idx = rng.choice(len(wh), p=p / total) if total > 0 else rng.integers(len(wh))
        centres[j] = wh[idx]
        dist = np.minimum(dist, 1.0 - wh_iou(wh, centres[j:j + 1])[:, 0])
    assign = np.full(len(wh), -1)
    for _ in range(max_iter):
        iou = wh_iou(wh, centres)
        new = iou.argmax(1)
        if np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = wh[assign == j]
            if len(members):
                centres[j] = np.median(members, axis=0)
            else:  # re-seed with the box the current centres fit worst
                worst = int(iou.max(1).argmin())
                centres[j] = wh[worst]
                assign[worst] = j
    ratio = centres[:, 1] / centres[:, 0]
    order = np.lexsort((centres[:, 0] * centres[:, 1], ratio))
    centres = centres[order]
    assign = wh_iou(wh, centres).argmax(1)
    return centres, assign


@dataclass(frozen=True)
class Anchors:
    centres: list[list[float]]          # k (w, h) pairs in resized-image pixels
    aspect_ratios: list[list[float]]    # per FPN level: the k ratios h / w (same list on every level)
    sizes: list[list[float]]            # per FPN level: stride × scale for each scale
    strides: list[int]
    scales: list[float]
    mean_iou: float                     # mean best IoU of a box with the centres
    num_boxes: int


def resized_box_wh(boxes: pd.DataFrame, images: pd.DataFrame, *, min_size: int = 800,
                   max_size: int = 1333) -> np.ndarray:
    """(w, h) in pixels of normalized ``boxes`` after torchvision's detection resize of their images -> (N, 2).

    Boxes whose image is missing from ``images`` raise :class:`InputError`; zero-size boxes are dropped.
    """
    pos = positions(boxes["image_id"], pd.Index(images["image_id"], dtype=object))
    missing = pos < 0
    if missing.any():
        first = boxes["image_id"].iloc[int(np.flatnonzero(missing)[0])]
        raise InputError(f"box of image {first!r} has no row in the images table ({int(missing.sum())} boxes)",
                         field="image_id")
    wh_img = images[["width", "height"]].to_numpy(np.float64)[pos]
    short, long = wh_img.min(1), wh_img.max(1)
    scale = np.minimum(min_size / short, max_size / long)
    w = (boxes["x_max"].to_numpy() - boxes["x_min"].to_numpy()) * wh_img[:, 0] * scale
    h = (boxes["y_max"].to_numpy() - boxes["y_min"].to_numpy()) * wh_img[:, 1] * scale
    wh = np.stack([w, h], 1)
    return wh[(wh > 0).all(1)]


def anchors(*, wh: np.ndarray, k: int = 6, strides: Sequence[int] = DEFAULT_STRIDES,
            scales: Sequence[float] = DEFAULT_SCALES, seed: int = 0, max_boxes: int = 200_000) -> Anchors:
    """Cluster the box sizes ``wh`` (N, 2) into k aspect ratios; sizes per level are stride × scale.

    At most ``max_boxes`` boxes (a seeded random subset) are clustered, so the cost does not grow with the
    dataset. Ratios are rounded to 4 decimals.
    """
    wh = np.asarray(wh, dtype=np.float64)
    if len(wh) > max_boxes:
        wh = wh[np.random.default_rng(seed).choice(len(wh), max_boxes, replace=False)]
    centres, _ = kmeans_iou(wh, k=k, seed=seed)
    mean_iou = float(wh_iou(wh, centres).max(1).mean())
    ratios = [round(float(r), 4) for r in centres[:, 1] / centres[:, 0]]
    return Anchors(
        centres=centres.round(3).tolist(),
        aspect_ratios=[list(ratios) for _ in strides],
        sizes=[[float(s) * float(c) for c in scales] for s in strides],
        strides=[int(s) for s in strides],
        scales=[float(c) for c in scales],
        mean_iou=mean_iou,
        num_boxes=int(len(wh)),
    )


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.anchors", description=__doc__.split("\n")[0])
    ap.add_argument("--boxes", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--splits", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--strides", type=int, nargs="+", default=list(DEFAULT_STRIDES))
    ap.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES))
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--max-size", type=int, default=1333)
    ap.add_argument("--max-boxes", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    boxes = read_table(a.boxes, "boxes", columns=["image_id", *BOX_COLUMNS])
    images = read_table(a.images, "images", columns=["image_id", "width", "height"])
    splits = read_table(a.splits, "splits", columns=["image_id", "split"])
    ids = splits.loc[(splits["split"] == a.split).to_numpy(), "image_id"].to_numpy(dtype=object)
    boxes = boxes[boxes["image_id"].isin(ids).to_numpy()]
    if len(boxes) < a.k:
        raise InputError(f"split {a.split!r} has {len(boxes)} boxes, fewer than k={a.k}", file=a.boxes)
    try:
        wh = resized_box_wh(boxes, images, min_size=a.min_size, max_size=a.max_size)
    except InputError as exc:
        raise InputError(exc.message, file=a.boxes, field=exc.field) from None
    result = anchors(wh=wh, k=a.k, strides=a.strides, scales=a.scales, seed=a.seed, max_boxes=a.max_boxes)
    write_json(a.out, asdict(result) | {"split": a.split, "min_size": a.min_size, "max_size": a.max_size,
                                        "seed": a.seed})
    print(f"anchors: k={a.k} ratios={result.aspect_ratios[0]} mean IoU={result.mean_iou:.3f} "
          f"from {result.num_boxes} boxes -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
