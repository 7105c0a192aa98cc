"""Submit: final detections -> the Kaggle detection submission (``ImageId,PredictionString``), one row per
test image, checked by reading it back."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats import openimages as oi
from stages.formats.io import read_table


def submission(*, detections: pd.DataFrame, image_ids: Sequence[str]) -> pd.DataFrame:
    extra = sorted(set(detections["image_id"]) - set(image_ids))
    if extra:
        raise InputError(f"detections for {len(extra)} image(s) not in the test set, e.g. {extra[0]!r}",
                         field="image_id")
    return oi.detection_submission(detections, image_ids)


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.submit", description=__doc__)
    p.add_argument("--detections", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True, help="the test images table")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    dets = read_table(a.detections, "detections")
    images = read_table(a.images, "images")
    sub = submission(detections=dets, image_ids=list(images["image_id"]))
    oi.write_csv(a.out, sub)
    back = oi.read_detection_submission(a.out)
    if len(back) != len(dets):
        raise RuntimeError(f"submission round trip lost rows: {len(dets)} -> {len(back)}")
    print(f"submit: {len(sub)} images, {len(dets)} predictions -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
