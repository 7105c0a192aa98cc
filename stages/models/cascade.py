"""Modified Cascade R-CNN RoI heads for torchvision's Faster R-CNN.

T stages, each with its own two-FC box head, classifier and class-agnostic box regressor, its own IoU threshold
for positives and its own box-coder weights. In training, stage t samples RoIs (ground truth added) from the
boxes stage t-1 regressed (detached), and its losses are multiplied by its stage weight. The paper's modified
cascade uses IoU thresholds (0.5, 0.5, 0.6, 0.7) with weights (0.75, 1, 0.25, 0.25); both are arguments.

At test time the stages refine the proposals in turn; the final boxes are the last stage's regression of the
boxes it receives, and their class scores are the mean of the softmax scores of *every* stage's classifier on
those same boxes (Cascade R-CNN's test-time ensemble; the RoI features are pooled once and shared by the stage
heads). Post-processing (score threshold, NMS per class, top-k) is torchvision's.

Loss keys: ``loss_classifier_s{t}`` and ``loss_box_reg_s{t}`` for t = 0..T-1, each already weighted.

**With the Decoupling Head** (``decoupled`` = its :class:`~stages.models.tsd.TSDSettings`): every stage gets a
class-agnostic
:class:`~stages.models.tsd.DecoupledHead` next to its plain head, which becomes the training-only sibling.
Stage t then regresses relative to its own P_r, refines to the next stage from there, and adds the sibling and
margin losses (``loss_classifier_sibling_s{t}``, ``loss_box_reg_sibling_s{t}``, ``loss_margin_cls_s{t}``,
``loss_margin_reg_s{t}``, all times the stage weight). At test time only the decoupled branches run: the final
score is the mean of the stages' decoupled classifiers on the final boxes.

**Expert-model mode** (``expert_mode=True``, test time only; :class:`~stages.models.heads.ExpertGate`), with or
without the Decoupling Head: an RoI whose mean background score beats every mean foreground score is dropped
before the last stage's regression is decoded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from stages.models.heads import TwoPathRoIHeads, detections, roi_heads_settings
from stages.models.losses import classification_loss
from stages.models.tsd import (DecoupledHead, TSDSettings, decoupled_losses, matched_gt_boxes, pool_rois,
                               square_output_size)

DEFAULT_IOU_THRESHOLDS = (0.5, 0.5, 0.6, 0.7)
DEFAULT_STAGE_WEIGHTS = (0.75, 1.0, 0.25, 0.25)
#: box-coder weights by IoU threshold (Cascade R-CNN's 1/std of the targets at each quality level)
_REG_WEIGHTS_BY_IOU = {0.5: (10.0, 10.0, 5.0, 5.0), 0.6: (20.0, 20.0, 10.0, 10.0), 0.7: (30.0, 30.0, 15.0, 15.0)}


class CascadeStagePredictor(nn.Module):
    """Classifier (num_classes logits) and class-agnostic box regressor (4 deltas) on a box-head feature."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


def _stage_settings(thresholds: Sequence[float], weights: Sequence[float],
                    reg_weights: Optional[Sequence[Sequence[float]]]) -> list[tuple[float, float, float, float]]:
    """Check the per-stage settings; the box-coder weights per stage (by the nearest IoU threshold if None)."""
    if not thresholds:
        raise ValueError("a cascade needs at least one stage")
    if len(weights) != len(thresholds):
        raise ValueError(f"{len(thresholds)} stage IoU thresholds but {len(weights)} stage loss weights")
    if any(not 0.0 < t < 1.0 for t in thresholds):
        raise ValueError(f"stage IoU thresholds must lie in (0, 1), got {thresholds}")
    if any(w < 0 for w in weights):
        raise ValueError(f"stage loss weights must be >= 0, got {weights}")
    if reg_weights is None:
        return [_REG_WEIGHTS_BY_IOU[min(_REG_WEIGHTS_BY_IOU, key=lambda k: abs(k - t))] for t in thresholds]
    out = [tuple(float(x) for x in w) for w in reg_weights]
    if len(out) != len(thresholds) or any(len(w) != 4 for w in out):
        raise ValueError("stage_bbox_reg_weights needs one 4-tuple per stage")
    return out


class CascadeRoIHeads(TwoPathRoIHeads):
    """Cascade R-CNN box heads with the ``forward(features, proposals, image_shapes, targets=None)`` contract
    of torchvision's :class:`RoIHeads` (boxes only).

    box_roi_pool: torchvision's ``MultiScaleRoIAlign`` (shared by all stages); in_channels: FPN channels;
    num_classes: including background; stage_iou_thresholds / stage_loss_weights: one per stage;
    stage_bbox_reg_weights: box-coder weights per stage (default by IoU threshold: 0.5 -> (10, 10, 5, 5),
    0.6 -> (20, 20, 10, 10), 0.7 -> (30, 30, 15, 15)); decoupled: the Decoupling Head's settings to give every
    stage one (None: plain stages); expert_mode: see :class:`~stages.models.heads.ExpertGate`. The other
    arguments are torchvision's.
    """

    def __init__(self, box_roi_pool: nn.Module, *, in_channels: int, num_classes: int,
                 representation_size: int = 1024, stage_iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                 stage_loss_weights: Sequence[float] = DEFAULT_STAGE_WEIGHTS,
                 stage_bbox_reg_weights: Optional[Sequence[tuple[float, float, float, float]]] = None,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100, decoupled: Optional[TSDSettings] = None,
                 expert_mode: bool = False):
        thresholds = [float(t) for t in stage_iou_thresholds]
        weights = [float(w) for w in stage_loss_weights]
        reg_weights = _stage_settings(thresholds, weights, stage_bbox_reg_weights)
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        k_h, k_w = box_roi_pool.output_size
        feat_dim = in_channels * k_h * k_w
        heads = nn.ModuleList(TwoMLPHead(feat_dim, representation_size) for _ in thresholds)
        predictors = nn.ModuleList(CascadeStagePredictor(representation_size, num_classes) for _ in thresholds)
        super().__init__(box_roi_pool, heads, predictors, thresholds[0], thresholds[0], batch_size_per_image,
                         positive_fraction, reg_weights[0], score_thresh, nms_thresh, detections_per_img)
        self.num_classes = num_classes
        self.stage_iou_thresholds = thresholds
        self.stage_loss_weights = weights
        self._matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in thresholds]
        self._coders = [det_utils.BoxCoder(w) for w in reg_weights]
        self.tsd = decoupled
        self.expert_mode = bool(expert_mode)
        self.decoupled: Optional[nn.ModuleList] = None
        if decoupled is not None:
            k = square_output_size(box_roi_pool)
            self.decoupled = nn.ModuleList(
                DecoupledHead(in_channels=in_channels, resolution=k, num_classes=num_classes, num_reg_classes=1,
                              representation_size=representation_size, settings=decoupled)
                for _ in thresholds)

    @property
    def num_stages(self) -> int:
        return len(self.stage_iou_thresholds)

    @classmethod
    def from_roi_heads(cls, roi_heads: RoIHeads, *, num_classes: int, in_channels: int, **kwargs
                       ) -> "CascadeRoIHeads":
        """A cascade reusing ``roi_heads``' pooler and sampling/inference settings (not its box head; the IoU
        thresholds and box-coder weights are per stage)."""
        settings = {k: v for k, v in roi_heads_settings(roi_heads).items()
                    if k not in ("fg_iou_thresh", "bg_iou_thresh", "bbox_reg_weights")}
        settings.update(kwargs)
        return cls(roi_heads.box_roi_pool, in_channels=in_channels, num_classes=num_classes, **settings)

    @contextlib.contextmanager
    def _stage(self, t: int) -> Iterator[None]:
        """Make torchvision's sampling / decoding helpers use stage t's matcher and box coder."""
        saved = self.proposal_matcher, self.box_coder
        self.proposal_matcher, self.box_coder = self._matchers[t], self._coders[t]
        try:
            yield
        finally:
            self.proposal_matcher, self.box_coder = saved

    def train_losses(self, features: dict[str, Tensor], proposals: list[Tensor],
                     image_shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        boxes = proposals
        for t in range(self.num_stages):
            with self._stage(t):
                boxes, matched_idxs, labels, reg_targets = self.select_training_samples(boxes, targets)
            pooled = pool_rois(self.box_roi_pool, features, boxes, image_shapes)
            logits, deltas = self.box_predictor[t](self.box_head[t](pooled.shared))
            labels_cat = torch.cat(labels)
            w = self.stage_loss_weights[t]
            if self.decoupled is None:
                reg_cat = torch.cat(reg_targets)
                pos = torch.where(labels_cat > 0)[0]
                loss_reg = F.smooth_l1_loss(deltas[pos], reg_cat[pos], beta=1 / 9, reduction="sum")
                losses[f"loss_classifier_s{t}"] = w * classification_loss(logits, labels_cat, self.class_mixing)
                losses[f"loss_box_reg_s{t}"] = w * loss_reg / max(labels_cat.numel(), 1)
                refine_from = deltas, pooled.rois[:, 1:]
            else:
                head = self.decoupled[t]
                d_logits = head.classify(pooled)
                d_deltas, rois_r = head.regress(pooled)
                gt = torch.cat(matched_gt_boxes(targets, matched_idxs, boxes[0].dtype))
                parts = decoupled_losses(class_logits=d_logits, deltas=d_deltas, rois_r=rois_r,
                                         sibling_logits=logits, sibling_deltas=deltas, rois=pooled.rois[:, 1:],
                                         labels=labels_cat, matched_gt=gt, box_coder=self._coders[t],
                                         settings=self.tsd, mixing=self.class_mixing)
                for key, value in parts.items():
                    scale = w * (self.tsd.margin_loss_weight if key.startswith("margin") else 1.0)
                    losses[f"loss_{key}_s{t}"] = scale * value
                refine_from = d_deltas, rois_r
            if t + 1 < self.num_stages:
                boxes = self._refine(t, refine_from[0], refine_from[1], [len(b) for b in boxes], image_shapes)
        return losses

    def _refine(self, t: int, deltas: Tensor, rois: Tensor, counts: list[int],
                image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        # decode in fp32: torchvision's BoxCoder casts the boxes to the deltas' dtype (fp16/bf16 under AMP)
        decoded = self._coders[t].decode_single(deltas.detach().float(), rois.detach().float())
        return [box_ops.clip_boxes_to_image(b, shape) for b, shape in zip(decoded.split(counts), image_shapes)]

    def detect(self, features: dict[str, Tensor], proposals: list[Tensor],
               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        boxes = proposals
        counts = [len(b) for b in boxes]
        for t in range(self.num_stages - 1):
            pooled = pool_rois(self.box_roi_pool, features, boxes, image_shapes)
            if self.decoupled is None:
                deltas, rois = self.box_predictor[t](self.box_head[t](pooled.shared))[1], pooled.rois[:, 1:]
            else:
                deltas, rois = self.decoupled[t].regress(pooled)
            boxes = self._refine(t, deltas, rois, counts, image_shapes)
        pooled = pool_rois(self.box_roi_pool, features, boxes, image_shapes)
        if self.decoupled is None:
            outputs = [self.box_predictor[t](self.box_head[t](pooled.shared)) for t in range(self.num_stages)]
            probs = sum(F.softmax(logits.float(), -1) for logits, _ in outputs) / self.num_stages
            counts, (probs, deltas, final_rois) = self.expert_gate(probs, counts, probs, outputs[-1][1],
                                                                   pooled.rois[:, 1:])
        else:
            probs = sum(F.softmax(head.classify(pooled).float(), -1) for head in self.decoupled) / self.num_stages
            counts, (probs, pooled) = self.expert_gate(probs, counts, probs, pooled)
            deltas, final_rois = self.decoupled[-1].regress(pooled)
        # postprocess_detections applies a softmax: the log of a distribution gives the distribution back
        class_logits = torch.log(probs.clamp(min=1e-12))
        box_regression = deltas.float().repeat(1, self.num_classes)
        with self._stage(self.num_stages - 1):
            return detections(*self.postprocess_detections(class_logits, box_regression,
                                                           list(final_rois.split(counts)), image_shapes))


__all__ = ["CascadeRoIHeads", "CascadeStagePredictor", "DEFAULT_IOU_THRESHOLDS", "DEFAULT_STAGE_WEIGHTS"]
