"""The elaborate training augmentation of the paper, as a pure, seeded transform on (image, boxes, labels).

Given a class c drawn by the sampler and an image that holds c:

1. pick one box of class c and rotate the image by an angle ~ N(0, σ) degrees about that box's centre, σ
   larger for classes of extreme aspect ratio (long thin objects are where rotation adds the most variety);
   boxes become the axis-aligned boxes enclosing their rotated corners, clipped to the image;
2. crop a window that contains it, at a scale r drawn from the dataset's
   distribution of box-to-image size (sqrt(box area / image area)): the window's side is sqrt(box area) / r,
   with the image's aspect ratio, capped so that it holds at most ``max_pixels`` pixels (the memory budget;
   the detector then resizes the crop to its training size, so a small crop zooms in);
3. keep the other boxes that remain at least ``min_visible`` visible, clipped to the window.

Boxes are absolute xyxy pixels (x along the width). Everything random comes from the ``rng`` argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import rotate


@dataclass(frozen=True)
class AugmentStats:
    """What the elaborate augmentation needs to know about the training set."""

    size_ratios: np.ndarray      # sqrt(box area / image area) of every training box, sorted
    extreme: frozenset[int]      # class indices whose median aspect ratio (w/h or h/w) is >= the threshold


def augment_stats(*, box_wh: np.ndarray, image_wh: np.ndarray, labels: np.ndarray,
                  extreme_aspect: float = 3.0) -> AugmentStats:
    """Statistics from per-box pixel sizes ``box_wh`` (N, 2), their images' sizes ``image_wh`` (N, 2) and class
    indices ``labels`` (N,). A class is extreme when its median max(w/h, h/w) is >= ``extreme_aspect``."""
    box_wh = np.asarray(box_wh, np.float64).reshape(-1, 2)
    image_wh = np.asarray(image_wh, np.float64).reshape(-1, 2)
    labels = np.asarray(labels).reshape(-1)
    if not len(box_wh) == len(image_wh) == len(labels):
        raise ValueError("box_wh, image_wh and labels must have the same length")
    ok = (box_wh > 0).all(1)
    box_wh, image_wh, labels = box_wh[ok], image_wh[ok], labels[ok]
    if not len(box_wh):
        raise ValueError("augment_stats needs at least one box of positive size")
    ratios = np.sqrt(box_wh.prod(1) / image_wh.prod(1))
    aspect = np.maximum(box_wh[:, 0] / box_wh[:, 1], box_wh[:, 1] / box_wh[:, 0])
    extreme = frozenset(int(c) for c in np.unique(labels) if np.median(aspect[labels == c]) >= extreme_aspect)
    return AugmentStats(size_ratios=np.sort(np.clip(ratios, 1e-3, 1.0)), extreme=extreme)


def rotate_boxes(boxes: Tensor, angle: float, *, width: int, height: int,
                 center: tuple[float, float] | None = None) -> Tensor:
    """Boxes (N, 4) xyxy after rotating their image by ``angle`` degrees counter-clockwise about ``center``
    (default: the image's centre; torchvision's ``rotate`` convention, no expansion): the enclosing axis-aligned
    box of the rotated corners, clipped to the image."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4).clone()
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    cx, cy = (width / 2.0, height / 2.0) if center is None else (float(center[0]), float(center[1]))
    x = boxes[:, [0, 2, 2, 0]] - cx
    y = boxes[:, [1, 1, 3, 3]] - cy
    # y points down: a counter-clockwise turn on screen maps (x, y) -> (x cos + y sin, -x sin + y cos)
    xr = cx + x * cos + y * sin
    yr = cy - x * sin + y * cos
    out = torch.stack([xr.min(1).values, yr.min(1).values, xr.max(1).values, yr.max(1).values], 1)
    out[:, [0, 2]] = out[:, [0, 2]].clamp(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clamp(0, height)
    return out


def _area(b: Tensor) -> Tensor:
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def crop_window(box: Sequence[float], *, ratio: float, width: int, height: int, max_pixels: int,
                rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Integer window (x0, y0, x1, y1) inside the image that contains ``box`` (xyxy) and has side
    sqrt(box area) / ``ratio`` with the image's aspect, at most ``max_pixels`` pixels (rounding aside) unless the
    box itself is larger; placed uniformly among the positions that keep the box inside."""
    bx1, by1, bx2, by2 = (float(v) for v in box)
    need_w = math.ceil(bx2) - math.floor(bx1)
    need_h = math.ceil(by2) - math.floor(by1)
    side = math.sqrt(max(bx2 - bx1, 1.0) * max(by2 - by1, 1.0)) / max(ratio, 1e-3)
    aspect = math.sqrt(width / height)
    cw, ch = side * aspect, side / aspect
    if cw * ch > max_pixels:
        shrink = math.sqrt(max_pixels / (cw * ch))
        cw, ch = cw * shrink, ch * shrink
    cw, ch = max(cw, need_w), max(ch, need_h)
    if cw * ch > max_pixels:  # the box forced one side up: take the budget back from the other
        ch = max(need_h, max_pixels / cw)
        cw = max(need_w, max_pixels / ch)
    cw = int(min(max(round(cw), need_w, 1), width))
    ch = int(min(max(round(ch), need_h, 1), height))
    x_lo, x_hi = max(0, math.ceil(bx2) - cw), min(math.floor(bx1), width - cw)
    y_lo, y_hi = max(0, math.ceil(by2) - ch), min(math.floor(by1), height - ch)
    x0 = int(rng.integers(x_lo, x_hi + 1)) if x_hi >= x_lo else max(0, min(x_lo, width - cw))
    y0 = int(rng.integers(y_lo, y_hi + 1)) if y_hi >= y_lo else max(0, min(y_lo, height - ch))
    return x0, y0, x0 + cw, y0 + ch


def elaborate_augment(image: Tensor, boxes: Tensor, labels: Tensor, *, cls: int, rng: np.random.Generator,
                      stats: AugmentStats, rotate_std: tuple[float, float] = (3.0, 10.0),
                      max_pixels: int = 1_000_000, min_visible: float = 0.5
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Rotate, then crop around a box of class ``cls`` (see the module doc). image (C, H, W); boxes (N, 4) xyxy
    pixels; labels int64 (N,). Returns the new (image, boxes, labels); boxes lie inside the new image. When the
    image holds no box of ``cls`` the crop centres on a random box; with no box at all only the rotation runs.
    ``rotate_std``: (σ for ordinary classes, σ for extreme-aspect ones), degrees."""
    if not 0.0 <= min_visible <= 1.0:
        raise ValueError(f"min_visible must lie in [0, 1], got {min_visible}")
    height, width = image.shape[-2:]
    boxes = boxes.reshape(-1, 4).float()
    std = rotate_std[1] if cls in stats.extreme else rotate_std[0]
    angle = float(rng.normal(0.0, std)) if std > 0 else 0.0
    if len(boxes) == 0:
        if abs(angle) >= 0.05:
            image = rotate(image, angle, interpolation=InterpolationMode.BILINEAR)
        return image, boxes, labels
    candidates = torch.where(labels == cls)[0]
    if len(candidates) == 0:
        candidates = torch.arange(len(boxes))
    k = int(candidates[int(rng.integers(len(candidates)))])
    if abs(angle) >= 0.05:
        # about the chosen box's centre, so the rotation never carries it out of the image
        cx, cy = float(boxes[k, 0] + boxes[k, 2]) / 2, float(boxes[k, 1] + boxes[k, 3]) / 2
        image = rotate(image, angle, interpolation=InterpolationMode.BILINEAR, center=[cx, cy])
        boxes = rotate_boxes(boxes, angle, width=width, height=height, center=(cx, cy))
        ok = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        ok[k] = True
        k = int(ok[:k].sum())
        boxes, labels = boxes[ok], labels[ok]
    ratio = float(stats.size_ratios[int(rng.integers(len(stats.size_ratios)))])
    x0, y0, x1, y1 = crop_window(boxes[k].tolist(), ratio=ratio, width=width, height=height,
                                 max_pixels=max_pixels, rng=rng)
    image = image[:, y0:y1, x0:x1]
    shifted = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    clipped = shifted.clone()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clamp(0, x1 - x0)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clamp(0, y1 - y0)
    visible = _area(clipped) / _area(shifted).clamp(min=1e-6)
    keep = (visible >= min_visible) & (clipped[:, 2] - clipped[:, 0] >= 1) & (clipped[:, 3] - clipped[:, 1] >= 1)
    keep[k] = True
    return image.contiguous(), clipped[keep], labels[keep]


__all__ = ["AugmentStats", "augment_stats", "crop_window", "elaborate_augment", "rotate_boxes"]
