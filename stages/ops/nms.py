"""Batched NMS, soft-NMS (linear, gaussian) and adj-NMS over many (image, class) groups at once.

Boxes are ``xyxy`` tensors ``[M, 4]``; ``groups`` is an int64 tensor ``[M]`` (one id per image and class, e.g.
from :func:`group_ids`); boxes of different groups never interact. No Python loop per box: groups are laid
out as a padded ``[G, N]`` index matrix (groups of equal size share a matrix, so there is no padding), and the
sequential selection runs for all ``G`` groups at once, ``N`` steps of vector ops. Runs on the device of the
input tensors (CUDA when the caller puts them there).

Tie-breaking, everywhere: among equal scores the box with the lower input index is taken first.

Difference to ``ensemble_boxes.soft_nms``: that function returns the *original* scores of the boxes it keeps
(it only uses the decayed scores to decide which boxes survive ``thresh``). :func:`soft_nms` here returns the
*decayed* scores, which is what soft-NMS is for (the ranking changes); the kept boxes are the same (a box is
kept iff its decayed score is > ``score_thr``, as in ``ensemble_boxes``). ``ensemble_boxes`` also clips
coordinates to [0, 1] and drops zero-area boxes first; here such boxes are kept (IoU with them is 0).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from stages.formats.tables import BOX_COLUMNS
from stages.ops.boxes import box_iou

#: elements (groups x group size) per padded block; bounds memory independently of the input size
BLOCK_ELEMS = 1 << 19


def group_ids(image_ids: np.ndarray | pd.Series, labels: np.ndarray | pd.Series) -> np.ndarray:
    """One int64 id per distinct (image_id, label) pair, without a Python loop per row."""
    img, _ = pd.factorize(np.asarray(image_ids, dtype=object))
    lab, lab_u = pd.factorize(np.asarray(labels, dtype=object))
    return img.astype(np.int64) * max(len(lab_u), 1) + lab.astype(np.int64)


def group_blocks(groups: Tensor, scores: Tensor, *, block_elems: int = BLOCK_ELEMS,
                 square: bool = False) -> Iterator[Tensor]:
    """Yield index matrices ``[G, N]`` (int64 into the inputs) that cover every box exactly once.

    Each row holds one group, sorted by score descending (ties: lower index first). All groups of a block have
    the same size ``N``, so there is no padding. A block holds about ``block_elems`` elements (``G * N``, or
    ``G * N * N`` with ``square`` for ops that build a pairwise matrix per group).
    """
    m = groups.numel()
    if m == 0:
        return
    order = torch.argsort(-scores, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    # sort groups by size (stable) so equal sizes are contiguous; reorder the elements to match
    gorder = torch.argsort(counts, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    sizes = counts[gorder]
    elem = torch.repeat_interleave(starts[gorder], sizes) + _ranks(sizes)
    order = order[elem]
    uniq, ucounts = torch.unique_consecutive(sizes, return_counts=True)
    pos = 0
    for n, g in zip(uniq.tolist(), ucounts.tolist()):
        per = max(1, block_elems // (n * n if square else n))
        for a in range(0, g, per):
            b = min(g, a + per)
            yield order[pos + a * n: pos + b * n].view(b - a, n)
        pos += g * n


def _ranks(sizes: Tensor) -> Tensor:
    """``[0..s0-1, 0..s1-1, ...]`` for group sizes ``sizes``."""
    total = int(sizes.sum())
    starts = torch.cumsum(sizes, 0) - sizes
    return torch.arange(total, device=sizes.device) - torch.repeat_interleave(starts, sizes)


def _by_score(keep: Tensor, scores: Tensor) -> Tensor:
    """Sort kept indices by score descending, ties by index (the order ``torchvision.ops.nms`` returns)."""
    keep = keep.sort().values
    return keep[torch.argsort(-scores[keep], stable=True)]


def _nms_mask(o: Tensor, iou_thr: float) -> Tensor:
    """Kept mask ``[G, N]`` of hard NMS given the IoUs ``o [G, N, N]`` of score-sorted groups."""
    g, n = o.shape[:2]
    over = o > iou_thr
    suppressed = torch.zeros((g, n), dtype=torch.bool, device=o.device)
    kept = torch.zeros((g, n), dtype=torch.bool, device=o.device)
    for i in range(n):
        k = ~suppressed[:, i]
        kept[:, i] = k
        suppressed |= over[:, i, :] & k[:, None]
    return kept


def _soft_steps(cur: Tensor, done: Tensor, w: Tensor, score_thr: float) -> Tensor:
    """Soft-NMS selection over rows of ``cur [G, N]`` (boxes with ``done`` take no part) with pairwise
    weights ``w [G, N, N]``; returns the decayed scores. Ties: the lower column first."""
    g, n = cur.shape
    neg = torch.tensor(float("-inf"), dtype=cur.dtype, device=cur.device)
    for _ in range(n):
        best_s, best = torch.where(done, neg, cur).max(1)
        if not bool((best_s > score_thr).any()):
            break   # every box left is <= score_thr: it is dropped, and it could only decay lower ones
        done.scatter_(1, best[:, None], True)
        wi = w.gather(1, best[:, None, None].expand(g, 1, n)).squeeze(1)
        cur = torch.where(done, cur, cur * wi)
    return cur


def _weights(o: Tensor, method: str, iou_thr: float, sigma: float) -> Tensor:
    if method == "gaussian":
        return torch.exp(o.mul_(o).div_(-sigma))
    return torch.where(o > iou_thr, 1.0 - o, torch.ones_like(o))


def nms(boxes: Tensor, scores: Tensor, groups: Tensor, *, iou_thr: float = 0.5) -> Tensor:
    """Hard NMS per group: drop every box whose IoU with a higher-scoring kept box of its group is > ``iou_thr``.

    ``boxes [M, 4]`` xyxy, ``scores [M]``, ``groups [M]`` int64. Returns the int64 indices of the kept boxes,
    sorted by decreasing score (same contract as ``torchvision.ops.batched_nms``; a box at exactly
    ``iou_thr`` is kept, as there).
    """
    keep = []
    for idx in group_blocks(groups, scores, square=True):
        if idx.shape[1] == 1:
            keep.append(idx.view(-1))
            continue
        b = boxes[idx]
        keep.append(idx[_nms_mask(box_iou(b, b), iou_thr)])
    if not keep:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    return _by_score(torch.cat(keep), scores)


def soft_nms(boxes: Tensor, scores: Tensor, groups: Tensor, *, method: str = "gaussian", iou_thr: float = 0.5,
             sigma: float = 0.5, score_thr: float = 0.001) -> tuple[Tensor, Tensor]:
    """Soft-NMS per group (Bodla et al. 2017): repeatedly take the box with the highest *current* score and
    decay the others of its group by a weight of their IoU ``o`` with it:

    - ``method="gaussian"``: ``w = exp(-o**2 / sigma)`` (``iou_thr`` unused),
    - ``method="linear"``: ``w = 1 - o`` if ``o > iou_thr`` else 1.

    Returns ``(keep, new_scores)``: int64 indices of the boxes whose decayed score is > ``score_thr``, sorted
    by decreasing decayed score, and those decayed scores (``new_scores[i]`` belongs to ``keep[i]``). The
    scores are never raised. See the module docstring for the difference to ``ensemble_boxes.soft_nms``.
    """
    return _soft(boxes, scores, groups, method=method, iou_thr=iou_thr, sigma=sigma, score_thr=score_thr,
                 nms_first=None)


def adj_nms(boxes: Tensor, scores: Tensor, groups: Tensor, *, iou_thr: float = 0.5, sigma: float = 0.5,
            score_thr: float = 0.001) -> tuple[Tensor, Tensor]:
    """adj-NMS (MMfruit): hard NMS at ``iou_thr``, then gaussian soft-NMS re-weighting of the survivors,
    ``w = exp(-IoU**2 / sigma)``, dropping those whose decayed score is <= ``score_thr``.

    Same result as ``soft_nms`` (gaussian) on the boxes :func:`nms` keeps, computed in one pass (the IoUs of a
    group are built once). Returns ``(keep, new_scores)`` like :func:`soft_nms`; ``keep`` is always a subset of
    :func:`nms`'s.
    """
    return _soft(boxes, scores, groups, method="gaussian", iou_thr=iou_thr, sigma=sigma, score_thr=score_thr,
                 nms_first=iou_thr)


def _soft(boxes: Tensor, scores: Tensor, groups: Tensor, *, method: str, iou_thr: float, sigma: float,
          score_thr: float, nms_first: float | None) -> tuple[Tensor, Tensor]:
    if method not in ("gaussian", "linear"):
        raise ValueError(f"method must be 'gaussian' or 'linear', not {method!r}")
    if method == "gaussian" and sigma <= 0:
        raise ValueError(f"sigma must be > 0, not {sigma}")
    out = scores.clone()
    keep = []
    for idx in group_blocks(groups, scores, square=True):
        g, n = idx.shape
        cur = scores[idx]
        live = torch.ones((g, n), dtype=torch.bool, device=boxes.device)
        if n > 1:
            b = boxes[idx]
            o = box_iou(b, b)                                   # [G, N, N]
            if nms_first is not None:
                live = _nms_mask(o, nms_first)
            cur = _soft_steps(cur, ~live, _weights(o, method, iou_thr, sigma), score_thr)
        out[idx] = cur
        keep.append(idx[live & (cur > score_thr)])
    if not keep:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), scores[:0]
    k = _by_score(torch.cat(keep), out)
    return k, out[k]


METHODS = ("nms", "soft_nms", "soft_nms_linear", "adj_nms", "none")


def suppress(dets: pd.DataFrame, *, method: str = "adj_nms", iou_thr: float = 0.5, sigma: float = 0.5,
             score_thr: float = 0.001, device: str | torch.device | None = None) -> pd.DataFrame:
    """Apply one of :data:`METHODS` per (image_id, label) to a ``detections`` table.

    ``soft_nms`` is gaussian, ``soft_nms_linear`` linear. ``none`` only drops scores <= ``score_thr``.
    Returns the surviving rows (all columns kept) with their new scores, sorted by image_id then score
    descending. ``device`` defaults to CUDA when available.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if len(dets) == 0:
        return dets.reset_index(drop=True)
    dev = torch.device(device) if device is not None else _default_device()
    boxes = torch.from_numpy(dets[list(BOX_COLUMNS)].to_numpy(np.float64)).to(dev)
    scores = torch.from_numpy(dets["score"].to_numpy(np.float64)).to(dev)
    img, groups = _codes(dets)
    keep, new = suppress_tensors(boxes, scores, torch.from_numpy(groups).to(dev), method=method, iou_thr=iou_thr,
                                 sigma=sigma, score_thr=score_thr)
    return take_sorted(dets, img, keep.cpu().numpy(), new.cpu().numpy())


def _codes(dets: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(image codes in sorted image-id order, group ids per (image_id, label))."""
    img, _ = pd.factorize(dets["image_id"].to_numpy(), sort=True)
    lab, lab_u = pd.factorize(dets["label"].to_numpy())
    return img, img.astype(np.int64) * max(len(lab_u), 1) + lab


def take_sorted(dets: pd.DataFrame, img: np.ndarray, keep: np.ndarray, scores: np.ndarray,
                boxes: np.ndarray | None = None) -> pd.DataFrame:
    """Rows ``keep`` of ``dets`` with new ``scores`` (and ``boxes [len(keep), 4]``), sorted by image id then
    score descending (ties: the order of ``keep``), in one take."""
    order = np.lexsort((-scores, img[keep]))
    rows = keep[order]
    cols = {}
    for c in dets.columns:
        if c == "score":
            cols[c] = scores[order]
        elif boxes is not None and c in BOX_COLUMNS:
            cols[c] = boxes[order, BOX_COLUMNS.index(c)]
        else:
            cols[c] = dets[c].to_numpy()[rows]
    return pd.DataFrame(cols)


def suppress_tensors(boxes: Tensor, scores: Tensor, groups: Tensor, *, method: str, iou_thr: float = 0.5,
                     sigma: float = 0.5, score_thr: float = 0.001) -> tuple[Tensor, Tensor]:
    """Dispatch one of :data:`METHODS` on tensors; returns ``(keep, new_scores)``."""
    if method == "none":
        keep = torch.nonzero(scores > score_thr).view(-1)
        keep = _by_score(keep, scores)
        return keep, scores[keep]
    if method == "nms":
        keep = nms(boxes, scores, groups, iou_thr=iou_thr)
        return keep, scores[keep]
    if method == "adj_nms":
        return adj_nms(boxes, scores, groups, iou_thr=iou_thr, sigma=sigma, score_thr=score_thr)
    if method in ("soft_nms", "soft_nms_linear"):
        return soft_nms(boxes, scores, groups, method="linear" if method == "soft_nms_linear" else "gaussian",
                        iou_thr=iou_thr, sigma=sigma, score_thr=score_thr)
    raise ValueError(f"method must be one of {METHODS}, not {method!r}")


def top_per_image(dets: pd.DataFrame, *, max_per_image: int) -> pd.DataFrame:
    """Keep the ``max_per_image`` highest-scoring rows of each image (ties: earlier row first)."""
    if max_per_image <= 0:
        raise ValueError(f"max_per_image must be > 0, not {max_per_image}")
    d = _sorted(dets)
    rank = d.groupby("image_id", sort=False).cumcount().to_numpy()
    return d[rank < max_per_image].reset_index(drop=True)


def _sorted(dets: pd.DataFrame) -> pd.DataFrame:
    if len(dets) == 0:
        return dets.reset_index(drop=True)
    img, _ = pd.factorize(dets["image_id"].to_numpy(), sort=True)
    order = np.lexsort((-dets["score"].to_numpy(np.float64), img))
    return dets.iloc[order].reset_index(drop=True)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
