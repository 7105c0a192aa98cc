"""Box geometry on ``xyxy`` boxes (normalized or absolute; only the ratios matter here), pairwise (every box
of ``a`` with every box of ``b``) or paired (``a[..., i]`` with ``b[..., i]``).

Every function takes numpy arrays or torch tensors of shape ``[..., 4]`` and returns the same kind (numpy
never imports torch). Degenerate boxes are allowed: an empty union gives IoU 0 (not NaN), an empty area gives
IoA 0. The formulas treat both axes alike, so ``yxyx`` boxes give the same values; the OpenImages metric
(:mod:`stages.metrics.detection`) uses the paired functions on its ``yxyx`` boxes, whose floating-point
operations are then the official evaluator's (intersection = y-extent * x-extent, area likewise).
"""

from __future__ import annotations

import numpy as np

from stages.ops._array import Array, clamp_min, xp


def box_area(boxes: Array) -> Array:
    """Area of ``[..., 4]`` xyxy boxes -> ``[...]`` (0 for inverted boxes)."""
    b = boxes
    return clamp_min(b[..., 2] - b[..., 0], 0) * clamp_min(b[..., 3] - b[..., 1], 0)


def _inter(a: Array, b: Array) -> Array:
    """Intersection area of ``a [..., 4]`` and ``b [..., 4]`` (broadcast) -> ``[...]``."""
    if isinstance(a, np.ndarray):           # in place: one temporary per axis (this is the hot loop on a CPU)
        iw = np.minimum(a[..., 2], b[..., 2])
        iw -= np.maximum(a[..., 0], b[..., 0])
        np.maximum(iw, 0, out=iw)
        ih = np.minimum(a[..., 3], b[..., 3])
        ih -= np.maximum(a[..., 1], b[..., 1])
        np.maximum(ih, 0, out=ih)
        iw *= ih
        return iw
    m = xp(a)
    iw = m.minimum(a[..., 2], b[..., 2]) - m.maximum(a[..., 0], b[..., 0])
    ih = m.minimum(a[..., 3], b[..., 3]) - m.maximum(a[..., 1], b[..., 1])
    return clamp_min(iw, 0) * clamp_min(ih, 0)


def _pairwise(a: Array, b: Array) -> tuple[Array, Array]:
    """``a [..., N, 4]``, ``b [..., M, 4]`` as views that broadcast to ``[..., N, M, 4]``."""
    return a[..., :, None, :], b[..., None, :, :]


def paired_iou(a: Array, b: Array) -> Array:
    """Intersection over union of ``a[..., i]`` and ``b[..., i]`` (``[..., 4]``, broadcast) -> ``[...]``."""
    inter = _inter(a, b)
    if isinstance(inter, np.ndarray):
        union = box_area(a) + box_area(b)
        union -= inter
        return _safe_div(inter, union)
    return _safe_div(inter, box_area(a) + box_area(b) - inter)


def paired_ioa(a: Array, b: Array) -> Array:
    """Intersection over the area of ``a``: ``|a[..., i] ∩ b[..., i]| / |a[..., i]|`` (broadcast) -> ``[...]``.

    1 means ``a`` lies inside ``b`` (the metric's group-of rule, the surround statistics and the built-in
    dataset's occlusion use this)."""
    return _safe_div(_inter(a, b), box_area(a))


def box_intersection(a: Array, b: Array) -> Array:
    """Pairwise intersection areas: ``a [..., N, 4]``, ``b [..., M, 4]`` -> ``[..., N, M]``."""
    return _inter(*_pairwise(a, b))


def box_iou(a: Array, b: Array) -> Array:
    """Pairwise intersection over union: ``a [..., N, 4]``, ``b [..., M, 4]`` -> ``[..., N, M]``.

    Same values as ``torchvision.ops.box_iou`` except that an empty union gives 0 instead of NaN, and it
    broadcasts over leading batch dimensions (used on padded ``[G, N, 4]`` groups).
    """
    return paired_iou(*_pairwise(a, b))


def box_ioa(a: Array, b: Array) -> Array:
    """Pairwise intersection over the area of ``a``: ``[..., N, M]``; IoA[i, j] = |a_i ∩ b_j| / |a_i|."""
    return paired_ioa(*_pairwise(a, b))


def _safe_div(num: Array, den: Array) -> Array:
    """``num / den`` where ``den > 0``, else 0."""
    if isinstance(num, np.ndarray):
        ok = den > 0
        if ok.all():
            return np.divide(num, den, out=num if num.shape == np.broadcast_shapes(num.shape, den.shape) else None)
        out = np.zeros(np.broadcast_shapes(num.shape, den.shape))
        np.divide(num, den, out=out, where=ok)
        return out
    return xp(num).where(den > 0, num / den, num.new_zeros(()))
