"""Refine the boxes of a detections table with a trained box refiner (stages.train_refiner).

Every input row is kept, in order, with its score, label and provenance columns (model, scale, flip) unchanged;
only x_min, y_min, x_max, y_max move: each image is decoded once, its distinct boxes (rows of several labels
often share one: hierarchy expansion, the ensemble) pass through every stage of the class-agnostic cascade, and
the result is clipped to [0, 1]. A box never inverts: where a refined box would have no width or height in
normalised coordinates the input box is kept. The output is written atomically; bad input (a coordinate outside
[0, 1], an image id missing from the images table, an image file missing or unreadable) is an error naming the
file, the row and the field.

Also :func:`matched_iou`: the mean IoU of detections matched to ground truth of their label (the
before/after-refinement figure of the ablation; AP@0.75 comes from ``stages.evaluate --iou-thr 0.75``).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.core.cli import stage_main
from stages.core.config import schema_default
from stages.core.errors import InputError
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import read_table, write_table
from stages.formats.tables import BOX_COLUMNS, check_boxes
from stages.infer import shard
from stages.models.data import load_image
from stages.models.detector import select_device
from stages.models.refiner import BoxRefiner, load_refiner

log = logging.getLogger(__name__)


def refine_detections(*, refiner: BoxRefiner, detections: pd.DataFrame, images: pd.DataFrame,
                      device: torch.device, batch_size: int = 4, source: object = None) -> pd.DataFrame:
    """``detections`` (normalised xyxy) with refined boxes: same rows, order and other columns. ``images``
    (image_id, path) must hold every image of ``detections``; ``source`` names the detections file in errors.
    Raises :class:`InputError` on a box outside [0, 1], an unknown image id or an unreadable image."""
    check_boxes(detections, source=source)
    out = detections.copy()
    if detections.empty:
        return out
    ids = detections["image_id"].astype(str).to_numpy(dtype=object)
    table = pd.Index(images["image_id"].astype(str).to_numpy(dtype=object))
    pos = table.get_indexer(ids)
    if (pos < 0).any():
        i = int(np.flatnonzero(pos < 0)[0])
        raise InputError(f"image {ids[i]!r} is not in the images table", file=source, row=f"row {i}",
                         field="image_id")
    xyxy = detections[list(BOX_COLUMNS)].to_numpy(np.float64)
    # distinct (image, box) pairs: the refiner is class-agnostic, so rows sharing a box share its refinement
    key = pd.DataFrame({"img": pos, "x0": xyxy[:, 0], "y0": xyxy[:, 1], "x1": xyxy[:, 2], "y1": xyxy[:, 3]})
    codes, uniq = pd.factorize(pd.MultiIndex.from_frame(key))
    uniq = uniq.to_frame(index=False).to_numpy()
    u_img = uniq[:, 0].astype(np.int64)
    u_box = uniq[:, 1:].astype(np.float64)
    refined = u_box.copy()
    order = np.argsort(u_img, kind="stable")
    img_list = np.unique(u_img)
    bounds = np.searchsorted(u_img[order], np.append(img_list, np.iinfo(np.int64).max))
    paths = images["path"].astype(str).to_numpy(dtype=object)
    for s in range(0, len(img_list), batch_size):
        chunk = range(s, min(s + batch_size, len(img_list)))
        imgs, sel, boxes = [], [], []
        for j in chunk:
            try:
                im = load_image(paths[img_list[j]]).to(device)
            except InputError as exc:
                first = int(np.flatnonzero(pos == img_list[j])[0])
                raise InputError(f"image {ids[first]!r}: {exc}", file=source, row=f"row {first}",
                                 field="image_id") from exc
            h, w = im.shape[-2:]
            rows = order[bounds[j]:bounds[j + 1]]
            imgs.append(im)
            sel.append(rows)
            boxes.append(torch.as_tensor(u_box[rows] * np.array([w, h, w, h]), dtype=torch.float32, device=device))
        outs = refiner.refine(imgs, boxes)
        for im, rows, b in zip(imgs, sel, outs):
            h, w = im.shape[-2:]
            refined[rows] = b.double().cpu().numpy() / np.array([w, h, w, h])
    np.clip(refined, 0.0, 1.0, out=refined)
    bad = (refined[:, 2] <= refined[:, 0]) | (refined[:, 3] <= refined[:, 1]) | ~np.isfinite(refined).all(1)
    refined[bad] = u_box[bad]
    new = refined[codes]
    for k, c in enumerate(BOX_COLUMNS):
        out[c] = new[:, k]
    return out


@dataclass(frozen=True)
class MatchedIoU:
    """Detections matched to ground truth of their label at IoU >= the threshold: their mean IoU, how many
    matched and how many (non group-of) ground-truth boxes there were."""

    mean_iou: float
    n_matched: int
    n_gt: int


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes a (N, 4) x b (M, 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def matched_iou(detections: pd.DataFrame, boxes: pd.DataFrame, *, iou_thr: float = 0.5,
                hierarchy: Hierarchy | None = None, image_ids: Sequence[str] | None = None) -> MatchedIoU:
    """Mean IoU of the detections matched to ground truth of their label: per (image, label), detections in
    descending score order each take the unmatched ground-truth box of highest IoU, if that IoU is at least
    ``iou_thr`` (one match per ground-truth box). Group-of boxes are left out. ``hierarchy``: the ground truth
    is expanded up it first (a box of a class is also one of each ancestor, as the metric does); ``image_ids``:
    only these images (of both tables). Normalised xyxy in both tables."""
    gt = boxes[~boxes["is_group_of"].astype(bool)][["image_id", "label", *BOX_COLUMNS]]
    dets = detections[["image_id", "label", "score", *BOX_COLUMNS]]
    if image_ids is not None:
        keep = set(image_ids)
        gt, dets = gt[gt["image_id"].isin(keep)], dets[dets["image_id"].isin(keep)]
    gt = gt.astype({"image_id": object, "label": object})
    if hierarchy is not None:
        pairs = hierarchy.expansion_pairs(up=True)
        gt = gt.merge(pairs, on="label", how="left")
        gt["label"] = gt["expanded"].fillna(gt["label"])
        gt = gt.drop(columns="expanded").drop_duplicates()
    dets = dets.astype({"image_id": object, "label": object}).sort_values("score", ascending=False, kind="stable")
    gt_groups = {k: g[list(BOX_COLUMNS)].to_numpy(np.float64) for k, g in gt.groupby(["image_id", "label"])}
    ious = []
    for k, d in dets.groupby(["image_id", "label"], sort=False):
        g = gt_groups.get(k)
        if g is None:
            continue
        m = _iou(d[list(BOX_COLUMNS)].to_numpy(np.float64), g)
        free = np.ones(len(g), bool)
        for row in m:
            cand = np.where(free, row, -1.0)
            j = int(cand.argmax())
            if cand[j] >= iou_thr:
                free[j] = False
                ious.append(cand[j])
            if not free.any():
                break
    return MatchedIoU(float(np.mean(ious)) if ious else float("nan"), len(ious), len(gt))


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.refine", description=__doc__.split("\n\n")[0])
    p.add_argument("--refiner", type=Path, required=True, help="refiner.pt (stages.train_refiner)")
    p.add_argument("--detections", type=Path, required=True, help="detections parquet to refine")
    p.add_argument("--images", type=Path, required=True,
                   help="images table (images.parquet, or test_images.parquet for the test detections)")
    p.add_argument("--splits", type=Path, help="splits table; with --split only that split's images are looked up")
    p.add_argument("--split", default=None)
    p.add_argument("--shard", type=int, default=0, help="image shard index (with --shards)")
    p.add_argument("--shards", type=int, default=1,
                   help="image shards (sorted ids, round robin; as stages.infer): refine the shard's images only")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--threads", type=int, default=schema_default("refiner", "threads"))
    p.add_argument("--batch-size", type=int, default=schema_default("infer", "batch_size"),
                   help="images per forward pass")
    p.add_argument("--out", type=Path, required=True, help="refined detections parquet")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = select_device(a.device)
    refiner, meta = load_refiner(a.refiner, device)
    images = read_table(a.images, "images")
    if a.split is not None:
        if a.splits is None:
            raise InputError("--split needs --splits", field="--splits")
        splits = read_table(a.splits, "splits")
        images = images[images["image_id"].isin(set(splits.loc[splits["split"] == a.split, "image_id"]))]
    dets = read_table(a.detections, "detections")
    if not 0 <= a.shard < a.shards:
        raise InputError(f"--shard {a.shard} is not in [0, --shards {a.shards})", field="--shard")
    if a.shards > 1:
        mine = set(shard(images, a.shard, a.shards)["image_id"]) | (set(dets["image_id"]) - set(images["image_id"]))
        dets = dets[dets["image_id"].isin(mine)].reset_index(drop=True)   # unknown ids stay: they are an error
    t0 = time.time()
    out = refine_detections(refiner=refiner, detections=dets, images=images, device=device,
                            batch_size=a.batch_size, source=a.detections)
    dt = time.time() - t0
    write_table(a.out, out, "detections",
                provenance={"stage": "refine", "refiner": str(a.refiner), "refiner_config_hash":
                            meta.get("config_hash"), "detections": str(a.detections), "split": a.split})
    n_img = dets["image_id"].nunique()
    moved = float(np.abs(out[list(BOX_COLUMNS)].to_numpy() - dets[list(BOX_COLUMNS)].to_numpy()).mean()) \
        if len(dets) else 0.0
    print(f"refine: {len(dets)} detections on {n_img} images, {n_img / max(dt, 1e-9):.1f} images/s, "
          f"mean coordinate shift {moved:.4f} -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
