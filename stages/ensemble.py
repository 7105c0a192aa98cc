"""Naive ensemble of several models' detections (see :mod:`stages.ops.ensemble` for the formulas).

    python -m stages.ensemble --detections a.parquet b.parquet --ap-metrics a.json b.json --out out.parquet \
        [--no-reweight] [--no-vote] [--k 4 --score-weight 0.05 --box-weight 0.7] [--method adj_nms ...]

AP files: ``{"mAP": float, "per_class": {MID: {"name": str, "ap": float, ...}}}`` (written by stages.evaluate).
Processed in image shards over all inputs together, so memory stays flat with the number of images.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats.io import read_json
from stages.formats.stream import TableWriter, image_shards, pipeline, read_shard
from stages.ops.ensemble import naive_ensemble
from stages.ops.hierarchy import expand_hierarchy
from stages.ops.nms import top_per_image
from stages.postprocess import add_suppress_args, load_hierarchy

log = logging.getLogger(__name__)


def read_ap_metrics(path: Path) -> dict[str, float | None]:
    """``{MID: ap}`` from an evaluate metrics JSON."""
    obj = read_json(path)
    per = obj.get("per_class") if isinstance(obj, dict) else None
    if not isinstance(per, dict):
        raise InputError("no 'per_class' object", file=path, field="per_class")
    out = {}
    for mid, rec in per.items():
        if not isinstance(rec, dict) or "ap" not in rec:
            raise InputError("per-class entry without 'ap'", file=path, row=f"per_class.{mid}", field="ap")
        ap = rec["ap"]
        if ap is not None and not isinstance(ap, int | float):
            raise InputError(f"ap is not a number: {ap!r}", file=path, row=f"per_class.{mid}", field="ap")
        out[mid] = None if ap is None else float(ap)
    return out


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.ensemble", description=__doc__.split("\n\n")[0])
    p.add_argument("--detections", required=True, nargs="+", type=Path)
    p.add_argument("--ap-metrics", nargs="+", type=Path, default=None)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--no-reweight", action="store_true", help="skip the PFDet per-class AP re-weighting")
    p.add_argument("--no-vote", action="store_true", help="skip top-k voting (same as --k 0)")
    p.add_argument("--k", type=int, default=4, help="voting: neighbours from the other models per box")
    p.add_argument("--score-weight", type=float, default=0.05, help="voting: S = S_P + w * sum S_Pi")
    p.add_argument("--box-weight", type=float, default=0.7, help="voting: B = w B_P + (1-w)/k sum B_Pi")
    p.add_argument("--min-iou", type=float, default=0.0, help="voting: neighbours need IoU > this")
    p.add_argument("--expand-hierarchy", type=Path, default=None, metavar="JSON_OR_PARQUET",
                   help="add parent-class boxes to every model's detections before ensembling")
    add_suppress_args(p)
    a = p.parse_args(argv)
    hierarchy = load_hierarchy(a.expand_hierarchy) if a.expand_hierarchy else None
    reweight = not a.no_reweight
    if reweight:
        if not a.ap_metrics:
            raise InputError("--ap-metrics is required unless --no-reweight", field="--ap-metrics")
        if len(a.ap_metrics) != len(a.detections):
            raise InputError(f"{len(a.detections)} --detections but {len(a.ap_metrics)} --ap-metrics",
                             field="--ap-metrics")
    aps = [read_ap_metrics(f) for f in a.ap_metrics] if reweight else None
    k = 0 if a.no_vote else a.k
    t0 = time.perf_counter()
    prov = {"stage": "ensemble", "inputs": [str(d) for d in a.detections], "reweight": reweight, "k": k,
            "score_weight": a.score_weight, "box_weight": a.box_weight, "min_iou": a.min_iou, "method": a.method,
            "iou_thr": a.iou_thr, "sigma": a.sigma, "score_thr": a.score_thr, "max_per_image": a.max_per_image}
    n_in = 0

    def load(shard: tuple[str, str]) -> list[pd.DataFrame]:
        frames = [read_shard(d, "detections", *shard, categorical=True) for d in a.detections]
        return [expand_hierarchy(f, hierarchy) for f in frames] if hierarchy is not None else frames

    def work(frames: list[pd.DataFrame]) -> pd.DataFrame:
        nonlocal n_in
        n_in += sum(len(f) for f in frames)
        out = naive_ensemble(frames, ap_per_model=aps, k=k, score_weight=a.score_weight, box_weight=a.box_weight,
                             min_iou=a.min_iou, method=a.method, iou_thr=a.iou_thr, sigma=a.sigma,
                             score_thr=a.score_thr, device=a.device)
        return top_per_image(out, max_per_image=a.max_per_image) if a.max_per_image else out

    with TableWriter(a.out, "detections", provenance=prov) as w:
        pipeline(image_shards(a.detections, rows_per_shard=a.rows_per_shard), load, work, w.write)
    print(f"ensemble: {len(a.detections)} models, {n_in} -> {w.rows} detections in "
          f"{time.perf_counter() - t0:.2f} s -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
