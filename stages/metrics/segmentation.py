"""The OpenImages Challenge instance-segmentation metric on COCO RLE masks (pycocotools), never decoding masks.

Same protocol as :mod:`stages.metrics.detection` (hierarchy expansion, evaluated classes per image, ordering,
greedy matching without fallback, group-of handling, VOC all-point AP), with the official evaluator's mask mode:

1. detections are matched by mask IoU >= 0.5 to ground-truth instances that have a mask (group-of instances
   with a mask by mask intersection over the detection's mask area);
2. ground-truth boxes without a mask (all group-of boxes in the challenge) are not in the ground-truth total;
   detections still unmatched that match one of them by box IoU (first claim per box) or box IoA (group-of)
   are ignored — neither true nor false positives.

Detection boxes are the boxes of the predicted masks (the ``masks`` table's x_min..y_max; the CLI derives them
from the RLE with ``pycocotools.mask.toBbox``). Masks are ``{"size": [h, w], "counts": bytes}`` COCO RLEs at
the image's resolution; mask IoU is computed on the run-length encoding by ``pycocotools.mask.iou``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from stages.formats.hierarchy import Hierarchy
from stages.metrics.detection import (
    IOU_THR,
    MetricResult,
    PreparedGroundTruth,
    best_overlap,
    first_claims,
    group_of_entries,
    per_class_ap,
    prepare_detections,
    prepare_ground_truth,
)


def rle_from_row(counts: str | bytes, height: int, width: int) -> dict:
    """The ``masks`` table's (rle, mask_height, mask_width) -> a pycocotools RLE object."""
    return {"size": [int(height), int(width)], "counts": counts.encode() if isinstance(counts, str) else counts}


def prepare_mask_ground_truth(*, boxes: pd.DataFrame, image_labels: pd.DataFrame, hierarchy: Hierarchy,
                              classes: pd.DataFrame, masks: Sequence[dict | None],
                              image_ids: Iterable[str] | None = None, expanded: bool = False
                              ) -> PreparedGroundTruth:
    """Like :func:`~stages.metrics.detection.prepare_ground_truth`, with ``masks[i]`` the RLE of ``boxes`` row i
    (``None`` for a box without a mask). The ground-truth total counts only instances with a mask."""
    arr = np.empty(len(masks), dtype=object)
    arr[:] = list(masks)
    gt = prepare_ground_truth(boxes=boxes, image_labels=image_labels, hierarchy=hierarchy, classes=classes,
                              image_ids=image_ids, expanded=expanded, box_payload={"mask": arr})
    has = np.array([m is not None for m in gt.extra["mask"]], dtype=bool)
    ghas = np.array([m is not None for m in gt.extra["group_mask"]], dtype=bool)
    keys = np.concatenate([gt.box_key[has], gt.group_key[ghas]])
    num_gt = np.bincount(keys % gt.n_classes, minlength=gt.n_classes).astype(np.float64)
    return PreparedGroundTruth(labels=gt.labels, names=gt.names, image_ids=gt.image_ids, num_gt=num_gt,
                               eval_keys=gt.eval_keys, box_key=gt.box_key, box=gt.box, group_key=gt.group_key,
                               group_box=gt.group_box, extra=dict(gt.extra, has_mask=has, group_has_mask=ghas))


def _best_mask_overlap(det_key: np.ndarray, det_rle: np.ndarray, gt_key: np.ndarray, gt_rle: np.ndarray,
                       crowd: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per detection: best mask IoU (``crowd``: intersection over the detection's mask area) with a ground-truth
    mask of the same key and that mask's index (first on a tie); one pycocotools call per (image, class)."""
    n = len(det_key)
    best = np.full(n, -np.inf)
    arg = np.full(n, -1, dtype=np.int64)
    if not len(gt_key) or not n:
        return best, arg
    keys, d_lo = np.unique(det_key, return_index=True)
    d_hi = np.append(d_lo[1:], n)
    g_lo = np.searchsorted(gt_key, keys, "left")
    g_hi = np.searchsorted(gt_key, keys, "right")
    for k in np.flatnonzero(g_hi > g_lo).tolist():
        a, b, ga, gb = int(d_lo[k]), int(d_hi[k]), int(g_lo[k]), int(g_hi[k])
        iou = np.asarray(mask_utils.iou(list(det_rle[a:b]), list(gt_rle[ga:gb]), [int(crowd)] * (gb - ga)))
        iou = iou.reshape(b - a, gb - ga)
        j = np.argmax(iou, axis=1)
        best[a:b] = iou[np.arange(b - a), j]
        arg[a:b] = ga + j
    return best, arg


def evaluate_masks(*, gt: PreparedGroundTruth, masks: pd.DataFrame, iou_thr: float = IOU_THR) -> MetricResult:
    """Score a ``masks`` table (detections columns + rle, mask_height, mask_width) against ground truth from
    :func:`prepare_mask_ground_truth`."""
    d = prepare_detections(gt=gt, detections=masks)
    counts_col = masks["rle"].to_numpy(dtype=object)[d.row]
    hh = masks["mask_height"].to_numpy()[d.row]
    ww = masks["mask_width"].to_numpy()[d.row]
    det_rle = np.empty(len(d.row), dtype=object)
    det_rle[:] = [rle_from_row(c, h, w) for c, h, w in zip(counts_col, hh, ww)]
    has, ghas = gt.extra["has_mask"], gt.extra["group_has_mask"]
    # stage 1: instances with masks
    m_iou, m_arg = _best_mask_overlap(d.key, det_rle, gt.box_key[has], gt.extra["mask"][has], crowd=False)
    tp = first_claims(m_iou >= iou_thr, m_arg)
    m_ioa, m_garg = _best_mask_overlap(d.key, det_rle, gt.group_key[ghas], gt.extra["group_mask"][ghas],
                                       crowd=True)
    in_group = ~tp & (m_ioa >= iou_thr)
    g_idx, g_score = group_of_entries(d.score, in_group, m_garg, int(ghas.sum()))
    # stage 2: boxes without masks only make detections ignored
    b_iou, b_arg = best_overlap(d.box, d.key, gt.box_key[~has], gt.box[~has], "iou")
    to_box = first_claims(~tp & ~in_group & (b_iou >= iou_thr), b_arg)
    b_ioa, _ = best_overlap(d.box, d.key, gt.group_key[~ghas], gt.group_box[~ghas], "ioa")
    in_box_group = ~tp & ~to_box & ~in_group & (b_ioa >= iou_thr)
    keep = ~in_group & ~to_box & ~in_box_group
    key = np.concatenate([d.key[keep], gt.group_key[ghas][g_idx]])
    score = np.concatenate([d.score[keep], g_score])
    lab = np.concatenate([tp[keep].astype(np.float64), np.ones(len(g_idx))])
    o = np.argsort(key, kind="stable")
    ap, ntp = per_class_ap(entry_key=key[o], entry_score=score[o], entry_tp=lab[o], n_classes=gt.n_classes,
                           num_gt=gt.num_gt)
    n_det = np.bincount(d.key % gt.n_classes, minlength=gt.n_classes)
    per_class = pd.DataFrame({"label": gt.labels, "name": gt.names, "ap": ap, "n_gt": gt.num_gt.astype(np.int64),
                              "n_det": n_det.astype(np.int64), "n_tp": ntp})
    with_gt = gt.num_gt > 0
    # the official evaluator takes np.nanmean over all classes (NaN = no ground truth): summing the same values
    # over the subset instead can differ in the last bit
    m = float(np.nanmean(ap)) if with_gt.any() else float("nan")
    counts = {"n_images": len(gt.image_ids), "n_classes": gt.n_classes, "n_classes_with_gt": int(with_gt.sum()),
              "n_gt": int(gt.num_gt.sum()), "n_gt_without_mask": int((~has).sum() + (~ghas).sum()),
              "n_det_input": d.n_input, "n_det_scored": len(d.key),
              "n_det_ignored": int((~keep).sum()), "n_tp": int(ntp.sum())}
    return MetricResult(map=m, per_class=per_class, counts=counts)
