"""Submit: final detections -> the Kaggle detection submission (``ImageId,PredictionString``), one row per
test image, checked by reading it back.

The detections are read and formatted by image shards (ranges of image ids, ~``--rows-per-shard`` detections
each), so memory stays flat however many detections there are; the file is written in image id order.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats import openimages as oi
from stages.formats.io import atomic_path, read_table
from stages.formats.stream import image_shards, pipeline, read_shard
from stages.formats.tables import empty


def shards(detections: Path, image_ids: np.ndarray, *, rows_per_shard: int
           ) -> Iterator[tuple[tuple[str, str] | None, np.ndarray]]:
    """``(image id range of the detections or None, the test images of that range)``, covering every test
    image (sorted ``image_ids``) exactly once, in order."""
    ranges = image_shards([detections], rows_per_shard=rows_per_shard)
    start = 0
    for k, (first, last) in enumerate(ranges):
        stop = len(image_ids) if k == len(ranges) - 1 else int(np.searchsorted(image_ids, last, side="right"))
        yield (first, last), image_ids[start:stop]
        start = stop
    if not ranges:
        yield None, image_ids


def write_submission(path: Path, *, detections: Path, image_ids: np.ndarray, rows_per_shard: int = 1 << 20
                     ) -> int:
    """Write the submission of the ``detections`` parquet for the test ``image_ids``; returns the number of
    detections written. A detection of an image that is not a test image is an error."""
    ids = np.unique(np.asarray(image_ids, dtype=object))

    def load(shard: tuple[tuple[str, str] | None, np.ndarray]) -> tuple[pd.DataFrame, np.ndarray]:
        rng, part = shard
        return (read_shard(detections, "detections", *rng, categorical=True) if rng else empty("detections")), part

    def work(loaded: tuple[pd.DataFrame, np.ndarray]) -> tuple[bytes, int]:
        dets, part = loaded
        outside = ~dets["image_id"].isin(part).to_numpy()
        if outside.any():
            raise InputError(f"detections of image {dets['image_id'].iloc[int(np.flatnonzero(outside)[0])]!r}, "
                             "which is not in the test set", file=detections, field="image_id")
        return oi.submission_rows(dets, part), len(dets)

    written = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(",".join(oi.SUBMISSION_COLUMNS).encode() + b"\n")

        def save(result: tuple[bytes, int]) -> None:
            nonlocal written
            f.write(result[0])
            written += result[1]

        pipeline(shards(detections, ids, rows_per_shard=rows_per_shard), load, work, save)
    return written


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.submit", description=__doc__.split("\n\n")[0])
    p.add_argument("--detections", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True, help="the test images table")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows-per-shard", type=int, default=1 << 20, help="detections formatted at a time")
    a = p.parse_args(argv)
    ids = read_table(a.images, "images", columns=["image_id"])["image_id"].to_numpy(dtype=object)
    n = write_submission(a.out, detections=a.detections, image_ids=ids, rows_per_shard=a.rows_per_shard)
    rows = back = 0
    for r, dets in oi.iter_detection_submission(a.out):
        rows, back = rows + r, back + len(dets)
    if (rows, back) != (len(np.unique(ids)), n):
        raise RuntimeError(f"submission round trip: {rows} rows, {back} predictions; wrote {len(ids)}, {n}")
    print(f"submit: {rows} images, {n} predictions -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
