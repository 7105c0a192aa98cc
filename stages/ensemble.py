"""Naive ensemble of several models' detections (see :mod:`stages.ops.ensemble` for the formulas).

    python -m stages.ensemble --detections a.parquet b.parquet --ap-metrics a.json b.json --out out.parquet \
        [--reweight true --merge-views true --vote true --k 4 --score-weight 0.05 --box-weight 0.7 --min-iou 0] \
        [--method adj_nms --iou-thr 0.5 --sigma 0.5 --score-thr 0.001 --max-per-image 300 --max-per-class 4000] \
        [--expand-hierarchy hierarchy.parquet]

Options named after keys of the config's ``ensemble`` section (and, for the suppression, of the ``postprocess``
section) take those keys' schema defaults. AP files: the metric JSON of stages.evaluate, one per detections file
(none with ``--reweight false``). With ``--merge-views true`` the test-time views of each model (the infer
stage's ``scale`` / ``flip`` columns) are merged per model before the models are ensembled; ``--max-per-class``
bounds every pool per (image, class) before its pairwise steps. Processed in image shards over all inputs
together, so memory stays flat with the number of images.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from stages.core.cli import add_config_args, add_stream_args, stage_main
from stages.core.errors import InputError
from stages.formats.experts import read_expert_targets
from stages.formats.hierarchy import Hierarchy
from stages.formats.readers import read_class_aps
from stages.formats.stream import TableWriter, image_shards, pipeline, read_shard
from stages.ops.ensemble import naive_ensemble
from stages.ops.hierarchy import expand_hierarchy
from stages.ops.nms import top_per_image

log = logging.getLogger(__name__)

#: config keys of the ``ensemble`` section, and of the ``postprocess`` section (the final suppression), it reads
ENSEMBLE_KEYS = ("method", "reweight", "merge_views", "vote", "k", "score_weight", "box_weight", "min_iou")
SUPPRESS_KEYS = ("iou_thr", "sigma", "score_thr", "max_per_image", "max_per_class")


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.ensemble", description=__doc__.split("\n\n")[0])
    p.add_argument("--detections", required=True, nargs="+", type=Path)
    p.add_argument("--ap-metrics", nargs="*", type=Path, default=[],
                   help="each model's metric JSON (per-class AP), in the order of --detections")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--expand-hierarchy", type=Path, nargs="?", metavar="JSON_OR_PARQUET",
                   help="add parent-class boxes to every model's detections before ensembling; no file: do not")
    p.add_argument("--class-filters", nargs="*", default=[], metavar="EXPERTS_JSON_OR_-",
                   help="per --detections file (same order): an expert's mined set (stages.experts JSON), whose "
                        "targets are the only classes it contributes, or - for a model that contributes all")
    add_config_args(p, "ensemble", ENSEMBLE_KEYS)
    add_config_args(p, "postprocess", SUPPRESS_KEYS)
    add_stream_args(p)
    a = p.parse_args(argv)
    hierarchy = Hierarchy.read(a.expand_hierarchy) if a.expand_hierarchy else None
    if a.reweight and len(a.ap_metrics) != len(a.detections):
        raise InputError(f"{len(a.detections)} --detections but {len(a.ap_metrics)} --ap-metrics (re-weighting "
                         "needs one per model)", field="--ap-metrics")
    if not a.reweight and a.ap_metrics:
        raise InputError("--ap-metrics given but --reweight false", field="--ap-metrics")
    if a.class_filters and len(a.class_filters) != len(a.detections):
        raise InputError(f"{len(a.detections)} --detections but {len(a.class_filters)} --class-filters (one per "
                         "model, - for none)", field="--class-filters")
    only = [None if f == "-" else set(read_expert_targets(f)) for f in a.class_filters] or [None] * len(a.detections)
    aps = [read_class_aps(f) for f in a.ap_metrics] if a.reweight else None
    k = a.k if a.vote else 0
    t0 = time.perf_counter()
    prov = {"stage": "ensemble", "inputs": [str(d) for d in a.detections], "class_filters": a.class_filters,
            "reweight": a.reweight, "merge_views": a.merge_views, "k": k, "max_per_class": a.max_per_class,
            "score_weight": a.score_weight, "box_weight": a.box_weight, "min_iou": a.min_iou, "method": a.method,
            "iou_thr": a.iou_thr, "sigma": a.sigma, "score_thr": a.score_thr, "max_per_image": a.max_per_image}
    n_in = 0

    def load(shard: tuple[str, str]) -> list[pd.DataFrame]:
        frames = [read_shard(d, "detections", *shard, categorical=True) for d in a.detections]
        if hierarchy is not None:
            frames = [expand_hierarchy(f, hierarchy) for f in frames]
        # an expert keeps its target classes only (after expansion: its parents' boxes are not its targets)
        return [f if keep is None else f[f["label"].isin(keep)] for f, keep in zip(frames, only)]

    def work(frames: list[pd.DataFrame]) -> pd.DataFrame:
        nonlocal n_in
        n_in += sum(len(f) for f in frames)
        out = naive_ensemble(frames, ap_per_model=aps, k=k, score_weight=a.score_weight, box_weight=a.box_weight,
                             min_iou=a.min_iou, method=a.method, iou_thr=a.iou_thr, sigma=a.sigma,
                             score_thr=a.score_thr, max_per_class=a.max_per_class, merge_views=a.merge_views,
                             device=a.device)
        return top_per_image(out, max_per_image=a.max_per_image) if a.max_per_image else out

    with TableWriter(a.out, "detections", provenance=prov) as w:
        pipeline(image_shards(a.detections, rows_per_shard=a.rows_per_shard), load, work, w.write)
    print(f"ensemble: {len(a.detections)} models, {n_in} -> {w.rows} detections in "
          f"{time.perf_counter() - t0:.2f} s -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
