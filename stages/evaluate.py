"""Score detections (or instance masks) with the OpenImages Challenge metric.

Raw OpenImages files or canonical tables, chosen by file extension::

    python -m stages.evaluate --boxes bbox.csv|boxes.parquet --image-labels human-imagelabels.csv|.parquet \\
        --hierarchy hierarchy.json|hierarchy.parquet --classes classes-description.csv|classes.parquet \\
        --predictions submission.csv|detections.parquet --out metrics.json \\
        [--split-ids splits.parquet --split val_a] [--expanded] [--iou-thr 0.5]

Segmentation: ``--masks segmentation.csv --mask-dir <png dir>`` and a segmentation submission (CSV) or a
``masks`` parquet as ``--predictions``; ``--boxes`` is then optional (its boxes without a mask are ignored
regions). Prints a one-line summary; writes JSON ``{"mAP", "per_class": {MID: {name, ap, n_gt, n_det, n_tp}},
"counts"}``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats import openimages as oi
from stages.formats.experts import read_experts
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import write_json
from stages.formats.readers import read_boxes, read_classes, read_image_labels, read_predictions, split_image_ids
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


def evaluate_files(args: argparse.Namespace) -> MetricResult:
    classes = read_classes(args.classes)
    known = set(classes["label"])
    hierarchy = Hierarchy.read(args.hierarchy, labels=classes["label"])
    image_ids = split_image_ids(args.split_ids, args.split) if args.split_ids else None
    labels = read_image_labels(args.image_labels, known, image_ids)
    if args.masks:
        from stages.metrics.segmentation import evaluate_masks, prepare_mask_ground_truth

        preds = read_predictions(args.predictions, known, table="masks")
        sizes = {img: (int(h), int(w)) for img, h, w in
                 zip(preds["image_id"], preds["mask_height"], preds["mask_width"])}
        mb, rles = _read_gt_masks(args.masks, args.mask_dir, known, sizes)
        boxes = read_boxes(args.boxes, known, image_ids) if args.boxes else None
        inst, inst_masks = _merge_mask_boxes(mb, rles, boxes)
        gt = prepare_mask_ground_truth(boxes=inst, image_labels=labels, hierarchy=hierarchy, classes=classes,
                                       masks=inst_masks, image_ids=image_ids, expanded=args.expanded)
        return evaluate_masks(gt=gt, masks=preds, iou_thr=args.iou_thr)
    boxes = read_boxes(args.boxes, known, image_ids)
    preds = read_predictions(args.predictions, known)
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
    p.add_argument("--boxes", help="boxes: challenge bbox CSV or boxes parquet (required unless --masks)")
    p.add_argument("--image-labels", required=True, help="human-imagelabels CSV or image_labels parquet")
    p.add_argument("--hierarchy", required=True, help="hierarchy JSON or hierarchy parquet (child, parent)")
    p.add_argument("--classes", required=True, help="class descriptions CSV (MID,name) or classes parquet")
    p.add_argument("--predictions", required=True,
                   help="submission CSV or detections parquet (segmentation: submission CSV or masks parquet)")
    p.add_argument("--out", required=True, help="metrics JSON to write")
    p.add_argument("--split-ids", help="splits parquet (image_id, split): score only --split's images")
    p.add_argument("--split", help="split name within --split-ids, e.g. val_a")
    p.add_argument("--masks", help="segmentation: challenge segmentation CSV (MaskPath, ImageID, LabelName, ...)")
    p.add_argument("--mask-dir", help="segmentation: directory holding the MaskPath PNGs")
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
    if not a.masks and not a.boxes:
        p.error("--boxes is required (unless --masks)")
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
