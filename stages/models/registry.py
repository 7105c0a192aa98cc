"""The detector backbones' names, without importing torch: config validation (every Snakefile parse) checks a
model's ``backbone`` against them cheaply; :mod:`stages.models.backbones` builds them.

- torchvision ResNet-family trunks (:data:`TORCHVISION_BACKBONES`, plus the aliases of :data:`ALIASES`);
- ``resnet_small`` / ``resnet_tiny``, this project's CPU-sized trunks;
- the paper's zoo through timm (:data:`TIMM_BACKBONES`: our name -> timm model name);
- ``timm:<model>``: any timm model whose ``features_only`` extractor has maps at strides 4, 8, 16, 32.
"""

from __future__ import annotations

import functools

TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                         "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
#: "resnext101" is the paper's ResNeXt-101 (32x8d in torchvision)
ALIASES = {"resnext101": "resnext101_32x8d", "resnext50": "resnext50_32x4d"}
#: the paper's trunks through timm (always built with pretrained=False): our name -> timm model name.
#: SENet-154 is timm's ``legacy_senet154``: Hu et al.'s architecture as ported from Cadene's pretrainedmodels (the
#: SENet-154 of the mmdetection-era solutions; its ImageNet checkpoint's keys ``layer0.conv1``, ...); timm's
#: ``senet154`` (a ResNet-class re-implementation with gluon weights) is reachable as ``timm:senet154``.
TIMM_BACKBONES = {
    "seresnext101_32x4d": "seresnext101_32x4d",
    "senet154": "legacy_senet154",
    **{f"efficientnet_b{i}": f"efficientnet_b{i}" for i in range(3, 8)},
    "nasnetalarge": "nasnetalarge",
}
#: prefix of the generic entry ``timm:<any timm model name>``
TIMM_PREFIX = "timm:"
BACKBONES = (tuple(sorted(TORCHVISION_BACKBONES)) + tuple(sorted(ALIASES)) + ("resnet_small", "resnet_tiny")
             + tuple(sorted(TIMM_BACKBONES)))
#: backbone norms: frozen_bn (FrozenBatchNorm2d, fine-tuning), bn (trainable BatchNorm), gn (GroupNorm: 32 groups
#: or the largest divisor of the channels below 32), syncbn (built as bn; stages.train converts it to
#: SyncBatchNorm when it runs on several CUDA processes)
NORMS = ("frozen_bn", "bn", "gn", "syncbn")


def timm_name(name: str) -> str | None:
    """The timm model behind backbone ``name`` (a :data:`TIMM_BACKBONES` key or ``timm:<model>``), else None."""
    if name in TIMM_BACKBONES:
        return TIMM_BACKBONES[name]
    if name.startswith(TIMM_PREFIX):
        return name[len(TIMM_PREFIX):]
    return None


@functools.lru_cache(maxsize=64)
def check_backbone_name(name: str) -> None:
    """ValueError unless ``name`` builds a backbone: one of :data:`BACKBONES`, or ``timm:<model>`` with a model
    timm knows whose ``features_only`` extractor has maps at strides 4, 8, 16, 32. Cheap: the named entries need
    no import; a ``timm:`` name imports timm (about 2 s) and builds the extractor on the meta device (no memory,
    no initialisation)."""
    if ALIASES.get(name, name) in BACKBONES:
        return
    if name.startswith(TIMM_PREFIX):
        from stages.models.timm_trunks import feature_indices

        feature_indices(name, name[len(TIMM_PREFIX):])
        return
    raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}, or {TIMM_PREFIX}<timm model "
                     "name>")


__all__ = ["ALIASES", "BACKBONES", "NORMS", "TIMM_BACKBONES", "TIMM_PREFIX", "TORCHVISION_BACKBONES",
           "check_backbone_name", "timm_name"]
