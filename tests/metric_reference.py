"""A slow, obvious, per-image reference of the OpenImages Challenge detection metric (tests and benchmarks).

It follows the official TF Object Detection API evaluator step by step: expand the ground truth row by row,
loop over images in sorted id order, over classes, over detections and boxes with scalar arithmetic. Not for
production use: it is here to be obviously right, not fast.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.formats.hierarchy import Hierarchy


def _overlaps(d, g):
    """Scalar IoU and intersection-over-detection-area of yxyx boxes, in the official operation order."""
    ih = max(0.0, min(d[2], g[2]) - max(d[0], g[0]))
    iw = max(0.0, min(d[3], g[3]) - max(d[1], g[1]))
    inter = ih * iw
    a_det = (d[2] - d[0]) * (d[3] - d[1])
    a_gt = (g[2] - g[0]) * (g[3] - g[1])
    return inter / (a_det + a_gt - inter), inter / a_det


def _argmax(values):
    best = 0
    for j, v in enumerate(values):
        if v > values[best]:
            best = j
    return best


def reference_ap(scores, labels, num_gt):
    if num_gt == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(np.asarray(scores, dtype=np.float64))[::-1]
    tp = fp = 0.0
    precision, recall = [], []
    for i in order:
        if labels[i] > 0:
            tp += labels[i]
        else:
            fp += 1.0
        precision.append(tp / (tp + fp))
        recall.append(tp / num_gt)
    r = [0.0] + recall + [1.0]
    p = [0.0] + precision + [0.0]
    for i in range(len(p) - 2, -1, -1):
        p[i] = max(p[i], p[i + 1])
    terms = np.array([(r[i] - r[i - 1]) * p[i] for i in range(1, len(r)) if r[i] != r[i - 1]])
    return float(np.sum(terms))


def reference_evaluate(*, boxes: pd.DataFrame, image_labels: pd.DataFrame, hierarchy: Hierarchy,
                       classes: pd.DataFrame, detections: pd.DataFrame, iou_thr: float = 0.5) -> dict:
    """Returns {"mAP": float, "ap": {label: ap (nan without gt)}, "num_gt": {label: n}}."""
    labels = list(classes["label"])
    known = set(labels)
    cidx = {lab: i for i, lab in enumerate(labels)}
    gt: dict[str, list] = {}
    verified: dict[str, set] = {}
    for r in boxes.itertuples(index=False):
        for lab in [r.label] + sorted(a for a in hierarchy.ancestors(r.label) if a in known):
            gt.setdefault(r.image_id, []).append(
                (cidx[lab], (r.y_min, r.x_min, r.y_max, r.x_max), bool(r.is_group_of)))
    for r in image_labels.itertuples(index=False):
        rel = hierarchy.ancestors(r.label) if r.confidence == 1 else hierarchy.descendants(r.label)
        for lab in [r.label] + [a for a in rel if a in known]:
            verified.setdefault(r.image_id, set()).add(cidx[lab])
    num_gt = [0.0] * len(labels)
    for rows in gt.values():
        for c, _, _ in rows:
            num_gt[c] += 1
    dets_by_image: dict[str, list] = {}
    for r in detections.itertuples(index=False):
        dets_by_image.setdefault(r.image_id, []).append(r)
    per_class_scores: list[list] = [[] for _ in labels]
    per_class_tp: list[list] = [[] for _ in labels]
    for image in sorted(set(gt) | set(verified)):
        rows = gt.get(image, [])
        evaluable = verified.get(image, set()) | {c for c, _, _ in rows}
        dets = [d for d in dets_by_image.get(image, [])
                if d.label in cidx and cidx[d.label] in evaluable and d.x_min < d.x_max and d.y_min < d.y_max
                and d.score > -10.0]
        for c in range(len(labels)):
            cd = [d for d in dets if cidx[d.label] == c]
            if not cd:
                continue
            sc = np.array([d.score for d in cd], dtype=np.float64)
            order = np.argsort(sc)[::-1][:10000]
            cd = [cd[i] for i in order]
            dbox = [(d.y_min, d.x_min, d.y_max, d.x_max) for d in cd]
            normal = [b for cc, b, g in rows if cc == c and not g]
            groups = [b for cc, b, g in rows if cc == c and g]
            tp = [False] * len(cd)
            in_group = [False] * len(cd)
            taken = [False] * len(normal)
            if normal:
                for i, db in enumerate(dbox):
                    ious = [_overlaps(db, g)[0] for g in normal]
                    j = _argmax(ious)
                    if ious[j] >= iou_thr and not taken[j]:
                        tp[i] = True
                        taken[j] = True
            group_score = [0.0] * len(groups)
            if groups:
                for i, db in enumerate(dbox):
                    ioas = [_overlaps(db, g)[1] for g in groups]
                    j = _argmax(ioas)
                    if not tp[i] and ioas[j] >= iou_thr:
                        in_group[i] = True
                        group_score[j] = max(group_score[j], cd[i].score)
            for i, d in enumerate(cd):
                if not in_group[i]:
                    per_class_scores[c].append(d.score)
                    per_class_tp[c].append(1.0 if tp[i] else 0.0)
            for s in group_score:
                if s > 0:
                    per_class_scores[c].append(s)
                    per_class_tp[c].append(1.0)
    ap = {lab: reference_ap(per_class_scores[c], per_class_tp[c], num_gt[c]) for c, lab in enumerate(labels)}
    vals = [v for v in ap.values() if not np.isnan(v)]
    return {"mAP": float(np.mean(vals)) if vals else float("nan"), "ap": ap,
            "num_gt": dict(zip(labels, num_gt))}
