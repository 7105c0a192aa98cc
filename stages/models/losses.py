"""Controllable Margin Losses of the Decoupling Head (TSD, "Revisiting the Sibling Head in Object Detector").

Both losses push the decoupled head to be *better* than the sibling head by a margin, and only the decoupled
side receives a gradient: the sibling's score / IoU is detached inside the functions, so calling them can never
move the sibling head's parameters.

    L_c = mean_i |S_o,i - S_i + m_c,i|_+      S = softmax probability of the true class (all sampled RoIs)
    L_r = mean_i |IoU_o,i - IoU_i + m_r,i|_+  IoU of the decoded box with its matched ground truth (positives)

with margins clipped to what is reachable: m_c,i = min(m_c, 1 - S_o,i), m_r,i = min(m_r, 1 - IoU_o,i).
"""

from __future__ import annotations

import torch
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


__all__ = ["margin_cls_loss", "margin_reg_loss", "paired_iou", "true_class_probability"]
