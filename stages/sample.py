"""Sampling weights for training: class-aware (pick a class uniformly, then an image that contains it) or uniform.

The paper's class-aware sampling raised validation mAP from 58.9 to 64.6. Drawing an image with probability
w_i = (1/C) * sum_{c in image i} 1/n_c (n_c = images containing class c, C = classes present) is exactly the
two-step draw; the training sampler draws with replacement from these weights.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.cli import stage_main
from stages.formats.io import read_table, write_table

METHODS = ("class_aware", "uniform")


def sampling_weights(*, boxes: pd.DataFrame, image_ids: Sequence[str], method: str = "class_aware") -> pd.DataFrame:
    """Return a table (image_id, weight) with weights summing to 1 over ``image_ids``."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose from {METHODS}")
    ids = pd.Index(sorted(image_ids))
    if method == "uniform":
        w = np.full(len(ids), 1.0 / len(ids))
    else:
        pres = boxes.loc[boxes["image_id"].isin(ids), ["image_id", "label"]].drop_duplicates()
        n_c = pres.groupby("label")["image_id"].transform("size").to_numpy(np.float64)
        n_classes = pres["label"].nunique()
        contrib = pd.Series(1.0 / (n_classes * n_c), index=pres["image_id"].to_numpy())
        w = contrib.groupby(level=0).sum().reindex(ids, fill_value=0.0).to_numpy()
        if w.sum() == 0:
            w = np.full(len(ids), 1.0)
        w = w / w.sum()
    return pd.DataFrame({"image_id": ids.to_numpy(dtype=object), "weight": w})


def expected_class_frequency(weights: pd.DataFrame, boxes: pd.DataFrame) -> pd.Series:
    """Probability that a drawn image contains each class (a diagnostic: flat under class-aware sampling)."""
    pres = boxes[["image_id", "label"]].drop_duplicates().merge(weights, on="image_id")
    return pres.groupby("label")["weight"].sum().sort_values()


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.sample", description=__doc__)
    p.add_argument("--boxes", type=Path, required=True)
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--method", choices=METHODS, default="class_aware")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    splits = read_table(a.splits, "splits")
    ids = splits.loc[splits["split"] == a.split, "image_id"]
    boxes = read_table(a.boxes, "boxes")
    w = sampling_weights(boxes=boxes, image_ids=ids, method=a.method)
    write_table(a.out, w, "sampling", provenance={"stage": "sample", "method": a.method})
    f = expected_class_frequency(w, boxes)
    print(f"sample[{a.method}]: {len(w)} images; P(image has class) min {f.min():.3f} max {f.max():.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
