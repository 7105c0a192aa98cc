"""Score detections (or instance masks) with the OpenImages Challenge metric.

Raw OpenImages files or canonical tables, chosen by file extension::

    python -m stages.evaluate --boxes bbox.csv|boxes.parquet --image-labels human-imagelabels.csv|.parquet \\
        --hierarchy hierarchy.json|hierarchy.parquet --classes classes-description.csv|classes.parquet \\
        --predictions submission.csv|detections.parquet --out metrics.json \\
        [--split-ids splits.parquet --split val_a] [--expanded] [--iou-thr 0.5]

Segmentation: ``--masks segmentation.csv --mask-dir <png dir>``, or ``--gt-masks gt_masks.parquet`` (the table
:mod:`stages.ingest_masks` writes: the masks as RLE, no PNG read again), and a segmentation submission (CSV) or a
``masks`` parquet as ``--predictions``; ``--boxes`` is then optional (its boxes without a mask are ignored
regions). ``--classes``/``--hierarchy`` may be the segmentable ones (``seg_classes.parquet``,
``seg_hierarchy.parquet`` or the challenge's files): in segmentation mode, image labels, boxes and predictions of
other classes are left out (counted in the log); the ground-truth masks must all be of the given classes.
Prints a one-line summary; writes JSON ``{"mAP", "per_class": {MID: {name, ap, n_gt, n_det, n_tp}},
"counts"}``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats import openimages as oi
from stages.formats.experts import read_experts
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import read_table, write_json
from stages.formats.readers import read_boxes, read_classes, read_image_labels, read_predictions, split_image_ids
from stages.formats.tables import check_boxes, check_labels
from stages.metrics.detection import IOU_THR, MetricResult, evaluate_detections, prepare_ground_truth

log = logging.getLogger(__name__)


def _read_gt_masks(masks_csv: str, mask_dir: str, known: set[str], sizes: dict[str, tuple[int, int]]
                   ) -> tuple[pd.DataFrame, list[dict]]:
    """segmentation.csv + PNG masks -> boxes with masks and their RLE at the predicted image size."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    mb = oi.read_masks_csv(masks_csv, known_labels=known)
    rles = []
    for i, (img, rel) in enumerate(zip(mb["image_id"], mb["mask_path"])):
        p = Path(mask_dir) / rel
        try:
            im = Image.open(p)
        except (FileNotFoundError, OSError) as exc:
            raise InputError(f"cannot read mask PNG {str(p)!r}: {exc}", file=masks_csv, row=i + 2,
                             field="MaskPath") from exc
        if img in sizes and im.size != (sizes[img][1], sizes[img][0]):
            im = im.resize((sizes[img][1], sizes[img][0]), Image.NEAREST)
        m = np.asarray(im.convert("L")) > 0
        rles.append(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
    return mb, rles


def _resize_rle(counts: str | bytes, height: int, width: int, to: tuple[int, int]) -> dict:
    """A mask RLE resized to ``to`` = (height, width), nearest neighbour (as a PNG mask is in
    :func:`_read_gt_masks`)."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    from stages.metrics.segmentation import rle_from_row

    m = mask_utils.decode(rle_from_row(counts, height, width))
    m = np.asarray(Image.fromarray(m * 255).resize((to[1], to[0]), Image.NEAREST)) > 0
    return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))


def _read_gt_mask_table(path: str, known: set[str], sizes: dict[str, tuple[int, int]],
                        image_ids: np.ndarray | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """The ``gt_masks`` parquet (:mod:`stages.ingest_masks`) -> boxes with masks and their RLE at the predicted
    image size (a mask of another size is resized, as :func:`_read_gt_masks` resizes a PNG)."""
    from stages.metrics.segmentation import rle_from_row

    gm = read_table(path, "gt_masks", image_ids=image_ids)
    check_labels(gm["label"], known, source=path)
    check_boxes(gm, source=path)
    rles = []
    for img, c, h, w in zip(gm["image_id"], gm["rle"], gm["mask_height"], gm["mask_width"]):
        want = sizes.get(img)
        rles.append(rle_from_row(c, h, w) if want is None or want == (h, w) else _resize_rle(c, h, w, want))
    gm["is_group_of"] = False
    return gm, rles


def _only_classes(df: pd.DataFrame, known: set[str], what: str, source: object) -> pd.DataFrame:
    """``df``'s rows of the ``known`` classes (segmentation scores a subset of the detection classes)."""
    keep = df["label"].isin(known).to_numpy()
    if keep.all():
        return df
    log.info("%s: %d %s of %d classes outside --classes left out", source, int((~keep).sum()), what,
             df["label"][~keep].nunique())
    out = df[keep].reset_index(drop=True)
    for col in ("image_id", "label"):
        if isinstance(out[col].dtype, pd.CategoricalDtype):
            out[col] = out[col].cat.remove_unused_categories()
    return out


def _merge_mask_boxes(mask_boxes: pd.DataFrame, rles: list[dict], boxes: pd.DataFrame | None
                      ) -> tuple[pd.DataFrame, list[dict | None]]:
    """Instances = mask rows, plus the boxes with no mask row at the same (image, label, coordinates)."""
    cols = ["image_id", "label", "x_min", "y_min", "x_max", "y_max", "is_group_of"]
    if boxes is None or not len(boxes):
        return mask_boxes[cols].reset_index(drop=True), list(rles)
    k = ["image_id", "label", "x_min", "y_min", "x_max", "y_max"]
    with_mask = pd.MultiIndex.from_frame(mask_boxes[k])
    extra = boxes[~pd.MultiIndex.from_frame(boxes[k]).isin(with_mask)]
    merged = pd.concat([mask_boxes[cols], extra[cols]], ignore_index=True)
    return merged, list(rles) + [None] * len(extra)


def mask_ground_truth(*, gt_masks: str | os.PathLike, boxes: pd.DataFrame | None, image_labels: pd.DataFrame,
                      hierarchy: Hierarchy, classes: pd.DataFrame, image_ids: np.ndarray | None = None,
                      sizes: dict[str, tuple[int, int]] | None = None, expanded: bool = False):
    """The segmentation ground truth of ``classes`` (the segmentable ones): the ``gt_masks`` parquet's masks
    (resized to ``sizes[image_id]`` where given and different), plus the boxes with no mask (ignored regions);
    image labels and boxes of other classes are left out."""
    from stages.metrics.segmentation import prepare_mask_ground_truth

    known = set(classes["label"])
    labels = _only_classes(image_labels, known, "image labels", gt_masks)
    mb, rles = _read_gt_mask_table(str(gt_masks), known, sizes or {}, image_ids)
    boxes = _only_classes(boxes, known, "boxes", gt_masks) if boxes is not None else None
    inst, inst_masks = _merge_mask_boxes(mb, rles, boxes)
    return prepare_mask_ground_truth(boxes=inst, image_labels=labels, hierarchy=hierarchy, classes=classes,
                                     masks=inst_masks, image_ids=image_ids, expanded=expanded)


def read_all_predictions(paths: Sequence[str], table: str, known: set[str] | None) -> pd.DataFrame:
    """The predictions of one or more files (image shards) as one table."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    parts = [read_predictions(p, known, table=table) for p in paths]
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


def evaluate_files(args: argparse.Namespace) -> MetricResult:
    classes = read_classes(args.classes)
    known = set(classes["label"])
    hierarchy = Hierarchy.read(args.hierarchy, labels=classes["label"])
    image_ids = split_image_ids(args.split_ids, args.split) if args.split_ids else None
    if args.masks or args.gt_masks:
        from stages.metrics.segmentation import evaluate_masks, prepare_mask_ground_truth

        labels = _only_classes(read_image_labels(args.image_labels, None, image_ids), known, "image labels",
                               args.image_labels)
        preds = _only_classes(read_all_predictions(args.predictions, "masks", None), known, "predictions",
                              args.predictions)
        sizes = {img: (int(h), int(w)) for img, h, w in
                 zip(preds["image_id"], preds["mask_height"], preds["mask_width"])}
        boxes = read_boxes(args.boxes, None, image_ids) if args.boxes else None
        if args.gt_masks:
            gt = mask_ground_truth(gt_masks=args.gt_masks, boxes=boxes, image_labels=labels, hierarchy=hierarchy,
                                   classes=classes, image_ids=image_ids, sizes=sizes, expanded=args.expanded)
            return evaluate_masks(gt=gt, masks=preds, iou_thr=args.iou_thr)
        mb, rles = _read_gt_masks(args.masks, args.mask_dir, known, sizes)
        boxes = _only_classes(boxes, known, "boxes", args.boxes) if boxes is not None else None
        inst, inst_masks = _merge_mask_boxes(mb, rles, boxes)
        gt = prepare_mask_ground_truth(boxes=inst, image_labels=labels, hierarchy=hierarchy, classes=classes,
                                       masks=inst_masks, image_ids=image_ids, expanded=args.expanded)
        return evaluate_masks(gt=gt, masks=preds, iou_thr=args.iou_thr)
    labels = read_image_labels(args.image_labels, known, image_ids)
    boxes = read_boxes(args.boxes, known, image_ids)
    preds = read_all_predictions(args.predictions, "detections", known)
    gt = prepare_ground_truth(boxes=boxes, image_labels=labels, hierarchy=hierarchy, classes=classes,
                              image_ids=image_ids, expanded=args.expanded)
    return evaluate_detections(gt=gt, detections=preds, iou_thr=args.iou_thr)


def restrict_classes(result: MetricResult, labels: Sequence[str], *, source: object = None) -> MetricResult:
    """``result`` over ``labels`` only (an expert model's trained classes): the other classes' rows are dropped,
    not scored as AP 0, and the mAP is the mean over the kept classes with ground truth."""
    keep = result.per_class["label"].isin(set(labels))
    unknown = sorted(set(labels) - set(result.per_class["label"]))
    if unknown:
        raise InputError(f"class {unknown[0]!r} is not in the class list", file=source, field="targets")
    pc = result.per_class[keep].reset_index(drop=True)
    ap = pc["ap"].to_numpy(np.float64)
    m = float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")
    counts = {**result.counts, "n_classes_with_gt": int(np.isfinite(ap).sum())}
    return MetricResult(map=m, per_class=pc, counts=counts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--boxes", help="boxes: challenge bbox CSV or boxes parquet (required unless --masks or "
                   "--gt-masks)")
    p.add_argument("--image-labels", required=True, help="human-imagelabels CSV or image_labels parquet")
    p.add_argument("--hierarchy", required=True, help="hierarchy JSON or hierarchy parquet (child, parent)")
    p.add_argument("--classes", required=True, help="class descriptions CSV (MID,name) or classes parquet")
    p.add_argument("--predictions", required=True, nargs="+",
                   help="submission CSV or detections parquet (segmentation: submission CSV or masks parquet)")
    p.add_argument("--out", required=True, help="metrics JSON to write")
    p.add_argument("--split-ids", help="splits parquet (image_id, split): score only --split's images")
    p.add_argument("--split", help="split name within --split-ids, e.g. val_a")
    p.add_argument("--masks", help="segmentation: challenge segmentation CSV (MaskPath, ImageID, LabelName, ...)")
    p.add_argument("--mask-dir", help="segmentation: directory holding the MaskPath PNGs")
    p.add_argument("--gt-masks", help="segmentation: gt_masks parquet (stages.ingest_masks) instead of "
                   "--masks/--mask-dir")
    p.add_argument("--expanded", action="store_true",
                   help="ground truth is already hierarchy-expanded (do not expand again)")
    p.add_argument("--iou-thr", type=float, default=IOU_THR)
    p.add_argument("--only-classes", type=Path, metavar="EXPERTS_JSON",
                   help="score only these classes (stages.experts output: an expert's targets and negatives); "
                        "the others are left out, not scored as AP 0")
    a = p.parse_args(argv)
    if bool(a.split_ids) != bool(a.split):
        p.error("--split-ids and --split go together")
    if bool(a.masks) != bool(a.mask_dir):
        p.error("--masks and --mask-dir go together")
    if a.masks and a.gt_masks:
        p.error("--gt-masks replaces --masks/--mask-dir: give one of them")
    if not a.masks and not a.gt_masks and not a.boxes:
        p.error("--boxes is required (unless --masks or --gt-masks)")
    return a


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = evaluate_files(args)
    if args.only_classes:
        result = restrict_classes(result, read_experts(args.only_classes), source=args.only_classes)
    write_json(args.out, result.to_json())
    print(result.summary())


if __name__ == "__main__":
    raise SystemExit(main())
