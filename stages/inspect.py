"""Inspect a canonical parquet file: what it holds, and its boxes (and masks) drawn on an image.

``python -m stages.inspect results/ensemble/default/all/val_a.parquet [--classes results/ingest/classes.parquet]
[--top 15]`` prints the table name and provenance from the file metadata, rows, images, classes, a score histogram,
per-model/scale/flip counts (when those columns exist), the most frequent classes and boxes per image.

``... --image <ImageID> --images results/ingest/images.parquet --out x.png [--score-thr 0.3]
[--boxes results/ingest/boxes.parquet]`` draws that image's detections (and masks for a ``masks`` table) with
labels and scores, and the ground-truth boxes dashed when ``--boxes`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats.io import atomic_path, read_canonical, read_table
from stages.formats.readers import read_class_names
from stages.formats.tables import BOX_COLUMNS
from stages.viz.overlay import render_image

log = logging.getLogger(__name__)

#: columns counted separately when a file has them (the detections table's provenance columns)
GROUP_COLUMNS = ("model", "scale", "flip")


# ----- summary ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    """What a canonical table holds. Fields that do not apply to the table (no score column...) are empty."""

    table: str
    provenance: dict
    rows: int
    images: int | None = None
    classes: int | None = None
    score_min: float | None = None
    score_max: float | None = None
    score_bins: list[float] = field(default_factory=list)     # bin edges, len(score_counts) + 1
    score_counts: list[int] = field(default_factory=list)
    groups: dict[str, dict[str, int]] = field(default_factory=dict)   # column -> value -> rows
    top_classes: list[tuple[str, str, int]] = field(default_factory=list)  # (label, name, rows)
    per_image: dict[str, float] = field(default_factory=dict)  # min / median / mean / max rows per image

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def summarize(df: pd.DataFrame, *, table: str, provenance: Mapping[str, object] | None = None,
              names: Mapping[str, str] | None = None, top: int = 15, bins: int = 10) -> Summary:
    """Summarize a conformed canonical table ``df`` (see :class:`Summary`).

    The score histogram has ``bins`` equal bins over [0, 1], widened to the scores' range when some fall
    outside. ``names`` maps MIDs to display names for ``top_classes`` (the MID itself otherwise).
    """
    names = names or {}
    out: dict = {"table": table, "provenance": dict(provenance or {}), "rows": len(df)}
    if "image_id" in df:
        out["images"] = int(df["image_id"].nunique())
        counts = df.groupby("image_id").size()
        if len(counts):
            out["per_image"] = {"min": float(counts.min()), "median": float(counts.median()),
                                "mean": float(counts.mean()), "max": float(counts.max())}
    if "label" in df:
        out["classes"] = int(df["label"].nunique())
        vc = df["label"].value_counts(sort=False).reset_index()
        vc.columns = ["label", "n"]
        vc = vc.sort_values(["n", "label"], ascending=[False, True]).head(top)
        out["top_classes"] = [(lab, names.get(lab, lab), int(n)) for lab, n in zip(vc["label"], vc["n"])]
    if "score" in df and len(df):
        s = df["score"].to_numpy(np.float64)
        lo, hi = min(0.0, float(s.min())), max(1.0, float(s.max()))
        counts, edges = np.histogram(s, bins=bins, range=(lo, hi))
        out.update(score_min=float(s.min()), score_max=float(s.max()), score_bins=[float(e) for e in edges],
                   score_counts=[int(c) for c in counts])
    for col in GROUP_COLUMNS:
        if col in df:
            vc = df[col].value_counts(sort=False)
            out.setdefault("groups", {})[col] = {str(k): int(v) for k, v in sorted(vc.items())}
    return Summary(**out)


def format_summary(s: Summary, *, width: int = 40) -> str:
    """The summary as text, with the score histogram drawn in ``#`` bars of at most ``width`` characters."""
    lines = [f"table: {s.table}"]
    for k, v in s.provenance.items():
        if k != "table":
            lines.append(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    lines.append(f"rows: {s.rows}")
    if s.images is not None:
        lines.append(f"images: {s.images}")
    if s.classes is not None:
        lines.append(f"classes: {s.classes}")
    if s.per_image:
        p = s.per_image
        lines.append(f"rows per image: min {p['min']:g}, median {p['median']:g}, mean {p['mean']:.2f}, "
                     f"max {p['max']:g}")
    if s.score_counts:
        lines.append(f"scores: min {s.score_min:.4f}, max {s.score_max:.4f}")
        peak = max(s.score_counts) or 1
        n = len(s.score_counts)
        for i, (lo, hi, c) in enumerate(zip(s.score_bins[:-1], s.score_bins[1:], s.score_counts)):
            bar = "#" * int(round(width * c / peak))
            lines.append(f"  [{lo:5.2f}, {hi:5.2f}{']' if i == n - 1 else ')'} {c:>9d} {bar}")
    for col, counts in s.groups.items():
        lines.append(f"by {col}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    if s.top_classes:
        lines.append(f"top {len(s.top_classes)} classes:")
        for lab, name, n in s.top_classes:
            shown = f"{name} ({lab})" if name != lab else lab
            lines.append(f"  {n:>9d}  {shown}")
    return "\n".join(lines) + "\n"


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help="a canonical parquet file (detections, masks, boxes, ...)")
    p.add_argument("--classes", type=Path, help="classes.parquet or the OpenImages class-description CSV")
    p.add_argument("--top", type=int, default=15, help="how many of the most frequent classes to list")
    p.add_argument("--bins", type=int, default=10, help="score histogram bins")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    p.add_argument("--image", help="an ImageID whose rows to draw (needs --images and --out)")
    p.add_argument("--images", type=Path, nargs="+", help="images table(s) with the image paths")
    p.add_argument("--boxes", type=Path, help="ground-truth boxes table: draw them dashed")
    p.add_argument("--score-thr", type=float, default=0.3, help="draw only rows scoring at least this")
    p.add_argument("--out", type=Path, help="PNG to write the drawing to")
    p.add_argument("--min-side", type=int, default=480, help="upscale smaller images to this (0: never)")
    a = p.parse_args(argv)
    if a.file.suffix.lower() != ".parquet":
        raise InputError("not a parquet file (expected a .parquet canonical table)", file=a.file)
    table, df, prov = read_canonical(a.file)
    names = read_class_names(a.classes) if a.classes else {}
    if a.image is None:
        s = summarize(df, table=table, provenance=prov, names=names, top=a.top, bins=a.bins)
        print(json.dumps(s.to_json(), indent=2) if a.json else format_summary(s), end="" if not a.json else "\n")
        return
    if not a.images or a.out is None:
        raise InputError("--image needs --images <images.parquet> and --out <file.png>", field="--image")
    if not {"image_id", "label", *BOX_COLUMNS} <= set(df.columns):
        raise InputError(f"a {table!r} table has no boxes to draw", file=a.file)
    images = pd.concat([read_table(x, "images") for x in a.images], ignore_index=True)
    gt = read_table(a.boxes, "boxes") if a.boxes else None
    img = render_image(image_id=a.image, images=images, dets=df, names=names, score_thr=a.score_thr, gt=gt,
                       min_side=a.min_side, source=", ".join(map(str, a.images)))
    with atomic_path(a.out) as tmp:
        img.save(tmp, format="PNG")
    n = int(((df["image_id"] == a.image) & (df["score"] >= a.score_thr if "score" in df else True)).sum())
    print(f"inspect: drew {n} {table} rows of {a.image} -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
