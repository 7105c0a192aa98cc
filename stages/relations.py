"""Mine co-occurrence and surround statistics from the training boxes (see :mod:`stages.ops.relations`).

    python -m stages.relations --boxes boxes.parquet --splits splits.parquet --split train --out stats.json \
        [--ioa-thr 0.9]

``--ioa-thr`` is the config key ``postprocess.ioa_thr`` (its schema default when not given).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from stages.core.cli import add_config_args, stage_main
from stages.core.errors import InputError
from stages.formats.io import read_table, write_json
from stages.ops.relations import RelationStats, mine_relations

log = logging.getLogger(__name__)


def relations(*, boxes: pd.DataFrame, splits: pd.DataFrame | None = None, split: str = "train",
              ioa_thr: float) -> RelationStats:
    """Statistics over the boxes of the images in ``split`` (all boxes when ``splits`` is None)."""
    if splits is not None:
        ids = splits.loc[splits["split"] == split, "image_id"]
        if len(ids) == 0:
            raise InputError(f"no image in split {split!r}", field="split")
        boxes = boxes[boxes["image_id"].isin(set(ids))]
    return mine_relations(boxes, ioa_thr=ioa_thr)


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.relations", description=__doc__.split("\n\n")[0])
    p.add_argument("--boxes", required=True, type=Path)
    p.add_argument("--splits", type=Path, default=None)
    p.add_argument("--split", default="train")
    add_config_args(p, "postprocess", ["ioa_thr"])
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    boxes = read_table(a.boxes, "boxes")
    splits = read_table(a.splits, "splits") if a.splits else None
    stats = relations(boxes=boxes, splits=splits, split=a.split, ioa_thr=a.ioa_thr)
    write_json(a.out, stats.to_json_obj() | {"split": a.split, "source": str(a.boxes)})
    print(f"relations: {stats.n_images} images, {len(stats.labels)} classes -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
