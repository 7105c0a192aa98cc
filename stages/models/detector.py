"""Detector builder: torchvision Faster R-CNN + FPN from a model config section (the ``model`` schema).

Every backbone (torchvision or timm trunk) comes from :func:`stages.models.backbones.build_backbone`; the RoI head is the sibling head
(torchvision's, with an optional expert mode), the Decoupling Head (``head: tsd``), or the modified Cascade
R-CNN (``cascade: true``, combinable with ``head: tsd``). ``decoupled_backbone: true`` (needs ``head: tsd``)
gives classification and regression their own layer3/layer4 + FPN
(:class:`~stages.models.backbones.DecoupledBackbone`): the RPN, the shared RoI feature F, the regression pooling
and the training-only sibling head read the regression pyramid, the Decoupling Head's classification pooling
the classification one. Nothing is downloaded: ``weights`` may name a local state dict of the whole detector,
``backbone_weights`` one of the trunk (or of a ``BackboneWithFPN``). ``wsddn: true`` gives a
:class:`~stages.models.wsddn.WSDDNFasterRCNN`: the same detector (same weights for a seed) plus the WSDDN branch
trained jointly on image-level labels (training only; detection is unchanged).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from stages.core.config import schema_default
from stages.models.backbones import CLS_PREFIX, build_backbone
from stages.models.cascade import CascadeRoIHeads
from stages.models.heads import ExpertGate, check_targets_types, roi_heads_settings
from stages.models.losses import ClassMixing, classification_loss
from stages.models.tsd import box_regression_loss
from stages.models.tsd import TSDRoIHeads, TSDSettings
from stages.models.wsddn import WSDDNFasterRCNN, WSDDNSettings

log = logging.getLogger(__name__)

#: anchors when the config says ``anchors: default``: one size per FPN level (P2..P6), three ratios
DEFAULT_ANCHOR_SIZES = ((16.0,), (32.0,), (64.0,), (128.0,), (256.0,))
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


class SiblingRoIHeads(ExpertGate, RoIHeads):
    """torchvision's RoI heads plus the expert-model mode (:class:`~stages.models.heads.ExpertGate`): with
    ``expert_mode`` an RoI whose background score beats every foreground score is dropped before its boxes are
    decoded (test time only). ``class_mixing`` (:class:`~stages.models.losses.ClassMixing`): the confusing-class
    groups of the classification loss in training; None (default) leaves torchvision's forward and loss as
    they are."""

    class_mixing: Optional[ClassMixing] = None

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: Optional[list[dict[str, Tensor]]] = None):
        if not (self.training and self.class_mixing is not None):
            return super().forward(features, proposals, image_shapes, targets)
        # torchvision's training path with fastrcnn_loss's classification term replaced by the mixed one
        check_targets_types(targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        feats = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(feats)
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        return [], {"loss_classifier": classification_loss(class_logits, labels, self.class_mixing),
                    "loss_box_reg": box_regression_loss(box_regression, regression_targets, labels)}

    @classmethod
    def from_roi_heads(cls, roi_heads: RoIHeads, *, expert_mode: bool = False) -> "SiblingRoIHeads":
        out = cls(roi_heads.box_roi_pool, roi_heads.box_head, roi_heads.box_predictor,
                  **roi_heads_settings(roi_heads))
        out.expert_mode = bool(expert_mode)
        return out

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                               image_shapes: list[tuple[int, int]]):
        counts, (class_logits, box_regression, boxes) = self.expert_gate(
            class_logits, [len(p) for p in proposals], class_logits, box_regression, torch.cat(proposals))
        return super().postprocess_detections(class_logits, box_regression, list(boxes.split(counts)),
                                              image_shapes)


class RegressionPyramidRPN(RegionProposalNetwork):
    """torchvision's RPN on the regression pyramid of a decoupled backbone: feature maps whose key starts with
    :data:`~stages.models.backbones.CLS_PREFIX` (the classification pyramid) are not passed on. Same parameters
    (and state-dict keys) as the RPN it is made from."""

    @classmethod
    def from_rpn(cls, rpn: RegionProposalNetwork) -> "RegressionPyramidRPN":
        out = cls(rpn.anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold,
                  rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image,
                  rpn.fg_bg_sampler.positive_fraction, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n),
                  rpn.nms_thresh, rpn.score_thresh)
        out.box_coder = rpn.box_coder
        return out

    def forward(self, images, features: dict[str, Tensor], targets=None):
        return super().forward(images, {k: v for k, v in features.items() if not k.startswith(CLS_PREFIX)},
                               targets)


def anchor_generator(anchors: Optional[Mapping[str, Sequence]]) -> AnchorGenerator:
    """An AnchorGenerator from an anchors file's ``sizes`` (per level) and ``aspect_ratios`` (per level, or one
    list for all levels); None gives the defaults. Every level must have the same anchor count (torchvision's
    RPN head has one conv for all levels)."""
    if not anchors:
        return AnchorGenerator(sizes=DEFAULT_ANCHOR_SIZES, aspect_ratios=(DEFAULT_ASPECT_RATIOS,) * 5)
    sizes = tuple(tuple(float(s) for s in level) for level in anchors["sizes"])
    ratios = anchors["aspect_ratios"]
    if ratios and not isinstance(ratios[0], (list, tuple)):
        ratios = [ratios] * len(sizes)
    ratios = tuple(tuple(float(r) for r in level) for level in ratios)
    if len(ratios) != len(sizes):
        raise ValueError(f"anchors have {len(sizes)} size levels but {len(ratios)} aspect-ratio levels")
    counts = {len(s) * len(r) for s, r in zip(sizes, ratios)}
    if len(counts) != 1:
        raise ValueError(f"every FPN level needs the same number of anchors, got {sorted(counts)}")
    if len(sizes) != 5:
        raise ValueError(f"anchors need 5 levels (P2..P6), got {len(sizes)}")
    return AnchorGenerator(sizes=sizes, aspect_ratios=ratios)


def build_detector(cfg: Mapping[str, Any], *, num_classes: int,
                   anchors: Optional[Mapping[str, Sequence]] = None) -> FasterRCNN:
    """Faster R-CNN + FPN from a model config section (schema defaults apply to missing keys). ``num_classes``
    excludes background. ``anchors`` (the anchors stage's JSON: ``sizes`` per level, ``aspect_ratios``) replace
    the default anchors when given. The inference settings (``infer`` keys of the schema) start at their
    defaults; :func:`set_inference` changes them on a built model."""

    def get(key: str) -> Any:
        return cfg[key] if key in cfg else schema_default("model", key)

    if get("arch") != "faster_rcnn":
        raise ValueError(f"unknown arch {cfg['arch']!r}")
    head = get("head")
    if head not in ("sibling", "tsd"):
        raise ValueError(f"head must be 'sibling' or 'tsd', got {head!r}")
    decoupled = bool(get("decoupled_backbone"))
    if decoupled and head != "tsd":
        raise ValueError("decoupled_backbone needs head: tsd (the sibling head reads a single pyramid)")
    fpn = int(get("fpn_channels"))
    rep = int(get("representation_size"))
    backbone = build_backbone(cfg["backbone"], width=int(get("width")), out_channels=fpn,
                              trainable_layers=int(get("trainable_layers")), norm=get("norm"),
                              dcn=bool(get("dcn")), weights_path=get("backbone_weights"), decoupled=decoupled)
    pooled = 7 * 7 * fpn
    wsddn = bool(get("wsddn"))
    model = (WSDDNFasterRCNN if wsddn else FasterRCNN)(
        backbone, num_classes=None, rpn_anchor_generator=anchor_generator(anchors),
        box_head=TwoMLPHead(pooled, rep), box_predictor=FastRCNNPredictor(rep, num_classes + 1),
        min_size=int(get("min_size")), max_size=int(get("max_size")),
        rpn_pre_nms_top_n_train=int(get("rpn_pre_nms_top_n_train")),
        rpn_post_nms_top_n_train=int(get("rpn_post_nms_top_n_train")),
        rpn_pre_nms_top_n_test=int(get("rpn_pre_nms_top_n_test")),
        rpn_post_nms_top_n_test=int(get("rpn_post_nms_top_n_test")),
        rpn_nms_thresh=float(get("rpn_nms_thresh")),
        rpn_batch_size_per_image=int(get("rpn_batch_size_per_image")),
        box_batch_size_per_image=int(get("box_batch_size_per_image")),
        box_nms_thresh=float(get("box_nms_thresh")),
        box_score_thresh=float(schema_default("infer", "score_thr")),
        box_detections_per_img=int(schema_default("infer", "max_per_image")),
    )
    if decoupled:
        model.rpn = RegressionPyramidRPN.from_rpn(model.rpn)
    expert = bool(get("expert"))
    tsd = TSDSettings(gamma=float(get("tsd_gamma")), margin_cls=float(get("margin_cls")),
                      margin_reg=float(get("margin_reg")), offset_hidden=int(get("tsd_offset_hidden")),
                      margin_loss_weight=float(get("tsd_margin_loss_weight")))
    if get("cascade"):
        model.roi_heads = CascadeRoIHeads.from_roi_heads(
            model.roi_heads, num_classes=num_classes + 1, in_channels=fpn, representation_size=rep,
            stage_iou_thresholds=get("cascade_iou"), stage_loss_weights=get("cascade_weights"),
            decoupled=tsd if head == "tsd" else None, expert_mode=expert)
    elif head == "tsd":
        model.roi_heads = TSDRoIHeads.from_roi_heads(model.roi_heads, num_classes=num_classes + 1,
                                                     in_channels=fpn, expert_mode=expert, tsd=tsd,
                                                     sibling_loss_weight=float(get("tsd_sibling_loss_weight")))
    else:
        model.roi_heads = SiblingRoIHeads.from_roi_heads(model.roi_heads, expert_mode=expert)
    if wsddn:
        model.attach_wsddn(in_features=rep, num_classes=num_classes,
                           settings=WSDDNSettings(weight=float(get("wsddn_weight")),
                                                  pseudo_thr=float(get("pseudo_thr")),
                                                  pseudo_weight=float(get("pseudo_weight"))))
    if get("weights"):
        state = torch.load(get("weights"), map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
            state = state["model"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if not any(k in model.state_dict() for k in state):
            raise ValueError(f"weights file {get('weights')} shares no key with the detector")
        log.info("detector weights from %s (%d missing, %d unexpected keys)", get("weights"), len(missing),
                 len(unexpected))
    return model


def set_inference(model: FasterRCNN, *, score_thr: float, max_per_image: int, box_nms_thresh: float,
                  rpn_pre_nms_top_n_test: int, rpn_post_nms_top_n_test: int) -> None:
    """Set the inference-time settings of a built detector (the schema's ``infer`` keys and the ``infer``
    section's ``score_thr`` / ``max_per_image``): what the RPN keeps, and the box head's score threshold,
    per-class NMS threshold and detections per image. Training is not affected."""
    model.rpn._pre_nms_top_n["testing"] = int(rpn_pre_nms_top_n_test)
    model.rpn._post_nms_top_n["testing"] = int(rpn_post_nms_top_n_test)
    model.roi_heads.score_thresh = float(score_thr)
    model.roi_heads.nms_thresh = float(box_nms_thresh)
    model.roi_heads.detections_per_img = int(max_per_image)


def set_class_mixing(model: FasterRCNN, mixing: Optional[ClassMixing]) -> None:
    """Switch confusing-class mixing of the classification losses (training) of any of our RoI heads."""
    if not hasattr(model.roi_heads, "class_mixing"):
        raise ValueError(f"{type(model.roi_heads).__name__} has no class mixing")
    model.roi_heads.class_mixing = mixing


def set_expert_mode(model: FasterRCNN, on: bool) -> None:
    """Switch the expert-model mode of any of our RoI heads."""
    if not hasattr(model.roi_heads, "expert_mode"):
        raise ValueError(f"{type(model.roi_heads).__name__} has no expert mode")
    model.roi_heads.expert_mode = bool(on)


def select_device(device: str = "auto", *, local_rank: int | None = None) -> torch.device:
    """"auto" -> CUDA when present, else CPU; with ``local_rank`` a CUDA device is that GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(device)
