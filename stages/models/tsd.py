"""The Decoupling Head (TSD: "Revisiting the Sibling Head in Object Detector", Song et al., CVPR 2020) as a
drop-in replacement of torchvision's :class:`~torchvision.models.detection.roi_heads.RoIHeads`.

From the RoI feature F pooled at a shared proposal P = (x1, y1, x2, y2) with w, h:

* ΔC = γ · F_c(F) · (w, h): a per-bin offset field (k × k × 2); the classification branch pools each of its
  k × k bins at the bin's position shifted by its own offset (deformable per-bin sampling);
* ΔR = γ · F_r(F) · (w, h): one global offset (2); the regression branch pools at P_r = P + ΔR and regresses
  relative to P_r (so the box coder encodes targets against P_r and decodes against it at test time).

F_c and F_r are three-layer FC nets whose last layer starts at zero (a fresh head pools exactly at P). Each
branch has its own two-FC stack. The sibling head (``box_head`` + ``box_predictor``, torchvision's
TwoMLPHead/FastRCNNPredictor) runs in training only and is tied to the decoupled one by the Controllable Margin
Losses of :mod:`stages.models.losses`; at test time only the decoupled branches run.

**Pooling.** Both branches sample with :func:`deformable_roi_pool`: s × s bilinear samples per bin on the FPN
level that torchvision's ``LevelMapper`` (inside the ``MultiScaleRoIAlign`` given as ``box_roi_pool``) picks for
the shared proposal P. With zero offsets it equals ``roi_align(..., sampling_ratio=s, aligned=False)`` (the
pooling torchvision's Faster R-CNN uses). When the offsets need a gradient (training) it samples with
``torch.nn.functional.grid_sample``, which is differentiable with respect to the sampling positions (this is how
the offset nets learn); otherwise (inference) it runs ``roi_align`` on the k·k shifted bins, which gives the same
values faster. No deformable-RoI-pool CUDA op is needed, so the same code runs on CPU and GPU.

**Expert-model mode** (``expert_mode=True``, test time only; :class:`~stages.models.heads.ExpertGate`): an RoI
whose background score beats every foreground score is dropped before the regression branch runs.

Loss keys in training: ``loss_classifier``/``loss_box_reg`` (decoupled branches),
``loss_classifier_sibling``/``loss_box_reg_sibling`` (sibling head), ``loss_margin_cls``/``loss_margin_reg``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, roi_align

from stages.models.backbones import CLS_PREFIX
from stages.models.heads import TwoPathRoIHeads, detections, roi_heads_settings
from stages.models.losses import ClassMixing, classification_loss, margin_cls_loss, margin_reg_loss


@dataclass(frozen=True)
class TSDSettings:
    """The Decoupling Head's hyper-parameters: offset scale γ; margins m_c, m_r of the Controllable Margin
    Losses (0 disables the loss's margin, not the loss) and those losses' weight; the width of the offset nets
    F_c, F_r; samples per bin side of the pooling."""

    gamma: float = 0.1
    margin_cls: float = 0.2
    margin_reg: float = 0.2
    margin_loss_weight: float = 1.0
    offset_hidden: int = 256
    sampling_ratio: int = 2

    def __post_init__(self):
        if self.gamma <= 0:
            raise ValueError(f"gamma must be positive, got {self.gamma}")
        if self.sampling_ratio < 1:
            raise ValueError(f"sampling_ratio must be >= 1, got {self.sampling_ratio}")


def deformable_roi_pool(features: list[Tensor], scales: list[float], levels: Tensor, rois: Tensor,
                        offsets: Tensor, *, output_size: int, sampling_ratio: int = 2, method: str = "auto"
                        ) -> Tensor:
    """Pool ``rois`` with per-bin offsets by bilinear sampling.

    features: L maps (B, C, H_l, W_l); scales: feature/image scale per map (1/stride); levels: int64 (K,) map
    index per RoI; rois: (K, 5) rows (batch index, x1, y1, x2, y2) in image pixels; offsets: (K, k, k, 2) shift
    (dx, dy) in image pixels of bin (row i, column j), k = ``output_size``. Each bin averages
    ``sampling_ratio``² bilinear samples at the bin's regular positions shifted by its offset, with roi_align's
    border rule (a sample more than one pixel outside the map reads 0, one within it reads the clamped
    position). Returns (K, C, k, k) in the features' dtype.

    method: "grid" samples with ``grid_sample`` (differentiable with respect to ``offsets``, in the dtype of
    ``rois``: fp32 under AMP); "bins" runs ``roi_align`` on the K·k·k shifted bins (same values, about 3x
    faster on CPU, no gradient to ``offsets``); "auto" takes "grid" when ``offsets`` needs a gradient.
    """
    k, s = int(output_size), int(sampling_ratio)
    n = rois.shape[0]
    if offsets.shape != (n, k, k, 2):
        raise ValueError(f"offsets must have shape ({n}, {k}, {k}, 2), got {tuple(offsets.shape)}")
    if method not in ("auto", "grid", "bins"):
        raise ValueError(f"method must be 'auto', 'grid' or 'bins', got {method!r}")
    if n == 0:
        return features[0].new_zeros((0, features[0].shape[1], k, k))
    if method == "auto":
        method = "grid" if torch.is_grad_enabled() and offsets.requires_grad else "bins"
    pool = _pool_grid if method == "grid" else _pool_bins
    return pool(features, scales, levels, rois, offsets, k, s)


def _pool_bins(features: list[Tensor], scales: list[float], levels: Tensor, rois: Tensor, offsets: Tensor,
               k: int, s: int) -> Tensor:
    n = rois.shape[0]
    x1, y1, x2, y2 = rois[:, 1:2], rois[:, 2:3], rois[:, 3:4], rois[:, 4:5]
    steps = torch.arange(k, dtype=rois.dtype, device=rois.device)[None]
    bw, bh = (x2 - x1) / k, (y2 - y1) / k
    bx = (x1 + steps * bw)[:, None, :].expand(n, k, k)  # column j
    by = (y1 + steps * bh)[:, :, None].expand(n, k, k)  # row i
    bx = bx + offsets[..., 0].to(rois.dtype)
    by = by + offsets[..., 1].to(rois.dtype)
    bins = torch.stack([bx, by, bx + bw[:, :, None], by + bh[:, :, None]], -1).reshape(-1, 4)
    batch = rois[:, :1].repeat_interleave(k * k, 0)
    bin_levels = levels.repeat_interleave(k * k)
    c = features[0].shape[1]
    out = features[0].new_zeros((n * k * k, c))
    for lvl, (feat, scale) in enumerate(zip(features, scales)):
        idx = torch.where(bin_levels == lvl)[0]
        if idx.numel() == 0:
            continue
        # aligned=True reads pixel i at coordinate i + 0.5 and never enlarges sub-pixel bins: shift the boxes
        # by half a pixel to get the aligned=False pixel convention without its 1-pixel minimum bin size
        boxes = torch.cat([batch[idx], bins[idx] + 0.5 / scale], 1)
        pooled = roi_align(feat, boxes.to(feat.dtype), output_size=1, spatial_scale=scale, sampling_ratio=s,
                           aligned=True)
        out[idx] = pooled.reshape(-1, c).to(out.dtype)
    return out.reshape(n, k, k, c).permute(0, 3, 1, 2).contiguous()


def _pool_grid(features: list[Tensor], scales: list[float], levels: Tensor, rois: Tensor, offsets: Tensor,
               k: int, s: int) -> Tensor:
    n = rois.shape[0]
    ks = k * s
    dtype = rois.dtype
    frac = (torch.arange(ks, dtype=dtype, device=rois.device) + 0.5) / ks
    x1, y1, x2, y2 = rois[:, 1:2], rois[:, 2:3], rois[:, 3:4], rois[:, 4:5]
    xs = x1 + frac[None] * (x2 - x1)  # (K, ks)
    ys = y1 + frac[None] * (y2 - y1)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # (K, ks, ks, 2)
    grid = grid + offsets.to(dtype).repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
    out = features[0].new_zeros((n, features[0].shape[1], k, k))
    batch = rois[:, 0].to(torch.int64)
    for lvl, (feat, scale) in enumerate(zip(features, scales)):
        h, w = feat.shape[-2:]
        size = torch.tensor([w, h], dtype=dtype, device=rois.device)
        for b in torch.unique(batch[levels == lvl]).tolist():
            idx = torch.where((levels == lvl) & (batch == b))[0]
            u = grid[idx] * scale  # pixel i at coordinate i, as roi_align(aligned=False)
            inside = ((u >= -1.0) & (u <= size)).all(-1).to(feat.dtype)  # roi_align's out-of-map rule
            g = (u + 0.5) * (2.0 / size) - 1.0  # grid_sample(align_corners=False) reads pixel i at i + 0.5
            sampled = F.grid_sample(feat[b:b + 1].to(g.dtype), g.reshape(1, -1, ks, 2), mode="bilinear",
                                    padding_mode="border", align_corners=False)  # (1, C, m*ks, ks)
            sampled = sampled.reshape(feat.shape[1], idx.numel(), ks, ks).transpose(0, 1) * inside[:, None]
            out[idx] = F.avg_pool2d(sampled, s).to(out.dtype)
    return out


def translated_roi_pool(features: list[Tensor], scales: list[float], levels: Tensor, rois: Tensor, *,
                        output_size: int, sampling_ratio: int = 2) -> Tensor:
    """``roi_align`` of ``rois`` (K, 5) on the map ``levels`` (K,) assigns each one, with the pixel convention of
    :func:`deformable_roi_pool` (equal to it with a constant offset per RoI added to ``rois``; no gradient to
    the boxes). One ``roi_align`` call per level with k x k bins instead of K·k·k one-bin calls: the eval-time
    pooling of the regression branch at P_r. Returns (K, C, k, k) in the features' dtype."""
    k, s = int(output_size), int(sampling_ratio)
    n, c = rois.shape[0], features[0].shape[1]
    if n == 0:
        return features[0].new_zeros((0, c, k, k))
    out = features[0].new_empty((n, c, k, k))
    for lvl, (feat, scale) in enumerate(zip(features, scales)):
        idx = torch.where(levels == lvl)[0]
        if idx.numel() == 0:
            continue
        # aligned=True with a half-pixel shift: roi_align(aligned=False)'s pixel convention without its 1-pixel
        # minimum RoI size, as in _pool_bins
        boxes = torch.cat([rois[idx, :1], rois[idx, 1:] + 0.5 / scale], 1)
        out[idx] = roi_align(feat, boxes.to(feat.dtype), output_size=k, spatial_scale=scale, sampling_ratio=s,
                             aligned=True).to(out.dtype)
    return out


def _offset_net(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    net = nn.Sequential(nn.Flatten(1), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def roi_levels(box_roi_pool: MultiScaleRoIAlign, features: dict[str, Tensor], proposals: list[Tensor]
               ) -> tuple[list[Tensor], list[float], Tensor]:
    """The maps, their scales and each proposal's level, as ``box_roi_pool`` (already called once) pools them."""
    maps = [v for name, v in features.items() if name in box_roi_pool.featmap_names]
    if box_roi_pool.scales is None or box_roi_pool.map_levels is None:
        raise RuntimeError("box_roi_pool has not set up its scales; call it once first")
    if len(maps) == 1:
        levels = torch.zeros(sum(len(p) for p in proposals), dtype=torch.int64, device=maps[0].device)
    else:
        levels = box_roi_pool.map_levels(proposals)
    return maps, list(box_roi_pool.scales), levels


def classification_maps(box_roi_pool: MultiScaleRoIAlign, features: dict[str, Tensor], maps: list[Tensor]
                        ) -> list[Tensor]:
    """The maps the classification branch pools from: with a decoupled backbone (features also hold the
    classification pyramid under ``CLS_PREFIX + name``) those, in the order of ``maps`` from
    :func:`roi_levels`; otherwise ``maps`` itself."""
    names = [name for name in features if name in box_roi_pool.featmap_names]
    if not all(CLS_PREFIX + name in features for name in names):
        return maps
    return [features[CLS_PREFIX + name] for name in names]


def rois_with_batch_index(proposals: list[Tensor]) -> Tensor:
    """(sum N_i, 5) rows (image index, x1, y1, x2, y2) from per-image (N_i, 4) boxes."""
    ref = proposals[0]
    idx = [torch.full((len(p), 1), i, dtype=ref.dtype, device=ref.device) for i, p in enumerate(proposals)]
    return torch.cat([torch.cat(idx), torch.cat(proposals)], 1)


@dataclass(frozen=True)
class PooledRoIs:
    """The RoI feature F at the shared proposals P and what the decoupled branches sample from.

    shared: F (N, C, k, k); rois: P as (N, 5) rows (image index, x1, y1, x2, y2); levels: int64 (N,) map of each
    RoI; maps / cls_maps: the regression / classification pyramids (:func:`roi_levels`,
    :func:`classification_maps`); scales: feature/image scale per map. Indexing with a mask or indices keeps
    those RoIs (the maps stay)."""

    shared: Tensor
    rois: Tensor
    levels: Tensor
    maps: list[Tensor]
    cls_maps: list[Tensor]
    scales: list[float]

    def __getitem__(self, keep: Tensor) -> "PooledRoIs":
        return PooledRoIs(self.shared[keep], self.rois[keep], self.levels[keep], self.maps, self.cls_maps,
                          self.scales)


def pool_rois(box_roi_pool: MultiScaleRoIAlign, features: dict[str, Tensor], proposals: list[Tensor],
              image_shapes: list[tuple[int, int]]) -> PooledRoIs:
    """Pool F at ``proposals`` (per image (N_i, 4)) with ``box_roi_pool`` and gather what the branches need."""
    shared = box_roi_pool(features, proposals, image_shapes)  # also sets up the level mapper
    maps, scales, levels = roi_levels(box_roi_pool, features, proposals)
    return PooledRoIs(shared, rois_with_batch_index(proposals), levels, maps,
                      classification_maps(box_roi_pool, features, maps), scales)


def square_output_size(box_roi_pool: MultiScaleRoIAlign) -> int:
    """The RoI output size k of a pooler with a square k x k output (the decoupled branches need one)."""
    k_h, k_w = box_roi_pool.output_size
    if k_h != k_w:
        raise ValueError(f"the Decoupling Head needs a square RoI output size, got {(k_h, k_w)}")
    return int(k_h)


def box_regression_loss(deltas: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
    """torchvision's Fast R-CNN box loss (smooth L1, beta 1/9, summed over positives / number of RoIs) for
    class-specific (N, C*4) or class-agnostic (N, 4) ``deltas``; targets (N, 4); labels int64 (N,)."""
    n = labels.numel()
    pos = torch.where(labels > 0)[0]
    d = deltas.reshape(n, -1, 4)
    d = d[pos, labels[pos]] if d.shape[1] > 1 else d[pos, 0]
    return F.smooth_l1_loss(d, targets[pos], beta=1 / 9, reduction="sum") / max(n, 1)


def select_deltas(deltas: Tensor, labels: Tensor) -> Tensor:
    """The (N, 4) deltas of class ``labels`` from class-specific (N, C*4) or class-agnostic (N, 4) ``deltas``."""
    d = deltas.reshape(labels.numel(), -1, 4)
    if d.shape[1] == 1:
        return d[:, 0]
    return d[torch.arange(labels.numel(), device=labels.device), labels]


class DecoupledHead(nn.Module):
    """The decoupled classification and regression branches of TSD for one set of shared proposals.

    ``num_reg_classes`` is ``num_classes`` for class-specific boxes (TSD as published) or 1 for class-agnostic
    boxes (a cascade stage). Both branches read a :class:`PooledRoIs`.
    """

    def __init__(self, *, in_channels: int, resolution: int, num_classes: int, num_reg_classes: int,
                 representation_size: int = 1024, settings: TSDSettings = TSDSettings()):
        super().__init__()
        k = int(resolution)
        feat_dim = in_channels * k * k
        self.resolution = k
        self.gamma = float(settings.gamma)
        self.sampling_ratio = int(settings.sampling_ratio)
        self.offset_cls = _offset_net(feat_dim, settings.offset_hidden, k * k * 2)
        self.offset_reg = _offset_net(feat_dim, settings.offset_hidden, 2)
        self.cls_head = TwoMLPHead(feat_dim, representation_size)
        self.cls_score = nn.Linear(representation_size, num_classes)
        self.reg_head = TwoMLPHead(feat_dim, representation_size)
        self.bbox_pred = nn.Linear(representation_size, num_reg_classes * 4)

    def _pool(self, maps: list[Tensor], scales: list[float], levels: Tensor, rois: Tensor,
              offsets: Tensor) -> Tensor:
        return deformable_roi_pool(maps, scales, levels, rois, offsets, output_size=self.resolution,
                                   sampling_ratio=self.sampling_ratio)

    def classify(self, pooled: PooledRoIs) -> Tensor:
        """Class logits (N, num_classes) from bins pooled at P + ΔC (on the classification pyramid)."""
        rois, k = pooled.rois, self.resolution
        wh = rois[:, 3:] - rois[:, 1:3]
        delta_c = self.gamma * self.offset_cls(pooled.shared).view(len(rois), k, k, 2) * wh[:, None, None, :]
        return self.cls_score(self.cls_head(self._pool(pooled.cls_maps, pooled.scales, pooled.levels, rois,
                                                       delta_c)))

    def regress(self, pooled: PooledRoIs) -> tuple[Tensor, Tensor]:
        """(deltas (N, num_reg_classes*4) relative to P_r, P_r (N, 4)) with P_r = P + ΔR."""
        rois, k = pooled.rois, self.resolution
        wh = rois[:, 3:] - rois[:, 1:3]
        delta_r = self.gamma * self.offset_reg(pooled.shared) * wh  # (N, 2)
        rois_r = rois[:, 1:] + delta_r.repeat(1, 2)
        if torch.is_grad_enabled() and delta_r.requires_grad:
            # pooling P with ΔR on every bin is pooling at P_r, differentiable with respect to ΔR
            feat = self._pool(pooled.maps, pooled.scales, pooled.levels, rois,
                              delta_r[:, None, None, :].expand(len(rois), k, k, 2))
        else:  # the same values with one k x k roi_align per level (at P's level, as above)
            feat = translated_roi_pool(pooled.maps, pooled.scales, pooled.levels,
                                       torch.cat([rois[:, :1], rois_r], 1), output_size=k,
                                       sampling_ratio=self.sampling_ratio)
        return self.bbox_pred(self.reg_head(feat)), rois_r


def decoupled_losses(*, class_logits: Tensor, deltas: Tensor, rois_r: Tensor, sibling_logits: Tensor,
                     sibling_deltas: Tensor, rois: Tensor, labels: Tensor, matched_gt: Tensor, box_coder,
                     settings: TSDSettings, mixing: Optional[ClassMixing] = None) -> dict[str, Tensor]:
    """The six TSD losses of one set of sampled RoIs (all tensors concatenated over images).

    rois_r: P_r (N, 4), attached to ΔR (the regression targets use it detached, the IoU margin loss attached);
    rois: P (N, 4); labels int64 (N,); matched_gt (N, 4); box_coder: the coder of this head; settings: the
    margins (the margin losses are returned unweighted); mixing: confusing-class groups of both classification
    losses (None: plain cross-entropy; the margin loss keeps the hard labels).
    Keys: classifier, box_reg, classifier_sibling, box_reg_sibling, margin_cls, margin_reg.
    """
    targets_r = box_coder.encode_single(matched_gt, rois_r.detach())
    targets_p = box_coder.encode_single(matched_gt, rois)
    pos = torch.where(labels > 0)[0]
    lab_pos = labels[pos]
    # decode in fp32: torchvision's BoxCoder casts the boxes to the deltas' dtype (fp16/bf16 under AMP)
    tsd_boxes = box_coder.decode_single(select_deltas(deltas[pos], lab_pos).float(), rois_r[pos].float())
    sib_boxes = box_coder.decode_single(select_deltas(sibling_deltas[pos], lab_pos).float(), rois[pos].float())
    matched_gt = matched_gt.float()
    return {
        "classifier": classification_loss(class_logits, labels, mixing),
        "box_reg": box_regression_loss(deltas, targets_r, labels),
        "classifier_sibling": classification_loss(sibling_logits, labels, mixing),
        "box_reg_sibling": box_regression_loss(sibling_deltas, targets_p, labels),
        "margin_cls": margin_cls_loss(class_logits, sibling_logits, labels, margin=settings.margin_cls),
        "margin_reg": margin_reg_loss(tsd_boxes, sib_boxes, matched_gt[pos], margin=settings.margin_reg),
    }


def matched_gt_boxes(targets: list[dict[str, Tensor]], matched_idxs: list[Tensor], dtype: torch.dtype
                     ) -> list[Tensor]:
    """Per image, the ground-truth box each sampled proposal was matched to (zeros for images without boxes)."""
    out = []
    for t, idx in zip(targets, matched_idxs):
        gt = t["boxes"].to(dtype)
        out.append(gt[idx] if gt.numel() else gt.new_zeros((idx.numel(), 4)))
    return out


class TSDRoIHeads(TwoPathRoIHeads):
    """RoI heads with the Decoupling Head; same ``forward(features, proposals, image_shapes, targets=None)
    -> (detections, losses)`` contract as torchvision's :class:`RoIHeads` (boxes only: no masks/keypoints).

    box_roi_pool: a :class:`~torchvision.ops.MultiScaleRoIAlign` (its level mapping and output size k are
    reused); box_head, box_predictor: the sibling head (default TwoMLPHead + FastRCNNPredictor);
    in_channels: FPN channels; num_classes: including background; tsd: the Decoupling Head's settings;
    sibling_loss_weight: weight of the sibling head's losses; expert_mode: drop RoIs with background winning
    before regression (:class:`~stages.models.heads.ExpertGate`). The other arguments are torchvision's.
    The decoupled branches live in ``self.decoupled`` (:class:`DecoupledHead`).
    """

    def __init__(self, box_roi_pool: MultiScaleRoIAlign, box_head: Optional[nn.Module] = None,
                 box_predictor: Optional[nn.Module] = None, *, in_channels: int, num_classes: int,
                 representation_size: int = 1024, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 bbox_reg_weights: Optional[tuple[float, float, float, float]] = None, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100, tsd: TSDSettings = TSDSettings(),
                 sibling_loss_weight: float = 1.0, expert_mode: bool = False):
        if not isinstance(box_roi_pool, MultiScaleRoIAlign):
            raise ValueError("TSDRoIHeads needs a torchvision MultiScaleRoIAlign as box_roi_pool")
        k = square_output_size(box_roi_pool)
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        feat_dim = in_channels * k * k
        if box_head is None:
            box_head = TwoMLPHead(feat_dim, representation_size)
        if box_predictor is None:
            box_predictor = FastRCNNPredictor(representation_size, num_classes)
        super().__init__(box_roi_pool, box_head, box_predictor, fg_iou_thresh, bg_iou_thresh,
                         batch_size_per_image, positive_fraction, bbox_reg_weights, score_thresh, nms_thresh,
                         detections_per_img)
        self.num_classes = num_classes
        self.tsd = tsd
        self.sibling_loss_weight = float(sibling_loss_weight)
        self.expert_mode = bool(expert_mode)
        self.decoupled = DecoupledHead(in_channels=in_channels, resolution=k, num_classes=num_classes,
                                       num_reg_classes=num_classes, representation_size=representation_size,
                                       settings=tsd)

    @classmethod
    def from_roi_heads(cls, roi_heads: RoIHeads, *, num_classes: int, in_channels: Optional[int] = None,
                       **kwargs) -> "TSDRoIHeads":
        """A TSD head that reuses ``roi_heads``' pooler, sibling head/predictor and sampling/inference settings
        (e.g. ``model.roi_heads = TSDRoIHeads.from_roi_heads(model.roi_heads, num_classes=n)``)."""
        pool = roi_heads.box_roi_pool
        if in_channels is None:
            fc6 = getattr(roi_heads.box_head, "fc6", None)
            if fc6 is None:
                raise ValueError("cannot infer in_channels from this box_head; pass in_channels")
            k_h, k_w = pool.output_size
            in_channels = fc6.in_features // (k_h * k_w)
        settings = roi_heads_settings(roi_heads)
        rep = getattr(getattr(roi_heads.box_head, "fc7", None), "out_features", None)
        if rep is not None:
            settings["representation_size"] = rep
        settings.update(kwargs)
        return cls(pool, roi_heads.box_head, roi_heads.box_predictor, in_channels=in_channels,
                   num_classes=num_classes, **settings)

    def train_losses(self, features: dict[str, Tensor], proposals: list[Tensor],
                     image_shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        proposals, matched_idxs, labels, _ = self.select_training_samples(proposals, targets)
        pooled = pool_rois(self.box_roi_pool, features, proposals, image_shapes)
        class_logits = self.decoupled.classify(pooled)
        box_regression, rois_r = self.decoupled.regress(pooled)
        sib_logits, sib_regression = self.box_predictor(self.box_head(pooled.shared))
        parts = decoupled_losses(class_logits=class_logits, deltas=box_regression, rois_r=rois_r,
                                 sibling_logits=sib_logits, sibling_deltas=sib_regression, rois=pooled.rois[:, 1:],
                                 labels=torch.cat(labels),
                                 matched_gt=torch.cat(matched_gt_boxes(targets, matched_idxs, proposals[0].dtype)),
                                 box_coder=self.box_coder, settings=self.tsd, mixing=self.class_mixing)
        return {
            "loss_classifier": parts["classifier"],
            "loss_box_reg": parts["box_reg"],
            "loss_classifier_sibling": self.sibling_loss_weight * parts["classifier_sibling"],
            "loss_box_reg_sibling": self.sibling_loss_weight * parts["box_reg_sibling"],
            "loss_margin_cls": self.tsd.margin_loss_weight * parts["margin_cls"],
            "loss_margin_reg": self.tsd.margin_loss_weight * parts["margin_reg"],
        }

    def detect(self, features: dict[str, Tensor], proposals: list[Tensor],
               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        pooled = pool_rois(self.box_roi_pool, features, proposals, image_shapes)
        class_logits = self.decoupled.classify(pooled)
        counts, (class_logits, pooled) = self.expert_gate(class_logits, [len(p) for p in proposals], class_logits,
                                                          pooled)
        box_regression, rois_r = self.decoupled.regress(pooled)
        # decode in fp32: torchvision's BoxCoder casts the boxes to the deltas' dtype (fp16/bf16 under AMP)
        return detections(*self.postprocess_detections(class_logits.float(), box_regression.float(),
                                                       list(rois_r.split(counts)), image_shapes))


__all__ = ["DecoupledHead", "PooledRoIs", "TSDRoIHeads", "TSDSettings", "box_regression_loss",
           "classification_maps", "decoupled_losses", "deformable_roi_pool", "pool_rois", "roi_levels",
           "rois_with_batch_index", "select_deltas", "square_output_size", "translated_roi_pool"]
