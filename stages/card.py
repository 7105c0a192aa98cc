"""A model card per trained detector (``results/train/<model>/card.json``): what it is (backbone, head, cascade,
DCN, decoupled backbone, expert / external), its size (parameters, total and trainable), its cost (FLOPs of one
forward at the training size, images/s measured while it trained), how it was trained (epochs, lr schedule,
parameter averaging, sampling, augmentation, the data), how well it scores (mAP on val_a and val_b, from the
evaluate stage's JSONs), how it is run at test time (scales, flip), its config hash and checkpoint. The report
collects the cards into one table (``stages.report --cards``).

    python -m stages.card --model r50 --config '{...the model section as JSON...}' \\
        --ckpt results/train/r50/model.pt \\
        --eval-val-a results/evaluate/postprocess/default/r50/val_a.json \\
        --eval-val-b results/evaluate/postprocess/default/r50/val_b.json \\
        --out results/train/r50/card.json

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` (a multiply-add is 2 FLOPs) on the
detector in eval mode (inference settings from the config) on one image of ``min_size`` x ``max_size`` (height x
width: the transform keeps it as it is) — convolutions and matrix products, deformable convolutions as their
dense equivalent (the offsets' conv is an ordinary one); RoIAlign, NMS and the bilinear sampling are not counted.
The box head's share depends on how many RoIs the RPN keeps (``rois``, at most ``rpn_post_nms_top_n_test``).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from stages.core.cli import json_object, stage_main
from stages.core.config import model_part, schema_default
from stages.core.errors import InputError
from stages.formats.io import config_hash, write_json
from stages.formats.readers import read_metrics
from stages.models.registry import ALIASES, TORCHVISION_BACKBONES, timm_name
from stages.models.detector import build_detector, set_expert_mode, set_inference
from stages.train import model_config

log = logging.getLogger(__name__)

VAL_SPLITS = ("val_a", "val_b")
#: what a checkpoint of stages.train must hold for a card
CHECKPOINT_KEYS = ("model", "labels", "config", "config_hash")
FLOPS_NOTE = ("torch.utils.flop_counter.FlopCounterMode, eval mode, one image; a multiply-add = 2 FLOPs; "
              "deformable convs as their dense equivalent; RoIAlign, NMS and sampling not counted")


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of ``model``: total, trainable (``requires_grad``) and the backbone's (trunk + FPN)."""
    params = list(model.parameters())
    out = {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        out["backbone"] = sum(p.numel() for p in backbone.parameters())
    return out


def _deform_conv_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """torchvision's deform_conv2d as the dense conv it replaces: 2 x output elements x (C_in / groups) x kh x kw
    (``weight_shape`` = (C_out, C_in / groups, kh, kw))."""
    return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])


#: what :class:`FlopCounterMode` does not count by itself (its ``custom_mapping``)
FLOP_FORMULAS = {torch.ops.torchvision.deform_conv2d: _deform_conv_flops}


@torch.no_grad()
def detector_flops(model: torch.nn.Module, *, height: int, width: int, seed: int = 0) -> dict[str, Any]:
    """FLOPs of one forward of a torchvision-style detector in eval mode on one image of ``height`` x ``width``
    (random pixels drawn from ``seed``), at that size: the transform's sizes are set so that it does not resize
    (and restored afterwards). Returns ``{"flops", "gflops", "height", "width", "rois"}`` (rois: the proposals the
    RPN passed to the box head)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    transform = model.transform
    saved = transform.min_size, transform.max_size, model.training
    transform.min_size, transform.max_size = (min(height, width),), max(height, width)
    rois: list[int] = []
    hook = model.rpn.register_forward_hook(lambda m, i, out: rois.append(int(out[0][0].shape[0])))
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    try:
        model.eval()
        counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
        with counter:
            model([image.to(device)])
    finally:
        hook.remove()
        transform.min_size, transform.max_size = saved[0], saved[1]
        model.train(saved[2])
    flops = int(counter.get_total_flops())
    return {"flops": flops, "gflops": flops / 1e9, "height": height, "width": width,
            "rois": rois[0] if rois else None}


def throughput(epoch_stats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Training speed from the per-epoch records stages.train keeps (``epoch_stats``: images, seconds of the
    epoch's iterations, device, processes): images/s over all recorded epochs (total images / total seconds),
    the devices and the records. img_per_s is None when nothing was recorded."""
    images = sum(int(s["images"]) for s in epoch_stats)
    seconds = sum(float(s["seconds"]) for s in epoch_stats)
    return {"img_per_s": images / seconds if seconds > 0 else None, "images": images, "seconds": seconds,
            "devices": sorted({str(s.get("device")) for s in epoch_stats}),
            "processes": sorted({int(s.get("processes", 1)) for s in epoch_stats}),
            "per_epoch": [dict(s) for s in epoch_stats]}


def backbone_info(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What is known of a model's backbone from its config: the name, the builder it resolves to (torchvision's
    ResNet family, timm or the repository's own small trunks), normalisation, trainable stages, FPN width, weights."""
    name = cfg["backbone"]
    resolved = ALIASES.get(name, name)
    tv = resolved in TORCHVISION_BACKBONES
    tname = timm_name(name)
    builder = (f"torchvision.models.{resolved}" if tv else f"timm.create_model({tname!r}, features_only=True)"
               if tname else f"stages.models.backbones.{resolved}")
    info = {"name": name, "builder": builder,
            "library": "torchvision" if tv else "timm" if tname else "orchard", "norm": cfg["norm"],
            "trainable_layers": cfg["trainable_layers"], "fpn_channels": cfg["fpn_channels"],
            "weights": cfg["backbone_weights"]}
    if resolved == "resnet_small":
        info["width"] = cfg["width"]
    return info


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def model_card(*, name: str, cfg: Mapping[str, Any], checkpoint: Mapping[str, Any], model: torch.nn.Module,
               evaluation: Mapping[str, Mapping[str, Any] | None], checkpoint_path: str,
               evaluation_files: Mapping[str, str] | None = None,
               flops_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The card of model ``name``.

    cfg: the model's config section (schema defaults filled in; the inference keys come from here, the training
    keys from the checkpoint, which trained with them); checkpoint: the dict stages.train wrote (its weights are
    not read here); model: the detector built from it (its parameters are counted, its FLOPs measured, with the
    config's inference settings set on it); evaluation: per validation split the metric JSON of stages.evaluate
    (None: not evaluated); flops_size: (height, width) of the FLOP count, default (min_size, max_size).
    """
    train_cfg = dict(checkpoint["config"])
    changed = sorted(k for k, v in model_part(cfg, "train").items() if k in train_cfg and train_cfg[k] != v)
    if changed:
        log.warning("%s: the config's training keys %s differ from the checkpoint's; the card describes the "
                    "checkpoint", name, changed)
    c = {**cfg, **train_cfg}
    data = dict(checkpoint.get("data") or {})
    labels = list(checkpoint["labels"])
    params = parameter_counts(model)

    set_inference(model, score_thr=schema_default("infer", "score_thr"),
                  max_per_image=schema_default("infer", "max_per_image"), box_nms_thresh=c["box_nms_thresh"],
                  rpn_pre_nms_top_n_test=c["rpn_pre_nms_top_n_test"],
                  rpn_post_nms_top_n_test=c["rpn_post_nms_top_n_test"])
    if hasattr(model.roi_heads, "expert_mode"):
        set_expert_mode(model, bool(c["expert"]))
    height, width = flops_size or (c["min_size"], c["max_size"])
    flops = {**detector_flops(model, height=height, width=width, seed=c["seed"]), "counter": FLOPS_NOTE}
    stats = checkpoint.get("epoch_stats")
    if not stats:
        log.warning("%s: the checkpoint holds no epoch_stats (trained before they were recorded): no images/s",
                    name)

    files = dict(evaluation_files or {})
    ev: dict[str, Any] = {}
    for split in VAL_SPLITS:
        m = evaluation.get(split)
        counts = (m or {}).get("counts") or {}
        ev[split] = {"mAP": None if m is None else m["mAP"], "n_images": counts.get("n_images"),
                     "n_classes_with_gt": counts.get("n_classes_with_gt"), "file": files.get(split)}
    ev["mean_mAP"] = _mean([ev[s]["mAP"] for s in VAL_SPLITS])

    return {
        "model": name,
        "architecture": {
            "arch": c["arch"], "backbone": {**backbone_info(c), "parameters": params.get("backbone")},
            "head": c["head"], "cascade": bool(c["cascade"]),
            "cascade_iou": list(c["cascade_iou"]) if c["cascade"] else None,
            "dcn": bool(c["dcn"]), "decoupled_backbone": bool(c["decoupled_backbone"]),
            "representation_size": c["representation_size"], "anchors": c["anchors"], "weights": c["weights"],
        },
        "expert": {"expert_mode": bool(c["expert"]), "expert_of": c["expert_of"],
                   "external": c["train_data"] is not None},
        "parameters": params,
        "flops": flops,
        "throughput": throughput(stats or []),
        "training": {
            "epochs": checkpoint.get("epochs", c["epochs"]), "epochs_configured": c["epochs"],
            "batch_size": c["batch_size"], "iters_per_epoch": c["iters_per_epoch"],
            "lr": c["lr"], "lr_schedule": {"warmup_iters": c["warmup_iters"], "warmup_factor": c["warmup_factor"],
                                           "lr_steps": list(c["lr_steps"]), "lr_gamma": c["lr_gamma"]},
            "momentum": c["momentum"], "weight_decay": c["weight_decay"], "clip_grad_norm": c["clip_grad_norm"],
            "average_epochs": c["average_epochs"], "averaged_epochs": checkpoint.get("averaged_epochs"),
            # the train rule gives an external dataset no sampling table: its images are drawn uniformly
            "sampling": c["sampling"] if data.get("sampling_table", c["train_data"] is None) else "uniform",
            "augment": c["augment"], "full_class_batch": bool(c["full_class_batch"]), "amp": bool(c["amp"]),
            "seed": c["seed"], "min_size": c["min_size"], "max_size": c["max_size"],
        },
        "data": {"train_data": c["train_data"] or "built-in", "split": data.get("split"),
                 "images": data.get("images"), "boxes": data.get("boxes"), "classes": len(labels),
                 "labels": labels},
        "evaluation": ev,
        "test_time": {"scales": list(c["test_scales"]), "flip": bool(c["test_flip"]),
                      "max_size_ratio": c["test_max_size_ratio"], "box_nms_thresh": c["box_nms_thresh"],
                      "rpn_post_nms_top_n_test": c["rpn_post_nms_top_n_test"]},
        "config_hash": checkpoint["config_hash"],
        "model_config_hash": config_hash(dict(cfg)),
        "checkpoint": checkpoint_path,
        "code": checkpoint.get("code"),
    }


def load_checkpoint(path: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    """(checkpoint dict, detector on the CPU with its weights) of a stages.train output, or :class:`InputError`
    naming the file (and the missing field)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise InputError(f"cannot load model checkpoint: {exc}", file=path) from exc
    if not isinstance(ckpt, Mapping):
        raise InputError("not a stages.train checkpoint", file=path)
    for key in CHECKPOINT_KEYS:
        if key not in ckpt:
            raise InputError("not a stages.train checkpoint: a field is missing", file=path, field=key)
    model = build_detector({**ckpt["config"], "weights": None, "backbone_weights": None},
                           num_classes=len(ckpt["labels"]), anchors=ckpt.get("anchors"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise InputError(f"the weights do not fit the detector of its config: {exc}", file=path,
                         field="model") from exc
    return dict(ckpt), model.eval()


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.card", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model's name (its entry in config models)")
    p.add_argument("--config", required=True, help="the model's config section as JSON (all of it: the inference "
                   "keys come from here; missing keys take the schema's defaults)")
    p.add_argument("--ckpt", type=Path, required=True, help="the model's checkpoint (stages.train --out)")
    p.add_argument("--eval-val-a", type=Path, help="metric JSON of the model on val_a (stages.evaluate)")
    p.add_argument("--eval-val-b", type=Path, help="metric JSON of the model on val_b (stages.evaluate)")
    p.add_argument("--flops-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                   help="image size of the FLOP count (default: the model's min_size x max_size)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, required=True, help="the card JSON to write")
    a = p.parse_args(argv)
    cfg = model_config(json_object(a.config))
    if a.threads:
        torch.set_num_threads(a.threads)
    files = {"val_a": a.eval_val_a, "val_b": a.eval_val_b}
    evaluation = {s: read_metrics(f) for s, f in files.items() if f is not None}
    ckpt, model = load_checkpoint(a.ckpt)
    card = model_card(name=a.model, cfg=cfg, checkpoint=ckpt, model=model, evaluation=evaluation,
                      checkpoint_path=str(a.ckpt), evaluation_files={s: str(f) for s, f in files.items() if f},
                      flops_size=tuple(a.flops_size) if a.flops_size else None)
    write_json(a.out, card)
    t, ev = card["throughput"]["img_per_s"], card["evaluation"]
    print(f"card {a.model}: {card['parameters']['total'] / 1e6:.2f}M parameters, {card['flops']['gflops']:.2f} "
          f"GFLOPs at {card['flops']['height']}x{card['flops']['width']}, "
          f"{'n/a' if t is None else f'{t:.2f}'} img/s training, mAP val_a {ev['val_a']['mAP']} "
          f"val_b {ev['val_b']['mAP']} -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
