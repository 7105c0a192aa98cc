"""Train an HRNet mask network (paper §8.2-8.3) on crops of the ground-truth masked instances of one split.

Each instance's box (from ``gt_masks.parquet``: normalized xyxy + the full-image COCO RLE of its mask) is
jittered (every side by U(-jitter, jitter) x the box's width or height), turned by N(0, rotate_sigma) degrees
about its centre together with its mask (the detectors' rotation augmentation, applied to the crop), cut out at a
square side S drawn per batch from the multiples of 4 in ``train_scales`` and flipped horizontally with
probability 1/2 (:func:`stages.models.hrnet.crop_boxes`). The loss is per-pixel binary cross-entropy with
logits against the mask cropped the same way (thresholded at 0.5).

SGD (momentum, weight decay) at ``lr x batch_size x processes / 16`` (the linear scaling rule: the configured lr,
0.08 by default, is the rate of a total batch of 16 crops), a linear warm-up over ``warmup_iters`` iterations,
then poly decay ``(1 - it / total) ^ poly_power`` over all iterations of the run.

**Images are decoded once per epoch**: each epoch's plan shuffles the images that hold instances (seeded by
the seed and the epoch) and packs whole images into batches of at most ``batch_size`` crops (an image with more
instances than that contributes a random ``batch_size`` of them), so every image of an epoch is decoded and
cropped by exactly one loader call; nothing is cached between epochs (memory does not grow with the dataset).
The randomness of an image's crops comes from (seed, epoch, image) alone, so the result does not depend on
``--workers``. Under ``torchrun`` the plan's batches are dealt round-robin to the processes (iteration k of rank
r is packed batch k x world + r) and DistributedDataParallel averages gradients (BatchNorm statistics stay per
process).

A checkpoint per epoch (model, optimiser, scaler) in ``--ckpt-dir``; a rerun resumes from the newest one of the
same config hash (a changed config starts over); older checkpoints are deleted after each epoch. Progress (epoch,
iteration, loss, crops/s, ETA) goes to the log and one JSON line per logged step to ``--metrics``. Output
``model.pt``: ``{"state_dict", "cfg" (the mask_model section, every key), "meta"}``
(:func:`stages.models.hrnet.load_mask_model` reads it).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from stages.core.cli import json_object, stage_main
from stages.core.config import _schema_cached, defaults_validator
from stages.core.errors import InputError
from stages.core.provenance import code_version
from stages.formats.io import atomic_path, config_hash, read_table
from stages.models.data import load_image
from stages.models.hrnet import build_mask_net, crop_boxes, normalize
from stages.train import (NonFiniteLoss, _all_finite, _ckpt_path, _dist, _init_distributed, find_resume,
                          prune_checkpoints)

log = logging.getLogger(__name__)

#: who reads a mask_model key (its ``x-reads``)
MASK_PARTS = ("train", "infer", "resources")
#: columns of the ground-truth instance masks table (stages.ingest_masks)
GT_MASK_COLUMNS = {"image_id": object, "label": object, "x_min": np.float64, "y_min": np.float64,
                   "x_max": np.float64, "y_max": np.float64, "rle": object, "mask_height": np.int32,
                   "mask_width": np.int32}


# ------------------------------------------------------------------------------------------------ the config
def _mask_schema() -> dict:
    return _schema_cached()["$defs"]["mask_model"]


def mask_default(key: str) -> Any:
    """The schema's default of one ``mask_model`` key (CLIs take their defaults from here)."""
    return copy.deepcopy(_mask_schema()["properties"][key]["default"])


def mask_config(cfg: Mapping[str, Any], *, source: object = "--config") -> dict[str, Any]:
    """A ``mask_model`` section validated against the schema, every default filled in; :class:`InputError`
    naming the key when it does not match."""
    schema = {"$defs": _schema_cached()["$defs"], "$ref": "#/$defs/mask_model"}
    out = copy.deepcopy(dict(cfg))
    errors = sorted(defaults_validator(schema).iter_errors(out), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        raise InputError(f"mask model config: {err.message}", file=source,
                         field="/".join(str(p) for p in err.absolute_path) or "(top level)")
    lo, hi = out["train_scales"]
    if lo > hi:
        raise InputError(f"train_scales {[lo, hi]} must be [lo, hi] with lo <= hi", file=source,
                         field="train_scales")
    return out


def mask_part(cfg: Mapping[str, Any], part: str) -> dict[str, Any]:
    """The keys of ``cfg`` that ``part`` reads (their ``x-reads``)."""
    if part not in MASK_PARTS:
        raise ValueError(f"part must be one of {MASK_PARTS}, got {part!r}")
    props = _mask_schema()["properties"]
    return {k: v for k, v in cfg.items() if props[k]["x-reads"] == part}


# ------------------------------------------------------------------------------------------------ the data
def read_gt_masks(path: str | Path) -> pd.DataFrame:
    """The ground-truth instance masks table (image_id, label, x_min, y_min, x_max, y_max normalized, rle: COCO
    compressed counts of the full-image mask, mask_height, mask_width), checked: :class:`InputError` naming
    file, row and field on a missing column, an empty value or a box outside [0, 1]."""
    path = Path(path)
    try:
        df = read_table(path, "gt_masks")
    except (OSError, ValueError) as exc:
        raise InputError(f"not a readable parquet file: {exc}", file=path) from exc
    missing = [c for c in GT_MASK_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"ground-truth masks table is missing column(s) {missing}", file=path, field=missing[0])
    for c in GT_MASK_COLUMNS:
        bad = df[c].isna().to_numpy()
        if bad.any():
            raise InputError("empty value", file=path, row=f"row {int(np.flatnonzero(bad)[0])}", field=c)
    df = df[list(GT_MASK_COLUMNS)].astype(GT_MASK_COLUMNS).reset_index(drop=True)
    check_boxes(df, source=path)
    return df


def check_boxes(df: pd.DataFrame, *, source: object) -> None:
    """:class:`InputError` (file, row, field) at the first box outside [0, 1], empty, or not finite."""
    b = df[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float64)
    bad = ~np.isfinite(b) | (b < 0) | (b > 1)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise InputError(f"box coordinate {b[row, col]!r} outside [0, 1]", file=source, row=f"row {row}",
                         field=("x_min", "y_min", "x_max", "y_max")[col])
    empty = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        field = "x_max" if b[row, 2] <= b[row, 0] else "y_max"
        raise InputError(f"empty box {b[row].tolist()}", file=source, row=f"row {row}", field=field)


def decode_masks(rles: Sequence[str], height: int, width: int) -> np.ndarray:
    """COCO compressed RLE counts strings of [height, width] masks -> uint8 [N, height, width]."""
    from pycocotools import mask as mask_utils

    if not len(rles):
        return np.zeros((0, height, width), np.uint8)
    objs = [{"size": [int(height), int(width)], "counts": r.encode() if isinstance(r, str) else r} for r in rles]
    return np.ascontiguousarray(mask_utils.decode(objs).transpose(2, 0, 1))


class Instances:
    """The training instances as flat arrays grouped by image (sorted by image id): image ``i`` holds instances
    ``offsets[i]:offsets[i + 1]`` of ``boxes`` (normalized xyxy float64 [N, 4]), ``rles``, ``mask_hw``
    ([N, 2]: height, width of each mask); ``paths``, ``hw`` ([n, 2]) of the images."""

    def __init__(self, masks: pd.DataFrame, images: pd.DataFrame, *, source: object = "masks"):
        images = images.drop_duplicates("image_id").set_index("image_id")
        known = masks["image_id"].isin(images.index).to_numpy()
        if not known.all():
            row = int(np.flatnonzero(~known)[0])
            raise InputError(f"image {masks['image_id'].iloc[row]!r} is not in the images table", file=source,
                             row=f"row {row}", field="image_id")
        order = np.argsort(masks["image_id"].to_numpy(dtype=str), kind="stable")
        m = masks.iloc[order].reset_index(drop=True)
        ids, first = np.unique(m["image_id"].to_numpy(dtype=str), return_index=True)
        self.image_ids = ids
        self.paths = images.loc[ids, "path"].astype(str).to_numpy()
        self.hw = images.loc[ids, ["height", "width"]].to_numpy(np.int64)
        self.offsets = np.append(first, len(m)).astype(np.int64)
        self.boxes = m[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float64)
        self.rles = m["rle"].to_numpy(dtype=object)
        self.mask_hw = m[["mask_height", "mask_width"]].to_numpy(np.int64)

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def n_images(self) -> int:
        return len(self.paths)


class CropItem(NamedTuple):
    """One image's part of a batch: its crops (instances ``instances``) at side ``size``, in epoch ``epoch``."""

    epoch: int
    image: int
    instances: tuple[int, ...]
    size: int


def scale_choices(train_scales: Sequence[int]) -> np.ndarray:
    """The crop sides a batch may draw: the multiples of 4 in [lo, hi]."""
    lo, hi = int(train_scales[0]), int(train_scales[1])
    sides = np.arange(math.ceil(lo / 4) * 4, hi + 1, 4)
    if not len(sides):
        raise ValueError(f"train_scales {list(train_scales)} holds no multiple of 4")
    return sides


def plan_epoch(inst: Instances, *, epoch: int, seed: int, batch_size: int, train_scales: Sequence[int]
               ) -> list[list[CropItem]]:
    """Epoch ``epoch``'s packed batches (see the module doc): the images in a seeded random order, whole images
    packed greedily into batches of at most ``batch_size`` crops, each batch with its own crop side."""
    rng = np.random.default_rng([seed, epoch, 0])
    counts = np.diff(inst.offsets)
    sides = scale_choices(train_scales)
    batches: list[list[CropItem]] = []
    cur: list[tuple[int, tuple[int, ...]]] = []
    n_cur = 0
    for i in rng.permutation(inst.n_images):
        idx = np.arange(inst.offsets[i], inst.offsets[i + 1])
        if counts[i] > batch_size:
            idx = np.sort(rng.choice(idx, size=batch_size, replace=False))
        if n_cur + len(idx) > batch_size and cur:
            batches.append(cur)
            cur, n_cur = [], 0
        cur.append((int(i), tuple(int(k) for k in idx)))
        n_cur += len(idx)
    if cur:
        batches.append(cur)
    size = rng.choice(sides, size=len(batches))
    return [[CropItem(epoch, i, idx, int(s)) for i, idx in b] for b, s in zip(batches, size)]


class EpochSampler(torch.utils.data.Sampler):
    """The batches of one epoch for rank ``rank`` of ``world`` (call :meth:`set_epoch` first): packed batch
    k x world + r is iteration k of rank r; the tail that does not fill a round is dropped."""

    def __init__(self, plans: Sequence[Sequence[Sequence[CropItem]]], *, rank: int = 0, world: int = 1):
        self.plans, self.rank, self.world = plans, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.plans[self.epoch]) // self.world

    def __iter__(self) -> Iterator[list[CropItem]]:
        plan = self.plans[self.epoch]
        for k in range(len(self)):
            yield list(plan[k * self.world + self.rank])


class CropSet(torch.utils.data.Dataset):
    """Decoding and augmentation of one :class:`CropItem`: (crops [k, 3, S, S] normalised, targets
    [k, 1, S, S] 0/1). Randomness from ``np.random.default_rng([seed, epoch, 1, image])`` alone."""

    def __init__(self, inst: Instances, *, seed: int, jitter: float, rotate_sigma: float):
        self.inst, self.seed, self.jitter, self.rotate_sigma = inst, seed, jitter, rotate_sigma

    def __len__(self) -> int:
        return self.inst.n_images

    def __getitem__(self, item: CropItem) -> tuple[torch.Tensor, torch.Tensor]:
        inst = self.inst
        rng = np.random.default_rng([self.seed, item.epoch, 1, item.image])
        idx = np.asarray(item.instances, np.int64)
        img = normalize(load_image(inst.paths[item.image]))
        h, w = img.shape[-2:]
        masks = torch.from_numpy(_masks_at(inst, idx, h, w))
        k = len(idx)
        b = inst.boxes[idx] * np.array([w, h, w, h], np.float64)
        bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        b = b + rng.uniform(-self.jitter, self.jitter, (k, 4)) * np.stack([bw, bh, bw, bh], 1)
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
        b[:, 2] = np.maximum(b[:, 2], b[:, 0] + 1)
        b[:, 3] = np.maximum(b[:, 3], b[:, 1] + 1)
        angles = rng.normal(0.0, self.rotate_sigma, k) if self.rotate_sigma > 0 else np.zeros(k)
        flips = torch.from_numpy(rng.random(k) < 0.5)
        crops, targets = crop_boxes(img, torch.from_numpy(b).float(), item.size, masks=masks,
                                    angles=torch.from_numpy(angles).float())
        crops = torch.where(flips[:, None, None, None], crops.flip(-1), crops)
        targets = torch.where(flips[:, None, None, None], targets.flip(-1), targets)
        return crops, targets


def _masks_at(inst: Instances, idx: np.ndarray, h: int, w: int) -> np.ndarray:
    """The masks of instances ``idx`` (one image) at the image's size [k, h, w] uint8 (a mask stored at another
    resolution, as OpenImages' are, is resized nearest-neighbour)."""
    out = np.empty((len(idx), h, w), np.uint8)
    hw = inst.mask_hw[idx]
    for mh, mw in np.unique(hw, axis=0):
        at = np.flatnonzero((hw[:, 0] == mh) & (hw[:, 1] == mw))
        m = decode_masks(list(inst.rles[idx[at]]), mh, mw)
        if (mh, mw) != (h, w):
            m = F.interpolate(torch.from_numpy(m)[:, None].float(), size=(h, w), mode="nearest")
            m = m[:, 0].byte().numpy()
        out[at] = m
    return out


def collate_crops(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])


# ------------------------------------------------------------------------------------------------ training
def lr_at(it: int, total: int, cfg: Mapping[str, Any], *, world: int = 1) -> float:
    """Iteration ``it``'s (0-based, of ``total``) learning rate: lr x batch_size x world / 16, times the
    warm-up (it + 1) / (warmup_iters + 1) for it < warmup_iters, times the poly decay (1 - it / total)^power."""
    lr = cfg["lr"] * cfg["batch_size"] * world / 16.0
    lr *= (1.0 - it / max(total, 1)) ** cfg["poly_power"]
    if it < cfg["warmup_iters"]:
        lr *= (it + 1) / (cfg["warmup_iters"] + 1)
    return lr


@dataclass
class _Progress:
    metrics_path: Path | None
    total_iters: int
    epochs: int

    def __post_init__(self):
        self.metrics = open(self.metrics_path, "a") if self.metrics_path else None
        self.t0 = time.time()
        self.crops = 0
        self.iters = 0

    def log(self, *, epoch: int, k: int, iters: int, it: int, lr: float, loss: float) -> None:
        dt = max(time.time() - self.t0, 1e-9)
        cps = self.crops / dt
        eta = (self.total_iters - it - 1) * dt / max(self.iters, 1)
        log.info("epoch %d/%d iter %d/%d loss %.4f lr %.4g | %.1f crops/s ETA %.0fs", epoch + 1, self.epochs,
                 k + 1, iters, loss, lr, cps, eta)
        if self.metrics:
            self.metrics.write(json.dumps({"epoch": epoch + 1, "iter": it + 1, "lr": lr, "loss": loss,
                                           "crops_per_s": cps}) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()


def train_masks(*, cfg: Mapping[str, Any], masks: pd.DataFrame, images: pd.DataFrame, ckpt_dir: Path,
                device: torch.device, metrics_path: Path | None = None, log_every: int = 20, workers: int = 0,
                stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train on the instances of ``masks`` (the ground-truth masks table, rows of images in ``images``) and
    return ``{"state_dict", "cfg", "meta"}``. ``cfg``: a ``mask_model`` section (defaults filled here); only its
    ``train`` keys are hashed (a checkpoint of another hash is not resumed). Under an initialised process group
    every rank calls this alike; rank 0 alone writes checkpoints and metrics."""
    cfg = mask_config(cfg)
    tcfg = mask_part(cfg, "train")
    rank, world = _dist()
    masks = masks[masks["image_id"].isin(images["image_id"])]
    if masks.empty:
        raise InputError("no ground-truth masks on the training images", field="image_id")
    inst = Instances(masks, images)
    chash = config_hash({"cfg": tcfg, "n_instances": len(inst), "n_images": inst.n_images, "world": world})
    plans = [plan_epoch(inst, epoch=e, seed=cfg["seed"], batch_size=cfg["batch_size"],
                        train_scales=cfg["train_scales"]) for e in range(cfg["epochs"])]
    iters = [len(p) // world for p in plans]
    if min(iters) < 1:
        raise InputError(f"{inst.n_images} training images make fewer batches than {world} processes",
                         field="image_id")
    total = sum(iters)

    torch.manual_seed(cfg["seed"])
    core = build_mask_net(cfg).to(device)
    cuda = device.type == "cuda"
    use_amp = bool(cfg["amp"]) and cuda
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    params = [p for p in core.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr_at(0, total, cfg, world=world), momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"])
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    path = find_resume(ckpt_dir, chash)
    if path is not None:
        state = torch.load(path, map_location=device, weights_only=False)
        core.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = state["epoch"] + 1
        log.info("resuming from %s (epoch %d done)", path, start)
    model = core
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if cuda else None)

    sampler = EpochSampler(plans, rank=rank, world=world)
    data = CropSet(inst, seed=cfg["seed"], jitter=cfg["jitter"], rotate_sigma=cfg["rotate_sigma"])
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate_crops,
                                         num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0,
                                         prefetch_factor=2 if workers else None)
    meta = {"config_hash": chash, "n_instances": len(inst), "n_images": inst.n_images, "world": world}
    progress = _Progress(metrics_path if rank == 0 else None, total_iters=total, epochs=cfg["epochs"])
    last = start
    try:
        for epoch in range(start, cfg["epochs"]):
            model.train()
            sampler.set_epoch(epoch)
            t_epoch, crops_epoch, loss_sum = time.time(), 0, 0.0
            it0 = sum(iters[:epoch])
            for k, (x, y) in enumerate(loader):
                it = it0 + k
                lr = lr_at(it, total, cfg, world=world)
                for g in opt.param_groups:
                    g["lr"] = lr
                x, y = x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda)
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                    logits = model(x)
                loss = F.binary_cross_entropy_with_logits(logits.float(), y)
                if not _all_finite(loss.detach(), world):
                    raise NonFiniteLoss(f"non-finite loss {loss.item()} at epoch {epoch + 1} iteration {k + 1} "
                                        f"(rank {rank}); lower lr or raise warmup_iters")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                progress.crops += len(x) * world  # other ranks taken as this one's batch size (a log figure)
                progress.iters += 1
                crops_epoch += len(x) * world
                loss_sum += loss.item()
                if rank == 0 and ((k + 1) % log_every == 0 or k + 1 == iters[epoch]):
                    progress.log(epoch=epoch, k=k, iters=iters[epoch], it=it, lr=lr, loss=loss.item())
            if rank == 0:
                state = {"model": core.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                         "scaler": scaler.state_dict() if scaler.is_enabled() else None, "config_hash": chash,
                         "cfg": cfg}
                with atomic_path(_ckpt_path(ckpt_dir, epoch)) as tmp:
                    torch.save(state, tmp)
                prune_checkpoints(ckpt_dir, latest=epoch, keep=set())
                dt = time.time() - t_epoch
                log.info("epoch %d done in %.1fs: mean loss %.4f, %.1f crops/s", epoch + 1, dt,
                         loss_sum / max(iters[epoch], 1), crops_epoch / max(dt, 1e-9))
            if world > 1:
                dist.barrier()
            last = epoch + 1
            if stop_after_epoch is not None and last >= stop_after_epoch:
                break
    finally:
        progress.close()
        loader = None
    final = torch.load(_ckpt_path(ckpt_dir, last - 1), map_location="cpu", weights_only=False)
    return {"state_dict": final["model"], "cfg": cfg, "meta": {**meta, "epochs": final["epoch"] + 1}}


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.train_masks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="{}", help="the mask model's config section as JSON (a mask_model entry "
                   "of the schema: the keys training reads; others are ignored, missing ones take the defaults)")
    p.add_argument("--masks", type=Path, required=True, help="ground-truth instance masks (gt_masks.parquet)")
    p.add_argument("--images", type=Path, required=True, help="images table (parquet)")
    p.add_argument("--splits", type=Path, help="splits table; default: every image of --images with masks trains")
    p.add_argument("--split", default="train")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda[:N]")
    p.add_argument("--threads", type=int, default=mask_default("threads"), help="torch CPU threads")
    p.add_argument("--workers", type=int, default=mask_default("workers"),
                   help="DataLoader processes decoding images and cutting crops (0: this process)")
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--metrics", type=Path, help="JSON lines of the logged steps")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--stop-after-epoch", type=int, help="stop after this epoch (testing resume)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    raw = json_object(a.config)
    cfg = mask_config({k: v for k, v in raw.items() if k in _mask_schema()["properties"]})
    torch.set_num_threads(a.threads)
    images = read_table(a.images, "images")
    if a.splits:
        splits = read_table(a.splits, "splits")
        images = images[images["image_id"].isin(set(splits.loc[splits["split"] == a.split, "image_id"]))]
    masks = read_gt_masks(a.masks)
    unknown = ~masks["image_id"].isin(read_table(a.images, "images")["image_id"]).to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise InputError(f"image {masks['image_id'].iloc[row]!r} is not in {a.images}", file=a.masks,
                         row=f"row {row}", field="image_id")
    rank, world, device = _init_distributed(a.device)
    try:
        n = int(masks["image_id"].isin(images["image_id"]).sum())
        log.info("training masks on %d instances of %d images (split %s), device %s, %d threads, %d process(es), "
                 "%d loader worker(s)", n, images["image_id"].isin(masks["image_id"]).sum(),
                 a.split if a.splits else "all", device, torch.get_num_threads(), world, a.workers)
        t0, c0 = time.time(), time.process_time()
        result = train_masks(cfg=cfg, masks=masks, images=images, ckpt_dir=a.ckpt_dir, device=device,
                             metrics_path=a.metrics, log_every=a.log_every, workers=a.workers,
                             stop_after_epoch=a.stop_after_epoch)
        if rank == 0:
            result["meta"].update(code=code_version(), split=a.split if a.splits else None)
            with atomic_path(a.out) as tmp:
                torch.save(result, tmp)
            print(f"train_masks: {result['meta']['epochs']} epochs on {n} instances, {world} process(es), "
                  f"{time.time() - t0:.1f}s wall, {time.process_time() - c0:.1f}s CPU (this process) -> {a.out}")
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
