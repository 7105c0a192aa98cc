"""timm trunks for :func:`stages.models.backbones.build_backbone`: the paper's backbone zoo (SE-ResNeXt-101
32x4d, SENet-154, EfficientNet-B3..B7, NASNet-A large) and any timm model with ``features_only`` support.

timm is imported here only (about 2 s), so the torchvision trunks and the config check of the named entries do
not pay for it. Models are always built with ``pretrained=False``; weights come from a local file only.

A timm model's ``feature_info`` (read from a build on the ``meta`` device: no memory, no initialisation) names
its feature maps and their strides; the last map at each of the strides 4, 8, 16 and 32 feeds FPN levels
"0".."3" (returned_layers 1..4), and the last map below stride 4, when there is one, ends the stem. The feature
extractor timm builds (``features_only=True``) becomes the ``body`` of a :class:`TimmBackboneWithFPN`:

- :class:`TimmStages` when the extractor runs its children one after the other (timm's ``FeatureListNet`` /
  ``FeatureDictNet``: ResNet, SE-ResNeXt, SENet, ConvNeXt, RegNet, ...; and ``EfficientNetFeatures`` /
  ``MobileNetV3Features``, whose ``blocks`` are flattened into ``blocks_0``, ``blocks_1``, ...). It is a
  ``ModuleDict`` with ``return_layers`` like torchvision's ``IntermediateLayerGetter``, so
  :class:`~stages.models.backbones.DecoupledBackbone` splits it after the stride-8 stage.
- :class:`TimmOpaque` otherwise (``FeatureHookNet``: NASNet-A large; ``FeatureGetterNet``, ...): the extractor is
  called whole and its maps are renamed; it cannot be decoupled.

Stages for ``trainable_layers`` (0..5, counted from the top: stages 4, 3, 2, 1, then the stem): stage k (1..4)
holds the top-level children after the one producing the previous map, up to the one producing the stride
2^(k+1) map; a child that holds a feature tap inside it (NASNet's cells tap the next cell's input) belongs to the
next stage; without a map below stride 4 the first child is the stem. Bodies whose stages cannot be told apart
(extractors other than the two kinds above and NASNet's) take trainable_layers 0 or 5 only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import timm
import torch
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

log = logging.getLogger(__name__)

#: strides of FPN levels "0".."3" (returned_layers 1..4)
STRIDES = (4, 8, 16, 32)


def family(tname: str) -> str:
    """timm's module of a model, e.g. "resnet", "senet", "efficientnet", "nasnet"."""
    return timm.models.model_entrypoint(tname).__module__.rsplit(".", 1)[-1]


def feature_indices(entry: str, tname: str) -> tuple[int | None, list[int]]:
    """(index of the stem's last map below stride 4 or None, indices of the last map at each of :data:`STRIDES`)
    in the ``feature_info`` of timm model ``tname``, read from a ``features_only`` build on the meta device.
    ValueError naming the backbone ``entry`` when timm does not know the model, cannot build its feature
    extractor, or it lacks one of the strides."""
    if not timm.is_model(tname):
        raise ValueError(f"backbone {entry!r}: {tname!r} is not a timm model name (timm {timm.__version__})")
    try:
        with torch.device("meta"):
            feats = timm.create_model(tname, pretrained=False, features_only=True)
    except Exception as exc:  # noqa: BLE001 - timm raises anything from asserts to TypeErrors here
        raise ValueError(f"backbone {entry!r}: timm model {tname!r} does not support features_only "
                         f"({type(exc).__name__}: {exc})") from exc
    # every map of the model (the default extractor returns the first five only)
    all_red = [int(d["reduction"]) for d in feats.feature_info.info]
    missing = [s for s in STRIDES if s not in all_red]
    if missing:
        raise ValueError(f"backbone {entry!r}: timm model {tname!r} offers feature maps at strides {all_red}, "
                         f"not at {missing}; the FPN needs strides {list(STRIDES)}")
    levels = [max(i for i, r in enumerate(all_red) if r == s) for s in STRIDES]
    if levels != sorted(levels):
        raise ValueError(f"backbone {entry!r}: timm model {tname!r}'s feature strides {all_red} do not grow "
                         "with depth")
    stem = [i for i, r in enumerate(all_red[:levels[0]]) if r < STRIDES[0]]
    return (stem[-1] if stem else None), levels


def _stage_map(children: Sequence[str], taps: Sequence[tuple[str, int]], stem_tap: bool) -> dict[str, int]:
    """Stage (0 = stem, 1..4) of each top-level child (in execution order) from the feature taps (module path,
    stage). A child that is a tap ends that stage; a child holding a tap inside it starts the next one."""
    out: dict[str, int] = {}
    cur = 0
    for i, child in enumerate(children):
        exact = [s for p, s in taps if p == child]
        inside = [s for p, s in taps if p.startswith(child + ".")]
        if exact:
            st = max(exact)
            cur = st + 1
        elif inside:
            st = max(inside) + 1
            cur = st
        else:
            st = cur
        out[child] = min(st, 4)
        if i == 0 and not stem_tap and not exact and not inside:
            cur = max(cur, 1)  # no map below stride 4: the first child is the stem
    return out


class TimmStages(nn.ModuleDict):
    """A timm feature extractor whose children run one after the other, as a ``ModuleDict`` of those children
    (like torchvision's ``IntermediateLayerGetter``): ``forward(x)`` returns an OrderedDict of the maps of
    ``return_layers`` (child name -> FPN key). ``stages`` gives each child's stage (0 = stem, 1..4)."""

    def __init__(self, children: Sequence[tuple[str, nn.Module]], return_layers: dict[str, str],
                 stages: dict[str, int]):
        super().__init__(OrderedDict(children))
        self.return_layers = dict(return_layers)
        self.stages = dict(stages)

    def stage_of(self, param_name: str) -> int:
        return self.stages[param_name.split(".", 1)[0]]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class TimmOpaque(nn.Module):
    """A timm feature extractor called whole (``net``); its list of maps, positions ``positions`` -> FPN keys.
    ``prefixes`` (parameter-name prefix -> stage) is None when the stages cannot be told apart."""

    def __init__(self, net: nn.Module, positions: dict[int, str], prefixes: dict[str, int] | None):
        super().__init__()
        self.net = net
        self.positions = dict(positions)
        self.prefixes = prefixes

    def stage_of(self, param_name: str) -> int | None:
        if self.prefixes is None:
            return None
        for prefix, stage in self.prefixes.items():
            if param_name.startswith(prefix):
                return stage
        return 4  # after the last tap (nothing with parameters, normally)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        maps = self.net(x)
        if isinstance(maps, dict):
            maps = list(maps.values())
        return OrderedDict((key, maps[pos]) for pos, key in self.positions.items())


class TimmBackboneWithFPN(BackboneWithFPN):
    """torchvision's ``BackboneWithFPN`` around a timm body (:class:`TimmStages` or :class:`TimmOpaque`):
    same ``body``/``fpn``/``out_channels`` attributes and forward, so FasterRCNN takes it as it is.
    ``timm_model`` and ``family`` name what it was built from."""

    def __init__(self, body: nn.Module, in_channels_list: list[int], out_channels: int, *, timm_model: str,
                 family: str, stage_channels: list[int]):
        nn.Module.__init__(self)
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels_list=in_channels_list, out_channels=out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.timm_model = timm_model
        self.family = family
        self.stage_channels = stage_channels


def build_timm_body(entry: str, tname: str, returned_layers: Sequence[int]
                    ) -> tuple[nn.Module, list[int], str | None, list[int]]:
    """(body, channels of the maps of ``returned_layers``, name of the child after which a decoupled backbone
    splits (the stride-8 stage) or None when it cannot, channels at strides 4..32) for timm model ``tname``
    with random weights; ``entry`` (the backbone name) names it in errors."""
    stem_idx, levels = feature_indices(entry, tname)
    out_indices = ([stem_idx] if stem_idx is not None else []) + levels
    feats = timm.create_model(tname, pretrained=False, features_only=True, out_indices=tuple(out_indices))
    channels = list(feats.feature_info.channels())
    modules = list(feats.feature_info.module_name())
    stage_of_index = {idx: k + 1 for k, idx in enumerate(levels)}
    if stem_idx is not None:
        stage_of_index[stem_idx] = 0
    level_channels = channels[len(out_indices) - 4:]
    fpn_key = {k: str(v) for v, k in enumerate(returned_layers)}  # stage 1..4 -> FPN key "0".."n-1"
    from timm.models._features import FeatureDictNet, FeatureHookNet

    if isinstance(feats, FeatureDictNet):
        children = list(feats.items())
        by_index = {int(v): k for k, v in feats.return_layers.items()}
        taps = [(by_index[i], s) for i, s in stage_of_index.items()]
        body: nn.Module = TimmStages(children, {by_index[levels[k - 1]]: fpn_key[k] for k in returned_layers},
                                     _stage_map([n for n, _ in children], taps, stem_idx is not None))
        split = by_index[levels[1]]
    elif all(hasattr(feats, a) for a in ("conv_stem", "blocks", "_stage_out_idx")) and feats.feature_hooks is None:
        # EfficientNetFeatures / MobileNetV3Features: stem children, then blocks[i] ends stage i + 1
        pre = [(n, m) for n, m in feats.named_children() if n != "blocks"]
        blocks = [(f"blocks_{i}", b) for i, b in enumerate(feats.blocks)]
        children = pre + blocks
        idx_child = {idx: (pre[-1][0] if st == 0 else f"blocks_{st - 1}") for st, idx in feats._stage_out_idx.items()}
        by_index = {out_indices[i]: name for i, name in idx_child.items()}
        taps = [(by_index[i], s) for i, s in stage_of_index.items()]
        body = TimmStages(children, {by_index[levels[k - 1]]: fpn_key[k] for k in returned_layers},
                          _stage_map([n for n, _ in children], taps, stem_idx is not None))
        split = by_index[levels[1]]
    else:
        prefixes = None
        if isinstance(feats, FeatureHookNet) and list(feats.keys()) == ["body"]:
            # FeatureHookNet without re-writing (NASNet): the taps are module paths of the model itself
            names = [n for n, _ in feats.body.named_children()]
            taps = [(modules[i], stage_of_index[idx]) for i, idx in enumerate(out_indices)]
            prefixes = {f"net.body.{n}.": s for n, s in _stage_map(names, taps, stem_idx is not None).items()}
        offset = len(out_indices) - 4
        body = TimmOpaque(feats, {offset + k - 1: fpn_key[k] for k in returned_layers}, prefixes)
        split = None
    return body, [level_channels[k - 1] for k in returned_layers], split, level_channels


def classification_keys(tname: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the state dict of timm model ``tname``'s classification model (built on meta)."""
    with torch.device("meta"):
        model = timm.create_model(tname, pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _norm_key(key: str) -> str:
    return key.replace("_", ".")


def source_key_map(body: nn.Module, cls_keys: Sequence[str]) -> dict[str, str | None]:
    """Each key of ``body``'s state dict -> the key of the classification model it comes from (timm's feature
    extractors keep the module names, flatten ``blocks.0`` into ``blocks_0`` or put the model under
    ``body.``), None for keys that no classification key matches (e.g. deformable offset convs)."""
    exact = set(cls_keys)
    normed: dict[str, str | None] = {}
    for k in cls_keys:
        n = _norm_key(k)
        normed[n] = None if n in normed else k  # ambiguous after normalising: no match
    out: dict[str, str | None] = {}
    for key in body.state_dict():
        parts = key.split(".")
        found = None
        for i in range(len(parts)):
            k = ".".join(parts[i:])
            if k in exact:
                found = k
                break
            if normed.get(_norm_key(k)):
                found = normed[_norm_key(k)]
                break
        out[key] = found
    return out


__all__ = ["STRIDES", "TimmBackboneWithFPN", "TimmOpaque", "TimmStages", "build_timm_body", "classification_keys",
           "family", "feature_indices", "source_key_map"]
