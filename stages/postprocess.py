"""Post-process one model's detections: hierarchy expansion, NMS / soft-NMS / adj-NMS, relationship
rescoring, a per-image cap.

    python -m stages.postprocess --detections in.parquet --out out.parquet [--method adj_nms --iou-thr 0.5 \
        --sigma 0.5 --score-thr 0.001 --max-per-image 300 --max-per-class 4000] \
        [--expand-hierarchy hierarchy.json|hierarchy.parquet] \
        [--relations stats.json [--conf-thr 0.5 --cooc-weight 0.5 ...]] [--scale 288 --flip true]

Every option named after a key of the config's ``postprocess`` section takes that key's schema default.
``--expand-hierarchy`` and ``--relations`` with no file (as the DAG passes them when the config turns them off)
skip that step. ``--scale`` / ``--flip`` keep only the rows of one test-time view (the infer stage's ``scale`` and
``flip`` columns): the auto ensemble's leaves. Works on any ``detections`` parquet; processed in image shards
(``--rows-per-shard``), so memory stays flat.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from stages.core.cli import add_config_args, add_stream_args, parse_bool, stage_main
from stages.core.errors import InputError
from stages.formats.columns import concat
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import read_json, read_provenance
from stages.formats.stream import TableWriter, image_shards, pipeline, read_shard
from stages.ops.hierarchy import expand_hierarchy
from stages.ops.nms import suppress, top_per_image
from stages.ops.relations import RelationStats, rescore

log = logging.getLogger(__name__)

#: config keys of the suppression (the ensemble's suppression reads all but the method too)
SUPPRESS_KEYS = ("method", "iou_thr", "sigma", "score_thr", "max_per_image", "max_per_class")


@dataclass(frozen=True)
class RescoreParams:
    """Relationship rescoring's parameters (config keys of the ``postprocess`` section)."""

    conf_thr: float
    cooc_weight: float
    surround_thr: float
    min_support: int
    boost: float
    penalty: float


def postprocess(dets: pd.DataFrame, *, method: str, iou_thr: float, sigma: float, score_thr: float,
                max_per_image: int, max_per_class: int | None = None, hierarchy: Hierarchy | None = None,
                relations: RelationStats | None = None, rescore_params: RescoreParams | None = None,
                device: object = None) -> pd.DataFrame:
    """expand (if ``hierarchy``) -> keep the ``max_per_class`` best per (image, class) (None: all; not with
    ``method`` none) and suppress with ``method`` -> rescore (if ``relations``, with ``rescore_params``) -> keep
    the ``max_per_image`` best per image (0 = all). Returns a detections table sorted by image_id, score desc."""
    if relations is not None and rescore_params is None:
        raise ValueError("relations need rescore_params")
    if hierarchy is not None:
        dets = expand_hierarchy(dets, hierarchy)
    out = suppress(dets, method=method, iou_thr=iou_thr, sigma=sigma, score_thr=score_thr,
                   max_per_class=max_per_class, device=device)
    if relations is not None:
        out = rescore(out, relations, **asdict(rescore_params))
    if max_per_image:
        out = top_per_image(out, max_per_image=max_per_image)
    return out


def select_view(dets: pd.DataFrame, *, scale: int | None, flip: bool | None, source: object = None
                ) -> pd.DataFrame:
    """The rows of one test-time view: inferred at ``scale`` and flipped or not (None: any)."""
    for col, value in (("scale", scale), ("flip", flip)):
        if value is not None:
            if col not in dets:
                raise InputError(f"no column {col!r}: cannot select a test-time view", file=source, field=col)
            dets = dets[dets[col].to_numpy() == value]
    return dets.reset_index(drop=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.postprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--detections", required=True, type=Path, nargs="+",
                   help="one or more detections files (image shards, scales or models), processed together")
    p.add_argument("--out", required=True, type=Path)
    add_config_args(p, "postprocess", SUPPRESS_KEYS)
    add_stream_args(p)
    p.add_argument("--expand-hierarchy", type=Path, nargs="?", metavar="JSON_OR_PARQUET",
                   help="add parent-class boxes (the hierarchy JSON or table); no file: do not expand")
    p.add_argument("--relations", type=Path, nargs="?", metavar="STATS_JSON",
                   help="rescore with these relation statistics (stages.relations); no file: no rescoring")
    p.add_argument("--scale", type=int, nargs="?", help="keep only the rows inferred at this test scale; no "
                   "value: every scale")
    p.add_argument("--flip", type=parse_bool, nargs="?", metavar="{true,false}",
                   help="keep only the rows inferred on flipped (true) or unflipped (false) images; no value: "
                   "both")
    add_config_args(p, "postprocess", RescoreParams.__dataclass_fields__)
    return p.parse_args(argv)


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    t0 = time.perf_counter()
    hierarchy = Hierarchy.read(a.expand_hierarchy) if a.expand_hierarchy else None
    relations = RelationStats.from_json_obj(read_json(a.relations), source=a.relations) if a.relations else None
    rp = RescoreParams(**{k: getattr(a, k) for k in RescoreParams.__dataclass_fields__})
    prov = {"stage": "postprocess", "input": [str(d) for d in a.detections], "method": a.method,
            "iou_thr": a.iou_thr, "sigma": a.sigma, "score_thr": a.score_thr, "max_per_image": a.max_per_image,
            "max_per_class": a.max_per_class,
            "expand_hierarchy": str(a.expand_hierarchy) if a.expand_hierarchy else None,
            "relations": str(a.relations) if a.relations else None, "rescore": asdict(rp) if relations else None,
            "view": {"scale": a.scale, "flip": a.flip},
            # what the input was (model, infer scales, ensemble settings...): the provenance chain stays readable
            "upstream": read_provenance(a.detections[0])}
    n_in = 0

    def load(shard: tuple[str, str]) -> pd.DataFrame:
        dets = concat([read_shard(d, "detections", *shard, categorical=True) for d in a.detections])
        return select_view(dets, scale=a.scale, flip=a.flip, source=a.detections[0])

    def work(dets: pd.DataFrame) -> pd.DataFrame:
        nonlocal n_in
        n_in += len(dets)
        return postprocess(dets, method=a.method, iou_thr=a.iou_thr, sigma=a.sigma, score_thr=a.score_thr,
                           max_per_image=a.max_per_image, max_per_class=a.max_per_class, hierarchy=hierarchy,
                           relations=relations,
                           rescore_params=rp, device=a.device)

    with TableWriter(a.out, "detections", provenance=prov) as w:
        pipeline(image_shards(a.detections, rows_per_shard=a.rows_per_shard), load, work, w.write)
    print(f"postprocess: {n_in} -> {w.rows} detections ({a.method}) in {time.perf_counter() - t0:.2f} s -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
