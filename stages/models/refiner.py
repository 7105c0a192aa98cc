"""Box refinement (paper 8.1 "Refined detection"): a cascade of class-agnostic box regressors on RoIAlign
features of a trained detector's frozen backbone + FPN.

:class:`BoxRefiner` holds the detector's backbone (body + FPN; frozen: no gradient, always in eval mode, so its
BatchNorm uses the running statistics) and its transform (ImageNet normalisation, resize of the short side to
``min_size`` with the long side capped at ``max_size``), a ``MultiScaleRoIAlign`` over the FPN levels "0".."3"
(7x7, sampling ratio 2, as the detector pools) and K stages, each a two-FC head (``representation_size``) and a
4-delta regressor with its own box-coder weights (Cascade R-CNN's, by the nearest IoU threshold: 0.5 ->
(10, 10, 5, 5), 0.6 -> (20, 20, 10, 10), 0.7 -> (30, 30, 15, 15)). Stage k+1 pools on the boxes stage k
regressed.

Training (:meth:`BoxRefiner.forward`): a proposal is a positive of stage k when its IoU with a ground-truth box of
its own label is at least ``iou_thrs[k]``; its target is the best such box. The stage's loss is the smooth L1
(beta 1/9, torchvision's) of its deltas on the positives, summed over the 4 deltas and averaged over positives,
times ``stage_weights[k]``. Boxes are absolute xyxy pixels of the *resized* image (the transform's output size)
inside the module; :meth:`BoxRefiner.refine` takes and returns boxes in the original image's pixels.

A checkpoint (:func:`refiner_checkpoint`) is self-contained: the whole state dict (the frozen backbone's too),
the detector's backbone keys (to rebuild it without the detector file) and the refiner's config;
:func:`load_refiner` rebuilds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, box_iou
from torchvision.ops import boxes as box_ops

from stages.core.errors import InputError
from stages.models.backbones import build_backbone
from stages.models.cascade import _stage_settings

#: the detector config keys that rebuild its backbone and transform (stored in a refiner checkpoint)
BACKBONE_KEYS = ("backbone", "width", "fpn_channels", "norm", "trainable_layers", "dcn", "decoupled_backbone",
                 "min_size", "max_size")
#: FasterRCNN's normalisation (torchvision's defaults, which build_detector keeps)
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
FEATMAPS = ("0", "1", "2", "3")
#: smallest box side in pixels after a stage (the box coder's log of a width needs it > 0)
MIN_SIDE = 1.0
#: RoIs pooled per call at inference (bounds the memory of a crowded image: 4096 x 64 x 7 x 7 floats)
CHUNK = 4096


class RefinerStage(nn.Module):
    """Two FC layers on a pooled RoI feature and a class-agnostic regressor (4 deltas)."""

    def __init__(self, in_features: int, representation_size: int):
        super().__init__()
        self.head = TwoMLPHead(in_features, representation_size)
        self.bbox_pred = nn.Linear(representation_size, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features (N, C, 7, 7) -> deltas (N, 4)."""
        return self.bbox_pred(self.head(x))


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """``boxes`` (N, 4) xyxy clipped to an image of ``size`` (h, w), each side at least :data:`MIN_SIDE` pixels
    (moved inward at the image border)."""
    h, w = size
    b = box_ops.clip_boxes_to_image(boxes, (h, w))
    x1 = torch.minimum(b[:, 0], b[:, 2] - MIN_SIDE).clamp(min=0)
    y1 = torch.minimum(b[:, 1], b[:, 3] - MIN_SIDE).clamp(min=0)
    x2 = torch.maximum(b[:, 2], x1 + MIN_SIDE).clamp(max=w)
    y2 = torch.maximum(b[:, 3], y1 + MIN_SIDE).clamp(max=h)
    return torch.stack([x1, y1, x2, y2], 1)


def match_same_label(proposals: Tensor, proposal_labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """For each proposal (N, 4) the best IoU with a ground-truth box (G, 4) of its own label and that box's
    index: (iou (N,), index (N,); -1 and 0 where no box has its label)."""
    n = len(proposals)
    if n == 0 or len(gt_boxes) == 0:
        return proposals.new_full((n,), -1.0), torch.zeros(n, dtype=torch.long, device=proposals.device)
    iou = box_iou(proposals, gt_boxes)
    iou = torch.where(proposal_labels[:, None] == gt_labels[None, :], iou, iou.new_tensor(-1.0))
    return iou.max(1)


class BoxRefiner(nn.Module):
    """The refiner (see the module docstring). backbone: a detector's backbone + FPN (frozen here);
    min_size / max_size: its transform's resize; iou_thrs / stage_weights: one per stage;
    representation_size: the width of each stage's two FC layers."""

    def __init__(self, backbone: nn.Module, *, min_size: int, max_size: int, iou_thrs: Sequence[float],
                 stage_weights: Sequence[float], representation_size: int):
        super().__init__()
        thrs = [float(t) for t in iou_thrs]
        weights = [float(w) for w in stage_weights]
        reg_weights = _stage_settings(thrs, weights, None)
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.transform = GeneralizedRCNNTransform(int(min_size), int(max_size), list(IMAGE_MEAN), list(IMAGE_STD))
        self.roi_pool = MultiScaleRoIAlign(list(FEATMAPS), output_size=7, sampling_ratio=2)
        in_features = int(backbone.out_channels) * 7 * 7
        self.stages = nn.ModuleList(RefinerStage(in_features, int(representation_size)) for _ in thrs)
        self.iou_thrs, self.stage_weights = thrs, weights
        self.coders = [det_utils.BoxCoder(w) for w in reg_weights]
        self.backbone.eval()

    def train(self, mode: bool = True) -> "BoxRefiner":
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm keeps the detector's running statistics
        return self

    @torch.no_grad()
    def features(self, images: Sequence[Tensor]) -> tuple[list[dict[str, Tensor]], list[tuple[int, int]]]:
        """Images [3, H, W] in [0, 1] -> (per image its FPN maps "0".."3" (1, C, h, w), per image the resized
        size (h, w) its boxes live in). Computed without gradient."""
        il, _ = self.transform(list(images))
        feats = self.backbone(il.tensors)
        per_image = [{k: feats[k][i:i + 1] for k in FEATMAPS} for i in range(len(images))]
        return per_image, [tuple(int(v) for v in s) for s in il.image_sizes]

    def stage_deltas(self, k: int, features: Sequence[Mapping[str, Tensor]],
                     image_sizes: Sequence[tuple[int, int]], boxes: Sequence[Tensor], chunk: int | None = None
                     ) -> Tensor:
        """Stage ``k``'s deltas (sum N, 4) of the boxes of every image (absolute xyxy of the resized image),
        pooled image by image (``chunk`` RoIs at a time when given)."""
        out = []
        for feats, size, b in zip(features, image_sizes, boxes):
            step = chunk or max(len(b), 1)
            for s in range(0, max(len(b), 1), step):
                part = b[s:s + step]
                out.append(self.stages[k](self.roi_pool(dict(feats), [part], [size])))
        return torch.cat(out) if out else boxes[0].new_zeros((0, 4))

    def decode(self, k: int, deltas: Tensor, boxes: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
               ) -> list[Tensor]:
        """Stage ``k``'s boxes: ``deltas`` applied to ``boxes`` (per image), clipped to each image."""
        counts = [len(b) for b in boxes]
        if not sum(counts):
            return [b.clone() for b in boxes]
        pred = self.coders[k].decode_single(deltas.float(), torch.cat(boxes).float())
        return [clip_boxes(p, s) for p, s in zip(pred.split(counts), image_sizes)]

    def forward(self, features: Sequence[Mapping[str, Tensor]], image_sizes: Sequence[tuple[int, int]],
                proposals: Sequence[Tensor], proposal_labels: Sequence[Tensor], gt_boxes: Sequence[Tensor],
                gt_labels: Sequence[Tensor]) -> dict[str, Tensor]:
        """Training losses ``loss_box_reg_s{k}`` (each weighted) of per-image proposals (N_i, 4) with their labels
        and the ground truth (G_i, 4) with labels, all absolute xyxy of the resized image."""
        boxes = [clip_boxes(p.float(), s) for p, s in zip(proposals, image_sizes)]
        losses = {}
        for k in range(len(self.stages)):
            matched = [match_same_label(b, lab, g, gl) for b, lab, g, gl in
                       zip(boxes, proposal_labels, gt_boxes, gt_labels)]
            deltas = self.stage_deltas(k, features, image_sizes, boxes)
            pos = torch.cat([iou >= self.iou_thrs[k] for iou, _ in matched])
            target_boxes = torch.cat([g[idx] if len(g) else b for (_, idx), g, b in zip(matched, gt_boxes, boxes)])
            if pos.any():
                targets = self.coders[k].encode_single(target_boxes[pos].float(), torch.cat(boxes)[pos].float())
                loss = F.smooth_l1_loss(deltas[pos].float(), targets, beta=1 / 9, reduction="sum") / pos.sum()
            else:
                loss = deltas.sum() * 0.0  # keeps every parameter in the graph (DistributedDataParallel)
            losses[f"loss_box_reg_s{k}"] = loss * self.stage_weights[k]
            if k + 1 < len(self.stages):
                boxes = [b.detach() for b in self.decode(k, deltas.detach(), boxes, image_sizes)]
        return losses

    @torch.no_grad()
    def refine_features(self, features: Sequence[Mapping[str, Tensor]], image_sizes: Sequence[tuple[int, int]],
                        boxes: Sequence[Tensor]) -> list[Tensor]:
        """Every stage in turn on per-image boxes (absolute xyxy of the resized images); the last stage's boxes."""
        boxes = [clip_boxes(b.float(), s) for b, s in zip(boxes, image_sizes)]
        for k in range(len(self.stages)):
            deltas = self.stage_deltas(k, features, image_sizes, boxes, chunk=CHUNK)
            boxes = self.decode(k, deltas, boxes, image_sizes)
        return boxes

    @torch.no_grad()
    def refine(self, images: Sequence[Tensor], boxes: Sequence[Tensor]) -> list[Tensor]:
        """Refined boxes: ``images`` [3, H, W] in [0, 1], ``boxes`` per image (N_i, 4) absolute xyxy pixels of the
        original image -> the same boxes after every stage, absolute xyxy of the original image, clipped to it
        (each side at least a pixel where the image allows)."""
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images but {len(boxes)} box sets")
        if not images:
            return []
        was_training = self.training
        self.eval()
        try:
            feats, sizes = self.features(images)
            orig = [tuple(im.shape[-2:]) for im in images]
            ratio = [torch.tensor([s[1] / o[1], s[0] / o[0]] * 2, device=b.device)
                     for s, o, b in zip(sizes, orig, boxes)]
            out = self.refine_features(feats, sizes, [b.float() * r for b, r in zip(boxes, ratio)])
            return [clip_boxes(b / r, o) for b, r, o in zip(out, ratio, orig)]
        finally:
            self.train(was_training)

    @classmethod
    def from_detector(cls, detector: nn.Module, detector_cfg: Mapping[str, Any], cfg: Mapping[str, Any]
                      ) -> "BoxRefiner":
        """A refiner on a trained detector's backbone (shared, and frozen by this call) for refiner config
        ``cfg`` (the ``refiner`` schema section)."""
        return cls(detector.backbone, min_size=detector_cfg["min_size"], max_size=detector_cfg["max_size"],
                   iou_thrs=cfg["iou_thrs"], stage_weights=cfg["stage_weights"],
                   representation_size=cfg["representation_size"])


def backbone_config(detector_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a detector config that rebuild its backbone and transform (:data:`BACKBONE_KEYS`)."""
    return {k: detector_cfg[k] for k in BACKBONE_KEYS}


def build_refiner(backbone_cfg: Mapping[str, Any], cfg: Mapping[str, Any]) -> BoxRefiner:
    """An untrained refiner with a freshly built (random) backbone of ``backbone_cfg`` (:func:`backbone_config`);
    a checkpoint's state dict then fills it."""
    b = backbone_cfg
    backbone = build_backbone(b["backbone"], width=int(b["width"]), out_channels=int(b["fpn_channels"]),
                              trainable_layers=int(b["trainable_layers"]), norm=b["norm"], dcn=bool(b["dcn"]),
                              weights_path=None, decoupled=bool(b["decoupled_backbone"]))
    return BoxRefiner(backbone, min_size=b["min_size"], max_size=b["max_size"], iou_thrs=cfg["iou_thrs"],
                      stage_weights=cfg["stage_weights"], representation_size=cfg["representation_size"])


def refiner_checkpoint(refiner: BoxRefiner, *, backbone_cfg: Mapping[str, Any], cfg: Mapping[str, Any],
                       **meta: Any) -> dict[str, Any]:
    """A self-contained checkpoint dict: ``model`` (every weight, the frozen backbone's too), ``backbone``
    (:func:`backbone_config`), ``config`` (the refiner section) and ``meta``."""
    return {"model": {k: v.detach().cpu() for k, v in refiner.state_dict().items()},
            "backbone": dict(backbone_cfg), "config": dict(cfg), **meta}


def load_refiner(path, device: torch.device) -> tuple[BoxRefiner, dict[str, Any]]:
    """(refiner in eval mode on ``device``, the checkpoint's other entries) of a file written by
    stages.train_refiner; nothing else is read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise InputError(f"cannot load refiner checkpoint: {exc}", file=path) from exc
    if not isinstance(ckpt, dict) or not {"model", "backbone", "config"} <= set(ckpt):
        raise InputError("not a refiner checkpoint (needs model, backbone, config)", file=path)
    refiner = build_refiner(ckpt["backbone"], ckpt["config"])
    refiner.load_state_dict(ckpt["model"])
    meta = {k: v for k, v in ckpt.items() if k != "model"}
    return refiner.to(device).eval(), meta


def jitter_boxes(boxes: np.ndarray, *, copies: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``copies`` jittered copies of each box (G, 4) xyxy -> (G * copies, 4), box-major: the centre moves by
    N(0, scale) times the box's width / height, width and height are multiplied by exp(N(0, scale))."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    g = len(boxes)
    w = (boxes[:, 2] - boxes[:, 0])[:, None]
    h = (boxes[:, 3] - boxes[:, 1])[:, None]
    cx = (boxes[:, 0] + boxes[:, 2])[:, None] / 2
    cy = (boxes[:, 1] + boxes[:, 3])[:, None] / 2
    d = rng.normal(0.0, scale, size=(g, copies, 4))
    cx, cy = cx + d[..., 0] * w, cy + d[..., 1] * h
    w, h = w * np.exp(d[..., 2]), h * np.exp(d[..., 3])
    out = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    return out.reshape(-1, 4)


__all__ = ["BACKBONE_KEYS", "BoxRefiner", "RefinerStage", "backbone_config", "build_refiner", "clip_boxes",
           "jitter_boxes", "load_refiner", "match_same_label", "refiner_checkpoint"]
