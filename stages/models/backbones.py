"""Backbone factory: torchvision ResNet-family trunks, or timm trunks (the paper's zoo and any timm model with
``features_only`` support, :mod:`stages.models.timm_trunks`), with an FPN on top, optional deformable 3x3 convs.

No weights are ever downloaded: the trunk is built with ``weights=None`` / ``pretrained=False`` and a local file
is loaded when given (an ImageNet classification state dict of the trunk, its classifier ignored, or a full
``BackboneWithFPN`` state dict whose keys start with ``body.``/``fpn.``).

``build_backbone("resnet50", trainable_layers=3)`` returns a :class:`~torchvision.models.detection.backbone_utils.
BackboneWithFPN` (``out_channels`` attribute set) that ``torchvision.models.detection.FasterRCNN`` takes as it is;
so does ``build_backbone("seresnext101_32x4d")`` (a :class:`~stages.models.timm_trunks.TimmBackboneWithFPN`).
"""

from __future__ import annotations

import copy
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import DeformConv2d, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from stages.models.registry import (ALIASES, BACKBONES, NORMS, TIMM_BACKBONES, TIMM_PREFIX, TORCHVISION_BACKBONES,
                                    check_backbone_name, timm_name)

log = logging.getLogger(__name__)

_TORCHVISION = {name: getattr(resnet, name) for name in TORCHVISION_BACKBONES}


def _gn_groups(channels: int, groups: int = 32) -> int:
    """32 groups, or the largest divisor of ``channels`` below 32 when 32 does not divide it."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with :func:`_gn_groups` groups (the ``gn`` norm)."""
    return nn.GroupNorm(_gn_groups(channels), channels)


_NORMS: dict[str, Callable[[int], nn.Module]] = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d,
                                                 "gn": group_norm, "syncbn": nn.BatchNorm2d}
assert tuple(_NORMS) == NORMS


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


def add_deformable_convs(trunk: nn.Module, layers: Sequence[str] = ("layer3", "layer4")) -> int:
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


def _check_trainable_layers(trainable_layers: int) -> None:
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must lie in [0, 5], got {trainable_layers}")


def _freeze(trunk: nn.Module, trainable_layers: int) -> None:
    _check_trainable_layers(trainable_layers)
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, p in trunk.named_parameters():
        # deformable offset predictors stay trainable: they start at zero and are new to any checkpoint
        if ".conv_offset." in name:
            continue
        if not any(name.startswith(t) for t in trainable):
            p.requires_grad_(False)


def _freeze_timm(body: nn.Module, trainable_layers: int, entry: str) -> None:
    """Freeze the stages of a timm body below the top ``trainable_layers`` (stages 4, 3, 2, 1, then the stem:
    ``body.stage_of(param_name)``)."""
    _check_trainable_layers(trainable_layers)
    for name, p in body.named_parameters():
        if ".conv_offset." in name:
            continue
        stage = body.stage_of(name)
        if stage is None:
            if trainable_layers in (0, 5):
                stage = 4
            else:
                raise ValueError(f"backbone {entry!r}: its timm feature extractor does not tell its stages apart; "
                                 f"trainable_layers must be 0 or 5, got {trainable_layers}")
        if stage < 5 - trainable_layers:
            p.requires_grad_(False)


_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} does not hold a state dict")
    return obj


def _fit(target: Mapping[str, Tensor], source: Mapping[str, Tensor], key_map: Mapping[str, str | None],
         ignorable: Callable[[str], bool], *, entry: str, path) -> dict[str, Tensor]:
    """The state dict for ``target``'s keys from file ``source`` (``key_map``: target key -> file key, None for
    keys new to any checkpoint such as deformable offsets). ValueError naming backbone ``entry`` and the first
    mismatching key: the first target key (in order) missing from the file or of another shape, else the first
    file key the backbone does not have and ``ignorable`` does not excuse."""
    out: dict[str, Tensor] = {}
    used = set()
    for key, value in target.items():
        src = key_map.get(key, key)
        if src is None or ".conv_offset." in key:
            continue
        if src not in source:
            if key.endswith("num_batches_tracked"):
                continue
            raise ValueError(f"weights file {path} does not fit backbone {entry!r}: first mismatching key "
                             f"{src!r} is missing from the file")
        if tuple(source[src].shape) != tuple(value.shape):
            raise ValueError(f"weights file {path} does not fit backbone {entry!r}: first mismatching key {src!r} "
                             f"has shape {tuple(source[src].shape)} in the file, {tuple(value.shape)} in the "
                             "backbone")
        out[key] = source[src]
        used.add(src)
    targets = set(target)
    for src in source:
        if src in used or ignorable(src):
            continue
        module, _, leaf = src.rpartition(".")
        if leaf in _STATS and (f"{module}.weight" in used or module + ".weight" in targets):
            continue  # statistics of a BatchNorm the backbone replaced (frozen_bn, gn)
        raise ValueError(f"weights file {path} does not fit backbone {entry!r}: first mismatching key {src!r} is "
                         "not a key of the backbone")
    return out


def _load_weights(trunk: nn.Module, fpn_backbone: nn.Module, path: str | os.PathLike, *, entry: str = "?",
                  timm_model: str | None = None) -> None:
    """Load a local weights file into a built backbone: a full backbone+FPN state dict (``body.*``/``fpn.*``) into
    ``fpn_backbone``, else an ImageNet-style classification state dict of the trunk into ``trunk`` (its
    classifier and the stages the FPN does not read are ignored; for a timm trunk the keys are those of timm
    model ``timm_model``'s classification model). ValueError naming backbone ``entry`` and the first
    mismatching key (and shapes)."""
    sd = _read_state_dict(path)
    if any(k.startswith(("body.", "fpn.")) for k in sd):
        target, key_map, ignorable = fpn_backbone, {}, (lambda k: False)
        state = _fit(fpn_backbone.state_dict(), sd, key_map, ignorable, entry=entry, path=path)
    elif timm_model is not None:
        from stages.models.timm_trunks import classification_keys, source_key_map

        cls_keys = classification_keys(timm_model)
        key_map = source_key_map(trunk, list(cls_keys))
        unmatched = [k for k, v in key_map.items() if v is None and ".conv_offset." not in k]
        if unmatched:
            raise ValueError(f"backbone {entry!r}: no key of timm model {timm_model!r} matches {unmatched[0]!r}")
        target = trunk
        state = _fit(trunk.state_dict(), sd, key_map, lambda k: k in cls_keys, entry=entry, path=path)
    else:
        present = {n for n, _ in trunk.named_children()}  # stages above the last returned one are dropped
        target = trunk
        state = _fit(trunk.state_dict(), sd, {}, lambda k: k.split(".", 1)[0] not in present or k.startswith("fc."),
                     entry=entry, path=path)
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".conv_offset." not in k and not k.endswith("num_batches_tracked")]
    if missing or unexpected:  # _fit checked every key: a bug if this happens
        raise ValueError(f"weights file {path} does not fit backbone {entry!r}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    log.info("loaded backbone %s weights from %s (%d tensors)", entry, path, len(state))


def convert_norms(module: nn.Module, norm: str) -> nn.Module:
    """Replace the BatchNorms of a built trunk (timm's BatchNormAct2d included, keeping its activation) by the
    ``norm`` of :data:`NORMS`: frozen_bn -> FrozenBatchNorm2d (running statistics and affine kept), gn ->
    GroupNorm (affine kept), bn/syncbn -> unchanged. Returns the module (replaced when it is a BatchNorm)."""
    if norm in ("bn", "syncbn"):
        return module
    if norm == "frozen_bn":
        from timm.layers import freeze_batch_norm_2d

        return freeze_batch_norm_2d(module)
    if norm != "gn":
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    if isinstance(module, nn.BatchNorm2d):
        c = module.num_features
        if hasattr(module, "act"):  # timm BatchNormAct2d
            from timm.layers import GroupNormAct

            new: nn.Module = GroupNormAct(c, _gn_groups(c), eps=module.eps, affine=module.affine)
            new.act, new.drop = module.act, module.drop
        else:
            new = nn.GroupNorm(_gn_groups(c), c, eps=module.eps, affine=module.affine)
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
        return new
    for name, child in list(module.named_children()):
        new_child = convert_norms(child, norm)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


#: where ``dcn`` applies: trunks whose layer3/layer4 hold residual blocks with plain 3x3 convs as direct
#: children (the torchvision ResNets/ResNeXts; timm's ResNet family: SE-ResNeXt, SENet-154, ``timm:resnet*``)
def _dcn_applies(body: nn.Module, layers: Sequence[str]) -> bool:
    names = dict(body.named_children())
    return all(isinstance(names.get(layer), nn.Sequential) and any(
        isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3) for block in names[layer] for c in block.children())
        for layer in layers)


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
    """A trunk + FPN (with the extra max-pool level, as torchvision's detectors use).

    name: one of :data:`BACKBONES` (torchvision ResNets/ResNeXts, resnet_small/resnet_tiny, and the timm zoo
    :data:`TIMM_BACKBONES`: seresnext101_32x4d, senet154 (timm ``legacy_senet154``), efficientnet_b3..b7,
    nasnetalarge) or ``timm:<timm model name>`` (any timm model whose ``features_only`` extractor has maps at
    strides 4, 8, 16, 32; see :mod:`stages.models.timm_trunks`); trainable_layers: 0..5 stages trainable from
    the top (4, 3, 2, 1, then the stem, as torchvision); weights_path: local trunk (ImageNet classification
    state dict, classifier ignored) or backbone+FPN state dict (never a download), a mismatch is a ValueError
    naming ``name`` and the first mismatching key; dcn: 3x3 convs of ``dcn_layers`` become
    :class:`DeformableConv3x3` (ResNet-family trunks only: torchvision's and timm's ResNet/SE-ResNeXt/SENet;
    other timm families raise ValueError); returned_layers: stages (1..4, strides 4..32) fed to the FPN, giving
    feature maps "0".."n-1" plus "pool"; norm: one of :data:`NORMS`: "frozen_bn" (default, for fine-tuning with
    small batches), "bn" (trainable BatchNorm, what training from scratch needs; ``build_detector`` defaults to
    it), "gn" (GroupNorm, 32 groups or the largest divisor of the channels below 32) or "syncbn" (built as "bn";
    ``stages.train`` converts it to SyncBatchNorm on several CUDA processes); width: stem channels of
    "resnet_small" (ignored by the other trunks); decoupled: return a :class:`DecoupledBackbone` (separate
    classification/regression stages after stride 8 and FPN; the weights file, DCN and freezing apply before
    the classification copies are made; NASNet-style extractors that cannot be run stage by stage raise).
    """
    entry = name
    name = ALIASES.get(name, name)
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
    _check_trainable_layers(trainable_layers)
    returned_layers = list(returned_layers)
    if not returned_layers or min(returned_layers) < 1 or max(returned_layers) > 4:
        raise ValueError(f"returned_layers must be ResNet stages in [1, 4], got {returned_layers}")
    if dcn:
        unknown = [layer for layer in dcn_layers if layer not in ("layer1", "layer2", "layer3", "layer4")]
        if unknown:
            raise ValueError(f"dcn_layers must name ResNet stages layer1..layer4, got {unknown}")
    tname = timm_name(name)
    if tname is not None:
        return _build_timm(entry, tname, trainable_layers=trainable_layers, weights_path=weights_path, dcn=dcn,
                           dcn_layers=dcn_layers, returned_layers=returned_layers, out_channels=out_channels,
                           norm=norm, decoupled=decoupled)
    norm_layer = _NORMS[norm]
    if name == "resnet_tiny":
        trunk = _resnet_tiny(norm_layer)
    elif name == "resnet_small":
        trunk = SmallResNet(width=width, norm_layer=norm_layer)
    elif name in _TORCHVISION:
        trunk = _TORCHVISION[name](weights=None, norm_layer=norm_layer)
    else:
        check_backbone_name(entry)  # raises: unknown backbone
        raise AssertionError(entry)
    if dcn:
        n = add_deformable_convs(trunk, dcn_layers)
        log.info("replaced %d 3x3 convs by deformable convs in %s", n, list(dcn_layers))
    stage_channels = [trunk.inplanes // 8 * 2 ** (i - 1) for i in (1, 2, 3, 4)]
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned_layers)}
    backbone = BackboneWithFPN(trunk, return_layers, [stage_channels[i - 1] for i in returned_layers],
                               out_channels, extra_blocks=LastLevelMaxPool())
    if weights_path is not None:
        _load_weights(backbone.body, backbone, weights_path, entry=entry)
    _freeze(backbone.body, trainable_layers)
    return DecoupledBackbone(backbone) if decoupled else backbone


def _build_timm(entry: str, tname: str, *, trainable_layers: int, weights_path, dcn: bool,
                dcn_layers: Sequence[str], returned_layers: list[int], out_channels: int, norm: str,
                decoupled: bool) -> BackboneWithFPN | DecoupledBackbone:
    from stages.models.timm_trunks import TimmBackboneWithFPN, build_timm_body, family

    fam = family(tname)
    body, in_channels, split, stage_channels = build_timm_body(entry, tname, returned_layers)
    if decoupled and split is None:
        raise ValueError(f"backbone {entry!r}: decoupled_backbone does not apply to timm family {fam!r} "
                         f"({type(body.net).__name__} extractor: its stages cannot be run one by one)")
    convert_norms(body, norm)
    if dcn:
        if not _dcn_applies(body, dcn_layers):
            raise ValueError(f"backbone {entry!r}: dcn does not apply to {fam} (timm {tname}): it replaces the 3x3 "
                             f"convs of the residual blocks of {list(dcn_layers)}, which only ResNet-family trunks "
                             "have (torchvision ResNets, timm ResNet/SE-ResNeXt/SENet)")
        n = add_deformable_convs(body, dcn_layers)
        log.info("%s: replaced %d 3x3 convs by deformable convs in %s", entry, n, list(dcn_layers))
    backbone = TimmBackboneWithFPN(body, in_channels, out_channels, timm_model=tname, family=fam,
                                   stage_channels=stage_channels)
    if weights_path is not None:
        _load_weights(body, backbone, weights_path, entry=entry, timm_model=tname)
    _freeze_timm(body, trainable_layers, entry)
    return DecoupledBackbone(backbone, split_after=split) if decoupled else backbone


__all__ = ["BACKBONES", "CLS_PREFIX", "NORMS", "TIMM_BACKBONES", "TIMM_PREFIX", "DecoupledBackbone", "DeformableConv3x3",
           "SmallResNet", "add_deformable_convs", "build_backbone", "check_backbone_name", "convert_norms",
           "group_norm", "timm_name"]
