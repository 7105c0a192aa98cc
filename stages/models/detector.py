"""Detector builders: torchvision Faster R-CNN + FPN on a ResNet backbone, trained from scratch.

Nothing is downloaded: ``weights`` may name a local state-dict file (a whole detector, or a backbone).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

log = logging.getLogger(__name__)

TORCHVISION_RESNETS = {
    "resnet18": resnet.resnet18, "resnet34": resnet.resnet34, "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101, "resnext50_32x4d": resnet.resnext50_32x4d,
    "resnext101_32x8d": resnet.resnext101_32x8d, "wide_resnet50_2": resnet.wide_resnet50_2,
}


class SmallResNet(nn.Module):
    """A ResNet-18-shaped network with configurable width (BasicBlocks, strides 4/8/16/32).

    ``width`` is the stem's channel count; stages have width × (1, 2, 4, 8) channels. With width 64 this is
    ResNet-18 itself; 32 trains from scratch on a CPU in minutes.
    """

    def __init__(self, width: int = 32, blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = width
        self.layer1 = self._make(width, blocks[0], 1)
        self.layer2 = self._make(width * 2, blocks[1], 2)
        self.layer3 = self._make(width * 4, blocks[2], 2)
        self.layer4 = self._make(width * 8, blocks[3], 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make(self, planes: int, n: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [resnet.BasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [resnet.BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - used through IntermediateLayerGetter
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def build_backbone(name: str, *, width: int = 64, fpn_channels: int = 128,
                   weights: str | Path | None = None) -> BackboneWithFPN:
    """ResNet + FPN (P2-P5 plus a max-pooled P6), BatchNorm trainable (we train from scratch)."""
    if name == "resnet_small":
        body = SmallResNet(width=width)
        in_channels = [width, width * 2, width * 4, width * 8]
    elif name in TORCHVISION_RESNETS:
        body = TORCHVISION_RESNETS[name](weights=None, norm_layer=nn.BatchNorm2d)
        c = body.fc.in_features
        in_channels = [c // 8, c // 4, c // 2, c]
    else:
        raise ValueError(f"unknown backbone {name!r}; choose resnet_small or one of {sorted(TORCHVISION_RESNETS)}")
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        missing, unexpected = body.load_state_dict(state, strict=False)
        log.info("backbone weights from %s (%d missing, %d unexpected keys)", weights, len(missing), len(unexpected))
    return BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, in_channels,
                           fpn_channels, extra_blocks=LastLevelMaxPool())


def build_detector(cfg: Mapping[str, Any], *, num_classes: int,
                   anchors: Mapping[str, Sequence] | None = None) -> FasterRCNN:
    """Faster R-CNN + FPN from a model config section (see the ``model`` schema). ``num_classes`` excludes
    background. ``anchors`` (sizes per level, aspect ratios) come from the anchors stage when given."""
    if cfg.get("arch", "faster_rcnn") != "faster_rcnn":
        raise ValueError(f"unknown arch {cfg['arch']!r}")
    backbone = build_backbone(cfg["backbone"], width=cfg.get("width", 64), fpn_channels=cfg.get("fpn_channels", 128))
    sizes = tuple(tuple(s) for s in (anchors or {}).get("sizes", [[16], [32], [64], [128], [256]]))
    ratios = tuple((anchors or {}).get("aspect_ratios", [0.5, 1.0, 2.0]))
    gen = AnchorGenerator(sizes=sizes, aspect_ratios=(ratios,) * len(sizes))
    model = FasterRCNN(
        backbone, num_classes=num_classes + 1, rpn_anchor_generator=gen,
        min_size=cfg.get("min_size", 288), max_size=cfg.get("max_size", 320),
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300,
        rpn_batch_size_per_image=128, box_batch_size_per_image=128,
        box_score_thresh=0.01, box_detections_per_img=100,
    )
    if cfg.get("weights"):
        state = torch.load(cfg["weights"], map_location="cpu", weights_only=True)
        state = state.get("model", state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        log.info("detector weights from %s (%d missing, %d unexpected keys)", cfg["weights"], len(missing),
                 len(unexpected))
    return model


def select_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)
