"""Backbone factory: torchvision ResNet-family trunks with an FPN on top, optional deformable 3x3 convs.

No weights are ever downloaded: the trunk is built with ``weights=None`` and a local file is loaded when given
(an ImageNet classification state dict of the trunk, ``fc.*`` ignored, or a full ``BackboneWithFPN`` state dict
whose keys start with ``body.``/``fpn.``).

``build_backbone("resnet50", trainable_layers=3)`` returns a :class:`~torchvision.models.detection.backbone_utils.
BackboneWithFPN` (``out_channels`` attribute set) that ``torchvision.models.detection.FasterRCNN`` takes as it is.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import DeformConv2d, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

log = logging.getLogger(__name__)

_TORCHVISION = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
    "resnext50_32x4d": resnet.resnext50_32x4d,
    "resnext101_32x8d": resnet.resnext101_32x8d,
    "resnext101_64x4d": resnet.resnext101_64x4d,
    "wide_resnet50_2": resnet.wide_resnet50_2,
    "wide_resnet101_2": resnet.wide_resnet101_2,
}
#: "resnext101" is the paper's ResNeXt-101 (32x8d in torchvision)
_ALIASES = {"resnext101": "resnext101_32x8d", "resnext50": "resnext50_32x4d"}
BACKBONES = tuple(sorted(_TORCHVISION)) + tuple(sorted(_ALIASES)) + ("resnet_small", "resnet_tiny")
_NORMS: dict[str, Callable[[int], nn.Module]] = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


class DeformableConv3x3(DeformConv2d):
    """A 3x3 :class:`~torchvision.ops.DeformConv2d` that predicts its own offsets with a plain conv
    (``conv_offset``, zero-initialised, so a fresh one computes exactly the conv it replaced).

    The kernel keeps the parameter name ``weight``, so ImageNet checkpoints of the plain trunk load unchanged.
    """

    def __init__(self, conv: nn.Conv2d):
        if conv.kernel_size != (3, 3):
            raise ValueError(f"DeformableConv3x3 replaces 3x3 convs, got kernel {conv.kernel_size}")
        super().__init__(conv.in_channels, conv.out_channels, 3, stride=conv.stride, padding=conv.padding,
                         dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.conv_offset = nn.Conv2d(conv.in_channels, 2 * 9, 3, stride=conv.stride, padding=conv.padding,
                                     dilation=conv.dilation, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor, offset: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return super().forward(x, self.conv_offset(x) if offset is None else offset, mask)


def add_deformable_convs(trunk: resnet.ResNet, layers: Sequence[str] = ("layer3", "layer4")) -> int:
    """Replace every 3x3 conv in the residual blocks of ``layers`` by :class:`DeformableConv3x3`, in place.
    Returns how many were replaced."""
    n = 0
    for lname in layers:
        layer = getattr(trunk, lname)
        for block in layer:
            for name, child in list(block.named_children()):
                if isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3):
                    setattr(block, name, DeformableConv3x3(child))
                    n += 1
    return n


class SmallResNet(nn.Module):
    """A ResNet-18-shaped trunk (BasicBlocks, strides 4/8/16/32) of configurable ``width``.

    ``width`` is the stem's channel count; stages have width × (1, 2, 4, 8) channels. With width 64 this is
    ResNet-18 itself; 32 trains from scratch on a CPU in minutes. Module names (conv1, bn1, layer1..4) and the
    ``inplanes`` attribute follow torchvision's ResNet, so freezing, DCN and weight loading treat it the same.
    """

    def __init__(self, width: int = 32, blocks: Sequence[int] = (2, 2, 2, 2),
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self._norm = norm_layer
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(width)
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
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), self._norm(planes))
        layers = [resnet.BasicBlock(self.inplanes, planes, stride, down, norm_layer=self._norm)]
        self.inplanes = planes
        layers += [resnet.BasicBlock(planes, planes, norm_layer=self._norm) for _ in range(n - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - used through IntermediateLayerGetter
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _resnet_tiny(norm_layer: Callable[[int], nn.Module]) -> resnet.ResNet:
    """A one-block-per-stage ResNet (BasicBlock, widths 64..512) for CPU tests."""
    return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], norm_layer=norm_layer)


def _freeze(trunk: nn.Module, trainable_layers: int) -> None:
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must lie in [0, 5], got {trainable_layers}")
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, p in trunk.named_parameters():
        # deformable offset predictors stay trainable: they start at zero and are new to any checkpoint
        if ".conv_offset." in name:
            continue
        if not any(name.startswith(t) for t in trainable):
            p.requires_grad_(False)


def _load_weights(trunk: nn.Module, fpn_backbone: nn.Module, path: str | os.PathLike) -> None:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"weights file {path} does not hold a state dict")
    if any(k.startswith(("body.", "fpn.")) for k in obj):
        target, sd = fpn_backbone, obj
    else:
        present = {n for n, _ in trunk.named_children()}  # stages above the last returned one are dropped
        target, sd = trunk, {k: v for k, v in obj.items() if k.split(".", 1)[0] in present}
    missing, unexpected = target.load_state_dict(sd, strict=False)
    missing = [k for k in missing if ".conv_offset." not in k and not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"weights file {path} does not fit the backbone: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    log.info("loaded backbone weights from %s", path)


#: key prefix of the classification pyramid in the features of a :class:`DecoupledBackbone`
CLS_PREFIX = "cls_"


class DecoupledBackbone(nn.Module):
    """The paper's "decoupled backbone": classification and regression get their own trunk stages from
    stride 8 on.

    The stem, layer1 and layer2 of ``base`` (a :class:`BackboneWithFPN`, up to stride 8) are shared; the later
    stages (layer3, layer4) and the FPN exist twice: ``body.layer3/4`` + ``fpn`` (those of ``base``, the
    regression branch) and ``cls_layers.layer3/4`` + ``cls_fpn`` (deep copies made at construction, so both
    branches start from the same, e.g. locally loaded, weights and the same frozen stages). C2 and C3 feed both
    FPNs; each FPN's top-down path makes its whole pyramid its own.

    ``forward(x)`` returns one OrderedDict: the regression pyramid under the usual keys ("0".."3", "pool": what
    the RPN and ``MultiScaleRoIAlign(["0", "1", "2", "3"])`` read) followed by the classification pyramid under
    the same keys prefixed with :data:`CLS_PREFIX` ("cls_0", ..., "cls_pool"), which the Decoupling Head's
    classification pooling reads (see :func:`stages.models.tsd.classification_maps`). Parameter names of the
    shared part and of the regression branch are those of ``BackboneWithFPN`` (``body.*``, ``fpn.*``), so its
    state dicts load into them unchanged.
    """

    def __init__(self, base: BackboneWithFPN, *, split_after: str = "layer2"):
        super().__init__()
        names = list(base.body.keys())
        if split_after not in names or names.index(split_after) == len(names) - 1:
            raise ValueError(f"cannot split the trunk after {split_after!r}; its stages are {names}")
        late = names[names.index(split_after) + 1:]
        self.return_layers = dict(base.body.return_layers)
        if not any(n in self.return_layers for n in late):
            raise ValueError(f"no stage after {split_after!r} returns a feature map: nothing to decouple")
        self.split_after = split_after
        self.body = base.body
        self.fpn = base.fpn
        self.cls_layers = nn.ModuleDict({n: copy.deepcopy(base.body[n]) for n in late})
        self.cls_fpn = copy.deepcopy(base.fpn)
        self.out_channels = base.out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        reg: OrderedDict[str, Tensor] = OrderedDict()
        cls: dict[str, Tensor] = {}
        split = x
        for name, module in self.body.items():
            x = module(x)
            if name in self.return_layers:
                reg[self.return_layers[name]] = x
                if name not in self.cls_layers:
                    cls[self.return_layers[name]] = x  # a shared stage feeds both FPNs
            if name == self.split_after:
                split = x
        y = split
        for name, module in self.cls_layers.items():
            y = module(y)
            if name in self.return_layers:
                cls[self.return_layers[name]] = y
        out = self.fpn(reg)
        cls_out = self.cls_fpn(OrderedDict((k, cls[k]) for k in reg))
        out.update((CLS_PREFIX + k, v) for k, v in cls_out.items())
        return out


def build_backbone(name: str, *, trainable_layers: int = 3, weights_path: str | os.PathLike | None = None,
                   dcn: bool = False, dcn_layers: Sequence[str] = ("layer3", "layer4"),
                   returned_layers: Sequence[int] = (1, 2, 3, 4), out_channels: int = 256,
                   norm: str = "frozen_bn", width: int = 32, decoupled: bool = False
                   ) -> BackboneWithFPN | DecoupledBackbone:
    """A ResNet-family trunk + FPN (with the extra max-pool level, as torchvision's detectors use).

    name: one of :data:`BACKBONES`; trainable_layers: 0..5 stages trainable from the top (as torchvision);
    weights_path: local trunk or backbone state dict (never a download); dcn: 3x3 convs of ``dcn_layers``
    become :class:`DeformableConv3x3`; returned_layers: ResNet stages (1..4) fed to the FPN, giving feature maps
    "0".."n-1" plus "pool"; norm: "frozen_bn" (default, for fine-tuning with small batches) or "bn"
    (trainable BatchNorm, what training from scratch needs; ``build_detector`` defaults to it);
    width: stem channels of "resnet_small" (ignored by the other trunks); decoupled: return a
    :class:`DecoupledBackbone` (separate classification/regression layer3, layer4 and FPN; the weights file,
    DCN and freezing apply before the classification copies are made).
    """
    name = _ALIASES.get(name, name)
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
    norm_layer = _NORMS[norm]
    if name == "resnet_tiny":
        trunk = _resnet_tiny(norm_layer)
    elif name == "resnet_small":
        trunk = SmallResNet(width=width, norm_layer=norm_layer)
    elif name in _TORCHVISION:
        trunk = _TORCHVISION[name](weights=None, norm_layer=norm_layer)
    else:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    returned_layers = list(returned_layers)
    if not returned_layers or min(returned_layers) < 1 or max(returned_layers) > 4:
        raise ValueError(f"returned_layers must be ResNet stages in [1, 4], got {returned_layers}")
    if dcn:
        unknown = [layer for layer in dcn_layers if layer not in ("layer1", "layer2", "layer3", "layer4")]
        if unknown:
            raise ValueError(f"dcn_layers must name ResNet stages layer1..layer4, got {unknown}")
        n = add_deformable_convs(trunk, dcn_layers)
        log.info("replaced %d 3x3 convs by deformable convs in %s", n, list(dcn_layers))
    stage_channels = [trunk.inplanes // 8 * 2 ** (i - 1) for i in (1, 2, 3, 4)]
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned_layers)}
    backbone = BackboneWithFPN(trunk, return_layers, [stage_channels[i - 1] for i in returned_layers],
                               out_channels, extra_blocks=LastLevelMaxPool())
    if weights_path is not None:
        _load_weights(backbone.body, backbone, weights_path)
    _freeze(backbone.body, trainable_layers)
    return DecoupledBackbone(backbone) if decoupled else backbone


__all__ = ["BACKBONES", "CLS_PREFIX", "DecoupledBackbone", "DeformableConv3x3", "SmallResNet", "add_deformable_convs", "build_backbone"]
