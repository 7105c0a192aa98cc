"""The naive ensemble (MMfruit §4.1): PFDet per-class AP re-weighting, top-k voting, then adj-NMS.

Re-weighting (PFDet): a detection of class ``c`` by model ``m`` gets

    score' = score * AP[m, c] / max_m' AP[m', c]

where ``AP[m, c]`` is model ``m``'s validation AP for ``c``. The best model for a class keeps its scores, the
others are scaled down in proportion. Where the factor is undefined it is 1: the class is missing from a
model's AP file or its AP is NaN (no evidence about that model: no change), or every model has AP 0.
A box whose factor is 0 (AP 0 where another model's is above 0) leaves the pool (:func:`reweight`): with no
score it would only pull the other models' boxes towards its own in the vote.

Top-k voting: each box ``P`` of the pooled set (same image and class) looks at the ``k`` boxes ``P_i`` *of the
other models* with the highest IoU to it (IoU > ``min_iou``; which of several boxes tied
at the k-th place votes is unspecified) and becomes

    S = S_P + score_weight * sum_i S_Pi                         (score_weight = 0.05)
    B = box_weight * B_P + (1 - box_weight) / k' * sum_i B_Pi   (box_weight = 0.7, k' = neighbours found <= k)

(with ``k'`` = ``k`` = 4 this is the paper's ``B = 0.7 B_P + 0.3/k sum B_Pi``; a box with no neighbour is
unchanged, ``k = 0`` is the identity). Boxes of the same model do not vote for each other, so a one-model
ensemble is exactly that model's post-processing (``suppress`` with the same method and thresholds).
The voted pool then goes through adj-NMS (or the chosen :data:`~stages.ops.nms.METHODS`).

Test-time views (``merge_views``): a model's detections inferred at several test scales and/or flipped (the
``scale`` and ``flip`` columns of the infer stage) are first merged per model, with the same operators as
across models (its views vote for each other, then the suppression), and the per-model results are then
ensembled across models. So a pool never holds more than one model's views, and every model comes into the
ensemble with one box per object, as a one-view model does. A model with one view comes in as it is; a
one-model ensemble is its view merge (one view: exactly its post-processing).

Bounds (``max_per_class``): before every vote and suppression only the ``max_per_class`` highest-scoring boxes
of each (image, class) of the pool take part (:func:`stages.ops.nms.cap_per_group`), so the pairwise
``[N, N]`` blocks stay bounded however many boxes the models propose for a crowded (parent) class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from stages.formats.columns import concat
from stages.formats.tables import BOX_COLUMNS
from stages.ops._array import (
    Array,
    arange_like,
    clamp_min,
    copy,
    default_backend,
    like,
    take_along,
    to_numpy,
    topk_indices,
    xp,
)
from stages.ops.boxes import box_iou
from stages.ops.nms import (
    cap_per_group,
    frame_arrays,
    frame_groups,
    group_blocks,
    group_ids,
    row_chunks,
    suppress_arrays,
    take_sorted,
)

#: the columns that tell a model's test-time views apart (written by the infer stage)
VIEW_COLUMNS = ("scale", "flip")


def ap_factors(ap_per_model: Sequence[Mapping[str, float | None]]) -> list[dict[str, float]]:
    """Per model, ``{label: AP[m, c] / max_m' AP[m', c]}`` for the labels where it is defined (see module doc)."""
    labels = sorted({c for aps in ap_per_model for c in aps})
    best = {}
    for c in labels:
        vals = [_ap(aps.get(c)) for aps in ap_per_model]
        vals = [v for v in vals if v is not None]
        best[c] = max(vals) if vals else 0.0
    out = []
    for aps in ap_per_model:
        f = {}
        for c in labels:
            v = _ap(aps.get(c))
            if v is not None and best[c] > 0:
                f[c] = v / best[c]
        out.append(f)
    return out


def _ap(v: object) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def reweight(dets: pd.DataFrame, factors: Mapping[str, float]) -> pd.DataFrame:
    """``score * factors[label]`` (1 for labels without a factor); rows left with no score (a factor of 0) are
    dropped: they would only pull the other models' boxes towards their own in the vote."""
    f = dets["label"].map(dict(factors)).astype(np.float64).fillna(1.0).to_numpy()
    score = dets["score"].to_numpy(np.float64) * f
    out = dets.assign(score=score)
    return out if (score > 0).all() else out[score > 0]


def topk_vote(boxes: Array, scores: Array, groups: Array, sources: Array, *, k: int = 4,
              score_weight: float = 0.05, box_weight: float = 0.7, min_iou: float = 0.0) -> tuple[Array, Array]:
    """Top-k voting (see module doc) over ``boxes [M, 4]`` xyxy, ``scores [M]``, ``groups [M]`` (image, class)
    and ``sources [M]`` (model index: only other sources vote); numpy arrays or torch tensors. Returns
    ``(new_boxes [M, 4], new_scores [M])`` in input order; every box is kept.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, not {k}")
    new_b, new_s = copy(boxes), copy(scores)
    if k == 0:
        return new_b, new_s
    m = xp(boxes)
    lay = group_blocks(groups, scores, square=True)
    perm = like(lay.perm, boxes)
    bp, sp, srcp = boxes[perm], scores[perm], sources[perm]
    vb, vs = copy(bp), copy(sp)
    for off, g, n in lay.spans:
        if n == 1:
            continue
        b, s, src = lay.views(bp, off, g, n), lay.views(sp, off, g, n), lay.views(srcp, off, g, n)
        rows = arange_like(g, perm)[:, None, None]
        for r0, r1 in row_chunks(g, n):                                      # [G, R, N] IoU slices
            bc, sc = b[:, r0:r1], s[:, r0:r1]
            iou = box_iou(bc, b)
            iou[src[:, r0:r1, None] == src[:, None, :]] = -1.0               # self and same model: no vote
            nb = topk_indices(iou, k)                                        # [G, R, k']
            valid = take_along(iou, nb, 2) > min_iou
            cnt = valid.sum(-1)                                              # [G, R]
            lay.views(vs, off, g, n)[:, r0:r1] = sc + score_weight * m.where(valid, s[rows, nb], 0.0).sum(-1)
            mean_nb = m.where(valid[..., None], b[rows, nb], 0.0).sum(2) / clamp_min(cnt, 1)[..., None]
            voted = box_weight * bc + (1.0 - box_weight) * mean_nb
            lay.views(vb, off, g, n)[:, r0:r1] = m.where((cnt > 0)[..., None], voted, bc)
    new_b[perm], new_s[perm] = vb, vs
    return new_b, new_s


def vote(dets: pd.DataFrame, sources: np.ndarray, *, k: int = 4, score_weight: float = 0.05,
         box_weight: float = 0.7, min_iou: float = 0.0, device: object = None) -> pd.DataFrame:
    """:func:`topk_vote` on a pooled ``detections`` table; ``sources[i]`` is row ``i``'s model index."""
    if len(dets) == 0 or k == 0:
        return dets.copy()
    boxes, scores = frame_arrays(dets, default_backend(device))
    groups = like(group_ids(dets["image_id"], dets["label"]), scores)
    src = like(np.asarray(sources, dtype=np.int64), scores)
    nb, ns = topk_vote(boxes, scores, groups, src, k=k, score_weight=score_weight, box_weight=box_weight,
                       min_iou=min_iou)
    out = dets.copy()
    nb = to_numpy(nb)
    for j, c in enumerate(BOX_COLUMNS):
        out[c] = nb[:, j]
    out["score"] = to_numpy(ns)
    return out


def view_ids(dets: pd.DataFrame) -> tuple[np.ndarray, int]:
    """``(int64 view index per row, number of views)``: the distinct (``scale``, ``flip``) of a model's
    detections; one view when the table has neither column."""
    cols = [c for c in VIEW_COLUMNS if c in dets]
    if not cols or len(dets) == 0:
        return np.zeros(len(dets), dtype=np.int64), min(len(dets), 1)
    ids = dets.groupby(cols, sort=True, dropna=False, observed=True).ngroup().to_numpy(np.int64)
    return ids, int(ids.max()) + 1


def merge_pool(pooled: pd.DataFrame, sources: np.ndarray, *, k: int = 4, score_weight: float = 0.05,
               box_weight: float = 0.7, min_iou: float = 0.0, method: str = "adj_nms", iou_thr: float = 0.5,
               sigma: float = 0.5, score_thr: float = 0.001, max_per_class: int | None = None,
               device: object = None) -> pd.DataFrame:
    """One pool of detections from several ``sources`` (models, or one model's views): keep the
    ``max_per_class`` best per (image, class) (None: all), top-k vote across sources (``k = 0``: no vote), then
    suppress with ``method``. Returns a detections table sorted by image_id, score descending."""
    if len(pooled) == 0:
        return pooled.reset_index(drop=True)
    boxes, scores = frame_arrays(pooled, default_backend(device))
    img, n_img, gid = frame_groups(pooled)
    groups, src = like(gid, scores), like(np.asarray(sources, dtype=np.int64), scores)
    rows = None
    if max_per_class is not None:
        idx = cap_per_group(groups, scores, max_per_class=max_per_class)
        if len(idx) < len(scores):
            boxes, scores, groups, src, rows = boxes[idx], scores[idx], groups[idx], src[idx], to_numpy(idx)
    if k > 0:
        boxes, scores = topk_vote(boxes, scores, groups, src, k=k, score_weight=score_weight,
                                  box_weight=box_weight, min_iou=min_iou)
    keep, new = suppress_arrays(boxes, scores, groups, method=method, iou_thr=iou_thr, sigma=sigma,
                                score_thr=score_thr)
    keep = to_numpy(keep)
    kept_boxes = to_numpy(boxes)[keep]
    if rows is not None:
        keep = rows[keep]
    return take_sorted(pooled, img, keep, to_numpy(new), kept_boxes, n_img=n_img)


def naive_ensemble(dets_per_model: Sequence[pd.DataFrame], *,
                   ap_per_model: Sequence[Mapping[str, float | None]] | None = None,
                   k: int = 4, score_weight: float = 0.05, box_weight: float = 0.7, min_iou: float = 0.0,
                   method: str = "adj_nms", iou_thr: float = 0.5, sigma: float = 0.5, score_thr: float = 0.001,
                   max_per_class: int | None = None, merge_views: bool = True,
                   device: object = None) -> pd.DataFrame:
    """Re-weight each model by per-class AP (skipped when ``ap_per_model`` is None), merge each model's
    test-time views (``merge_views``; see module doc), pool, keep the ``max_per_class`` best per (image, class)
    (None: all), top-k vote across models (``k = 0`` skips it), then suppress with ``method`` (default adj-NMS).
    Returns a detections table sorted by image_id, score descending. ``device``: None = CUDA when available,
    else numpy on the CPU.
    """
    if not dets_per_model:
        raise ValueError("naive_ensemble needs at least one model's detections")
    if ap_per_model is not None and len(ap_per_model) != len(dets_per_model):
        raise ValueError(f"{len(dets_per_model)} detection tables but {len(ap_per_model)} AP tables")
    frames = list(dets_per_model)
    if ap_per_model is not None:
        frames = [reweight(d, f) for d, f in zip(frames, ap_factors(ap_per_model))]
    ops = dict(k=k, score_weight=score_weight, box_weight=box_weight, min_iou=min_iou, method=method,
               iou_thr=iou_thr, sigma=sigma, score_thr=score_thr, max_per_class=max_per_class, device=device)
    merged = False
    if merge_views:
        for i, d in enumerate(frames):
            views, n_views = view_ids(d)
            if n_views > 1:
                frames[i], merged = merge_pool(d, views, **ops), True
        if merged and len(frames) == 1:
            return frames[0]     # one model: its views are merged and suppressed already
    sources = np.concatenate([np.full(len(d), i, dtype=np.int64) for i, d in enumerate(frames)])
    return merge_pool(concat(frames), sources, **ops)
