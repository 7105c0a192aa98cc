"""Train the box refiner (paper 8.1; :mod:`stages.models.refiner`) on a trained detector's frozen backbone + FPN.

First the detector runs once over the training images (its RPN keeps ``det_rpn_top_n`` proposals, its box head
keeps detections scoring at least ``det_score_thr`` after a per-class NMS at ``det_nms_thr``, the
``proposals_per_image`` best per image); those detections are cached next to the checkpoints as a
``detections`` parquet named by the hash of the detector file, the images and those settings, so a resumed run
reads them instead of recomputing. With ``feature_cache`` the same pass keeps every image's FPN maps (float16)
for the epochs. Then each epoch every training image's proposals are its cached detections plus
``jitter_copies`` jittered copies of each of its ground-truth boxes (drawn from the seed, the epoch and the
image), and the cascade stages learn to regress them onto the ground truth (SGD, linear warm-up, then step or
cosine decay).

A checkpoint per epoch (model + optimiser), resume from the newest one of the same config hash (others ignored),
progress lines every ``--log-every`` iterations and one JSON line each in ``--metrics``, as stages.train does.
Under ``torchrun --nproc_per_node N`` each process trains on its own fixed share of the images (every N-th
image; its detections cached per process) with DistributedDataParallel; rank 0 alone writes checkpoints,
metrics and the output. The output ``refiner.pt`` is self-contained (:func:`stages.models.refiner.load_refiner`).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from stages.core.cli import json_object, stage_main
from stages.core.config import _schema_cached, schema_default, validate_config
from stages.core.errors import InputError
from stages.core.provenance import code_version
from stages.formats.io import atomic_path, config_hash, file_sha256, read_table, write_table
from stages.infer import load_model
from stages.models.data import load_image
from stages.models.detector import set_inference
from stages.models.refiner import BoxRefiner, backbone_config, jitter_boxes, refiner_checkpoint
from stages.train import (NonFiniteLoss, Trainer, _all_finite, _dist, _init_distributed, _Progress, checkpoint,
                          prune_checkpoints, resume)

log = logging.getLogger(__name__)

#: who reads a refiner key (its ``x-reads`` in the schema)
REFINER_PARTS = ("train", "dag", "resources")


def refiner_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``refiner`` section with every schema default filled in, validated (:class:`InputError` naming the
    key), one stage weight per IoU threshold and lr_steps within the epochs."""
    full = validate_config({"models": {"m": {}}, "refiner": dict(cfg)}, cross_refs=False)["refiner"]
    if len(full["stage_weights"]) != len(full["iou_thrs"]):
        raise InputError(f"stage_weights {full['stage_weights']} needs one weight per iou_thrs entry "
                         f"{full['iou_thrs']}", field="refiner/stage_weights")
    if any(s > full["epochs"] for s in full["lr_steps"]) and full["lr_schedule"] == "step":
        raise InputError(f"lr_steps {full['lr_steps']} must be <= epochs {full['epochs']}",
                         field="refiner/lr_steps")
    return full


def refiner_part(cfg: Mapping[str, Any], part: str) -> dict[str, Any]:
    """The keys of refiner section ``cfg`` that ``part`` reads (their ``x-reads``): ``train`` is what the
    checkpoint hashes."""
    if part not in REFINER_PARTS:
        raise ValueError(f"part must be one of {REFINER_PARTS}, got {part!r}")
    props = _schema_cached()["properties"]["refiner"]["properties"]
    return {k: v for k, v in cfg.items() if props[k]["x-reads"] == part}


def lr_at(it: int, epoch: int, total_iters: int, cfg: Mapping[str, Any]) -> float:
    """Linear warm-up from ``warmup_factor`` x lr over ``warmup_iters`` iterations; then ``step``: x ``lr_gamma``
    after each epoch of ``lr_steps`` (1-based, as stages.train: epoch index ``epoch`` >= s),
    or ``cosine``: lr x (1 + cos(pi it / total_iters)) / 2."""
    if cfg["lr_schedule"] == "cosine":
        lr = cfg["lr"] * 0.5 * (1 + math.cos(math.pi * min(it, total_iters) / max(total_iters, 1)))
    else:
        lr = cfg["lr"] * cfg["lr_gamma"] ** sum(epoch >= s for s in cfg["lr_steps"])
    if it < cfg["warmup_iters"]:
        f = cfg["warmup_factor"]
        lr *= f + (1 - f) * it / cfg["warmup_iters"]
    return lr


@dataclass
class RefinerData:
    """One process's training images (sorted by id): paths, ground truth and cached detections as normalised
    xyxy with class indices (into ``labels``), and, with the feature cache, each image's FPN maps and resized
    size."""

    image_ids: list[str]
    paths: list[str]
    gt: list[np.ndarray]
    gt_cls: list[np.ndarray]
    det: list[np.ndarray]
    det_cls: list[np.ndarray]
    feats: list[dict[str, torch.Tensor]] | None
    sizes: list[tuple[int, int]] | None


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i])


def _image_loader(paths: Sequence[str], *, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_Images(paths), batch_size=batch_size, num_workers=workers,
                                       collate_fn=list, shuffle=False)


def _by_image(df: pd.DataFrame, ids: Sequence[str], label_index: Mapping[str, int]
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Normalised boxes (N_i, 4) and class indices (N_i,) of each of ``ids``, table order within an image."""
    pos = pd.Index(ids).get_indexer(df["image_id"].to_numpy(dtype=object))
    keep = pos >= 0
    df, pos = df[keep], pos[keep]
    order = np.argsort(pos, kind="stable")
    xyxy = df[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float64)[order]
    cls = df["label"].map(label_index).to_numpy(np.int64)[order]
    bounds = np.searchsorted(pos[order], np.arange(len(ids) + 1))
    return ([xyxy[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
            [cls[a:b] for a, b in zip(bounds[:-1], bounds[1:])])


@torch.inference_mode()
def detection_pass(*, detector: torch.nn.Module, refiner: BoxRefiner, labels: Sequence[str], paths: Sequence[str],
                   image_ids: Sequence[str], device: torch.device, want_dets: bool, want_feats: bool,
                   batch_size: int, workers: int = 0) -> tuple[pd.DataFrame | None, list | None, list | None]:
    """One pass of the frozen backbone over the images: (the detector's detections (detections table,
    normalised) when ``want_dets``, per image its FPN maps (float16, CPU) and resized size when
    ``want_feats``)."""
    lab = np.asarray(labels, dtype=object)
    dets, feats, sizes = [], [] if want_feats else None, [] if want_feats else None
    t0 = time.time()
    done = 0
    for imgs in _image_loader(paths, batch_size=batch_size, workers=workers):
        imgs = [im.to(device) for im in imgs]
        il, _ = refiner.transform(imgs)
        fmap = refiner.backbone(il.tensors)
        if want_feats:
            for i, s in enumerate(il.image_sizes):
                feats.append({k: fmap[k][i:i + 1].to("cpu", torch.float16) for k in ("0", "1", "2", "3")})
                sizes.append((int(s[0]), int(s[1])))
        if want_dets:
            props, _ = detector.rpn(il, fmap)
            out, _ = detector.roi_heads(fmap, props, il.image_sizes)
            for j, (s, pr) in enumerate(zip(il.image_sizes, out)):
                b = pr["boxes"].float().cpu().numpy().astype(np.float64) / np.array([s[1], s[0], s[1], s[0]])
                np.clip(b, 0.0, 1.0, out=b)
                k = len(b)
                dets.append(pd.DataFrame({
                    "image_id": np.full(k, image_ids[done + j], dtype=object),
                    "label": lab[pr["labels"].cpu().numpy() - 1], "score": pr["scores"].float().cpu().numpy(),
                    "x_min": b[:, 0], "y_min": b[:, 1], "x_max": b[:, 2], "y_max": b[:, 3]}))
        done += len(imgs)
        if done % 50 < len(imgs) or done == len(paths):
            log.info("detection pass: %d/%d images (%.1f img/s)", done, len(paths),
                     done / max(time.time() - t0, 1e-9))
    det_df = (pd.concat(dets, ignore_index=True) if dets else
              pd.DataFrame({c: [] for c in ("image_id", "label", "score", "x_min", "y_min", "x_max", "y_max")})
              ) if want_dets else None
    return det_df, feats, sizes


def prepare(*, cfg: Mapping[str, Any], detector: torch.nn.Module, refiner: BoxRefiner, det_labels: Sequence[str],
            images: pd.DataFrame, boxes: pd.DataFrame, cache_path: Path, device: torch.device, workers: int = 0
            ) -> tuple[RefinerData, list[str]]:
    """This process's training data and the class list (the detector's labels, then other ground-truth labels):
    detections from ``cache_path`` when it exists, else computed and written there."""
    ids = images["image_id"].astype(str).tolist()
    paths = images["path"].astype(str).tolist()
    labels = list(det_labels) + sorted(set(boxes["label"].astype(str)) - set(det_labels))
    label_index = {lab: i for i, lab in enumerate(labels)}
    cached = cache_path.exists()
    want_feats = bool(cfg["feature_cache"])
    det_df = None
    if cached:
        det_df = read_table(cache_path, "detections")
        log.info("detections of the training images read from %s (%d rows)", cache_path, len(det_df))
    if not cached or want_feats:
        t0 = time.time()
        got, feats, sizes = detection_pass(detector=detector, refiner=refiner, labels=det_labels, paths=paths,
                                           image_ids=ids, device=device, want_dets=not cached,
                                           want_feats=want_feats, batch_size=cfg["batch_size"], workers=workers)
        log.info("detection pass over %d images: %.1fs (detections %s, feature cache %s)", len(ids),
                 time.time() - t0, "computed" if not cached else "cached", "on" if want_feats else "off")
        if not cached:
            det_df = got
            write_table(cache_path, det_df, "detections",
                        provenance={"stage": "train_refiner", "cache": "detections"})
    else:
        feats = sizes = None
    det, det_cls = _by_image(det_df, ids, label_index)
    gt_boxes = boxes[boxes["image_id"].isin(set(ids)) & ~boxes["is_group_of"].astype(bool)]
    gt, gt_cls = _by_image(gt_boxes, ids, label_index)
    return RefinerData(ids, paths, gt, gt_cls, det, det_cls, feats, sizes), labels


def proposals_of(data: RefinerData, i: int, size: tuple[int, int], *, cfg: Mapping[str, Any], epoch: int,
                 position: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image ``i``'s (proposals, their classes, ground truth, its classes) in absolute xyxy of its resized
    ``size`` (h, w): its detections plus the jittered copies of its ground truth drawn from
    ``np.random.default_rng([seed, epoch, position])``."""
    scale = np.array([size[1], size[0], size[1], size[0]], np.float64)
    gt = data.gt[i] * scale
    rng = np.random.default_rng([cfg["seed"], epoch, position])
    jit = jitter_boxes(gt, copies=cfg["jitter_copies"], scale=cfg["jitter"], rng=rng)
    props = np.concatenate([data.det[i] * scale, jit])
    pcls = np.concatenate([data.det_cls[i], np.repeat(data.gt_cls[i], cfg["jitter_copies"])])
    t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return t(props, torch.float32), t(pcls, torch.int64), t(gt, torch.float32), t(data.gt_cls[i], torch.int64)


def plan(n: int, *, seed: int, epoch: int, rank: int, iters: int, batch_size: int) -> np.ndarray:
    """This process's image positions of one epoch, (iters, batch_size): a permutation of its n images drawn
    from (seed, epoch, rank), repeated to fill the iterations."""
    rng = np.random.default_rng([seed, epoch, rank])
    need = iters * batch_size
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])[:need]
    return order.reshape(iters, batch_size)


def train_refiner(*, cfg: Mapping[str, Any], detector_path: Path, images: pd.DataFrame, boxes: pd.DataFrame,
                  ckpt_dir: Path, device: torch.device, metrics_path: Path | None = None, log_every: int = 10,
                  stop_after_epoch: int | None = None, workers: int = 0) -> dict[str, Any]:
    """Train and return the self-contained refiner checkpoint dict (:func:`refiner_checkpoint` plus labels,
    hashes, epochs). ``cfg``: the ``refiner`` section (defaults filled here; its ``train`` keys are used,
    recorded and hashed); ``images``: the training images; ``boxes``: their ground truth (group-of boxes are
    left out). Under an initialised process group every rank calls this with the same arguments."""
    cfg = refiner_part(refiner_config(cfg), "train")
    rank, world = _dist()
    detector, det_labels, det_cfg = load_model(detector_path, device)
    set_inference(detector, score_thr=cfg["det_score_thr"], max_per_image=cfg["proposals_per_image"],
                  box_nms_thresh=cfg["det_nms_thr"], rpn_pre_nms_top_n_test=2 * cfg["det_rpn_top_n"],
                  rpn_post_nms_top_n_test=cfg["det_rpn_top_n"])
    images = images.sort_values("image_id").reset_index(drop=True)
    if images.empty:
        raise InputError("no training images", field="images")
    det_hash = file_sha256(detector_path)[:16]
    chash = config_hash({"cfg": cfg, "detector": det_hash, "n_images": len(images), "world": world})
    torch.manual_seed(cfg["seed"])
    core = BoxRefiner.from_detector(detector, det_cfg, cfg).to(device)
    mine = images.iloc[rank::world].reset_index(drop=True)
    det_key = config_hash({"detector": det_hash, "images": mine["image_id"].tolist(),
                           **{k: cfg[k] for k in ("det_score_thr", "det_nms_thr", "det_rpn_top_n",
                                                  "proposals_per_image")}})
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    cache = ckpt_dir / (f"detections_{det_key}.parquet" if world == 1 else
                        f"detections_{det_key}_rank{rank}of{world}.parquet")
    data, labels = prepare(cfg=cfg, detector=detector, refiner=core, det_labels=det_labels, images=mine,
                           boxes=boxes, cache_path=cache, device=device, workers=workers)
    del detector  # the refiner holds the backbone; the detector's heads are no longer needed
    n_det = sum(len(d) for d in data.det)
    log.info("rank %d: %d images, %d detections, %d ground-truth boxes as proposals x %d copies", rank,
             len(data.image_ids), n_det, sum(len(g) for g in data.gt), cfg["jitter_copies"])

    cuda = device.type == "cuda"
    use_amp = bool(cfg["amp"]) and cuda
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    params = [p for p in core.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    trainer = Trainer(core, core, params, opt, scaler, device, use_amp, amp_dtype)
    start_epoch = resume(trainer, ckpt_dir, chash)
    if world > 1:
        trainer.model = torch.nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if cuda else None)
    meta = {"labels": labels, "config": cfg, "config_hash": chash, "detector_hash": det_hash,
            "backbone": backbone_config(det_cfg)}
    iters = max(1, math.ceil(len(images) / (cfg["batch_size"] * world)))
    total = iters * cfg["epochs"]
    progress = _Progress(metrics_path if rank == 0 else None, total_iters=total,
                         global_bs=cfg["batch_size"] * world, epochs=cfg["epochs"])
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            trainer.model.train()
            t_epoch = time.time()
            order = plan(len(data.image_ids), seed=cfg["seed"], epoch=epoch, rank=rank, iters=iters,
                         batch_size=cfg["batch_size"])
            for k, batch in enumerate(order):
                it = epoch * iters + k
                lr = lr_at(it, epoch, total, cfg)
                feats, sizes = _features(trainer.core, data, batch, device)
                parts = [proposals_of(data, int(i), s, cfg=cfg, epoch=epoch, position=int(i) * world + rank,
                                      device=device) for i, s in zip(batch, sizes)]
                for g in opt.param_groups:
                    g["lr"] = lr
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                    losses = trainer.model(feats, sizes, *map(list, zip(*parts)))
                loss = sum(losses.values())
                if not _all_finite(loss.detach(), world):
                    raise NonFiniteLoss(f"non-finite loss {loss.item()} at epoch {epoch + 1} iteration {k + 1} "
                                        f"(rank {rank}); lower lr or raise warmup_iters")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg["clip_grad_norm"])
                scaler.step(opt)
                scaler.update()
                progress.step()
                if rank == 0 and ((k + 1) % log_every == 0 or k + 1 == iters):
                    progress.log(epoch=epoch, k=k, iters=iters, it=it, lr=lr, loss=loss, losses=losses)
            if rank == 0:
                path = checkpoint(trainer, ckpt_dir, epoch, meta=meta)
                prune_checkpoints(ckpt_dir, latest=epoch, keep=set())
                log.info("epoch %d done in %.1fs -> %s", epoch + 1, time.time() - t_epoch, path)
            if world > 1:
                dist.barrier()
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
    finally:
        progress.close()
    last = cfg["epochs"] if stop_after_epoch is None else min(stop_after_epoch, cfg["epochs"])
    return refiner_checkpoint(core, backbone_cfg=backbone_config(det_cfg), cfg=cfg, labels=labels,
                              config_hash=chash, detector_hash=det_hash, epochs=last)


def _features(core: BoxRefiner, data: RefinerData, batch: np.ndarray, device: torch.device
              ) -> tuple[list[dict[str, torch.Tensor]], list[tuple[int, int]]]:
    """The FPN maps (float32 on ``device``) and resized sizes of the images at positions ``batch``: from the
    feature cache, or computed from the decoded images."""
    if data.feats is not None:
        return ([{k: v.to(device).float() for k, v in data.feats[int(i)].items()} for i in batch],
                [data.sizes[int(i)] for i in batch])
    return core.features([load_image(data.paths[int(i)]).to(device) for i in batch])


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.train_refiner", description=__doc__.split("\n\n")[0])
    p.add_argument("--detector", type=Path, required=True, help="the detector's model.pt (stages.train)")
    p.add_argument("--config", default="{}", help="the refiner config section as JSON (missing keys take the "
                   "schema's defaults; only the keys training reads are used)")
    p.add_argument("--images", type=Path, required=True, help="images table (parquet)")
    p.add_argument("--boxes", type=Path, required=True, help="boxes table (parquet): the ground truth")
    p.add_argument("--splits", type=Path, help="splits table; default: every image of --images trains")
    p.add_argument("--split", default="train")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--threads", type=int, default=schema_default("refiner", "threads"),
                   help="torch CPU threads (the refiner's threads resource)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding the images of the "
                   "detection pass (0: this process); the result does not depend on it")
    p.add_argument("--ckpt-dir", type=Path, required=True, help="epoch checkpoints and the cached detections")
    p.add_argument("--metrics", type=Path, help="metrics JSONL (one line per logged iteration)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--stop-after-epoch", type=int, help="stop after this epoch (testing resume)")
    p.add_argument("--out", type=Path, required=True, help="refiner.pt to write")
    a = p.parse_args(argv)
    cfg = refiner_config(json_object(a.config))
    torch.set_num_threads(a.threads)
    if not a.detector.exists():
        raise InputError("file not found", file=a.detector)
    images = read_table(a.images, "images")
    if a.splits:
        splits = read_table(a.splits, "splits")
        images = images[images["image_id"].isin(set(splits.loc[splits["split"] == a.split, "image_id"]))]
        if images.empty:
            raise InputError(f"no image of split {a.split!r}", file=a.splits, field="split")
    boxes = read_table(a.boxes, "boxes")
    rank, world, device = _init_distributed(a.device)
    try:
        t0, c0 = time.time(), time.process_time()
        log.info("refiner training on %d images, device %s, %d threads, %d process(es)", len(images), device,
                 torch.get_num_threads(), world)
        result = train_refiner(cfg=cfg, detector_path=a.detector, images=images, boxes=boxes, ckpt_dir=a.ckpt_dir,
                               device=device, metrics_path=a.metrics, log_every=a.log_every,
                               stop_after_epoch=a.stop_after_epoch, workers=a.workers)
        if rank == 0:
            with atomic_path(a.out) as tmp:
                torch.save({**result, "code": code_version()}, tmp)
            print(f"train_refiner: {result['epochs']} epochs, {len(result['config']['iou_thrs'])} stages, "
                  f"{world} process(es), {time.time() - t0:.1f}s wall, {time.process_time() - c0:.1f}s CPU "
                  f"(this process) -> {a.out}")
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
