"""Pairwise box geometry on ``xyxy`` boxes (normalized or absolute; only the ratios matter here).

Every function takes torch tensors or numpy arrays of shape ``[..., 4]`` and returns the same kind.
Degenerate boxes are allowed: an empty union gives IoU 0 (not NaN), an empty area gives IoA 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _t(x: ArrayLike) -> tuple[Tensor, bool]:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)), True
    return x, False


def _back(x: Tensor, was_numpy: bool) -> ArrayLike:
    return x.numpy() if was_numpy else x


def box_area(boxes: ArrayLike) -> ArrayLike:
    """Area of ``[..., 4]`` xyxy boxes -> ``[...]`` (0 for inverted boxes)."""
    b, np_ = _t(boxes)
    area = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    return _back(area, np_)


def _inter(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise intersection area of ``a [..., N, 4]`` and ``b [..., M, 4]`` -> ``[..., N, M]``."""
    ax1, ay1, ax2, ay2 = (v[..., :, None] for v in a.unbind(-1))
    bx1, by1, bx2, by2 = (v[..., None, :] for v in b.unbind(-1))
    iw = torch.minimum(ax2, bx2).sub_(torch.maximum(ax1, bx1)).clamp_(min=0)
    ih = torch.minimum(ay2, by2).sub_(torch.maximum(ay1, by1)).clamp_(min=0)
    return iw.mul_(ih)


def box_intersection(a: ArrayLike, b: ArrayLike) -> ArrayLike:
    """Pairwise intersection areas: ``a [..., N, 4]``, ``b [..., M, 4]`` -> ``[..., N, M]``."""
    ta, np_ = _t(a)
    tb, _ = _t(b)
    return _back(_inter(ta, tb), np_)


def box_iou(a: ArrayLike, b: ArrayLike) -> ArrayLike:
    """Pairwise intersection over union: ``a [..., N, 4]``, ``b [..., M, 4]`` -> ``[..., N, M]``.

    Same values as ``torchvision.ops.box_iou`` except that an empty union gives 0 instead of NaN, and it
    broadcasts over leading batch dimensions (used on padded ``[G, N, 4]`` groups).
    """
    ta, np_ = _t(a)
    tb, _ = _t(b)
    inter = _inter(ta, tb)
    union = (box_area(ta)[..., :, None] + box_area(tb)[..., None, :]).sub_(inter)
    iou = torch.where(union > 0, inter / union, torch.zeros((), dtype=inter.dtype, device=inter.device))
    return _back(iou, np_)


def box_ioa(a: ArrayLike, b: ArrayLike) -> ArrayLike:
    """Pairwise intersection over the area of ``a``: ``[..., N, M]``; IoA[i, j] = |a_i ∩ b_j| / |a_i|.

    IoA[i, j] = 1 means ``a_i`` lies inside ``b_j`` (the metric's group-of rule and the surround statistics
    use this).
    """
    ta, np_ = _t(a)
    tb, _ = _t(b)
    inter = _inter(ta, tb)
    area = box_area(ta)[..., :, None]
    ioa = torch.where(area > 0, inter / area.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))
    return _back(ioa, np_)
