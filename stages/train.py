"""Train a detector: class-aware (or uniform) sampling, warm-up + step LR, a checkpoint per epoch, resume.

Progress (epoch, iteration, loss, images/s, ETA) goes to the log every ``--log-every`` iterations and one
JSON line per logged step to ``metrics.jsonl``. A killed run resumes from its last complete epoch checkpoint
(checkpoints whose config hash differs are ignored, so a changed config never resumes stale weights). After
each epoch the older checkpoints are pruned: the latest stays complete (model + optimiser, the resume point),
those of the ``average_epochs`` window keep their weights only, the others are deleted. Every checkpoint, and the
output, holds the measured throughput of each epoch so far (``epoch_stats``: images, wall seconds of its
iterations, images/s, device, processes), and the output the size of the training set (``data``).

Each epoch's sample is planned from the seed and the epoch (:class:`PlanSampler`, a batch sampler); with
``--workers W`` W DataLoader processes decode and augment it (each sample's randomness comes from the seed, the
epoch and its position, so the result does not depend on W) while this process moves batches to the device
and steps.

The same command trains on N processes under ``torchrun --nproc_per_node N`` (gloo on CPU, NCCL on GPU,
DistributedDataParallel): every rank plans the same per-epoch sample from the seed and takes its share of each
global batch (``batch_size`` images per process); only rank 0 writes checkpoints, metrics and the output.
With ``average_epochs: [a, b]`` the output model is the parameter average of the checkpoints of epochs a..b.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from stages.core.cli import json_object, stage_main
from stages.core.config import model_part, schema_default, validate_config
from stages.core.errors import InputError
from stages.core.provenance import code_version
from stages.formats.experts import read_experts, restrict_to_classes
from stages.formats.io import atomic_path, config_hash, file_sha256, read_table
from stages.formats.readers import read_class_names
from stages.models.augment import AugmentStats, augment_stats, elaborate_augment
from stages.models.averaging import average_checkpoints
from stages.models.data import (DetectionDataset, SamplingDraw, box_annotated_column, collate, hflip,
                                image_level_draw, image_level_matrix, training_draw)
from stages.models.detector import build_detector, select_device, set_class_mixing
from stages.models.losses import ClassMixing, resolve_groups
from stages.models.wsddn import set_pseudo_mining

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


def lr_at(it: int, epoch: int, cfg: Mapping[str, Any]) -> float:
    """Linear warm-up from ``warmup_factor`` × lr over ``warmup_iters`` iterations, then × ``lr_gamma`` at each
    epoch in ``lr_steps``."""
    lr = cfg["lr"] * cfg["lr_gamma"] ** sum(epoch >= s for s in cfg["lr_steps"])
    if it < cfg["warmup_iters"]:
        f = cfg["warmup_factor"]
        lr *= f + (1 - f) * it / cfg["warmup_iters"]
    return lr


def model_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A model section with every schema default filled in."""
    full = validate_config({"models": {"m": dict(cfg)}}, cross_refs=False)
    return full["models"]["m"]


def _ckpt_path(out_dir: Path, epoch: int) -> Path:
    return out_dir / f"epoch_{epoch:03d}.pt"


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """The epoch checkpoints in ``out_dir`` as (0-based epoch, path), oldest first."""
    found = []
    for p in out_dir.glob("epoch_*.pt"):
        m = re.fullmatch(r"epoch_(\d+)\.pt", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume(out_dir: Path, chash: str) -> Path | None:
    """The newest checkpoint of config hash ``chash`` that holds the optimiser state (one to resume from)."""
    for _, p in reversed(_checkpoints(out_dir)):
        try:
            meta = torch.load(p, map_location="cpu", weights_only=False)
        except Exception:  # a checkpoint that does not load is skipped  # noqa: BLE001
            continue
        if meta.get("config_hash") == chash and meta.get("optimizer") is not None:
            return p
    return None


def prune_checkpoints(out_dir: Path, *, latest: int, keep: Collection[int]) -> None:
    """Retention after epoch ``latest``'s checkpoint was written: that one stays complete (model, optimiser:
    the resume point); of the older ones, the epochs in ``keep`` (0-based; the ``average_epochs`` window) are
    cut down to their weights and metadata (rewritten atomically, the optimiser and scaler state dropped) and
    the others deleted. Checkpoints of later epochs (another config's, which this run will overwrite) are
    left alone."""
    for epoch, p in _checkpoints(out_dir):
        if epoch >= latest:
            continue
        if epoch not in keep:
            p.unlink()
            continue
        state = torch.load(p, map_location="cpu", weights_only=False)
        if state.get("optimizer") is None and state.get("scaler") is None:
            continue
        with atomic_path(p) as tmp:
            torch.save({**state, "optimizer": None, "scaler": None}, tmp)


def average_window(cfg: Mapping[str, Any]) -> set[int]:
    """The 0-based epochs whose checkpoints the output model averages (``average_epochs: [a, b]``, 1-based)."""
    avg = cfg["average_epochs"]
    return set() if avg is None else set(range(avg[0] - 1, avg[1]))


def plan_epoch(*, rng: np.random.Generator, n: int, batch_size: int, draw: SamplingDraw, class_first: bool,
               full_class_batch: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sample of one epoch from the sample stage's ``draw``: (image indices (n,), class per sample (n,),
    -1 when none was drawn, flips (n,)).

    Image-first (default): images drawn with their probability in ``draw``. Class-first (``class_first`` or
    ``full_class_batch``): (image, class) pairs drawn with their probability; with ``full_class_batch`` each run
    of ``batch_size`` samples first draws distinct classes from the class marginal (as many as there are; the
    rest of an oversized batch with replacement; the marginal of each position is unchanged when the classes
    are equally likely, as under class-aware sampling), then a pair of each class with its probability given
    the class.
    """
    if n % batch_size:
        raise ValueError(f"n={n} is not a multiple of batch_size={batch_size}")
    if not (class_first or full_class_batch):
        order = rng.choice(draw.n_images, size=n, p=draw.image_p())
        classes = np.full(n, -1, dtype=np.int64)
    elif not full_class_batch:
        picks = rng.choice(len(draw.p), size=n, p=draw.p)
        order, classes = draw.image[picks], draw.cls[picks]
    else:
        keys, of_pair = np.unique(draw.cls, return_inverse=True)
        q = np.bincount(of_pair, weights=draw.p)
        parts = []
        for _ in range(n // batch_size):
            k = min(batch_size, len(keys))
            first = rng.choice(len(keys), size=k, replace=False, p=q)
            rest = rng.choice(len(keys), size=batch_size - k, p=q)
            parts.append(np.concatenate([first, rest]))
        picked_class = np.concatenate(parts)
        picks = np.empty(n, dtype=np.int64)
        for c in np.unique(picked_class):
            at = np.flatnonzero(picked_class == c)
            pairs = np.flatnonzero(of_pair == c)
            picks[at] = rng.choice(pairs, size=len(at), p=draw.p[pairs] / q[c])
        order, classes = draw.image[picks], draw.cls[picks]
    flips = rng.random(n) < 0.5
    return order, classes, flips


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank (one tiny all-reduce, so all ranks stop together)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=loss.device)
    if world > 1:
        dist.all_reduce(bad)
    return bad.item() == 0


class PlanItem(NamedTuple):
    """One sample of an epoch's plan: position ``j`` of epoch ``epoch``'s plan, the image position ``image`` in
    the dataset, the class drawn for it (-1: none) and whether it is flipped."""

    epoch: int
    j: int
    image: int
    cls: int
    flip: bool


class PlanSampler(torch.utils.data.Sampler):
    """The training sample as a batch sampler: per iteration, this rank's ``batch_size`` positions of the
    epoch's plan (:func:`plan_epoch`, drawn from the seed and the epoch alone, the same on every rank), as
    :class:`PlanItem` s; iteration ``k`` of rank ``r`` takes positions ``k * B + r * batch_size ...`` of the
    global batch of ``B = batch_size * world``. Call :meth:`set_epoch` before iterating.

    With an image-level-only pool (``weak_draw``, positions into the same dataset, and ``weak_per_batch`` = w
    of each rank's ``batch_size`` slots): the last w slots of every rank's batch come from a plan of that pool
    (:func:`plan_epoch` with its own stream, ``default_rng([seed, epoch, 1])``; class-first when ``class_first``),
    the first ``batch_size - w`` from the plan of ``draw`` (``default_rng([seed, epoch])``, global batches of
    ``(batch_size - w) * world``)."""

    def __init__(self, draw: SamplingDraw, *, seed: int, iters: int, batch_size: int, class_first: bool,
                 full_class_batch: bool, rank: int = 0, world: int = 1, weak_draw: SamplingDraw | None = None,
                 weak_per_batch: int = 0):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        if weak_draw is not None and not 0 < weak_per_batch < batch_size:
            raise ValueError(f"weak_per_batch must lie in [1, batch_size - 1 = {batch_size - 1}], got "
                             f"{weak_per_batch}")
        self.draw, self.seed, self.iters, self.batch_size = draw, seed, iters, batch_size
        self.class_first, self.full_class_batch = class_first, full_class_batch
        self.weak_draw = weak_draw
        self.weak_per_batch = weak_per_batch if weak_draw is not None else 0
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Epoch ``epoch``'s whole plan (every rank's samples): (image positions, classes, flips)."""
        global_bs = self.batch_size * self.world
        if self.weak_draw is None:
            return plan_epoch(rng=np.random.default_rng([self.seed, epoch]), n=self.iters * global_bs,
                              batch_size=global_bs, draw=self.draw, class_first=self.class_first,
                              full_class_batch=self.full_class_batch)
        w = self.weak_per_batch
        b = self.batch_size - w
        box = plan_epoch(rng=np.random.default_rng([self.seed, epoch]), n=self.iters * b * self.world,
                         batch_size=b * self.world, draw=self.draw, class_first=self.class_first,
                         full_class_batch=self.full_class_batch)
        weak = plan_epoch(rng=np.random.default_rng([self.seed, epoch, 1]), n=self.iters * w * self.world,
                          batch_size=w * self.world, draw=self.weak_draw, class_first=self.class_first,
                          full_class_batch=False)
        # (iteration, rank, slot): each rank's box-annotated samples, then its image-level-only ones
        return tuple(np.concatenate([x.reshape(self.iters, self.world, b), y.reshape(self.iters, self.world, w)],
                                    axis=2).reshape(-1) for x, y in zip(box, weak))

    def __len__(self) -> int:
        return self.iters

    def __iter__(self) -> Iterator[list[PlanItem]]:
        epoch = self.epoch
        order, classes, flips = self.plan(epoch)
        global_bs = self.batch_size * self.world
        for k in range(self.iters):
            first = k * global_bs + self.rank * self.batch_size
            yield [PlanItem(epoch, j, int(order[j]), int(classes[j]), bool(flips[j]))
                   for j in range(first, first + self.batch_size)]


class TrainingSet(torch.utils.data.Dataset):
    """Decoding and augmentation of one :class:`PlanItem` (in a DataLoader worker or in the training process):
    the image and its target, after the elaborate augmentation (if on; its randomness comes from
    ``np.random.default_rng([seed, epoch, j])`` alone) and the plan's flip. Nothing here touches torch's or
    numpy's global random state, so a sample does not depend on the process or the worker that makes it.
    An image-level-only image (weak supervision) gets the flip only: a crop could cut its unseen objects out."""

    def __init__(self, ds: DetectionDataset, *, seed: int, elaborate: bool, stats: AugmentStats | None,
                 rotate_std: Sequence[float] = (3.0, 10.0), max_pixels: int = 1_000_000):
        if elaborate and stats is None:
            raise ValueError("the elaborate augmentation needs the dataset's box statistics")
        self.ds, self.seed, self.elaborate, self.stats = ds, seed, elaborate, stats
        self.rotate_std, self.max_pixels = tuple(rotate_std), max_pixels

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item: PlanItem) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img, tgt = self.ds[item.image]
        if self.elaborate and self.ds.box_annotated[item.image]:
            img, b, lab = elaborate_augment(
                img, tgt["boxes"], tgt["labels"], cls=item.cls, stats=self.stats,
                rng=np.random.default_rng([self.seed, item.epoch, item.j]),
                rotate_std=self.rotate_std, max_pixels=self.max_pixels)
            tgt = {**tgt, "boxes": b, "labels": lab}
        if item.flip:
            img, tgt = hflip(img, tgt)
        return img, tgt


@dataclass
class TrainingData:
    """The training images (sorted by id), the sampler that draws each epoch's batches from them and the
    dataset that decodes and augments a drawn sample."""

    dataset: TrainingSet
    sampler: PlanSampler

    def loader(self, *, workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
        """Batches (images, targets) of lists, decoded and augmented by ``workers`` processes (0: in this
        one); the workers live as long as the loader. The result does not depend on ``workers``."""
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers,
            pin_memory=pin_memory, persistent_workers=workers > 0, prefetch_factor=2 if workers else None,
            # the loader's base seed comes from this generator, not from torch's global one (which the
            # detector's RoI sampling reads in the training process)
            generator=torch.Generator().manual_seed(0))


def weak_per_batch(cfg: Mapping[str, Any]) -> int:
    """Image-level-only images in each process's batch: round(image_level_share x batch_size) with ``wsddn``,
    else 0. A share > 0 must give between 1 and batch_size - 1 of them."""
    share = float(cfg.get("image_level_share", 0.0))
    if not cfg.get("wsddn") or share <= 0:
        return 0
    w = round(share * cfg["batch_size"])
    if not 0 < w < cfg["batch_size"]:
        raise InputError(f"image_level_share {share} x batch_size {cfg['batch_size']} gives {w} image-level-only "
                         f"images per batch; it must give 1..{cfg['batch_size'] - 1}", field="image_level_share")
    return w


def weak_supervision_tables(*, cfg: Mapping[str, Any], images: pd.DataFrame, boxes: pd.DataFrame,
                            image_labels: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training images and boxes under the weak-supervision keys: with ``plain_box`` an image-level-only
    image marked ``plain_background`` becomes box-annotated with a box [0, 0, 1, 1] per verified-present label;
    without ``wsddn`` the remaining image-level-only images (``box_annotated`` False) are left out. Tables
    without a ``box_annotated`` column come back unchanged."""
    if "box_annotated" not in images.columns:
        return images, boxes
    annotated = box_annotated_column(images)
    if cfg.get("plain_box") and "plain_background" in images.columns:
        plain = ~annotated & images["plain_background"].fillna(False).to_numpy(dtype=bool)
        if plain.any():
            if image_labels is None:
                raise InputError("plain_box needs the image-level labels (--image-labels)", field="plain_box")
            ids = images.loc[plain, "image_id"]
            pos = image_labels[image_labels["image_id"].isin(ids) & (image_labels["confidence"] == 1)]
            pos = pos.drop_duplicates(["image_id", "label"])
            whole = pd.DataFrame({"image_id": pos["image_id"].to_numpy(dtype=object),
                                  "label": pos["label"].to_numpy(dtype=object), "x_min": 0.0, "y_min": 0.0,
                                  "x_max": 1.0, "y_max": 1.0, "is_group_of": False})
            boxes = pd.concat([boxes, whole], ignore_index=True)
            annotated = annotated | (plain & images["image_id"].isin(set(pos["image_id"])).to_numpy())
            log.info("plain_box: %d plain-background images train with %d whole-image boxes",
                     int(plain.sum()), len(whole))
    images = images.assign(box_annotated=annotated)
    if not cfg.get("wsddn"):
        dropped = int((~annotated).sum())
        if dropped:
            log.info("wsddn off: %d image-level-only images left out of training", dropped)
        images = images[annotated]
    return images, boxes


def training_data(*, cfg: Mapping[str, Any], images: pd.DataFrame, boxes: pd.DataFrame,
                  weights: pd.DataFrame | None, labels: Sequence[str], iters: int, rank: int = 0,
                  world: int = 1, image_labels: pd.DataFrame | None = None) -> TrainingData:
    """The training data of ``images`` (1-based class indices in the order of ``labels``) for config ``cfg``:
    ``iters`` iterations per epoch of ``cfg["batch_size"]`` images on each of ``world`` ranks.

    With ``wsddn`` the targets carry the image-level labels (``image_labels`` table; box classes count as
    present) and the images whose optional ``box_annotated`` column is False form the image-level-only pool,
    :func:`weak_per_batch` of each batch (:class:`PlanSampler`); the draw of ``weights`` covers the
    box-annotated images only. Without ``wsddn`` nothing changes (pass :func:`weak_supervision_tables`'
    images, which have no image-level-only ones)."""
    label_index = {lab: i + 1 for i, lab in enumerate(labels)}
    images = images.sort_values("image_id").reset_index(drop=True)
    wsddn = bool(cfg.get("wsddn"))
    matrix = (image_level_matrix(image_labels, image_ids=images["image_id"], label_index=label_index)
              if wsddn else None)
    ds = DetectionDataset(images, boxes, label_index, image_labels=matrix)
    annotated = ds.box_annotated
    if not wsddn and not annotated.all():
        raise ValueError("image-level-only images (box_annotated False) train only with wsddn")
    weak_draw, w = None, 0
    if wsddn and not annotated.all():
        w = weak_per_batch(cfg)
        weak_pos = np.flatnonzero(~annotated)
        if w:
            weak_draw = image_level_draw(matrix[weak_pos], class_aware=cfg["sampling"] == "class_aware"
                                         ).remap(weak_pos, len(images))
        box_pos = np.flatnonzero(annotated)
        draw = training_draw(weights, image_ids=images["image_id"].iloc[box_pos],
                             label_index=label_index).remap(box_pos, len(images))
    else:
        draw = training_draw(weights, image_ids=images["image_id"], label_index=label_index)
    elaborate = cfg["augment"] == "elaborate"
    stats: AugmentStats | None = None
    if elaborate:
        box_wh, image_wh, box_labels = ds.box_sizes()
        stats = augment_stats(box_wh=box_wh, image_wh=image_wh, labels=box_labels)
    sampler = PlanSampler(draw, seed=cfg["seed"], iters=iters, batch_size=cfg["batch_size"],
                          class_first=elaborate or cfg["full_class_batch"],
                          full_class_batch=cfg["full_class_batch"], rank=rank, world=world, weak_draw=weak_draw,
                          weak_per_batch=w)
    dataset = TrainingSet(ds, seed=cfg["seed"], elaborate=elaborate, stats=stats,
                          rotate_std=cfg["aug_rotate_std"], max_pixels=cfg["aug_max_pixels"])
    return TrainingData(dataset, sampler)


def to_device(imgs: Sequence[torch.Tensor], tgts: Sequence[Mapping[str, torch.Tensor]], device: torch.device
              ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    nb = device.type == "cuda"
    return ([i.to(device, non_blocking=nb) for i in imgs],
            [{n: v.to(device, non_blocking=nb) for n, v in t.items()} for t in tgts])


@dataclass
class Trainer:
    """A detector in training: the module called (DistributedDataParallel around ``core`` on several
    processes), the optimiser with its parameters, the gradient scaler and the autocast settings."""

    model: torch.nn.Module
    core: torch.nn.Module
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    use_amp: bool
    amp_dtype: torch.dtype


def class_mixing(cfg: Mapping[str, Any], labels: Sequence[str], *, names: Mapping[str, str] | None = None
                 ) -> ClassMixing | None:
    """The model's confusing-class mixing (``confusing_groups``/``confusing_mode``/``confusing_weight``) on the
    class indices of a head trained on ``labels``; None when off (no group, or no group with two trained
    classes). ``names``: MID -> display name, for groups given by name."""
    groups = cfg.get("confusing_groups") or []
    if not groups:
        return None
    try:
        idx = resolve_groups(groups, labels, names=dict(names) if names else None)
    except (KeyError, ValueError) as exc:
        raise InputError(str(exc.args[0]), field="confusing_groups") from None
    if not idx:
        log.warning("confusing_groups: no group has two classes with training boxes; no mixing")
        return None
    mixing = ClassMixing(groups=idx, mode=cfg.get("confusing_mode", "soft"),
                         weight=float(cfg.get("confusing_weight", 0.5)))
    log.info("confusing-class mixing (%s, weight %s): %s", mixing.mode, mixing.weight,
             [[labels[i - 1] for i in g] for g in idx])
    return mixing


def build(cfg: Mapping[str, Any], *, num_classes: int, anchors: Mapping | None, device: torch.device,
          mixing: ClassMixing | None = None) -> Trainer:
    """The detector (initialised from the seed), SGD and the gradient scaler; ``mixing``: the confusing-class
    groups of its classification losses (:func:`class_mixing`)."""
    torch.manual_seed(cfg["seed"])
    model = build_detector(cfg, num_classes=num_classes, anchors=anchors).to(device)
    if mixing is not None:
        set_class_mixing(model, mixing)
    cuda = device.type == "cuda"
    use_amp = bool(cfg["amp"]) and cuda
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    if cfg["channels_last"] and cuda:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    return Trainer(model, model, params, opt, scaler, device, use_amp, amp_dtype)


def resume(trainer: Trainer, ckpt_dir: Path, chash: str) -> int:
    """Load the last complete epoch checkpoint of this config (hash ``chash``), if any; the epoch to start at."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = find_resume(ckpt_dir, chash)
    if path is None:
        return 0
    state = torch.load(path, map_location=trainer.device, weights_only=False)
    trainer.core.load_state_dict(state["model"])
    trainer.opt.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    log.info("resuming from %s (epoch %d done)", path, state["epoch"] + 1)
    return state["epoch"] + 1


def step(trainer: Trainer, imgs: list[torch.Tensor], tgts: list[dict[str, torch.Tensor]], *, lr: float,
         clip_grad_norm: float, world: int, where: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One iteration on the images ``imgs`` and targets ``tgts`` (on the trainer's device) at learning rate
    ``lr``: (loss, loss parts). Raises :class:`NonFiniteLoss` (on every rank at once) when the loss is not
    finite; ``where`` names the iteration in that message."""
    for g in trainer.opt.param_groups:
        g["lr"] = lr
    with torch.autocast(device_type=trainer.device.type, dtype=trainer.amp_dtype, enabled=trainer.use_amp):
        losses = trainer.model(imgs, tgts)
    loss = sum(losses.values())
    if not _all_finite(loss.detach(), world):
        raise NonFiniteLoss(f"non-finite loss {loss.item()} at {where}: "
                            + ", ".join(f"{n}={v.item():.4g}" for n, v in losses.items())
                            + " (lower lr or raise warmup_iters)")
    trainer.opt.zero_grad(set_to_none=True)
    trainer.scaler.scale(loss).backward()
    trainer.scaler.unscale_(trainer.opt)
    torch.nn.utils.clip_grad_norm_(trainer.params, clip_grad_norm)
    trainer.scaler.step(trainer.opt)
    trainer.scaler.update()
    return loss, losses


def backbone_weights_provenance(path: str | os.PathLike | None, *, field: str = "backbone_weights"
                                ) -> dict[str, str] | None:
    """``{"path", "sha256"}`` of a model's local backbone weights file (recorded in every checkpoint), None
    without one."""
    if not path:
        return None
    try:
        return {"path": str(path), "sha256": file_sha256(path)}
    except OSError as exc:
        raise InputError(f"weights file cannot be read: {exc}", file=path, field=field) from exc


def use_sync_batchnorm(trainer: Trainer) -> None:
    """``norm: syncbn`` under DistributedDataParallel: the backbone's BatchNorms become SyncBatchNorm (timm's
    converter, which also keeps the activation of its BatchNormAct2d) on CUDA; on the CPU (gloo) they stay
    BatchNorm, logged: SyncBatchNorm needs CUDA. The parameters stay the same objects, so the optimiser keeps
    them."""
    if trainer.device.type != "cuda":
        log.warning("norm syncbn: SyncBatchNorm needs CUDA; training on %s keeps per-process BatchNorm",
                    trainer.device)
        return
    try:
        from timm.layers import convert_sync_batchnorm
    except ImportError:  # pragma: no cover - timm is in the environment
        convert_sync_batchnorm = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    trainer.core.backbone = convert_sync_batchnorm(trainer.core.backbone)
    log.info("norm syncbn: backbone BatchNorms synchronised across processes")


def checkpoint(trainer: Trainer, ckpt_dir: Path, epoch: int, *, meta: Mapping[str, Any]) -> Path:
    """Write epoch ``epoch``'s checkpoint (model, optimiser, scaler and ``meta``); its path."""
    state = {"model": trainer.core.state_dict(), "optimizer": trainer.opt.state_dict(), "epoch": epoch,
             "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None, **meta}
    path = _ckpt_path(ckpt_dir, epoch)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def final_model(ckpt_dir: Path, last: int, *, cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The output checkpoint after epoch ``last`` (1-based): its weights, or with ``average_epochs: [a, b]`` (and
    every epoch trained) the parameter average of the checkpoints of epochs a..b."""
    final = torch.load(_ckpt_path(ckpt_dir, last - 1), map_location="cpu", weights_only=False)
    result = {"model": final["model"], **meta, "epochs": final["epoch"] + 1, "averaged_epochs": None,
              "epoch_stats": final.get("epoch_stats", [])}
    avg = cfg["average_epochs"]
    if avg is not None and last == cfg["epochs"]:
        paths = [_ckpt_path(ckpt_dir, e - 1) for e in range(avg[0], avg[1] + 1)]
        result["model"] = average_checkpoints(paths, weights_only=False)
        result["averaged_epochs"] = list(avg)
        log.info("model = average of the checkpoints of epochs %d..%d", avg[0], avg[1])
    return result


def device_name(device: torch.device) -> str:
    """What ran a training (the images/s figures are of it): the GPU's name, or ``cpu (N threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'' if n == 1 else 's'})"


def epoch_stats(ckpt_dir: Path, start_epoch: int) -> list[dict[str, Any]]:
    """The throughput records of the epochs before ``start_epoch`` (a resumed run's: its resume checkpoint's
    ``epoch_stats``; memory-mapped, the weights are not read); [] for a fresh start."""
    if start_epoch == 0:
        return []
    state = torch.load(_ckpt_path(ckpt_dir, start_epoch - 1), map_location="cpu", weights_only=False, mmap=True)
    return list(state.get("epoch_stats", []))


def train(*, cfg: Mapping[str, Any], images: pd.DataFrame, boxes: pd.DataFrame, weights: pd.DataFrame | None,
          ckpt_dir: Path, device: torch.device, metrics_path: Path | None = None, log_every: int = 10,
          anchors: Mapping | None = None, stop_after_epoch: int | None = None, workers: int = 0,
          class_names: Mapping[str, str] | None = None, image_labels: pd.DataFrame | None = None
          ) -> dict[str, Any]:
    """Train and return the final checkpoint dict (model state, labels, config). Writes a checkpoint per epoch
    into ``ckpt_dir`` and keeps the latest complete and the ``average_epochs`` window's weights
    (:func:`prune_checkpoints`). ``weights``: the sample stage's ``sampling`` table (image_id, label, weight),
    the draw of every epoch (:func:`plan_epoch`); None means every image equally, without a class. Only the
    keys training reads (``model_part(cfg, "train")``) are used, recorded and hashed. ``workers``: DataLoader
    processes that decode and augment (0: this process); the result does not depend on it.

    Under an initialised ``torch.distributed`` process group every rank calls this with the same arguments;
    rank 0 alone writes checkpoints and metrics, and every rank returns the same result.

    Weak supervision: ``image_labels`` (the image_labels table) and the images table's optional
    ``box_annotated`` / ``plain_background`` columns (:func:`weak_supervision_tables`, :func:`training_data`).
    With ``wsddn`` an epoch is as many iterations as the box-annotated images fill the box-annotated slots of
    the batches (the plain detector's count of box-annotated draws), and pseudo-box mining is on from
    iteration ``warmup_iters``. The classes are those of the training boxes, as without it.
    """
    cfg = model_part(model_config(cfg), "train")
    rank, world = _dist()
    images, boxes = weak_supervision_tables(cfg=cfg, images=images, boxes=boxes, image_labels=image_labels)
    if cfg["wsddn"] and image_labels is None and not box_annotated_column(images).all():
        raise InputError("wsddn with image-level-only images needs the image-level labels (--image-labels)",
                         field="image_labels")
    labels = sorted(boxes.loc[boxes["image_id"].isin(images["image_id"]), "label"].unique())
    if not labels:
        raise InputError("no training boxes", field="boxes")
    hashed = {"cfg": cfg, "labels": labels, "n_images": len(images), "anchors": anchors, "world": world}
    backbone_weights = backbone_weights_provenance(cfg.get("backbone_weights"))  # each file read once
    if backbone_weights:  # other weights under the same path: another run
        hashed["backbone_weights_sha256"] = backbone_weights["sha256"]
    if cfg.get("weights"):  # e.g. init_from: a retrained base model under the same path
        hashed["weights_sha256"] = backbone_weights_provenance(cfg["weights"], field="weights")["sha256"]
    chash = config_hash(hashed)
    n_boxes = int(boxes["image_id"].isin(images["image_id"]).sum())
    meta = {"labels": labels, "config": cfg, "config_hash": chash, "anchors": anchors,
            "data": {"images": len(images), "boxes": n_boxes}, "backbone_weights": backbone_weights}
    global_bs = cfg["batch_size"] * world
    n_box = int(box_annotated_column(images).sum())
    box_bs = (cfg["batch_size"] - (weak_per_batch(cfg) if n_box < len(images) else 0)) * world
    iters = cfg["iters_per_epoch"] or max(1, math.ceil(n_box / box_bs))
    data = training_data(cfg=cfg, images=images, boxes=boxes, weights=weights, labels=labels, iters=iters,
                         rank=rank, world=world, image_labels=image_labels)
    mixing = class_mixing(cfg, labels, names=class_names)
    trainer = build(cfg, num_classes=len(labels), anchors=anchors, device=device, mixing=mixing)
    start_epoch = resume(trainer, ckpt_dir, chash)
    stats = epoch_stats(ckpt_dir, start_epoch)
    loader = data.loader(workers=workers, pin_memory=device.type == "cuda")
    if cfg.get("norm") == "syncbn" and world > 1:
        use_sync_batchnorm(trainer)
    if world > 1:
        trainer.model = torch.nn.parallel.DistributedDataParallel(
            trainer.core, device_ids=[device.index] if device.type == "cuda" else None)

    progress = _Progress(metrics_path if rank == 0 else None, total_iters=iters * cfg["epochs"],
                         global_bs=global_bs, epochs=cfg["epochs"])
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            trainer.model.train()
            torch.manual_seed(cfg["seed"] * 1000 + epoch * world + rank)
            data.sampler.set_epoch(epoch)
            t_epoch = time.time()
            for k, (imgs, tgts) in enumerate(loader):
                it = epoch * iters + k
                lr = lr_at(it, epoch, cfg)
                imgs, tgts = to_device(imgs, tgts, device)
                if cfg["wsddn"]:
                    set_pseudo_mining(trainer.core, it >= cfg["warmup_iters"])
                loss, losses = step(trainer, imgs, tgts, lr=lr, clip_grad_norm=cfg["clip_grad_norm"],
                                    world=world, where=f"epoch {epoch + 1} iteration {k + 1} (rank {rank})")
                progress.step()
                if rank == 0 and ((k + 1) % log_every == 0 or k + 1 == iters):
                    progress.log(epoch=epoch, k=k, iters=iters, it=it, lr=lr, loss=loss, losses=losses)
            if rank == 0:
                dt = time.time() - t_epoch
                stats.append({"epoch": epoch + 1, "images": iters * global_bs, "seconds": dt,
                              "img_per_s": iters * global_bs / dt, "device": device_name(device),
                              "processes": world})
                path = checkpoint(trainer, ckpt_dir, epoch, meta={**meta, "epoch_stats": stats})
                prune_checkpoints(ckpt_dir, latest=epoch, keep=average_window(cfg))
                log.info("epoch %d done in %.0fs (%.2f img/s) -> %s", epoch + 1, dt, iters * global_bs / dt, path)
            if world > 1:
                dist.barrier()
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
    finally:
        progress.close()
        loader = None  # shuts the workers down now, also when a traceback keeps this frame alive
    last = cfg["epochs"] if stop_after_epoch is None else min(stop_after_epoch, cfg["epochs"])
    return final_model(ckpt_dir, last, cfg=cfg, meta=meta)


class _Progress:
    """Progress of a training run: a log line (loss, lr, images/s, ETA) and a JSON line in ``metrics_path``."""

    def __init__(self, metrics_path: Path | None, *, total_iters: int, global_bs: int, epochs: int):
        self.metrics = open(metrics_path, "a") if metrics_path else None
        self.total_iters, self.global_bs, self.epochs = total_iters, global_bs, epochs
        self.t_start = time.time()
        self.done_iters = 0

    def step(self) -> None:
        self.done_iters += 1

    def log(self, *, epoch: int, k: int, iters: int, it: int, lr: float, loss: torch.Tensor,
            losses: Mapping[str, torch.Tensor]) -> None:
        ips = self.done_iters * self.global_bs / (time.time() - self.t_start)
        eta = (self.total_iters - it - 1) * self.global_bs / max(ips, 1e-9)
        log.info("epoch %d/%d iter %d/%d loss %.4f lr %.4g | %.1f img/s ETA %.0fs", epoch + 1, self.epochs, k + 1,
                 iters, loss.item(), lr, ips, eta)
        if self.metrics:
            self.metrics.write(json.dumps({"epoch": epoch + 1, "iter": it + 1, "lr": lr, "loss": loss.item(),
                                           "img_per_s": ips, **{n: v.item() for n, v in losses.items()}}) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()


def _init_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; initialises the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return 0, 1, select_device(device_arg)
    device = select_device(device_arg, local_rank=local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log.info("rank %d of %d on %s", rank, world, device)
    return rank, world, device


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__)
    p.add_argument("--config", required=True, help="the model's config section as JSON (the keys training reads; "
                   "others are ignored, missing ones take the schema's defaults)")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--boxes", type=Path, required=True)
    p.add_argument("--splits", type=Path, help="splits table; default: every image of --images trains (e.g. an "
                   "external dataset)")
    p.add_argument("--split", default="train")
    p.add_argument("--sampling", type=Path, help="sampling weights table (stages.sample); default uniform")
    p.add_argument("--image-labels", type=Path, help="image_labels table: the image-level labels the WSDDN branch "
                   "(wsddn) and plain_box read; needed when the images table has image-level-only images and "
                   "either is on")
    p.add_argument("--anchors", type=Path, help="anchors JSON (stages.anchors)")
    p.add_argument("--classes", type=Path, help="experts JSON (stages.experts): train only on its targets and "
                   "negatives (images holding one of them; other classes' boxes dropped)")
    p.add_argument("--class-names", type=Path, help="classes table (classes parquet or class-description CSV): "
                   "resolves confusing_groups entries given by display name (MIDs need no table)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=schema_default("model", "threads"),
                   help="torch CPU threads (the rule passes the job's threads: the model's threads resource)")
    p.add_argument("--workers", type=int, default=schema_default("model", "workers"),
                   help="DataLoader processes decoding and augmenting the images (0: the training process; the "
                   "rule passes the model's workers resource); the result does not depend on it")
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--metrics", type=Path)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--stop-after-epoch", type=int, help="stop after this epoch (testing resume)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    cfg = model_config(json_object(a.config))
    torch.set_num_threads(a.threads)
    images = read_table(a.images, "images")
    if a.splits:
        splits = read_table(a.splits, "splits")
        images = images[images["image_id"].isin(set(splits.loc[splits["split"] == a.split, "image_id"]))]
    boxes = read_table(a.boxes, "boxes")
    if a.classes:
        classes = read_experts(a.classes)
        images, boxes = restrict_to_classes(images=images, boxes=boxes, classes=classes)
        log.info("expert model: %d classes, %d training images hold one of them", len(classes), len(images))
        if images.empty:
            raise InputError("no training image holds a box of the experts' classes", file=a.classes)
    weights = read_table(a.sampling, "sampling") if a.sampling else None
    image_labels = (read_table(a.image_labels, "image_labels", image_ids=images["image_id"])
                    if a.image_labels else None)
    anchors = json.loads(a.anchors.read_text()) if a.anchors else None
    if cfg["anchors"] == "kmeans" and anchors is None:
        raise InputError("the config says anchors: kmeans but no --anchors file was given", field="--anchors")
    rank, world, device = _init_distributed(a.device)
    try:
        log.info("training on %d images, device %s, %d threads, %d process(es), %d loader worker(s) each",
                 len(images), device, torch.get_num_threads(), world, a.workers)
        result = train(cfg=cfg, images=images, boxes=boxes, weights=weights, ckpt_dir=a.ckpt_dir, device=device,
                       metrics_path=a.metrics, log_every=a.log_every, anchors=anchors,
                       stop_after_epoch=a.stop_after_epoch, workers=a.workers,
                       class_names=read_class_names(a.class_names) if a.class_names else None,
                       image_labels=image_labels)
        if rank == 0:
            # the split trained on (None: every image of --images, an external dataset); sampling table or not
            data = {**result["data"], "split": a.split if a.splits else None,
                    "sampling_table": a.sampling is not None}
            with atomic_path(a.out) as tmp:
                torch.save({**result, "code": code_version(), "data": data}, tmp)
            print(f"train: {result['epochs']} epochs, {len(result['labels'])} classes, {world} process(es)"
                  f" -> {a.out}")
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
