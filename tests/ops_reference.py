"""Slow, obvious reference loops for the box ops (one box at a time, Python floats) and the mask ops (one
box at a time, on a full-image array)."""

from __future__ import annotations

import math

import numpy as np


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ioa(a, b) -> float:
    """Intersection over the area of ``a`` (0 for an empty ``a``)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    return iw * ih / area if area > 0 else 0.0


def _groups(groups):
    out: dict = {}
    for i, g in enumerate(groups):
        out.setdefault(int(g), []).append(i)
    return out


def nms(boxes, scores, groups, thr) -> set[int]:
    keep = set()
    for idx in _groups(groups).values():
        kept = []
        for i in sorted(idx, key=lambda i: (-scores[i], i)):
            if all(iou(boxes[i], boxes[j]) <= thr for j in kept):
                kept.append(i)
        keep |= set(kept)
    return keep


def soft_nms(boxes, scores, groups, *, method, thr=0.5, sigma=0.5, score_thr=0.001) -> dict[int, float]:
    out = {}
    for idx in _groups(groups).values():
        cur = {i: float(scores[i]) for i in idx}
        left = list(idx)
        while left:
            best = min(left, key=lambda i: (-cur[i], i))
            left.remove(best)
            for r in left:
                o = iou(boxes[best], boxes[r])
                if method == "gaussian":
                    cur[r] *= math.exp(-(o * o) / sigma)
                elif o > thr:
                    cur[r] *= 1 - o
        out.update({i: s for i, s in cur.items() if s > score_thr})
    return out


def vote(boxes, scores, groups, sources, *, k, score_weight=0.05, box_weight=0.7, min_iou=0.0):
    boxes = np.array(boxes, dtype=np.float64)
    nb, ns = boxes.copy(), np.array(scores, dtype=np.float64)
    for idx in _groups(groups).values():
        for p in idx:
            cands = [(iou(boxes[p], boxes[q]), q) for q in idx if sources[q] != sources[p]]
            cands = [c for c in cands if c[0] > min_iou]
            # the op takes equal IoUs in its score order (desc, then index)
            cands.sort(key=lambda c: (-c[0], -scores[c[1]], c[1]))
            top = [q for _, q in cands[:k]]
            if top:
                ns[p] = scores[p] + score_weight * sum(scores[q] for q in top)
                nb[p] = box_weight * boxes[p] + (1 - box_weight) * np.mean(boxes[top], axis=0)
    return nb, ns


def random_boxes(rng, n, *, grid=None):
    """n xyxy boxes in [0, 1]; on a 1/grid lattice (exact IoUs, many ties and threshold hits) when grid."""
    if grid:
        a = rng.integers(0, grid + 1, (n, 2, 2)) / grid
    else:
        a = rng.random((n, 2, 2))
    lo, hi = a.min(1), a.max(1)
    return np.concatenate([lo, hi], 1)


# ---------------------------------------------------------------- masks: full-image paste, one box at a time
def paste_prob(prob, box, height: int, width: int) -> np.ndarray:
    """The plain paste: the map resized to the box's pixels (centres inside ``[x_min * W, x_max * W)``, rows
    alike) and placed into a zeros image -> [height, width] float64."""
    from stages.ops.masks import resize_bilinear

    c0, c1 = math.ceil(box[0] * width - 0.5), math.ceil(box[2] * width - 0.5)
    r0, r1 = math.ceil(box[1] * height - 0.5), math.ceil(box[3] * height - 0.5)
    full = np.zeros((height, width), dtype=np.float64)
    if c1 > c0 and r1 > r0:
        full[r0:r1, c0:c1] = resize_bilinear(prob, r1 - r0, c1 - c0)
    return full


def paste_mask(prob, box, height: int, width: int, thr: float = 0.5) -> np.ndarray:
    """The pasted map thresholded (``> thr``) -> [height, width] bool."""
    return paste_prob(prob, box, height, width) > thr


def vote_mask(probs, box, height: int, width: int, *, vote: str, thr: float = 0.5) -> np.ndarray:
    """The vote of ``probs`` [M, h, w] at one box, on the full image -> [height, width] bool. ``mean``: the
    models' mean map (float64, summed in model order) pasted, > thr; ``majority``: more than half of the
    pasted masks."""
    probs = np.asarray(probs)
    if vote == "mean":
        mean = probs[0] if len(probs) == 1 else sum(p.astype(np.float64) for p in probs) / len(probs)
        return paste_mask(mean, box, height, width, thr)
    n = sum(paste_mask(p, box, height, width, thr).astype(np.int64) for p in probs)
    return 2 * n > len(probs)
