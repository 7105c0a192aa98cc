"""Inference: a trained detector on one image set (a split, or the test images), at several test scales with
optional horizontal flip, sharded by image. Writes raw parquet detections (normalized xyxy) with the
provenance columns model, scale and flip; merging across scales is the post-processing stage's job.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.core.cli import stage_main
from stages.core.config import schema_default
from stages.core.errors import InputError
from stages.formats.io import read_table, write_table
from stages.formats.tables import empty
from stages.models.data import load_image
from stages.models.detector import build_detector, select_device, set_expert_mode, set_inference

log = logging.getLogger(__name__)


def load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module, list[str], dict]:
    """(detector, labels, training config) of a checkpoint written by stages.train, in eval mode on ``device``;
    the inference settings start at the schema's defaults (:func:`infer` sets them)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as exc:
        raise InputError(f"cannot load model checkpoint: {exc}", file=path) from exc
    cfg = ckpt["config"]
    model = build_detector({**cfg, "weights": None, "backbone_weights": None}, num_classes=len(ckpt["labels"]),
                           anchors=ckpt.get("anchors"))
    model.load_state_dict(ckpt["model"])
    model = model.to(device).eval()
    if device.type == "cuda" and cfg.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return model, list(ckpt["labels"]), cfg


def shard(images: pd.DataFrame, index: int, count: int) -> pd.DataFrame:
    """Images of shard ``index`` of ``count`` (sorted by id, round-robin: balanced and stable)."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} out of range for {count} shards")
    return images.sort_values("image_id").iloc[index::count].reset_index(drop=True)


@torch.inference_mode()
def infer(*, model: torch.nn.Module, labels: Sequence[str], images: pd.DataFrame, scales: Sequence[int],
          flip: bool, device: torch.device, batch_size: int = schema_default("infer", "batch_size"),
          score_thr: float = schema_default("infer", "score_thr"),
          max_per_image: int = schema_default("infer", "max_per_image"),
          box_nms_thresh: float = schema_default("model", "box_nms_thresh"),
          rpn_pre_nms_top_n_test: int = schema_default("model", "rpn_pre_nms_top_n_test"),
          rpn_post_nms_top_n_test: int = schema_default("model", "rpn_post_nms_top_n_test"),
          test_max_size_ratio: float = schema_default("model", "test_max_size_ratio"),
          model_name: str = "model", log_every: int = 20, amp: bool = False, expert: bool | None = None
          ) -> pd.DataFrame:
    """Detections of ``model`` on ``images`` at every scale (and flipped when ``flip``), normalized xyxy.

    At scale s the short image side is resized to s, the long one capped at s x ``test_max_size_ratio``. The
    other settings are set on the model (:func:`~stages.models.detector.set_inference`); amp: autocast (bf16
    where supported, else fp16) on CUDA, ignored on CPU; expert: switch the RoI head's expert-model mode (None
    keeps the model's)."""
    if expert is not None:
        set_expert_mode(model, expert)
    set_inference(model, score_thr=score_thr, max_per_image=max_per_image, box_nms_thresh=box_nms_thresh,
                  rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=rpn_post_nms_top_n_test)
    use_amp = amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    lab = np.asarray(labels, dtype=object)
    out = []
    t0 = time.time()
    n = len(images)
    for start in range(0, n, batch_size):
        rows = images.iloc[start:start + batch_size]
        imgs = [load_image(p).to(device) for p in rows["path"]]
        for scale in scales:
            model.transform.min_size = (int(scale),)
            model.transform.max_size = max(int(scale), int(round(scale * test_max_size_ratio)))
            for flipped in ([False, True] if flip else [False]):
                batch = [im.flip(-1) for im in imgs] if flipped else imgs
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                    preds = model(batch)
                for (_, r), im, pr in zip(rows.iterrows(), imgs, preds):
                    h, w = im.shape[-2:]
                    b = pr["boxes"].float().cpu().numpy().astype(np.float64)
                    if flipped:
                        b[:, [0, 2]] = w - b[:, [2, 0]]
                    b /= np.array([w, h, w, h], np.float64)
                    np.clip(b, 0.0, 1.0, out=b)
                    k = len(b)
                    out.append(pd.DataFrame({
                        "image_id": np.full(k, r["image_id"], dtype=object),
                        "label": lab[pr["labels"].cpu().numpy() - 1],
                        "score": pr["scores"].float().cpu().numpy().astype(np.float64),
                        "x_min": b[:, 0], "y_min": b[:, 1], "x_max": b[:, 2], "y_max": b[:, 3],
                        "model": model_name, "scale": np.int32(scale), "flip": flipped}))
        done = min(start + batch_size, n)
        if done % log_every < batch_size or done == n:
            rate = done / max(time.time() - t0, 1e-9)
            log.info("infer %s: %d/%d images (%.1f img/s, ETA %.0fs)", model_name, done, n, rate,
                     (n - done) / rate)
    if not out:
        return empty("detections", optional=True)
    return pd.concat(out, ignore_index=True)


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.infer", description=__doc__)
    p.add_argument("--model", type=Path, required=True, help="checkpoint written by stages.train")
    p.add_argument("--model-name", default=None)
    p.add_argument("--images", type=Path, required=True, help="images table (parquet)")
    p.add_argument("--splits", type=Path, help="splits table; with --split selects images")
    p.add_argument("--split", default=None)
    # the model's inference keys (the schema's x-reads: infer), defaults from the schema
    p.add_argument("--scales", type=int, nargs="+", default=schema_default("model", "test_scales"),
                   help="test scales (the model's test_scales)")
    p.add_argument("--flip", action="store_true", help="also infer on flipped images (the model's test_flip)")
    p.add_argument("--expert", action="store_true", help="expert-model mode (the model's expert)")
    for key, kind in (("test_max_size_ratio", float), ("box_nms_thresh", float), ("rpn_pre_nms_top_n_test", int),
                      ("rpn_post_nms_top_n_test", int)):
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=schema_default("model", key),
                       help=f"the model's {key}")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shards", type=int, default=schema_default("infer", "shards"))
    p.add_argument("--batch-size", type=int, default=schema_default("infer", "batch_size"))
    p.add_argument("--score-thr", type=float, default=schema_default("infer", "score_thr"))
    p.add_argument("--max-per-image", type=int, default=schema_default("infer", "max_per_image"))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = select_device(a.device)
    model, labels, cfg = load_model(a.model, device)
    images = read_table(a.images, "images")
    if a.split is not None:
        if a.splits is None:
            raise InputError("--split needs --splits", field="--splits")
        splits = read_table(a.splits, "splits")
        images = images[images["image_id"].isin(splits.loc[splits["split"] == a.split, "image_id"])]
    images = shard(images, a.shard, a.shards)
    name = a.model_name or a.model.parent.name
    settings = dict(score_thr=a.score_thr, max_per_image=a.max_per_image, box_nms_thresh=a.box_nms_thresh,
                    rpn_pre_nms_top_n_test=a.rpn_pre_nms_top_n_test,
                    rpn_post_nms_top_n_test=a.rpn_post_nms_top_n_test, test_max_size_ratio=a.test_max_size_ratio)
    t0 = time.time()
    dets = infer(model=model, labels=labels, images=images, scales=a.scales, flip=a.flip, device=device,
                 batch_size=a.batch_size, model_name=name, amp=bool(cfg.get("amp")), expert=a.expert, **settings)
    write_table(a.out, dets, "detections",
                provenance={"stage": "infer", "model": name, "split": a.split, "scales": a.scales, "flip": a.flip,
                            "expert": a.expert, "shard": f"{a.shard}/{a.shards}", "inference": settings,
                            "config": json.dumps(cfg, sort_keys=True)})
    dt = time.time() - t0
    print(f"infer: {name} {a.split or 'all'} shard {a.shard}/{a.shards}: {len(images)} images, {len(dets)} "
          f"detections, {len(images) / max(dt, 1e-9):.1f} img/s")

if __name__ == "__main__":
    raise SystemExit(main())
