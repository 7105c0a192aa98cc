"""The naive ensemble (MMfruit §4.1): PFDet per-class AP re-weighting, top-k voting, then adj-NMS.

Re-weighting (PFDet): a detection of class ``c`` by model ``m`` gets

    score' = score * AP[m, c] / max_m' AP[m', c]

where ``AP[m, c]`` is model ``m``'s validation AP for ``c``. The best model for a class keeps its scores, the
others are scaled down in proportion. Where the factor is undefined it is 1: the class is missing from a
model's AP file or its AP is NaN (no evidence about that model: no change), or every model has AP 0.

Top-k voting: each box ``P`` of the pooled set (same image and class) looks at the ``k`` boxes ``P_i`` *of the
other models* with the highest IoU to it (IoU > ``min_iou``; which of several boxes tied
at the k-th place votes is unspecified) and becomes

    S = S_P + score_weight * sum_i S_Pi                         (score_weight = 0.05)
    B = box_weight * B_P + (1 - box_weight) / k' * sum_i B_Pi   (box_weight = 0.7, k' = neighbours found <= k)

(with ``k'`` = ``k`` = 4 this is the paper's ``B = 0.7 B_P + 0.3/k sum B_Pi``; a box with no neighbour is
unchanged, ``k = 0`` is the identity). Boxes of the same model do not vote for each other, so a one-model
ensemble is exactly that model's post-processing (``suppress`` with the same method and thresholds).
The voted pool then goes through adj-NMS (or the chosen :data:`~stages.ops.nms.METHODS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from stages.formats.tables import BOX_COLUMNS
from stages.ops.boxes import box_iou
from stages.ops.nms import _codes, _default_device, group_blocks, group_ids, suppress_tensors, take_sorted


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
    """``score * factors[label]`` (1 for labels without a factor)."""
    f = dets["label"].map(dict(factors)).astype(np.float64).fillna(1.0).to_numpy()
    return dets.assign(score=dets["score"].to_numpy(np.float64) * f)


def topk_vote(boxes: Tensor, scores: Tensor, groups: Tensor, sources: Tensor, *, k: int = 4,
              score_weight: float = 0.05, box_weight: float = 0.7, min_iou: float = 0.0) -> tuple[Tensor, Tensor]:
    """Top-k voting (see module doc) over ``boxes [M, 4]`` xyxy, ``scores [M]``, ``groups [M]`` (image, class)
    and ``sources [M]`` (model index: only other sources vote). Returns ``(new_boxes [M, 4], new_scores [M])``
    in input order; every box is kept.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, not {k}")
    new_b, new_s = boxes.clone(), scores.clone()
    if k == 0:
        return new_b, new_s
    for idx in group_blocks(groups, scores, square=True):
        g, n = idx.shape
        if n == 1:
            continue
        b = boxes[idx]
        src = sources[idx]
        iou = box_iou(b, b)
        iou = iou.masked_fill(src[:, :, None] == src[:, None, :], -1.0)    # self and same model: no vote
        vals, nb = torch.topk(iou, min(k, n), dim=-1)                        # [G, N, k]
        kk = vals.shape[-1]
        valid = (vals > min_iou).to(b.dtype)
        cnt = valid.sum(-1)                                                  # [G, N]
        s = scores[idx]
        s_nb = s.gather(1, nb.reshape(g, -1)).view(g, n, kk)
        new_s[idx] = s + score_weight * (s_nb * valid).sum(-1)
        b_nb = b.gather(1, nb.reshape(g, -1, 1).expand(g, n * kk, 4)).view(g, n, kk, 4)
        mean_nb = (b_nb * valid[..., None]).sum(2) / cnt.clamp(min=1)[..., None]
        voted = box_weight * b + (1.0 - box_weight) * mean_nb
        new_b[idx] = torch.where((cnt > 0)[..., None], voted, b)
    return new_b, new_s


def vote(dets: pd.DataFrame, sources: np.ndarray, *, k: int = 4, score_weight: float = 0.05,
         box_weight: float = 0.7, min_iou: float = 0.0, device: str | torch.device | None = None) -> pd.DataFrame:
    """:func:`topk_vote` on a pooled ``detections`` table; ``sources[i]`` is row ``i``'s model index."""
    if len(dets) == 0 or k == 0:
        return dets.copy()
    dev = torch.device(device) if device is not None else _default_device()
    boxes = torch.from_numpy(dets[list(BOX_COLUMNS)].to_numpy(np.float64)).to(dev)
    scores = torch.from_numpy(dets["score"].to_numpy(np.float64)).to(dev)
    groups = torch.from_numpy(group_ids(dets["image_id"], dets["label"])).to(dev)
    src = torch.from_numpy(np.asarray(sources, dtype=np.int64)).to(dev)
    nb, ns = topk_vote(boxes, scores, groups, src, k=k, score_weight=score_weight, box_weight=box_weight,
                       min_iou=min_iou)
    out = dets.copy()
    out[list(BOX_COLUMNS)] = nb.cpu().numpy()
    out["score"] = ns.cpu().numpy()
    return out


def naive_ensemble(dets_per_model: Sequence[pd.DataFrame], *,
                   ap_per_model: Sequence[Mapping[str, float | None]] | None = None,
                   k: int = 4, score_weight: float = 0.05, box_weight: float = 0.7, min_iou: float = 0.0,
                   method: str = "adj_nms", iou_thr: float = 0.5, sigma: float = 0.5, score_thr: float = 0.001,
                   device: str | torch.device | None = None) -> pd.DataFrame:
    """Re-weight each model by per-class AP (skipped when ``ap_per_model`` is None), pool, top-k vote across
    models (``k = 0`` skips it), then suppress with ``method`` (default adj-NMS). Returns a detections table
    sorted by image_id, score descending.
    """
    if not dets_per_model:
        raise ValueError("naive_ensemble needs at least one model's detections")
    if ap_per_model is not None and len(ap_per_model) != len(dets_per_model):
        raise ValueError(f"{len(dets_per_model)} detection tables but {len(ap_per_model)} AP tables")
    frames = list(dets_per_model)
    if ap_per_model is not None:
        frames = [reweight(d, f) for d, f in zip(frames, ap_factors(ap_per_model))]
    sources = np.concatenate([np.full(len(d), i, dtype=np.int64) for i, d in enumerate(frames)])
    pooled = pd.concat(frames, ignore_index=True)
    if len(pooled) == 0:
        return pooled
    dev = torch.device(device) if device is not None else _default_device()
    boxes = torch.from_numpy(pooled[list(BOX_COLUMNS)].to_numpy(np.float64)).to(dev)
    scores = torch.from_numpy(pooled["score"].to_numpy(np.float64)).to(dev)
    img, gid = _codes(pooled)
    groups = torch.from_numpy(gid).to(dev)
    if k > 0:
        boxes, scores = topk_vote(boxes, scores, groups, torch.from_numpy(sources).to(dev), k=k,
                                  score_weight=score_weight, box_weight=box_weight, min_iou=min_iou)
    keep, new = suppress_tensors(boxes, scores, groups, method=method, iou_thr=iou_thr, sigma=sigma,
                                 score_thr=score_thr)
    return take_sorted(pooled, img, keep.cpu().numpy(), new.cpu().numpy(), boxes[keep].cpu().numpy())
