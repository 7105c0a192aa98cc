"""Pairwise box geometry on ``xyxy`` boxes (normalized or absolute; only the ratios matter here).

Every function takes numpy arrays or torch tensors of shape ``[..., 4]`` and returns the same kind (numpy
never imports torch). Degenerate boxes are allowed: an empty union gives IoU 0 (not NaN), an empty area gives
IoA 0.
"""

from __future__ import annotations

import numpy as np

from stages.ops._array import Array, clamp_min, xp


def box_area(boxes: Array) -> Array:
    """Area of ``[..., 4]`` xyxy boxes -> ``[...]`` (0 for inverted boxes)."""
    b = boxes
    return clamp_min(b[..., 2] - b[..., 0], 0) * clamp_min(b[..., 3] - b[..., 1], 0)


def _inter(a: Array, b: Array) -> Array:
    """Pairwise intersection area of ``a [..., N, 4]`` and ``b [..., M, 4]`` -> ``[..., N, M]``."""
    if isinstance(a, np.ndarray):           # in place: one temporary per axis (this is the hot loop on a CPU)
        iw = np.minimum(a[..., :, None, 2], b[..., None, :, 2])
        iw -= np.maximum(a[..., :, None, 0], b[..., None, :, 0])
        np.maximum(iw, 0, out=iw)
        ih = np.minimum(a[..., :, None, 3], b[..., None, :, 3])
        ih -= np.maximum(a[..., :, None, 1], b[..., None, :, 1])
        np.maximum(ih, 0, out=ih)
        iw *= ih
        return iw
    m = xp(a)
    iw = m.minimum(a[..., :, None, 2], b[..., None, :, 2]) - m.maximum(a[..., :, None, 0], b[..., None, :, 0])
    ih = m.minimum(a[..., :, None, 3], b[..., None, :, 3]) - m.maximum(a[..., :, None, 1], b[..., None, :, 1])
    return clamp_min(iw, 0) * clamp_min(ih, 0)


def box_intersection(a: Array, b: Array) -> Array:
    """Pairwise intersection areas: ``a [..., N, 4]``, ``b [..., M, 4]`` -> ``[..., N, M]``."""
    return _inter(a, b)


def box_iou(a: Array, b: Array) -> Array:
    """Pairwise intersection over union: ``a [..., N, 4]``, ``b [..., M, 4]`` -> ``[..., N, M]``.

    Same values as ``torchvision.ops.box_iou`` except that an empty union gives 0 instead of NaN, and it
    broadcasts over leading batch dimensions (used on padded ``[G, N, 4]`` groups).
    """
    inter = _inter(a, b)
    if isinstance(inter, np.ndarray):
        union = box_area(a)[..., :, None] + box_area(b)[..., None, :]
        union -= inter
        return _safe_div(inter, union)
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return _safe_div(inter, union)


def box_ioa(a: Array, b: Array) -> Array:
    """Pairwise intersection over the area of ``a``: ``[..., N, M]``; IoA[i, j] = |a_i ∩ b_j| / |a_i|.

    IoA[i, j] = 1 means ``a_i`` lies inside ``b_j`` (the metric's group-of rule and the surround statistics
    use this).
    """
    inter = _inter(a, b)
    return _safe_div(inter, box_area(a)[..., :, None])


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
