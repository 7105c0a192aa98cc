"""Controllable Margin Losses of the Decoupling Head (TSD, "Revisiting the Sibling Head in Object Detector").

Both losses push the decoupled head to be *better* than the sibling head by a margin, and only the decoupled
side receives a gradient: the sibling's score / IoU is detached inside the functions, so calling them can never
move the sibling head's parameters.

    L_c = mean_i |S_o,i - S_i + m_c,i|_+      S = softmax probability of the true class (all sampled RoIs)
    L_r = mean_i |IoU_o,i - IoU_i + m_r,i|_+  IoU of the decoded box with its matched ground truth (positives)

with margins clipped to what is reachable: m_c,i = min(m_c, 1 - S_o,i), m_r,i = min(m_r, 1 - IoU_o,i).

**Confusing-class mixing** (paper 5.9; the ``confusing_groups`` model keys): classes that look alike ("torch" and
"flashlight") are put in groups, and an RoI labelled with a class of a group is also a positive of the group's
other classes in the box-classification loss. :func:`mixing_targets` turns labels into target distributions
(``soft``: the label's class 1 and each other group member ``w``, normalised, i.e. ``1 / (1 + w (|G| - 1))`` and
``w / (1 + w (|G| - 1))``; ``full``: uniform over the group, the same as ``soft`` with ``w = 1``); background and
classes outside every group keep their one-hot target. :func:`classification_loss` is the box heads'
classification loss: plain ``F.cross_entropy`` without mixing (bit for bit the torchvision loss), the soft-target
cross-entropy :func:`soft_cross_entropy` with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def true_class_probability(logits: Tensor, labels: Tensor) -> Tensor:
    """Softmax probability of ``labels`` under ``logits``: logits (N, C), labels int64 (N,) -> (N,)."""
    return torch.softmax(logits, dim=-1).gather(1, labels.view(-1, 1)).squeeze(1)


def paired_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of row i of ``boxes1`` with row i of ``boxes2`` (both xyxy, same frame): (N, 4), (N, 4) -> (N,)."""
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    return inter / (area1 + area2 - inter).clamp(min=1e-12)


def _check_margin(margin: float, name: str) -> None:
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {margin}")


def margin_cls_loss(logits: Tensor, sibling_logits: Tensor, labels: Tensor, *, margin: float = 0.2) -> Tensor:
    """L_c = mean |S_o - S + min(m_c, 1 - S_o)|_+ over all rows (the true class may be background, 0).

    logits: decoupled classifier (N, C); sibling_logits: sibling classifier (N, C), detached here;
    labels: int64 (N,). Returns a scalar; 0 (connected to ``logits``) when N == 0.
    """
    _check_margin(margin, "margin")
    if logits.shape != sibling_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and sibling_logits {tuple(sibling_logits.shape)} differ")
    if labels.numel() == 0:
        return logits.sum() * 0.0
    s = true_class_probability(logits, labels)
    s_o = true_class_probability(sibling_logits.detach(), labels)
    m = torch.clamp(1.0 - s_o, max=margin)
    return torch.relu(s_o - s + m).mean()


def margin_reg_loss(boxes: Tensor, sibling_boxes: Tensor, gt_boxes: Tensor, *, margin: float = 0.2) -> Tensor:
    """L_r = mean |IoU_o - IoU + min(m_r, 1 - IoU_o)|_+ over positive RoIs.

    boxes: decoupled regression decoded to xyxy (P, 4); sibling_boxes: sibling decoded boxes (P, 4), detached
    here; gt_boxes: matched ground truth (P, 4); all in the same (absolute) frame. Returns a scalar; 0 when P == 0.
    """
    _check_margin(margin, "margin")
    if boxes.shape != sibling_boxes.shape or boxes.shape != gt_boxes.shape:
        raise ValueError("boxes, sibling_boxes and gt_boxes must have the same shape (P, 4)")
    if boxes.shape[0] == 0:
        return boxes.sum() * 0.0
    iou = paired_iou(boxes, gt_boxes)
    iou_o = paired_iou(sibling_boxes.detach(), gt_boxes.detach())
    m = torch.clamp(1.0 - iou_o, max=margin)
    return torch.relu(iou_o - iou + m).mean()


MIXING_MODES = ("soft", "full")


@dataclass(frozen=True)
class ClassMixing:
    """Confusing-class groups as contiguous class indices (1..C-1 of a head with C = classes + background),
    the mode (``soft`` | ``full``) and the soft mode's weight ``w`` in [0, 1]."""

    groups: tuple[tuple[int, ...], ...]
    mode: str = "soft"
    weight: float = 0.5

    def __post_init__(self):
        if self.mode not in MIXING_MODES:
            raise ValueError(f"mode must be one of {MIXING_MODES}, got {self.mode!r}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"weight must lie in [0, 1], got {self.weight}")
        seen: set[int] = set()
        for g in self.groups:
            if len(g) < 2:
                raise ValueError(f"a group needs at least two classes, got {list(g)}")
            for c in g:
                if c < 1:
                    raise ValueError(f"class index {c} in a group: 0 is the background, classes start at 1")
                if c in seen:
                    raise ValueError(f"class index {c} is in more than one group (or twice in one)")
                seen.add(c)

    def matrix(self, num_classes: int, *, dtype: torch.dtype = torch.float32,
               device: Optional[torch.device] = None) -> Tensor:
        """(C, C) row-stochastic: row i is the target distribution of label i (C includes the background)."""
        m = torch.eye(num_classes, dtype=torch.float64)
        w = 1.0 if self.mode == "full" else float(self.weight)
        for g in self.groups:
            if max(g) >= num_classes:
                raise ValueError(f"class index {max(g)} out of range for {num_classes} classes (with background)")
            idx = torch.tensor(g)
            block = torch.full((len(g), len(g)), w, dtype=torch.float64)
            block.fill_diagonal_(1.0)
            m[idx[:, None], idx[None, :]] = block
        return (m / m.sum(1, keepdim=True)).to(dtype=dtype, device=device)


def mixing_targets(labels: Tensor, num_classes: int, mixing: ClassMixing, *, dtype: torch.dtype = torch.float32
                   ) -> Tensor:
    """Target distributions (N, C) of int64 ``labels`` (N,) under ``mixing`` (see the module docstring)."""
    return mixing.matrix(num_classes, dtype=dtype, device=labels.device)[labels]


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """mean_i -sum_c targets[i, c] log softmax(logits[i])_c: logits (N, C), targets (N, C) rows summing to 1.
    Equals ``F.cross_entropy(logits, labels)`` for one-hot targets (up to float rounding). 0 when N == 0."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    logp = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)   # fp32 under AMP
    return -(targets.to(logp.dtype) * logp).sum(-1).mean()


def classification_loss(logits: Tensor, labels: Tensor, mixing: Optional[ClassMixing] = None) -> Tensor:
    """The box heads' classification loss: ``F.cross_entropy(logits, labels)`` when ``mixing`` is None (the
    unchanged torchvision loss), else :func:`soft_cross_entropy` on :func:`mixing_targets`."""
    if mixing is None:
        return F.cross_entropy(logits, labels)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return soft_cross_entropy(logits, mixing_targets(labels, logits.shape[-1], mixing, dtype=dtype))


def resolve_groups(groups: Sequence[Sequence[str]], labels: Sequence[str], *,
                   names: Optional[dict[str, str]] = None) -> tuple[tuple[int, ...], ...]:
    """Config ``confusing_groups`` (class MIDs or display names) -> contiguous class indices of a head trained on
    ``labels`` (index = position in ``labels`` + 1). ``names``: MID -> display name (a classes table), needed for
    entries given by name. Members not among ``labels`` (a class without training boxes, e.g. outside an expert's
    classes) are left out, as is a group left with fewer than two. Raises KeyError naming an entry that is
    neither a MID of ``labels``/``names`` nor a display name in ``names``, and ValueError for one given twice."""
    index = {lab: i + 1 for i, lab in enumerate(labels)}
    by_name: dict[str, list[str]] = {}
    for mid, name in (names or {}).items():
        by_name.setdefault(name, []).append(mid)
    out, seen = [], set()
    for g in groups:
        members = []
        for entry in g:
            if entry in index or entry in (names or {}):
                mid = entry
            elif len(by_name.get(entry, ())) == 1:
                mid = by_name[entry][0]
            elif entry in by_name:
                raise KeyError(f"{entry!r} names several classes {sorted(by_name[entry])}: give the MID")
            else:
                raise KeyError(f"{entry!r} is not a class" + ("" if names else " MID of the training boxes (class "
                                                                                 "names need the classes table)"))
            if mid in seen:
                raise ValueError(f"{entry!r} ({mid}) is given twice")
            seen.add(mid)
            if mid in index:
                members.append(index[mid])
        if len(members) >= 2:
            out.append(tuple(members))
    return tuple(out)


__all__ = ["ClassMixing", "classification_loss", "margin_cls_loss", "margin_reg_loss", "mixing_targets",
           "paired_iou", "resolve_groups", "soft_cross_entropy", "true_class_probability"]
