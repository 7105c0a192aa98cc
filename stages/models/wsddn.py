"""Weakly supervised training (paper §5.7): a WSDDN branch trained jointly with Faster R-CNN in one model.

**The branch** (Bilen & Vedaldi, "Weakly Supervised Deep Detection Networks", CVPR 2016) reads the box-head
feature x_r (the fc7 output of the first box head) of the proposals r of one image and has two streams:

    classification  σcls[r, c] = softmax over the C foreground classes of FC_cls(x_r)     (per proposal)
    detection       σdet[r, c] = softmax over the proposals r of the image of FC_det(x_r)  (per class)
    region score    x[r, c]    = σcls[r, c] · σdet[r, c]
    image score     φ[c]       = Σ_r x[r, c]  ∈ [0, 1]   (a convex combination of σcls[·, c])

**Losses** (each times ``wsddn_weight``):

* ``loss_wsddn``: binary cross-entropy of φ against the image-level labels, averaged over the known entries:
  positives are the classes with a box in the image plus its verified-present labels (confidence 1), negatives
  its verified-absent labels (confidence 0) that are not a box class; unverified classes are ignored.
* ``loss_wsddn_box`` (box-annotated images only): for each image b and each class c with a ground-truth box
  in it, let M = the image's proposals with IoU >= 0.5 to a ground-truth box of class c; the loss is
  -log Σ_{r ∈ M} σdet[r, c], averaged over the (b, c) pairs whose M is not empty. It moves the detection
  stream's mass of class c onto the proposals that overlap its boxes (a multiple-instance cross-entropy: the
  distribution over proposals should put all its mass on M, however it is spread within M).

**Pseudo ground truth** (image-level-only images, once :func:`set_pseudo_mining` switched it on, i.e. after the
warm-up): per positive class c of an image the proposal with the highest region score x[r, c] becomes a
pseudo ground-truth box of class c if x[r, c] >= ``pseudo_thr`` (ties: the first proposal). The images with at
least one pseudo box go through the fully supervised RoI head once more (its own sampling, the pseudo boxes as
targets, everything detached from the branch) and those losses, times ``pseudo_weight``, are added under their
key + ``_pseudo``. :func:`mine_pseudo_boxes` is the vectorised miner, :func:`mine_pseudo_boxes_reference` the
slow loop it is tested against.

**Which proposals and features.** Box-annotated images: the RoIs the fully supervised head samples for its own
loss (the ground-truth boxes are among the candidates) and the box-head features it computes on them — no
extra box-head pass. Sibling head: its ``box_head``; TSD: the sibling ``box_head`` on the shared feature F
(the training-only sibling, which reads what the decoupled branches are built from); cascade (with or without
TSD): stage 0's ``box_head[0]`` on stage 0's samples (the RPN proposals; later stages see refined boxes).
Image-level-only images: all the RPN's training proposals (``rpn_post_nms_top_n_train``) through the same
pooler and box head (WSDDN scores every proposal; the first box head only, so such an image costs the head
about rpn_post_nms_top_n_train / box_batch_size_per_image times a box-annotated image's first FC pass).

**RPN and box losses skip image-level-only images**: their anchors are all ignored by the RPN's sampler (label
-1) and the RoI head is called on the box-annotated images only. With every image box-annotated the losses of
the detector (every key but the branch's) are those of the plain detector, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import box_iou

from stages.models.backbones import CLS_PREFIX

#: IoU with a ground-truth box of class c at which a proposal takes part in the constraint loss of class c
CONSTRAINT_IOU = 0.5
_EPS = 1e-6


@dataclass(frozen=True)
class WSDDNSettings:
    """The branch's loss weight, the pseudo-box threshold on the region score and the pseudo-box loss weight."""

    weight: float = 1.0
    pseudo_thr: float = 0.3
    pseudo_weight: float = 0.5

    def __post_init__(self):
        if self.weight < 0 or self.pseudo_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got {self.weight}, {self.pseudo_weight}")
        if not 0.0 <= self.pseudo_thr <= 1.0:
            raise ValueError(f"pseudo_thr must lie in [0, 1], got {self.pseudo_thr}")


def segment_softmax(logits: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Softmax over the rows of each segment, per column: logits (N, C), index int64 (N,) segment of each row
    in [0, num_segments) -> (N, C), each column summing to 1 within each non-empty segment."""
    c = logits.shape[1]
    idx = index[:, None].expand(-1, c)
    top = logits.new_full((num_segments, c), float("-inf")).scatter_reduce(0, idx, logits.detach(), "amax")
    e = torch.exp(logits - top[index])
    return e / logits.new_zeros((num_segments, c)).index_add(0, index, e)[index]


@dataclass(frozen=True)
class WSDDNOutput:
    """region: x = σcls · σdet (N, C); image: φ (B, C) in [0, 1]; det: σdet (N, C)."""

    region: Tensor
    image: Tensor
    det: Tensor


class WSDDNBranch(nn.Module):
    """The two streams over box-head features: ``cls_fc`` and ``det_fc`` (in_features -> num_classes, the
    foreground classes; class j is the detector's label j + 1)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.cls_fc = nn.Linear(in_features, num_classes)
        self.det_fc = nn.Linear(in_features, num_classes)
        for fc in (self.cls_fc, self.det_fc):
            nn.init.normal_(fc.weight, std=0.01)
            nn.init.zeros_(fc.bias)

    def forward(self, feats: Tensor, index: Tensor, num_images: int) -> WSDDNOutput:
        """feats (N, in_features) of the proposals of ``num_images`` images, index int64 (N,) the image of each
        row. Computed in float32 (also under autocast)."""
        with torch.autocast(device_type=feats.device.type, enabled=False):
            feats = feats.float()
            cls = torch.softmax(self.cls_fc(feats), dim=1)
            det = segment_softmax(self.det_fc(feats), index, num_images)
            region = cls * det
            image = feats.new_zeros((num_images, self.num_classes)).index_add(0, index, region)
        return WSDDNOutput(region, image.clamp(0.0, 1.0), det)


def image_label_loss(scores: Tensor, labels: Tensor) -> Tensor:
    """BCE of image scores (B, C) in [0, 1] against labels (B, C) (1 present, 0 absent, -1 unknown: ignored),
    averaged over the known entries; 0 (connected to ``scores``) when none is known."""
    known = labels >= 0
    if not known.any():
        return scores.sum() * 0.0
    p = scores[known].clamp(_EPS, 1.0 - _EPS)
    return F.binary_cross_entropy(p, labels[known].to(p.dtype))


def box_constraint_loss(det: Tensor, index: Tensor, proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                        gt_index: Tensor, num_images: int, *, iou_thr: float = CONSTRAINT_IOU) -> Tensor:
    """-log Σ_{r ∈ M(b, c)} σdet[r, c], averaged over the (image b, class c) pairs with a ground-truth box of c
    in b and a non-empty M(b, c) = {proposals r of b : IoU(r, a box of class c in b) >= iou_thr}.

    det: σdet (N, C); index (N,): image of each proposal; proposals (N, 4) xyxy; gt_boxes (G, 4) in the same
    frame, gt_labels int64 (G,) 0-based classes, gt_index (G,) image of each box. Returns a scalar (0 connected
    to ``det`` when no pair qualifies)."""
    c = det.shape[1]
    if gt_boxes.numel() == 0 or proposals.numel() == 0:
        return det.sum() * 0.0
    hit = (box_iou(proposals.float(), gt_boxes.float()) >= iou_thr) & (index[:, None] == gt_index[None, :])
    of_class = F.one_hot(gt_labels, c).to(det.dtype)                      # (G, C)
    member = (hit.to(det.dtype) @ of_class) > 0                           # (N, C): r in M(image of r, c)
    mass = det.new_zeros((num_images, c)).index_add(0, index, det * member)
    has_gt = det.new_zeros((num_images, c)).index_put_((gt_index, gt_labels), det.new_ones(len(gt_labels))) > 0
    has_member = det.new_zeros((num_images, c)).index_add(0, index, member.to(det.dtype)) > 0
    pairs = has_gt & has_member
    if not pairs.any():
        return det.sum() * 0.0
    return -torch.log(mass[pairs].clamp(min=_EPS)).mean()


@dataclass(frozen=True)
class PseudoBoxes:
    """Mined pseudo ground truth: image (K,) int64, boxes (K, 4), labels (K,) int64 0-based classes, scores (K,);
    sorted by (image, class)."""

    image: Tensor
    boxes: Tensor
    labels: Tensor
    scores: Tensor


def mine_pseudo_boxes(region: Tensor, index: Tensor, proposals: Tensor, positives: Tensor, *,
                      thr: float) -> PseudoBoxes:
    """Per image b and positive class c (``positives`` (B, C) bool), the proposal of b with the highest region
    score x[r, c] (the first one on ties) if that score is >= ``thr``. region (N, C); index (N,) image of each
    row; proposals (N, 4). No gradient flows (the pseudo boxes are targets)."""
    region = region.detach()
    n, c = region.shape
    b = positives.shape[0]
    dev = region.device
    if n == 0:
        z = torch.zeros(0, dtype=torch.int64, device=dev)
        return PseudoBoxes(z, proposals.new_zeros((0, 4)), z, region.new_zeros(0))
    idx = index[:, None].expand(-1, c)
    best = region.new_full((b, c), float("-inf")).scatter_reduce(0, idx, region, "amax")
    rows = torch.arange(n, device=dev)[:, None].expand(-1, c)
    cand = torch.where(region == best[index], rows, torch.full_like(rows, n))
    first = torch.full((b, c), n, dtype=torch.int64, device=dev).scatter_reduce(0, idx, cand, "amin")
    keep = positives & (first < n) & (best >= thr)
    img, cls = torch.nonzero(keep, as_tuple=True)
    r = first[img, cls]
    return PseudoBoxes(img, proposals[r].detach(), cls, best[img, cls])


def mine_pseudo_boxes_reference(region: Tensor, index: Tensor, proposals: Tensor, positives: Tensor, *,
                                thr: float) -> PseudoBoxes:
    """The slow, obvious loop :func:`mine_pseudo_boxes` must equal."""
    out_img, out_box, out_cls, out_score = [], [], [], []
    for b in range(positives.shape[0]):
        rows = [r for r in range(region.shape[0]) if int(index[r]) == b]
        for c in range(positives.shape[1]):
            if not bool(positives[b, c]) or not rows:
                continue
            best_r, best_s = rows[0], float(region[rows[0], c])
            for r in rows[1:]:
                if float(region[r, c]) > best_s:
                    best_r, best_s = r, float(region[r, c])
            if best_s >= thr:
                out_img.append(b)
                out_box.append(proposals[best_r])
                out_cls.append(c)
                out_score.append(best_s)
    as_long = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    boxes = torch.stack(out_box) if out_box else proposals.new_zeros((0, 4))
    return PseudoBoxes(as_long(out_img), boxes, as_long(out_cls), torch.tensor(out_score, dtype=region.dtype))


def image_level_targets(target: dict[str, Tensor], num_classes: int) -> Tensor:
    """The image-level labels (C,) int8 of one training target: its ``image_labels`` (1 / 0 / -1 unknown; all
    unknown when absent) with every class of its boxes set to 1."""
    labels = target.get("image_labels")
    dev = target["boxes"].device
    out = (labels.to(torch.int8).clone() if labels is not None
           else torch.full((num_classes,), -1, dtype=torch.int8, device=dev))
    if out.shape != (num_classes,):
        raise ValueError(f"image_labels must have shape ({num_classes},), got {tuple(out.shape)}")
    if target["labels"].numel():
        out[target["labels"] - 1] = 1
    return out


def is_box_annotated(target: dict[str, Tensor]) -> bool:
    flag = target.get("box_annotated")
    return True if flag is None else bool(flag)


def rpn_forward(rpn: RegionProposalNetwork, images: ImageList, features: dict[str, Tensor],
                targets: list[dict[str, Tensor]], annotated: Sequence[bool]
                ) -> tuple[list[Tensor], dict[str, Tensor]]:
    """torchvision's RPN forward in training, with the anchors of the images not ``annotated`` ignored by the
    loss (their proposals are still made). Same computation, random draws and losses as ``rpn(images, features,
    targets)`` when every image is annotated. A decoupled backbone's classification maps are left out as
    :class:`~stages.models.detector.RegressionPyramidRPN` does."""
    from stages.models.detector import RegressionPyramidRPN

    if isinstance(rpn, RegressionPyramidRPN):
        features = {k: v for k, v in features.items() if not k.startswith(CLS_PREFIX)}
    feats = list(features.values())
    objectness, pred_bbox_deltas = rpn.head(feats)
    anchors = rpn.anchor_generator(images, feats)
    num_images = len(anchors)
    num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
    objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
    proposals = rpn.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(num_images, -1, 4)
    boxes, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
    if not any(annotated):
        zero = objectness.sum() * 0.0 + pred_bbox_deltas.sum() * 0.0
        return boxes, {"loss_objectness": zero, "loss_rpn_box_reg": zero}
    labels, matched_gt_boxes = rpn.assign_targets_to_anchors(anchors, targets)
    labels = [lab if a else torch.full_like(lab, -1.0) for lab, a in zip(labels, annotated)]
    regression_targets = rpn.box_coder.encode(matched_gt_boxes, anchors)
    loss_objectness, loss_rpn_box_reg = rpn.compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
    return boxes, {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}


def first_box_head(roi_heads: nn.Module) -> nn.Module:
    """The box head whose features the branch reads: the sibling head's (also TSD's training-only sibling) or
    the cascade's stage 0."""
    head = roi_heads.box_head
    return head[0] if isinstance(head, nn.ModuleList) else head


class _FirstCall:
    """Records the proposals of the first ``box_roi_pool`` call and the output of the first box-head call."""

    def __init__(self, pool: nn.Module, head: nn.Module):
        self.pool, self.head = pool, head
        self.proposals: Optional[list[Tensor]] = None
        self.feats: Optional[Tensor] = None

    def _pre(self, _m, args) -> None:
        if self.proposals is None:
            self.proposals = list(args[1])

    def _post(self, _m, _args, out) -> None:
        if self.feats is None:
            self.feats = out

    @contextlib.contextmanager
    def recording(self) -> Iterator["_FirstCall"]:
        handles = [self.pool.register_forward_pre_hook(self._pre), self.head.register_forward_hook(self._post)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _subset(features: dict[str, Tensor], idx: list[int], n: int) -> dict[str, Tensor]:
    if len(idx) == n:
        return features
    at = torch.tensor(idx, dtype=torch.int64, device=next(iter(features.values())).device)
    return type(features)((k, v.index_select(0, at)) for k, v in features.items())


def _flat(parts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Concatenated rows and the position (in ``parts``) of each row."""
    index = torch.cat([torch.full((len(p),), i, dtype=torch.int64, device=p.device) for i, p in enumerate(parts)])
    return torch.cat(parts), index


class WSDDNFasterRCNN(FasterRCNN):
    """torchvision's Faster R-CNN with a :class:`WSDDNBranch` (``self.wsddn``) trained jointly (module docstring).

    Training targets may carry ``image_labels`` ((C,) int8: 1 present, 0 verified absent, -1 unknown) and
    ``box_annotated`` (a bool tensor; absent = True). An image with ``box_annotated`` False has no boxes: the RPN
    and box losses skip it and the branch learns from its image-level labels (and, with mining on, the box head
    from its pseudo boxes). At test time the branch is not used: detection is Faster R-CNN's.
    """

    wsddn_settings: WSDDNSettings
    mine_pseudo: bool = False

    def attach_wsddn(self, *, in_features: int, num_classes: int, settings: WSDDNSettings) -> None:
        """Add the branch (created here, after the detector, so a seed gives the detector the same weights as
        without it)."""
        self.wsddn = WSDDNBranch(in_features, num_classes)
        self.wsddn_settings = settings
        self.mine_pseudo = False

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None) -> Any:
        if not self.training:
            return super().forward(images, targets)
        if targets is None:
            raise ValueError("targets should not be None in training")
        images, targets = self.transform(images, targets)
        features = self.backbone(images.tensors)
        n = len(targets)
        annotated = [is_box_annotated(t) for t in targets]
        proposals, losses = rpn_forward(self.rpn, images, features, targets, annotated)
        ann = [i for i in range(n) if annotated[i]]
        weak = [i for i in range(n) if not annotated[i]]
        shapes = images.image_sizes
        heads = self.roi_heads
        box_head = first_box_head(heads)
        feats_parts: list[Tensor] = []
        props_parts: list[list[Tensor]] = []
        if ann:
            rec = _FirstCall(heads.box_roi_pool, box_head)
            with rec.recording():
                _, det_losses = heads(_subset(features, ann, n), [proposals[i] for i in ann],
                                      [shapes[i] for i in ann], [targets[i] for i in ann])
            losses.update(det_losses)
            if rec.feats is None or rec.proposals is None:
                raise RuntimeError(f"{type(heads).__name__} did not call its pooler and box head")
            feats_parts.append(rec.feats)
            props_parts.append(rec.proposals)
        weak_props: list[Tensor] = []
        if weak:
            weak_props = [proposals[i] for i in weak]
            pooled = heads.box_roi_pool(_subset(features, weak, n), weak_props, [shapes[i] for i in weak])
            feats_parts.append(box_head(pooled))
            props_parts.append(weak_props)
        order = ann + weak
        props = [p for part in props_parts for p in part]
        flat_props, index = _flat(props)
        out = self.wsddn(torch.cat(feats_parts), index, len(order))
        c = self.wsddn.num_classes
        img_labels = torch.stack([image_level_targets(targets[i], c) for i in order])
        s = self.wsddn_settings
        losses["loss_wsddn"] = s.weight * image_label_loss(out.image, img_labels)
        if ann:
            gt = [targets[i] for i in ann]
            gt_boxes, gt_index = _flat([t["boxes"] for t in gt])
            gt_labels = torch.cat([t["labels"] for t in gt]) - 1
            na_rows = sum(len(p) for p in props_parts[0])
            losses["loss_wsddn_box"] = s.weight * box_constraint_loss(
                out.det[:na_rows], index[:na_rows], flat_props[:na_rows], gt_boxes, gt_labels, gt_index, len(ann))
        if weak and self.mine_pseudo:
            na_rows = sum(len(p) for p in props_parts[0]) if ann else 0
            mined = mine_pseudo_boxes(out.region[na_rows:], index[na_rows:] - len(ann), flat_props[na_rows:],
                                      img_labels[len(ann):] == 1, thr=s.pseudo_thr)
            with_boxes = sorted(set(mined.image.tolist()))
            if with_boxes:
                pseudo_targets = []
                for j in with_boxes:
                    at = mined.image == j
                    pseudo_targets.append({"boxes": mined.boxes[at], "labels": mined.labels[at] + 1})
                sel = [weak[j] for j in with_boxes]
                _, pseudo_losses = heads(_subset(features, sel, n), [proposals[i] for i in sel],
                                         [shapes[i] for i in sel], pseudo_targets)
                losses.update({f"{key}_pseudo": s.pseudo_weight * v for key, v in pseudo_losses.items()})
        return losses


def set_pseudo_mining(model: nn.Module, on: bool) -> None:
    """Switch pseudo-box mining of a joint model on or off (no-op for a model without the branch)."""
    core = getattr(model, "module", model)
    if isinstance(core, WSDDNFasterRCNN):
        core.mine_pseudo = bool(on)


__all__ = ["CONSTRAINT_IOU", "PseudoBoxes", "WSDDNBranch", "WSDDNFasterRCNN", "WSDDNOutput", "WSDDNSettings",
           "box_constraint_loss", "first_box_head", "image_label_loss", "image_level_targets", "is_box_annotated",
           "mine_pseudo_boxes", "mine_pseudo_boxes_reference", "rpn_forward", "segment_softmax",
           "set_pseudo_mining"]
