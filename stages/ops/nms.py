"""Batched NMS, soft-NMS (linear, gaussian) and adj-NMS over many (image, class) groups at once.

Boxes are ``xyxy`` arrays ``[M, 4]``; ``groups`` is an int array ``[M]`` (one id per image and class, e.g.
from :func:`group_ids`); boxes of different groups never interact. Every op takes numpy arrays (the CPU path:
no torch import, so a post-processing stage starts fast) or torch tensors (the GPU path: it runs on the
tensors' device) and returns the same kind; the algorithm is the same code for both (:mod:`stages.ops._array`).

No Python loop per box: the boxes are ordered by (group, score desc) with 16-bit radix passes and row-wise
sorts (:func:`segment_order`), then every group size ``N`` gets an index matrix ``[G, N]`` (groups of equal
size share a matrix, so there is no padding) and the sequential selection runs for all ``G`` groups at once,
``N`` steps of vector ops. A pairwise IoU block too large for :data:`BLOCK_ELEMS` is built a slice of rows at a
time (:func:`row_chunks`), so memory stays bounded for any group size.

Tie-breaking, everywhere: among equal scores the box with the lower input index is taken first.

Difference to ``ensemble_boxes.soft_nms``: that function returns the *original* scores of the boxes it keeps
(it only uses the decayed scores to decide which boxes survive ``thresh``). :func:`soft_nms` here returns the
*decayed* scores, which is what soft-NMS is for (the ranking changes); the kept boxes are the same (a box is
kept iff its decayed score is > ``score_thr``, as in ``ensemble_boxes``). ``ensemble_boxes`` also clips
coordinates to [0, 1] and drops zero-area boxes first; here such boxes are kept (IoU with them is 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import pandas as pd

from stages.formats.columns import codes, stable_argsort_int
from stages.formats.tables import BOX_COLUMNS
from stages.ops._array import Array, arange_like, copy, default_backend, is_numpy, like, to_numpy, xp
from stages.ops.boxes import box_iou

#: elements (groups x group size, or x group size^2 for pairwise ops) per block; bounds memory: a pairwise
#: block of a group too large for it is built a few rows at a time (:func:`row_chunks`)
BLOCK_ELEMS = 1 << 18


# ---------------------------------------------------------------------------------------------- grouping


def group_ids(image_ids: np.ndarray | pd.Series, labels: np.ndarray | pd.Series) -> np.ndarray:
    """One int64 id per distinct (image_id, label) pair, without a Python loop per row."""
    img, _ = codes(image_ids)
    lab, n_lab = codes(labels)
    return img * max(n_lab, 1) + lab


def _dense(keys: np.ndarray) -> tuple[np.ndarray, int]:
    """Keys as non-negative ints below a small bound (renumbered when sparse or negative)."""
    keys = np.asarray(keys, dtype=np.int64)
    if len(keys) == 0:
        return keys, 0
    lo, hi = int(keys.min()), int(keys.max())
    if lo >= 0 and hi < max(4 * len(keys), 1 << 16):
        return keys, hi + 1
    uniq, inv = np.unique(keys, return_inverse=True)
    return inv.astype(np.int64).reshape(-1), len(uniq)


def _sizes(counts: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(n, keys)`` for every distinct non-zero count ``n``: the keys with exactly ``n`` elements."""
    nz = np.flatnonzero(counts)
    if len(nz) == 0:
        return
    c = counts[nz]
    o = np.argsort(c, kind="stable")
    cs = c[o]
    for seg in np.split(o, np.flatnonzero(np.diff(cs)) + 1):
        yield int(c[seg[0]]), nz[seg]


def _layout(keys: np.ndarray, scores: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, counts, starts)``: ``order`` sorts by key, then score descending, then index; the elements of
    key ``k`` are ``order[starts[k]: starts[k] + counts[k]]``."""
    order = stable_argsort_int(keys, n_keys - 1)
    counts = np.bincount(keys, minlength=n_keys)
    starts = np.cumsum(counts) - counts
    for n, ks in _sizes(counts):
        if n == 1:
            continue
        pos = starts[ks][:, None] + np.arange(n)
        idx = order[pos]
        r = np.argsort(-scores[idx], axis=1, kind="stable")   # ties keep index order (the key sort was stable)
        order[pos] = np.take_along_axis(idx, r, 1)
    return order, counts, starts


def segment_order(keys: np.ndarray, scores: np.ndarray, n_keys: int | None = None) -> np.ndarray:
    """Permutation that sorts by ``keys`` (non-negative ints) ascending, then ``scores`` descending, then
    index ascending (e.g. a table by image, then score)."""
    keys = np.asarray(keys, dtype=np.int64)
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    n_keys = int(keys.max()) + 1 if n_keys is None else n_keys
    return _layout(keys, np.asarray(scores, dtype=np.float64), n_keys)[0]


def cap_per_group(groups: Array, scores: Array, *, max_per_class: int) -> Array:
    """Indices (ascending) of the boxes among the ``max_per_class`` highest-scoring of their group (ties: the
    lower index first); every box of a group with at most ``max_per_class`` boxes is kept.

    ``groups [M]`` int (one id per image and class), ``scores [M]``; numpy arrays or tensors (the indices come
    back as the same kind). Bounds the ``N`` of every pairwise ``[N, N]`` block built on the result. Only the
    boxes of groups over the cap are sorted (by group, then score: :func:`segment_order`); no loop per group.
    """
    if max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, not {max_per_class}")
    keys, n_keys = _dense(to_numpy(groups))
    counts = np.bincount(keys, minlength=n_keys)
    over = counts > max_per_class
    if not over.any():
        return arange_like(len(keys), scores)
    rows = np.flatnonzero(over[keys])                          # the boxes of the groups over the cap, ascending
    order = segment_order(keys[rows], to_numpy(scores)[rows], n_keys)
    sk = keys[rows][order]                                     # sorted: each group's boxes by score descending
    rank = np.arange(len(sk)) - np.searchsorted(sk, sk)
    keep = np.ones(len(keys), dtype=bool)
    keep[rows[order[rank >= max_per_class]]] = False
    return like(np.flatnonzero(keep), scores)


class Blocks(NamedTuple):
    """Boxes laid out for batched per-group work: ``perm`` lists every box once, groups of equal size ``N``
    contiguous, each group sorted by score descending (ties: lower index first); ``spans`` are
    ``(offset, G, N)``: ``perm[offset: offset + G * N].reshape(G, N)`` holds ``G`` groups of ``N`` boxes, with
    no padding. A span holds about ``block_elems`` elements (``G * N``, or ``G * N * N`` with ``square``)."""

    perm: np.ndarray
    spans: list[tuple[int, int, int]]

    def views(self, x: Array, offset: int, g: int, n: int) -> Array:
        """The span's rows of ``x`` (already permuted by ``perm``) as ``[G, N, ...]`` (a view, no copy)."""
        return x[offset: offset + g * n].reshape(g, n, *x.shape[1:])


def group_blocks(groups: Array, scores: Array, *, block_elems: int | None = None, square: bool = False) -> Blocks:
    """The :class:`Blocks` layout of boxes with group ids ``groups`` and ``scores`` (``block_elems``: default
    :data:`BLOCK_ELEMS`)."""
    block_elems = BLOCK_ELEMS if block_elems is None else block_elems
    keys, n_keys = _dense(to_numpy(groups))
    if len(keys) == 0:
        return Blocks(np.zeros(0, dtype=np.int64), [])
    order, counts, starts = _layout(keys, to_numpy(scores).astype(np.float64, copy=False), n_keys)
    parts, spans, off = [], [], 0
    for n, ks in _sizes(counts):
        parts.append(order[(starts[ks][:, None] + np.arange(n)).reshape(-1)])
        per = max(1, block_elems // (n * n if square else n))
        for a in range(0, len(ks), per):
            g = min(per, len(ks) - a)
            spans.append((off, g, n))
            off += g * n
    return Blocks(np.concatenate(parts), spans)


def row_chunks(g: int, n: int, block_elems: int | None = None) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` of the pairwise ``[G, N, N]`` matrix of a span of ``G`` groups of ``N`` boxes such
    that each ``[G, r1 - r0, N]`` slice holds at most ``block_elems`` elements (default :data:`BLOCK_ELEMS`; one
    row at least): ``[(0, N)]`` when the whole matrix fits, as it does for every span when no group is larger
    than ``sqrt(block_elems)``. The pairwise kernels build one slice at a time, so their memory stays bounded
    whatever ``N`` is (a row of ``N`` at worst), with values identical to the whole matrix's."""
    block_elems = BLOCK_ELEMS if block_elems is None else block_elems
    step = max(1, block_elems // max(1, g * n))
    return [(r, min(n, r + step)) for r in range(0, n, step)]


# ------------------------------------------------------------------------------------------------ kernels


def _nms_mask(b: Array, iou_thr: float, o: Array | None = None) -> Array:
    """Kept mask ``[G, N]`` of hard NMS of the score-sorted groups ``b [G, N, 4]``, from their IoUs ``o [G, N, N]``
    when given, else built a slice of rows at a time (:func:`row_chunks`)."""
    m = xp(b)
    g, n = b.shape[:2]
    suppressed = m.zeros_like(b[..., 0], dtype=bool)
    for r0, r1 in [(0, n)] if o is not None else row_chunks(g, n):
        rows = o if o is not None else box_iou(b[:, r0:r1], b)
        over = m.triu(rows > iou_thr, r0 + 1)             # [G, R, N]: row i (of r0..r1) over the boxes after i
        for i in range(r0, min(r1, n - 1)):
            suppressed |= over[:, i - r0, :] & ~suppressed[:, i: i + 1]
    return ~suppressed


def _weights(o: Array, method: str, iou_thr: float, sigma: float) -> Array:
    m = xp(o)
    if method == "gaussian":
        return m.exp(o * o / -sigma)
    return m.where(o > iou_thr, 1.0 - o, 1.0)


def _soft_steps(cur: Array, done: Array, b: Array, o: Array | None, *, method: str, iou_thr: float, sigma: float,
                score_thr: float) -> Array:
    """Soft-NMS selection over rows of ``cur [G, N]`` (boxes with ``done`` take no part) of the groups
    ``b [G, N, 4]``, with their pairwise IoUs ``o [G, N, N]`` when given, else the chosen box's row of IoUs
    built at each step; returns the decayed scores. Ties: the lower column first."""
    m = xp(cur)
    g, n = cur.shape
    ar = arange_like(g, cur)
    for _ in range(n):
        masked = m.where(done, -np.inf, cur)
        best = masked.argmax(1)
        if not bool((masked[ar, best] > score_thr).any()):
            break   # every box left is <= score_thr: it is dropped, and it could only decay lower ones
        done[ar, best] = True
        row = o[ar, best] if o is not None else box_iou(b[ar, best][:, None], b)[:, 0]
        cur = m.where(done, cur, cur * _weights(row, method, iou_thr, sigma))
    return cur


def _by_score(keep: Array, scores: Array) -> Array:
    """Sort kept indices by score descending, ties by index (the order ``torchvision.ops.nms`` returns)."""
    if is_numpy(keep):
        keep = np.sort(keep)
        return keep[np.argsort(-scores[keep], kind="stable")]
    keep = keep.sort().values
    return keep[xp(keep).argsort(-scores[keep], stable=True)]


def _nms_keep(boxes: Array, scores: Array, groups: Array, iou_thr: float) -> Array:
    lay = group_blocks(groups, scores, square=True)
    perm = like(lay.perm, boxes)
    bp = boxes[perm]
    keep_mask = xp(perm).ones_like(perm, dtype=bool)

    for off, g, n in lay.spans:
        if n > 1:
            lay.views(keep_mask, off, g, n)[...] = _nms_mask(lay.views(bp, off, g, n), iou_thr)
    return perm[keep_mask]


def _soft(boxes: Array, scores: Array, groups: Array, *, method: str, iou_thr: float, sigma: float,
          score_thr: float, nms_first: float | None) -> tuple[Array, Array]:
    """(kept indices in no particular order, decayed scores of *all* boxes)."""
    if method not in ("gaussian", "linear"):
        raise ValueError(f"method must be 'gaussian' or 'linear', not {method!r}")
    if method == "gaussian" and sigma <= 0:
        raise ValueError(f"sigma must be > 0, not {sigma}")
    lay = group_blocks(groups, scores, square=True)
    perm = like(lay.perm, boxes)
    bp, sp = boxes[perm], scores[perm]          # sp: decayed in place, span by span
    live = xp(perm).ones_like(perm, dtype=bool)

    for off, g, n in lay.spans:
        if n == 1:
            continue
        b = lay.views(bp, off, g, n)
        # [G, N, N], built once for both passes when it fits in a block; else rows on demand
        o = box_iou(b, b) if len(row_chunks(g, n)) == 1 else None
        lv = lay.views(live, off, g, n)
        if nms_first is not None:
            lv[...] = _nms_mask(b, nms_first, o)
        cur = lay.views(sp, off, g, n)
        cur[...] = _soft_steps(cur, ~lv, b, o, method=method, iou_thr=iou_thr, sigma=sigma, score_thr=score_thr)
    out = copy(scores)
    out[perm] = sp
    return perm[live & (sp > score_thr)], out


# -------------------------------------------------------------------------------------------- public ops


def nms(boxes: Array, scores: Array, groups: Array, *, iou_thr: float = 0.5) -> Array:
    """Hard NMS per group: drop every box whose IoU with a higher-scoring kept box of its group is > ``iou_thr``.

    ``boxes [M, 4]`` xyxy, ``scores [M]``, ``groups [M]`` int. Returns the int64 indices of the kept boxes,
    sorted by decreasing score (same contract as ``torchvision.ops.batched_nms``; a box at exactly
    ``iou_thr`` is kept, as there).
    """
    return _by_score(_nms_keep(boxes, scores, groups, iou_thr), scores)


def soft_nms(boxes: Array, scores: Array, groups: Array, *, method: str = "gaussian", iou_thr: float = 0.5,
             sigma: float = 0.5, score_thr: float = 0.001) -> tuple[Array, Array]:
    """Soft-NMS per group (Bodla et al. 2017): repeatedly take the box with the highest *current* score and
    decay the others of its group by a weight of their IoU ``o`` with it:

    - ``method="gaussian"``: ``w = exp(-o**2 / sigma)`` (``iou_thr`` unused),
    - ``method="linear"``: ``w = 1 - o`` if ``o > iou_thr`` else 1.

    Returns ``(keep, new_scores)``: int64 indices of the boxes whose decayed score is > ``score_thr``, sorted
    by decreasing decayed score, and those decayed scores (``new_scores[i]`` belongs to ``keep[i]``). The
    scores are never raised. See the module docstring for the difference to ``ensemble_boxes.soft_nms``.
    """
    keep, out = _soft(boxes, scores, groups, method=method, iou_thr=iou_thr, sigma=sigma, score_thr=score_thr,
                      nms_first=None)
    keep = _by_score(keep, out)
    return keep, out[keep]


def adj_nms(boxes: Array, scores: Array, groups: Array, *, iou_thr: float = 0.5, sigma: float = 0.5,
            score_thr: float = 0.001) -> tuple[Array, Array]:
    """adj-NMS (MMfruit): hard NMS at ``iou_thr``, then gaussian soft-NMS re-weighting of the survivors,
    ``w = exp(-IoU**2 / sigma)``, dropping those whose decayed score is <= ``score_thr``.

    Same result as ``soft_nms`` (gaussian) on the boxes :func:`nms` keeps, computed in one pass (the IoUs of a
    group are built once). Returns ``(keep, new_scores)`` like :func:`soft_nms`; ``keep`` is always a subset of
    :func:`nms`'s.
    """
    keep, out = _soft(boxes, scores, groups, method="gaussian", iou_thr=iou_thr, sigma=sigma,
                      score_thr=score_thr, nms_first=iou_thr)
    keep = _by_score(keep, out)
    return keep, out[keep]


METHODS = ("nms", "soft_nms", "soft_nms_linear", "adj_nms", "none")


def suppress_arrays(boxes: Array, scores: Array, groups: Array, *, method: str, iou_thr: float = 0.5,
                    sigma: float = 0.5, score_thr: float = 0.001,
                    max_per_class: int | None = None) -> tuple[Array, Array]:
    """Dispatch one of :data:`METHODS`; returns ``(keep, new_scores of keep)``, ``keep`` in no set order.
    ``max_per_class``: before a pairwise method (not ``none``), only the ``max_per_class`` highest-scoring
    boxes of each group take part (:func:`cap_per_group`; None: all)."""
    if max_per_class is not None and method != "none":
        idx = cap_per_group(groups, scores, max_per_class=max_per_class)
        if len(idx) < len(scores):
            keep, new = suppress_arrays(boxes[idx], scores[idx], groups[idx], method=method, iou_thr=iou_thr,
                                        sigma=sigma, score_thr=score_thr)
            return idx[keep], new
    if method == "none":
        keep = (scores > score_thr).nonzero()[0] if is_numpy(scores) else (scores > score_thr).nonzero()[:, 0]
        return keep, scores[keep]
    if method == "nms":
        keep = _nms_keep(boxes, scores, groups, iou_thr)
        return keep, scores[keep]
    if method in ("adj_nms", "soft_nms", "soft_nms_linear"):
        keep, out = _soft(boxes, scores, groups, method="linear" if method == "soft_nms_linear" else "gaussian",
                          iou_thr=iou_thr, sigma=sigma, score_thr=score_thr,
                          nms_first=iou_thr if method == "adj_nms" else None)
        return keep, out[keep]
    raise ValueError(f"method must be one of {METHODS}, not {method!r}")


# ------------------------------------------------------------------------------------- detections tables


def frame_arrays(dets: pd.DataFrame, backend: str | None) -> tuple[Array, Array]:
    """``(boxes [M, 4], scores [M])`` float64 of a detections table, as numpy (``backend`` None) or tensors."""
    boxes = np.stack([dets[c].to_numpy(np.float64) for c in BOX_COLUMNS], 1)
    scores = dets["score"].to_numpy(np.float64)
    if backend is None:
        return boxes, scores
    import torch

    return torch.from_numpy(boxes).to(backend), torch.from_numpy(scores).to(backend)


def frame_groups(dets: pd.DataFrame) -> tuple[np.ndarray, int, np.ndarray]:
    """``(image codes in sorted image-id order, number of images, group ids per (image_id, label))``."""
    img, n_img = codes(dets["image_id"], sort=True)
    lab, n_lab = codes(dets["label"])
    return img, n_img, img * max(n_lab, 1) + lab


def suppress(dets: pd.DataFrame, *, method: str = "adj_nms", iou_thr: float = 0.5, sigma: float = 0.5,
             score_thr: float = 0.001, max_per_class: int | None = None, device: object = None) -> pd.DataFrame:
    """Apply one of :data:`METHODS` per (image_id, label) to a ``detections`` table.

    ``soft_nms`` is gaussian, ``soft_nms_linear`` linear. ``none`` only drops scores <= ``score_thr``.
    ``max_per_class``: the other methods see only the ``max_per_class`` best rows of each (image_id, label)
    (:func:`cap_per_group`; None: all).
    Returns the surviving rows (all columns kept) with their new scores, sorted by image_id then score
    descending. ``device``: None = CUDA when available, else numpy on the CPU (see
    :func:`stages.ops._array.default_backend`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if len(dets) == 0:
        return dets.reset_index(drop=True)
    backend = default_backend(device)
    boxes, scores = frame_arrays(dets, backend)
    img, n_img, groups = frame_groups(dets)
    keep, new = suppress_arrays(boxes, scores, like(groups, scores), method=method, iou_thr=iou_thr,
                                sigma=sigma, score_thr=score_thr, max_per_class=max_per_class)
    return take_sorted(dets, img, to_numpy(keep), to_numpy(new), n_img=n_img)


def take_sorted(dets: pd.DataFrame, img: np.ndarray, keep: np.ndarray, scores: np.ndarray,
                boxes: np.ndarray | None = None, *, n_img: int | None = None) -> pd.DataFrame:
    """Rows ``keep`` of ``dets`` with new ``scores`` (and ``boxes [len(keep), 4]``), sorted by image code then
    score descending (ties: the order of ``keep``), in one take."""
    order = segment_order(img[keep], scores, n_img)
    out = dets.take(keep[order]).reset_index(drop=True)
    out["score"] = scores[order]
    if boxes is not None:
        for j, c in enumerate(BOX_COLUMNS):
            out[c] = boxes[order, j]
    return out


def top_per_image(dets: pd.DataFrame, *, max_per_image: int) -> pd.DataFrame:
    """Keep the ``max_per_image`` highest-scoring rows of each image (ties: earlier row first); sorted by
    image_id, score descending."""
    if max_per_image <= 0:
        raise ValueError(f"max_per_image must be > 0, not {max_per_image}")
    if len(dets) == 0:
        return dets.reset_index(drop=True)
    img, n_img = codes(dets["image_id"], sort=True)
    order = segment_order(img, dets["score"].to_numpy(np.float64), n_img)
    ic = img[order]
    counts = np.bincount(ic, minlength=n_img)
    rank = np.arange(len(ic)) - (np.cumsum(counts) - counts)[ic]
    return dets.take(order[rank < max_per_image]).reset_index(drop=True)
