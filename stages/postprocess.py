"""Post-process one model's detections: hierarchy expansion, NMS / soft-NMS / adj-NMS, relationship
rescoring, a per-image cap.

    python -m stages.postprocess --detections in.parquet --out out.parquet --method adj_nms \
        [--iou-thr 0.5 --sigma 0.5 --score-thr 0.001 --max-per-image 0] \
        [--expand-hierarchy hierarchy.json|hierarchy.parquet] [--relations stats.json ...]

Works on any ``detections`` parquet; processed in image shards (``--rows-per-shard``), so memory stays flat.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from stages.core.cli import stage_main
from stages.formats.columns import concat
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import read_json, read_provenance, read_table
from stages.formats.stream import TableWriter, image_shards, pipeline, read_shard
from stages.ops.hierarchy import expand_hierarchy
from stages.ops.nms import METHODS, suppress, top_per_image
from stages.ops.relations import RelationStats, rescore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RescoreParams:
    conf_thr: float = 0.5
    cooc_weight: float = 0.5
    surround_thr: float = 0.9
    min_support: int = 20
    boost: float = 0.1
    penalty: float = 0.1


def postprocess(dets: pd.DataFrame, *, method: str = "adj_nms", iou_thr: float = 0.5, sigma: float = 0.5,
                score_thr: float = 0.001, max_per_image: int = 0, hierarchy: Hierarchy | None = None,
                relations: RelationStats | None = None, rescore_params: RescoreParams = RescoreParams(),
                device: object = None) -> pd.DataFrame:
    """expand (if ``hierarchy``) -> suppress with ``method`` -> rescore (if ``relations``) -> keep the
    ``max_per_image`` best per image (0 = all). Returns a detections table sorted by image_id, score desc."""
    if hierarchy is not None:
        dets = expand_hierarchy(dets, hierarchy)
    out = suppress(dets, method=method, iou_thr=iou_thr, sigma=sigma, score_thr=score_thr, device=device)
    if relations is not None:
        out = rescore(out, relations, **asdict(rescore_params))
    if max_per_image:
        out = top_per_image(out, max_per_image=max_per_image)
    return out


def load_hierarchy(path: str | Path) -> Hierarchy:
    """A hierarchy from the challenge JSON or from the ``hierarchy`` parquet table (child, parent)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return Hierarchy.from_json(path)
    return Hierarchy.from_edges(read_table(path, "hierarchy"))


def load_relations(path: str | Path) -> RelationStats:
    return RelationStats.from_json_obj(read_json(path), source=path)


def add_suppress_args(p: argparse.ArgumentParser, *, method: str = "adj_nms") -> None:
    p.add_argument("--method", choices=METHODS, default=method)
    p.add_argument("--iou-thr", type=float, default=0.5, help="NMS / linear soft-NMS IoU threshold")
    p.add_argument("--sigma", type=float, default=0.5, help="gaussian soft-NMS / adj-NMS: w = exp(-IoU^2/sigma)")
    p.add_argument("--score-thr", type=float, default=0.001, help="drop boxes whose (decayed) score <= this")
    p.add_argument("--max-per-image", type=int, default=0, help="keep the N best boxes per image (0 = all)")
    p.add_argument("--rows-per-shard", type=int, default=1 << 20, help="rows processed at once (memory bound)")
    p.add_argument("--device", default=None,
                   help="auto (default): torch on CUDA when a GPU is visible, else numpy on the CPU; cpu; cuda[:N]")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.postprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--detections", required=True, type=Path, nargs="+",
                   help="one or more detections files (image shards, scales or models), processed together")
    p.add_argument("--out", required=True, type=Path)
    add_suppress_args(p)
    p.add_argument("--expand-hierarchy", type=Path, default=None, metavar="JSON_OR_PARQUET")
    p.add_argument("--relations", type=Path, default=None, metavar="STATS_JSON")
    d = RescoreParams()
    p.add_argument("--conf-thr", type=float, default=d.conf_thr)
    p.add_argument("--cooc-weight", type=float, default=d.cooc_weight)
    p.add_argument("--surround-thr", type=float, default=d.surround_thr)
    p.add_argument("--min-support", type=int, default=d.min_support)
    p.add_argument("--boost", type=float, default=d.boost)
    p.add_argument("--penalty", type=float, default=d.penalty)
    return p.parse_args(argv)


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    t0 = time.perf_counter()
    hierarchy = load_hierarchy(a.expand_hierarchy) if a.expand_hierarchy else None
    relations = load_relations(a.relations) if a.relations else None
    rp = RescoreParams(conf_thr=a.conf_thr, cooc_weight=a.cooc_weight, surround_thr=a.surround_thr,
                       min_support=a.min_support, boost=a.boost, penalty=a.penalty)
    prov = {"stage": "postprocess", "input": [str(d) for d in a.detections], "method": a.method, "iou_thr": a.iou_thr,
            "sigma": a.sigma, "score_thr": a.score_thr, "max_per_image": a.max_per_image,
            "expand_hierarchy": str(a.expand_hierarchy) if a.expand_hierarchy else None,
            "relations": str(a.relations) if a.relations else None, "rescore": asdict(rp) if relations else None,
            # what the input was (model, infer scales, ensemble settings...): the provenance chain stays readable
            "upstream": read_provenance(a.detections[0])}
    n_in = 0

    def load(shard: tuple[str, str]) -> pd.DataFrame:
        return concat([read_shard(d, "detections", *shard, categorical=True) for d in a.detections])

    def work(dets: pd.DataFrame) -> pd.DataFrame:
        nonlocal n_in
        n_in += len(dets)
        return postprocess(dets, method=a.method, iou_thr=a.iou_thr, sigma=a.sigma, score_thr=a.score_thr,
                           max_per_image=a.max_per_image, hierarchy=hierarchy, relations=relations,
                           rescore_params=rp, device=a.device)

    with TableWriter(a.out, "detections", provenance=prov) as w:
        pipeline(image_shards(a.detections, rows_per_shard=a.rows_per_shard), load, work, w.write)
    print(f"postprocess: {n_in} -> {w.rows} detections ({a.method}) in {time.perf_counter() - t0:.2f} s -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
