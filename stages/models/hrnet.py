"""The HRNet mask network of the segmentation track (paper §8.2): a box crop in, a foreground logit per pixel out.

**Backbone**: timm's HRNet (``timm.models.hrnet``), built with ``pretrained=False`` and ``features_only=True``,
``feature_location=""`` (the four branch outputs of the last stage at strides 4, 8, 16, 32, not the
classification head's "incre" bottleneck features), for the real names :data:`TIMM_NAMES` (hrnet_w18_small ...
hrnet_w64), or ``hrnet_tiny``: the same timm classes with the narrow config :data:`TINY_CFG` (branch widths
8/16/32/64, one BASIC block per branch, a 16-channel first stem conv) that trains on one CPU thread in under a
minute. A local weights file (``cfg["weights"]``) is honoured: an ImageNet classification state dict of the
same HRNet (its head keys ignored) or a whole mask-net state dict (``backbone.*``/``head.*``/``classifier.*``).

**Head** (HRNetV2, Wang et al.): the four branches upsampled (bilinear) to the stride-4 branch's size and
concatenated, 1x1 conv + BN + ReLU to ``head_channels``, a 1x1 per-pixel classifier (1 logit: foreground),
bilinear x4 up to the input size.

**Input size**: HRNet's fuse layers add nearest-upsampled maps of strides 4..32, which only line up when the
input side is a multiple of 32. :class:`HRNetMask` takes any square or rectangular input whose sides are
multiples of 4: it pads the input with zeros (the normalised mean colour) symmetrically to the next multiple of
32 on each side and crops the logits back, so ``forward(x [B, 3, S, S]) -> [B, 1, S, S]`` for S % 4 == 0 (an
S that is a multiple of 32 runs unpadded). The padding is symmetric, so a horizontally flipped input sits on a
flipped padded canvas.

**Crops** (:func:`crop_boxes`): each box's region resized to S x S with ``torchvision.ops.roi_align``
(``aligned=True``: pixel centres at half-integers, so bin j of a box [x0, x1) samples x0 + (j + 0.5) (x1 - x0) / S,
the inverse of the paste in :mod:`stages.ops.masks`), and the same for the boxes' full-image masks (soft targets
thresholded at 0.5). With per-box ``angles`` the crop is the box rotated about its centre (the training
augmentation), sampled with ``grid_sample`` from the image itself (context, not black corners, fills the turned
square).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from stages.core.errors import InputError

log = logging.getLogger(__name__)

#: ImageNet statistics (what torchvision's detectors and timm's HRNet weights use)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: the input side must be a multiple of this (padded inside :class:`HRNetMask` up to a multiple of 32)
SIZE_MULTIPLE = 4
_STRIDE = 32

TIMM_NAMES = ("hrnet_w18_small", "hrnet_w18_small_v2", "hrnet_w18", "hrnet_w30", "hrnet_w32", "hrnet_w40",
              "hrnet_w44", "hrnet_w48", "hrnet_w64")


def _stage(channels: Sequence[int]) -> dict[str, Any]:
    return dict(num_modules=1, num_branches=len(channels), block_type="BASIC", num_blocks=(1,) * len(channels),
                num_channels=tuple(channels), fuse_method="SUM")


#: ``hrnet_tiny``: timm's HRNet config layout (see ``timm.models.hrnet.cfg_cls``) at CPU size
TINY_CFG: dict[str, Any] = dict(stem_width=16, stage1=_stage((16,)), stage2=_stage((8, 16)),
                                stage3=_stage((8, 16, 32)), stage4=_stage((8, 16, 32, 64)))
CUSTOM_CFGS: dict[str, dict[str, Any]] = {"hrnet_tiny": TINY_CFG}
BACKBONES = tuple(CUSTOM_CFGS) + TIMM_NAMES


def build_backbone(name: str) -> nn.Module:
    """timm HRNet feature extractor returning the four branch outputs (strides 4, 8, 16, 32) as a list;
    ``feature_info.channels()`` gives their widths."""
    if name in CUSTOM_CFGS:
        from timm.models.hrnet import HighResolutionNetFeatures

        return HighResolutionNetFeatures(copy.deepcopy(CUSTOM_CFGS[name]), feature_location="",
                                         out_indices=(1, 2, 3, 4))
    if name not in TIMM_NAMES:
        raise ValueError(f"unknown HRNet backbone {name!r}; known: {', '.join(BACKBONES)}")
    import timm

    return timm.create_model(name, pretrained=False, features_only=True, feature_location="",
                             out_indices=(1, 2, 3, 4))


class HRNetMask(nn.Module):
    """HRNet backbone + HRNetV2 head: ``forward(x [B, 3, H, W]) -> logits [B, 1, H, W]`` for H, W multiples of 4
    (see the module doc: padded to multiples of 32 inside)."""

    def __init__(self, backbone: nn.Module, in_channels: Sequence[int], head_channels: int):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"the HRNetV2 head takes four branches, got channels {list(in_channels)}")
        self.backbone = backbone
        self.head = nn.Sequential(nn.Conv2d(sum(in_channels), head_channels, 1, bias=False),
                                  nn.BatchNorm2d(head_channels), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(head_channels, 1, 1)
        nn.init.kaiming_normal_(self.head[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(f"input sides must be multiples of {SIZE_MULTIPLE}, got {h}x{w}")
        ph, pw = -h % _STRIDE, -w % _STRIDE
        top, left = ph // 2, pw // 2
        if ph or pw:
            x = F.pad(x, (left, pw - left, top, ph - top))
        feats = self.backbone(x)
        size = feats[0].shape[-2:]
        up = [feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
        y = self.classifier(self.head(torch.cat(up, 1)))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)  # x4: stride 4 -> 1
        return y[..., top:top + h, left:left + w]


def build_mask_net(cfg: Mapping[str, Any]) -> HRNetMask:
    """The mask network of config ``cfg`` (a ``mask_model`` section: ``backbone``, ``head_channels``,
    ``weights``), initialised by timm (and the head's own init) or from the local ``weights`` file."""
    backbone = build_backbone(cfg["backbone"])
    model = HRNetMask(backbone, backbone.feature_info.channels(), int(cfg["head_channels"]))
    if cfg.get("weights"):
        load_weights(model, cfg["weights"])
    return model


def load_weights(model: HRNetMask, path: str | os.PathLike) -> None:
    """Load a local state dict into ``model``: a whole mask net (keys ``backbone.*``, ``head.*``,
    ``classifier.*``; also inside a ``{"state_dict": ...}`` checkpoint) or an HRNet classification/feature state
    dict of the backbone (its ``incre_modules``/``downsamp_modules``/``final_layer``/``classifier`` keys, which the
    branch features do not use, are ignored). Anything else that does not fit is a ValueError."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"weights file {path} does not hold a state dict")
    if any(k.startswith("backbone.") for k in obj):
        missing, unexpected = model.load_state_dict(obj, strict=False)
    else:
        unused = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.", "fc.")
        sd = {k: v for k, v in obj.items() if not k.startswith(unused)}
        missing, unexpected = model.backbone.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights file {path} does not fit the mask net: missing {list(missing)[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    log.info("loaded mask-net weights from %s", path)


def normalize(images: Tensor) -> Tensor:
    """uint8 or [0, 1] float images [..., 3, H, W] -> float32 normalised with :data:`MEAN`/:data:`STD`."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def crop_boxes(image: Tensor, boxes_px: Tensor, size: int, *, masks: Tensor | None = None,
               angles: Tensor | None = None, mask_thr: float | None = 0.5) -> tuple[Tensor, Tensor | None]:
    """Crops of many boxes of one image at once, each resized to ``size`` x ``size``.

    image: [C, H, W] float (normalise first: samples outside the image are 0); boxes_px: [N, 4] absolute xyxy in
    continuous pixel coordinates (the image spans [0, W] x [0, H]); masks: [N, H, W] (0/1, any dtype), the
    full-image mask of each box's instance, or None. Returns (crops [N, C, size, size] float, targets
    [N, 1, size, size] float: the masks cropped the same way, thresholded at ``mask_thr`` to 0/1 (None: the soft
    bilinear values), or None without masks).

    Without ``angles``: ``torchvision.ops.roi_align(aligned=True, sampling_ratio=-1)`` (each output bin averages
    ceil(box side / size) samples per axis, so a box larger than the crop is antialiased). With ``angles`` ([N]
    degrees, counter-clockwise on screen, torchvision's ``rotate`` convention): the image rotated by that angle
    about the box centre, then the box cropped (the crop's content turns counter-clockwise), by bilinear
    ``grid_sample`` at roi_align's sample points (``ceil(box side / size)`` samples per bin along each axis,
    averaged, taken for the batch's largest box side per axis), masks turned identically; zeros beyond the
    image (roi_align clamps samples within one pixel of the border to it instead).
    """
    if image.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got {tuple(image.shape)}")
    boxes = boxes_px.to(image.device, torch.float32).reshape(-1, 4)
    n = len(boxes)
    if masks is not None and (masks.dim() != 3 or len(masks) != n or masks.shape[-2:] != image.shape[-2:]):
        raise ValueError(f"masks must be [N={n}, H, W] of the image's size, got {tuple(masks.shape)}")
    if n == 0:
        crops = image.new_zeros((0, image.shape[0], size, size))
        return crops, (image.new_zeros((0, 1, size, size)) if masks is not None else None)
    if angles is None:
        rois = torch.cat([boxes.new_zeros((n, 1)), boxes], 1)
        crops = roi_align(image[None].float(), rois, (size, size), 1.0, -1, True)
        targets = None
        if masks is not None:
            mrois = torch.cat([torch.arange(n, dtype=boxes.dtype, device=boxes.device)[:, None], boxes], 1)
            targets = roi_align(masks[:, None].to(image.device, torch.float32), mrois, (size, size), 1.0, -1, True)
    else:
        grid, (ry, rx) = _rotated_grid(boxes, angles.to(boxes), size, image.shape[-1], image.shape[-2])
        gh, gw = grid.shape[1:3]
        # all boxes of one image in one call: the grids stacked along the output's height
        crops = F.grid_sample(image[None].float(), grid.reshape(1, n * gh, gw, 2), mode="bilinear",
                              padding_mode="zeros", align_corners=False)
        crops = crops.reshape(image.shape[0], n, gh, gw).transpose(0, 1)
        targets = None
        if masks is not None:
            targets = F.grid_sample(masks[:, None].to(image.device, torch.float32), grid, mode="bilinear",
                                    padding_mode="zeros", align_corners=False)
        if ry > 1 or rx > 1:
            crops = F.avg_pool2d(crops, (ry, rx))
            targets = F.avg_pool2d(targets, (ry, rx)) if targets is not None else None
    if targets is not None and mask_thr is not None:
        targets = (targets > mask_thr).float()
    return crops.contiguous(), targets


def _rotated_grid(boxes: Tensor, angles: Tensor, size: int, width: int, height: int
                  ) -> tuple[Tensor, tuple[int, int]]:
    """``grid_sample`` grids [N, size ry, size rx, 2] (normalised, align_corners=False) of the boxes turned by
    ``angles`` degrees about their centres, and (ry, rx): the samples per output bin along y and x, roi_align's
    ``ceil(box side / size)`` for the largest box side of the batch on each axis (at most 4)."""
    bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-3)
    bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-3)
    ry = max(1, min(4, math.ceil(float(bh.max()) / size)))
    rx = max(1, min(4, math.ceil(float(bw.max()) / size)))

    def centres(m: int) -> Tensor:  # bin centres in [-0.5, 0.5)
        return (torch.arange(m, dtype=boxes.dtype, device=boxes.device) + 0.5) / m - 0.5

    u = centres(size * rx)[None, None, :] * bw[:, None, None]  # x offset from the box centre, [N, 1, m]
    v = centres(size * ry)[None, :, None] * bh[:, None, None]  # y offset, [N, m, 1]
    a = torch.deg2rad(angles)[:, None, None]
    cos, sin = torch.cos(a), torch.sin(a)
    # the image turned counter-clockwise on screen (y down) about the box centre, then cropped: the sample frame
    # turns clockwise, (u, v) -> (u cos - v sin, u sin + v cos)
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2)[:, None, None]
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2)[:, None, None]
    x = cx + u * cos - v * sin
    y = cy + u * sin + v * cos
    grid = torch.stack([x / width * 2 - 1, y / height * 2 - 1], -1)
    return grid, (ry, rx)


def load_mask_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[HRNetMask, dict]:
    """(mask net in eval mode on ``device``, meta) of a ``model.pt`` written by :mod:`stages.train_masks`
    (``{"state_dict", "cfg", "meta"}``); meta holds the training config's ``test_scale``/``test_flip`` too (under
    ``cfg``). A file that is not such a checkpoint is an :class:`InputError`."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load raises whatever its unpickler meets  # noqa: BLE001
        raise InputError(f"cannot load mask model checkpoint: {exc}", file=path) from exc
    if not isinstance(ckpt, dict) or not {"state_dict", "cfg"} <= set(ckpt):
        raise InputError("not a mask model checkpoint (needs state_dict and cfg; written by stages.train_masks)",
                         file=path)
    cfg = dict(ckpt["cfg"])
    model = build_mask_net({**cfg, "weights": None})
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), {**dict(ckpt.get("meta") or {}), "cfg": cfg}


__all__ = ["BACKBONES", "HRNetMask", "MEAN", "SIZE_MULTIPLE", "STD", "TIMM_NAMES", "TINY_CFG", "build_backbone",
           "build_mask_net", "crop_boxes", "load_mask_model", "load_weights", "normalize"]
