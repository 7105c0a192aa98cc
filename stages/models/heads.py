"""What every RoI head of ours shares: the expert-model background gate, torchvision's settings, the targets
check, and (for the heads with their own training path) the train / detect split of ``forward``.

**Expert background gate** (``expert_mode``, test time only): an RoI whose background score (column 0) beats
every foreground score is dropped before its boxes are regressed or decoded. The sibling head, the Decoupling
Head and the cascade (with and without it) all gate through :meth:`ExpertGate.expert_gate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads

from stages.models.losses import ClassMixing


def foreground_wins(scores: Tensor) -> Tensor:
    """Boolean mask (N,) of the RoIs whose best foreground score (columns 1..C) is at least the background's
    (column 0). ``scores`` (N, C+1) are logits or probabilities: a softmax does not change the answer."""
    return scores[:, 1:].max(1).values >= scores[:, 0]


class ExpertGate:
    """Mixin for RoI heads: with ``expert_mode`` on and the head in eval mode, :meth:`expert_gate` drops the
    RoIs whose background score wins."""

    expert_mode: bool = False
    training: bool

    def expert_gate(self, scores: Tensor, counts: Sequence[int], *rows: Any) -> tuple[list[int], tuple[Any, ...]]:
        """Gate RoIs on ``scores`` (N, C+1). ``counts``: RoIs per image (summing to N); ``rows``: one row per RoI
        each (tensors, or anything a boolean mask indexes, e.g. :class:`~stages.models.tsd.PooledRoIs`).
        Returns (kept RoIs per image, the kept rows of each of ``rows``); everything passes unchanged in
        training or without ``expert_mode``."""
        if self.training or not self.expert_mode:
            return list(counts), rows
        keep = foreground_wins(scores)
        return [int(k.sum()) for k in keep.split(list(counts))], tuple(r[keep] for r in rows)


def roi_heads_settings(roi_heads: RoIHeads) -> dict[str, Any]:
    """The sampling and inference settings of a torchvision :class:`RoIHeads` as its constructor's keywords
    (``fg_iou_thresh`` ... ``detections_per_img``), to build another head with the same settings."""
    return dict(fg_iou_thresh=roi_heads.proposal_matcher.high_threshold,
                bg_iou_thresh=roi_heads.proposal_matcher.low_threshold,
                batch_size_per_image=roi_heads.fg_bg_sampler.batch_size_per_image,
                positive_fraction=roi_heads.fg_bg_sampler.positive_fraction,
                bbox_reg_weights=tuple(roi_heads.box_coder.weights), score_thresh=roi_heads.score_thresh,
                nms_thresh=roi_heads.nms_thresh, detections_per_img=roi_heads.detections_per_img)


def check_targets_types(targets: Optional[list[dict[str, Tensor]]]) -> None:
    if targets is None:
        raise ValueError("targets should not be None in training")
    for t in targets:
        if not t["boxes"].is_floating_point():
            raise TypeError(f"target boxes must be of float type, got {t['boxes'].dtype}")
        if t["labels"].dtype != torch.int64:
            raise TypeError(f"target labels must be of int64 type, got {t['labels'].dtype}")


class TwoPathRoIHeads(ExpertGate, RoIHeads):
    """Base of the heads whose training and test paths differ (TSD, cascade): same ``forward(features,
    proposals, image_shapes, targets=None) -> (detections, losses)`` contract as torchvision's
    :class:`RoIHeads` (boxes only), dispatching to ``train_losses`` or ``detect``. ``class_mixing``: the
    confusing-class groups of the classification losses (:class:`~stages.models.losses.ClassMixing`; None:
    plain cross-entropy)."""

    class_mixing: Optional[ClassMixing] = None

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            check_targets_types(targets)
            return [], self.train_losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    def train_losses(self, features: dict[str, Tensor], proposals: list[Tensor],
                     image_shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        raise NotImplementedError

    def detect(self, features: dict[str, Tensor], proposals: list[Tensor],
               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        raise NotImplementedError


def detections(boxes: list[Tensor], scores: list[Tensor], labels: list[Tensor]) -> list[dict[str, Tensor]]:
    """torchvision's per-image detection dicts from ``postprocess_detections``' three lists."""
    return [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels)]


__all__ = ["ExpertGate", "TwoPathRoIHeads", "check_targets_types", "detections", "foreground_wins",
           "roi_heads_settings"]
