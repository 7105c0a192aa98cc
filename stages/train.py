"""Train a detector: class-aware (or uniform) sampling, warm-up + step LR, a checkpoint per epoch, resume.

Progress (epoch, iteration, loss, images/s, ETA) goes to the log every ``--log-every`` iterations and one
JSON line per logged step to ``metrics.jsonl``. A killed run resumes from its last complete epoch checkpoint
(checkpoints whose config hash differs are ignored, so a changed config never resumes stale weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from stages.cli import stage_main
from stages.config import validate_config
from stages.errors import InputError
from stages.formats.io import atomic_path, config_hash, read_table
from stages.models.data import DetectionDataset, collate, hflip
from stages.models.detector import build_detector, select_device

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


def lr_at(it: int, epoch: int, cfg: Mapping[str, Any]) -> float:
    """Linear warm-up over ``warmup_iters`` iterations, then × ``lr_gamma`` at each epoch in ``lr_steps``."""
    lr = cfg["lr"] * cfg["lr_gamma"] ** sum(epoch >= s for s in cfg["lr_steps"])
    if it < cfg["warmup_iters"]:
        lr *= 0.001 + (1 - 0.001) * it / cfg["warmup_iters"]
    return lr


def model_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A model section with every schema default filled in."""
    full = validate_config({"models": {"m": dict(cfg)}})
    return full["models"]["m"]


def _ckpt_path(out_dir: Path, epoch: int) -> Path:
    return out_dir / f"epoch_{epoch:03d}.pt"


def find_resume(out_dir: Path, chash: str) -> Path | None:
    found = []
    for p in out_dir.glob("epoch_*.pt"):
        m = re.fullmatch(r"epoch_(\d+)\.pt", p.name)
        if m:
            found.append((int(m.group(1)), p))
    for _, p in sorted(found, reverse=True):
        try:
            meta = torch.load(p, map_location="cpu", weights_only=False)
        except Exception:  # a checkpoint that does not load is skipped  # noqa: BLE001
            continue
        if meta.get("config_hash") == chash:
            return p
    return None


def train(*, cfg: Mapping[str, Any], images: pd.DataFrame, boxes: pd.DataFrame, weights: pd.DataFrame | None,
          ckpt_dir: Path, device: torch.device, metrics_path: Path | None = None, log_every: int = 10,
          anchors: Mapping | None = None, stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train and return the final checkpoint dict (model state, labels, config). Writes one checkpoint per epoch
    into ``ckpt_dir``. ``weights`` (image_id, weight) drives sampling; None means uniform."""
    cfg = model_config(cfg)
    labels = sorted(boxes.loc[boxes["image_id"].isin(images["image_id"]), "label"].unique())
    if not labels:
        raise InputError("no training boxes", field="boxes")
    label_index = {lab: i + 1 for i, lab in enumerate(labels)}
    chash = config_hash({"cfg": cfg, "labels": labels, "n_images": len(images), "anchors": anchors})
    images = images.sort_values("image_id").reset_index(drop=True)
    ds = DetectionDataset(images, boxes, label_index)
    if weights is not None:
        w = weights.set_index("image_id")["weight"].reindex(images["image_id"]).fillna(0.0).to_numpy()
        w = w / w.sum()
    else:
        w = np.full(len(images), 1.0 / len(images))

    torch.manual_seed(cfg["seed"])
    model = build_detector(cfg, num_classes=len(labels), anchors=anchors).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    bs = cfg["batch_size"]
    iters = cfg["iters_per_epoch"] or max(1, math.ceil(len(images) / bs))
    total_iters = iters * cfg["epochs"]
    start_epoch = 0
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume = find_resume(ckpt_dir, chash)
    if resume is not None:
        state = torch.load(resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        log.info("resuming from %s (epoch %d done)", resume, state["epoch"] + 1)

    metrics = open(metrics_path, "a") if metrics_path else None
    t_start = time.time()
    done_iters = 0
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            model.train()
            rng = np.random.default_rng([cfg["seed"], epoch])
            torch.manual_seed(cfg["seed"] * 1000 + epoch)
            order = rng.choice(len(images), size=iters * bs, p=w)
            flips = rng.random(iters * bs) < 0.5
            t_epoch = time.time()
            for k in range(iters):
                it = epoch * iters + k
                lr = lr_at(it, epoch, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                batch = []
                for j in range(k * bs, (k + 1) * bs):
                    img, tgt = ds[int(order[j])]
                    if flips[j]:
                        img, tgt = hflip(img, tgt)
                    batch.append((img.to(device), {n: v.to(device) for n, v in tgt.items()}))
                imgs, tgts = collate(batch)
                losses = model(imgs, tgts)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"non-finite loss {loss.item()} at epoch {epoch + 1} iteration {k + 1}: "
                                        + ", ".join(f"{n}={v.item():.4g}" for n, v in losses.items())
                                        + " (lower lr or raise warmup_iters)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                opt.step()
                done_iters += 1
                if (k + 1) % log_every == 0 or k + 1 == iters:
                    el = time.time() - t_start
                    ips = done_iters * bs / el
                    eta = (total_iters - it - 1) * bs / max(ips, 1e-9)
                    log.info("epoch %d/%d iter %d/%d loss %.4f lr %.4g | %.1f img/s ETA %.0fs", epoch + 1,
                             cfg["epochs"], k + 1, iters, loss.item(), lr, ips, eta)
                    if metrics:
                        metrics.write(json.dumps({"epoch": epoch + 1, "iter": it + 1, "lr": lr,
                                                  "loss": loss.item(), "img_per_s": ips,
                                                  **{n: v.item() for n, v in losses.items()}}) + "\n")
                        metrics.flush()
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                     "labels": labels, "config": cfg, "config_hash": chash, "anchors": anchors}
            with atomic_path(_ckpt_path(ckpt_dir, epoch)) as tmp:
                torch.save(state, tmp)
            log.info("epoch %d done in %.0fs -> %s", epoch + 1, time.time() - t_epoch, _ckpt_path(ckpt_dir, epoch))
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
    finally:
        if metrics:
            metrics.close()
    final = torch.load(_ckpt_path(ckpt_dir, cfg["epochs"] - 1) if stop_after_epoch is None
                       else _ckpt_path(ckpt_dir, min(stop_after_epoch, cfg["epochs"]) - 1),
                       map_location="cpu", weights_only=False)
    return {"model": final["model"], "labels": labels, "config": cfg, "anchors": anchors,
            "config_hash": chash, "epochs": final["epoch"] + 1}


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__)
    p.add_argument("--config", required=True, help="the model's config section as JSON")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--boxes", type=Path, required=True)
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--sampling", type=Path, help="sampling weights table (stages.sample); default uniform")
    p.add_argument("--anchors", type=Path, help="anchors JSON (stages.anchors)")
    p.add_argument("--device", default="auto")
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--metrics", type=Path)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--stop-after-epoch", type=int, help="stop after this epoch (testing resume)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        cfg = json.loads(a.config)
    except json.JSONDecodeError as exc:
        raise InputError(f"--config is not JSON: {exc}", field="--config") from exc
    cfg = model_config(cfg)
    torch.set_num_threads(cfg["threads"])
    splits = read_table(a.splits, "splits")
    ids = set(splits.loc[splits["split"] == a.split, "image_id"])
    images = read_table(a.images, "images")
    images = images[images["image_id"].isin(ids)]
    boxes = read_table(a.boxes, "boxes")
    weights = read_table(a.sampling, "sampling") if a.sampling else None
    anchors = json.loads(a.anchors.read_text()) if a.anchors else None
    device = select_device(a.device)
    log.info("training on %d images, device %s, %d threads", len(images), device, torch.get_num_threads())
    result = train(cfg=cfg, images=images, boxes=boxes, weights=weights, ckpt_dir=a.ckpt_dir, device=device,
                   metrics_path=a.metrics, log_every=a.log_every, anchors=anchors,
                   stop_after_epoch=a.stop_after_epoch)
    with atomic_path(a.out) as tmp:
        torch.save(result, tmp)
    print(f"train: {result['epochs']} epochs, {len(result['labels'])} classes -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
