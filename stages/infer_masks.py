"""Mask inference: an HRNet mask network (stages.train_masks) on boxes, writing per-box probability maps.

Boxes come from a detections table (``--dets``: the top ``--top-n`` per image by score) or from the ground-truth
masks table (``--masks``: every instance, score 1.0, the oracle boxes) on the images of ``--images`` (optionally
one split of ``--splits``). Each box is cut out of its image at ``--scale`` x ``--scale``
(:func:`stages.models.hrnet.crop_boxes`: roi_align, aligned) and, with ``--flip``, also flipped; the network's
sigmoid over each view is resized (bilinear) to ``--map-size`` x ``--map-size`` (a flipped view is flipped back)
and all of it written to one ``.npz`` (:mod:`stages.formats.mask_probs`). Output order: images by id, within an
image by score (descending; ties in input order). Crops of several images go through the network together
(``--batch-size`` crops), each image is decoded once. Pasting, voting and encoding are the vote stage's.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from stages.core.cli import parse_bool, stage_main
from stages.core.config import schema_default
from stages.core.errors import InputError
from stages.formats.io import read_table
from stages.formats.readers import read_classes
from stages.formats.mask_probs import write_mask_probs
from stages.models.data import load_image
from stages.models.detector import select_device
from stages.models.hrnet import SIZE_MULTIPLE, crop_boxes, load_mask_model, normalize
from stages.infer import shard
from stages.train_masks import check_boxes, read_gt_masks

log = logging.getLogger(__name__)

BOX = ["x_min", "y_min", "x_max", "y_max"]


def select_boxes(boxes: pd.DataFrame, images: pd.DataFrame, *, top_n: int | None, source: object = "boxes",
                 images_source: object = "images") -> pd.DataFrame:
    """The boxes to predict, in output order (image id, then score descending, ties in input order), with the
    image's ``width`` and ``height``: boxes of images outside ``images`` raise :class:`InputError` (file, row,
    field image_id) unless ``images`` lacks them only because of a split selection (the caller drops those
    first), a box outside [0, 1] or empty likewise; at most ``top_n`` per image (None: all)."""
    boxes = boxes.reset_index(drop=True)
    check_boxes(boxes, source=source)
    sizes = images.drop_duplicates("image_id").set_index("image_id")[["width", "height"]]
    known = boxes["image_id"].isin(sizes.index).to_numpy()
    if not known.all():
        row = int(np.flatnonzero(~known)[0])
        raise InputError(f"image {boxes['image_id'].iloc[row]!r} is not in {images_source}", file=source,
                         row=f"row {row}", field="image_id")
    out = boxes.assign(_row=np.arange(len(boxes)))
    out = out.sort_values(["image_id", "score", "_row"], ascending=[True, False, True], kind="stable")
    if top_n is not None:
        out = out[out.groupby("image_id", sort=False).cumcount() < top_n]
    out = out.drop(columns="_row").reset_index(drop=True)
    wh = sizes.loc[out["image_id"].to_numpy()]
    return out.assign(width=wh["width"].to_numpy(np.int32), height=wh["height"].to_numpy(np.int32))


@torch.inference_mode()
def infer_masks(*, model: torch.nn.Module, boxes: pd.DataFrame, paths: pd.Series, scale: int, flip: bool,
                map_size: int, device: torch.device, batch_size: int = 64, log_every: int = 50
                ) -> tuple[np.ndarray, list[str]]:
    """Probability maps float16 [V, N, map_size, map_size] of ``boxes`` (rows in the order returned by
    :func:`select_boxes`, grouped by image; ``paths``: image id -> image file) and the view names (``s{scale}``,
    then ``s{scale}_flip`` when ``flip``). ``batch_size`` crops per forward pass, across images; each image is
    decoded once."""
    if scale % SIZE_MULTIPLE:
        raise InputError(f"--scale {scale} must be a multiple of {SIZE_MULTIPLE}", field="--scale")
    n = len(boxes)
    views = [f"s{scale}"] + ([f"s{scale}_flip"] if flip else [])
    out = np.zeros((len(views), n, map_size, map_size), np.float16)
    ids = boxes["image_id"].to_numpy(dtype=str)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if n else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], n].astype(np.int64)
    xyxy = boxes[BOX].to_numpy(np.float64)
    pending: list[torch.Tensor] = []
    pending_rows = 0
    done_rows = 0
    t0 = time.time()

    def run(chunks: list[torch.Tensor], first: int) -> None:
        x = torch.cat(chunks).to(device)
        xs = [x] + ([x.flip(-1)] if flip else [])
        for v, xv in enumerate(xs):
            p = torch.sigmoid(model(xv).float())
            if v == 1:
                p = p.flip(-1)
            p = F.interpolate(p, size=(map_size, map_size), mode="bilinear", align_corners=False)
            out[v, first:first + len(x)] = p[:, 0].cpu().numpy().astype(np.float16)

    for k, (a, b) in enumerate(zip(starts, ends)):
        img = normalize(load_image(str(paths[ids[a]]))).to(device)
        h, w = img.shape[-2:]
        px = torch.from_numpy(xyxy[a:b] * np.array([w, h, w, h], np.float64)).float()
        crops, _ = crop_boxes(img, px, scale)
        for lo in range(0, len(crops), batch_size):
            pending.append(crops[lo:lo + batch_size])
            pending_rows += len(pending[-1])
            if pending_rows >= batch_size:
                run(pending, done_rows)
                done_rows += pending_rows
                pending, pending_rows = [], 0
        if (k + 1) % log_every == 0:
            rate = (k + 1) / max(time.time() - t0, 1e-9)
            log.info("infer_masks: %d/%d images (%.1f img/s, ETA %.0fs)", k + 1, len(starts), rate,
                     (len(starts) - k - 1) / rate)
    if pending:
        run(pending, done_rows)
    return out, views


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.infer_masks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model.pt written by stages.train_masks")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dets", type=Path, help="detections table (parquet): the boxes (top --top-n per image)")
    src.add_argument("--masks", type=Path, help="ground-truth masks table (gt_masks.parquet): every instance's "
                     "box, score 1.0 (the oracle)")
    p.add_argument("--images", type=Path, required=True, help="images table (parquet): val or test images")
    p.add_argument("--splits", type=Path, help="splits table; with --split selects images")
    p.add_argument("--split", default=None)
    p.add_argument("--shard", type=int, default=0, help="image shard index (with --shards)")
    p.add_argument("--shards", type=int, default=1, help="image shards (sorted ids, round robin; as stages.infer)")
    p.add_argument("--classes", type=Path, help="keep only boxes of these classes (the segmentable ones: a "
                   "classes parquet or class-description CSV), before --top-n")
    p.add_argument("--top-n", type=int, default=schema_default("segmentation", "top_n"), help="boxes kept per "
                   "image, highest scores (--dets only) (default: %(default)s)")
    p.add_argument("--scale", type=int, default=None, help="crop side (default: the model's test_scale)")
    p.add_argument("--flip", type=parse_bool, default=None, metavar="{true,false}",
                   help="also predict the flipped crop (default: the model's test_flip)")
    p.add_argument("--map-size", type=int, default=schema_default("segmentation", "map_size"),
                   help="side M of the stored M x M maps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="crops per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, required=True, help="output .npz (stages.formats.mask_probs)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.top_n < 1 or a.map_size < 1 or a.batch_size < 1:
        raise InputError("--top-n, --map-size and --batch-size must be >= 1", field="--top-n")
    device = select_device(a.device)
    model, meta = load_mask_model(a.model, device)
    scale = a.scale if a.scale is not None else int(meta["cfg"]["test_scale"])
    flip = a.flip if a.flip is not None else bool(meta["cfg"]["test_flip"])
    images = read_table(a.images, "images")
    if a.split is not None:
        if a.splits is None:
            raise InputError("--split needs --splits", field="--splits")
        splits = read_table(a.splits, "splits")
        chosen = set(splits.loc[splits["split"] == a.split, "image_id"])
    if a.dets is not None:
        boxes, source, top_n = read_table(a.dets, "detections"), a.dets, a.top_n
    else:
        gt = read_gt_masks(a.masks)
        boxes, source, top_n = gt[["image_id", "label", *BOX]].assign(score=1.0), a.masks, None
    boxes = boxes[["image_id", "label", "score", *BOX]].reset_index(drop=True)
    known = boxes["image_id"].isin(images["image_id"]).to_numpy()
    if not known.all():  # checked before the split selection: an unknown id is an error, not a filter
        row = int(np.flatnonzero(~known)[0])
        raise InputError(f"image {boxes['image_id'].iloc[row]!r} is not in {a.images}", file=source,
                         row=f"row {row}", field="image_id")
    check_boxes(boxes, source=source)
    if a.split is not None:
        boxes = boxes[boxes["image_id"].isin(chosen)]
        images = images[images["image_id"].isin(chosen)]
    if not 0 <= a.shard < a.shards:
        raise InputError(f"--shard {a.shard} is not in [0, --shards {a.shards})", field="--shard")
    if a.shards > 1:
        images = shard(images, a.shard, a.shards)
        boxes = boxes[boxes["image_id"].isin(images["image_id"])]
    if a.classes is not None:
        keep = boxes["label"].isin(set(read_classes(a.classes)["label"]))
        log.info("infer_masks: %d of %d boxes of classes outside %s left out", int((~keep).sum()), len(boxes),
                 a.classes)
        boxes = boxes[keep]
    sel = select_boxes(boxes, images, top_n=top_n, source=source, images_source=a.images)
    paths = images.drop_duplicates("image_id").set_index("image_id")["path"]
    n_images = sel["image_id"].nunique()
    log.info("infer_masks: %d boxes on %d images, scale %d, flip %s, maps %dx%d, device %s", len(sel), n_images,
             scale, flip, a.map_size, a.map_size, device)
    # a box under several labels (hierarchy expansion: the leaf and its parents) is predicted once
    group = sel.groupby(["image_id", *BOX], sort=False).ngroup().to_numpy()
    first = np.unique(group, return_index=True)[1]
    t0 = time.time()
    probs, views = infer_masks(model=model, boxes=sel.iloc[first].reset_index(drop=True), paths=paths, scale=scale,
                               flip=flip, map_size=a.map_size, device=device, batch_size=a.batch_size)
    probs = probs[:, group]
    dt = time.time() - t0
    log.info("infer_masks: %d distinct boxes of %d rows", len(first), len(sel))
    write_mask_probs(a.out, sel, probs, views)
    print(f"infer_masks: {len(sel)} boxes on {n_images} images, views {views}, {dt:.1f}s, "
          f"{n_images / max(dt, 1e-9):.1f} img/s, {len(sel) / max(dt, 1e-9):.1f} boxes/s -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
