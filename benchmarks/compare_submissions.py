"""Compare two Kaggle detection submissions (``ImageId,PredictionString``, each prediction
``LabelName Confidence XMin YMin XMax YMax``) box by box, and optionally their mAP against a ground truth.

    python benchmarks/compare_submissions.py A.csv B.csv [--iou-thr 0.5] [--min-agreement 1.0]
        [--tol-score 1e-6] [--tol-coord 1e-6] [--boxes B --image-labels L --classes C --hierarchy H --tol-map 0.05]
        [--metrics A.json B.json --tol-metrics-map 0.05] [--out report.json]

Matching: per (image, label), the boxes of A in descending score order each take the box of B they overlap most
(IoU >= --iou-thr) unless an earlier box of A took it: the metric's own greedy matching
(``stages.metrics.detection.best_overlap`` + ``first_claims``), with B in the role of the ground truth.

Figures: the share of images whose set of predicted labels agrees, the share of (image, label) pairs present in
both (over the union), the box agreement = matched boxes / max(boxes of A, boxes of B), and over the matched pairs
the largest |score difference| and |coordinate difference| and the smallest IoU. With a ground truth (the
stages.evaluate inputs) both files are scored and |mAP(A) - mAP(B)| is reported; with ``--metrics`` two
``results/metrics.json`` tables (stages.report's rows: stage, variant, name, val_a, val_b) are compared row by row.

Defaults check that the two files are the same up to the 6 printed decimals. Exit status: 0 within every tolerance,
1 when a figure is outside its tolerance, 2 on bad input (a malformed file: the error names file, line, field).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.core.cli import EXIT_BAD_INPUT, setup_logging  # noqa: E402
from stages.core.errors import InputError  # noqa: E402
from stages.formats.openimages import read_detection_submission  # noqa: E402
from stages.metrics.detection import best_overlap, first_claims  # noqa: E402

BOX = ["x_min", "y_min", "x_max", "y_max"]


@dataclass
class Comparison:
    n_boxes_a: int
    n_boxes_b: int
    n_images: int                   # images in either file (an image with an empty PredictionString counts)
    image_agreement: float          # share of images whose label sets are equal
    label_agreement: float          # |pairs in both| / |pairs in either|, pairs = (image, label)
    box_agreement: float            # matched boxes / max(n_boxes_a, n_boxes_b)
    n_matched: int
    max_score_diff: float           # over matched pairs (0 when none)
    max_coord_diff: float
    min_matched_iou: float
    map_a: float | None = None
    map_b: float | None = None
    map_diff: float | None = None
    metrics_max_diff: float | None = None
    metrics_rows: int | None = None
    failures: list[str] = field(default_factory=list)


def read_submission(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The detections of a submission and every ImageId it lists (empty PredictionStrings included)."""
    dets = read_detection_submission(path)
    ids = pd.read_csv(path, usecols=["ImageId"], dtype=str, keep_default_na=False)["ImageId"].to_numpy(object)
    return dets, ids


def match_boxes(a: pd.DataFrame, b: pd.DataFrame, *, iou_thr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy matching of ``a``'s boxes to ``b``'s per (image, label), ``a`` in descending score order.

    Returns (rows of ``a``, rows of ``b``, IoU) of the matched pairs (positional row indices)."""
    keys = pd.concat([a[["image_id", "label"]], b[["image_id", "label"]]], ignore_index=True).astype(str)
    codes = keys.groupby(["image_id", "label"], sort=True).ngroup().to_numpy(np.int64)
    ka, kb = codes[: len(a)], codes[len(a):]
    oa = np.lexsort((-a["score"].to_numpy(np.float64), ka))     # by key, then score descending
    ob = np.argsort(kb, kind="stable")
    box_a = a[BOX].to_numpy(np.float64)[oa]
    box_b = b[BOX].to_numpy(np.float64)[ob]
    best, arg = best_overlap(box_a, ka[oa], kb[ob], box_b, "iou")
    won = first_claims(best >= iou_thr, arg)
    return oa[won], ob[arg[won]], best[won]


def compare(a: pd.DataFrame, ids_a: np.ndarray, b: pd.DataFrame, ids_b: np.ndarray, *,
            iou_thr: float = 0.5) -> Comparison:
    """The figures of two detection tables (see the module docstring); ``ids_*`` every image each one lists."""
    images = np.union1d(ids_a.astype(str), ids_b.astype(str))
    pa_ = set(zip(a["image_id"].astype(str), a["label"].astype(str)))
    pb_ = set(zip(b["image_id"].astype(str), b["label"].astype(str)))
    by_img_a: dict[str, set[str]] = {}
    by_img_b: dict[str, set[str]] = {}
    for img, lab in pa_:
        by_img_a.setdefault(img, set()).add(lab)
    for img, lab in pb_:
        by_img_b.setdefault(img, set()).add(lab)
    same_img = sum(by_img_a.get(i, set()) == by_img_b.get(i, set()) for i in images)
    union = pa_ | pb_
    ra, rb, iou = match_boxes(a, b, iou_thr=iou_thr)
    n = len(ra)
    sd = np.abs(a["score"].to_numpy(np.float64)[ra] - b["score"].to_numpy(np.float64)[rb])
    cd = np.abs(a[BOX].to_numpy(np.float64)[ra] - b[BOX].to_numpy(np.float64)[rb])
    return Comparison(
        n_boxes_a=len(a), n_boxes_b=len(b), n_images=len(images),
        image_agreement=same_img / len(images) if len(images) else 1.0,
        label_agreement=len(pa_ & pb_) / len(union) if union else 1.0,
        box_agreement=n / max(len(a), len(b)) if max(len(a), len(b)) else 1.0,
        n_matched=n, max_score_diff=float(sd.max(initial=0.0)), max_coord_diff=float(cd.max(initial=0.0)),
        min_matched_iou=float(iou.min(initial=1.0)))


def submission_map(path: str, *, boxes: str, image_labels: str, classes: str, hierarchy: str) -> float:
    """mAP of a submission file as ``python -m stages.evaluate`` computes it."""
    from stages.evaluate import evaluate_files

    ns = argparse.Namespace(boxes=boxes, image_labels=image_labels, classes=classes, hierarchy=hierarchy,
                            predictions=[path], split_ids=None, split=None, masks=None, mask_dir=None,
                            gt_masks=None, expanded=False, iou_thr=0.5)
    return float(evaluate_files(ns).map)


def compare_metrics(path_a: str, path_b: str) -> tuple[float, int]:
    """Largest |difference| of the val_a/val_b figures of the rows two metrics.json tables share, and the number
    of rows; a row of one missing from the other is an InputError."""
    def rows(path: str) -> dict[tuple, dict]:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"not a readable JSON file ({exc})", file=path) from None
        if not isinstance(data, list):
            raise InputError("expected a list of rows (stages.report's metrics.json)", file=path)
        out = {}
        for i, r in enumerate(data):
            if not isinstance(r, dict) or "val_a" not in r or "val_b" not in r:
                raise InputError("row without val_a/val_b", file=path, row=f"row {i}")
            out[(r.get("stage"), r.get("variant"), r.get("name"))] = r
        return out

    ra, rb = rows(path_a), rows(path_b)
    if set(ra) != set(rb):
        only = sorted(map(str, set(ra) ^ set(rb)))
        raise InputError(f"the two metrics tables have different rows, e.g. {only[0]}", file=path_b)
    diff = 0.0
    for k in ra:
        for split in ("val_a", "val_b"):
            x, y = ra[k][split], rb[k][split]
            if x is None or y is None:
                if (x is None) != (y is None):
                    diff = float("inf")
                continue
            diff = max(diff, abs(float(x) - float(y)))
    return diff, len(ra)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/compare_submissions.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="submission CSV (A: e.g. the CUDA run)")
    p.add_argument("b", help="submission CSV (B: e.g. the CPU run)")
    p.add_argument("--iou-thr", type=float, default=0.5, help="IoU for two boxes of the same label to match")
    p.add_argument("--min-agreement", type=float, default=1.0,
                   help="pass: box agreement (matched / max(n_a, n_b)) at least this")
    p.add_argument("--tol-score", type=float, default=1e-6, help="pass: max |score difference| of matched boxes")
    p.add_argument("--tol-coord", type=float, default=1e-6,
                   help="pass: max |coordinate difference| (normalized) of matched boxes")
    p.add_argument("--boxes", help="ground truth for mAP: bbox CSV or boxes parquet")
    p.add_argument("--image-labels", help="ground truth for mAP: human-imagelabels CSV or image_labels parquet")
    p.add_argument("--classes", help="ground truth for mAP: classes CSV or parquet")
    p.add_argument("--hierarchy", help="ground truth for mAP: hierarchy JSON or parquet")
    p.add_argument("--tol-map", type=float, default=0.05, help="pass: |mAP(A) - mAP(B)| (with a ground truth)")
    p.add_argument("--metrics", nargs=2, metavar=("A_JSON", "B_JSON"),
                   help="also compare two metrics.json tables (val_a/val_b mAP per row)")
    p.add_argument("--tol-metrics-map", type=float, default=0.05, help="pass: max |mAP difference| of --metrics")
    p.add_argument("--out", type=Path, help="write the figures as JSON")
    a = p.parse_args(argv)
    gt = [a.boxes, a.image_labels, a.classes, a.hierarchy]
    if any(gt) and not all(gt):
        p.error("a ground truth needs --boxes, --image-labels, --classes and --hierarchy together")
    if not 0.0 < a.iou_thr <= 1.0:
        p.error("--iou-thr must lie in (0, 1]")
    return a


def run(a: argparse.Namespace) -> Comparison:
    dets_a, ids_a = read_submission(a.a)
    dets_b, ids_b = read_submission(a.b)
    c = compare(dets_a, ids_a, dets_b, ids_b, iou_thr=a.iou_thr)
    if c.box_agreement < a.min_agreement:
        c.failures.append(f"box agreement {c.box_agreement:.4f} < {a.min_agreement}")
    if c.max_score_diff > a.tol_score:
        c.failures.append(f"max score difference {c.max_score_diff:.3g} > {a.tol_score}")
    if c.max_coord_diff > a.tol_coord:
        c.failures.append(f"max coordinate difference {c.max_coord_diff:.3g} > {a.tol_coord}")
    if a.boxes:
        kw = {"boxes": a.boxes, "image_labels": a.image_labels, "classes": a.classes, "hierarchy": a.hierarchy}
        c.map_a, c.map_b = submission_map(a.a, **kw), submission_map(a.b, **kw)
        c.map_diff = abs(c.map_a - c.map_b)
        if not c.map_diff <= a.tol_map:
            c.failures.append(f"|mAP difference| {c.map_diff:.4f} > {a.tol_map}")
    if a.metrics:
        c.metrics_max_diff, c.metrics_rows = compare_metrics(*a.metrics)
        if not c.metrics_max_diff <= a.tol_metrics_map:
            c.failures.append(f"metrics tables: max |mAP difference| {c.metrics_max_diff:.4f} > "
                              f"{a.tol_metrics_map}")
    return c


def summary(c: Comparison) -> str:
    lines = [f"boxes: A {c.n_boxes_a}, B {c.n_boxes_b}; images {c.n_images}",
             f"images with the same label set: {100 * c.image_agreement:.1f}%; (image, label) pairs in both: "
             f"{100 * c.label_agreement:.1f}%",
             f"box agreement: {100 * c.box_agreement:.1f}% ({c.n_matched} matched); over matched boxes: max |score "
             f"diff| {c.max_score_diff:.3g}, max |coord diff| {c.max_coord_diff:.3g}, min IoU {c.min_matched_iou:.3f}"]
    if c.map_diff is not None:
        lines.append(f"mAP: A {c.map_a:.4f}, B {c.map_b:.4f}, |diff| {c.map_diff:.4f}")
    if c.metrics_max_diff is not None:
        lines.append(f"metrics tables: {c.metrics_rows} rows, max |val mAP diff| {c.metrics_max_diff:.4f}")
    lines.append("PASS" if not c.failures else "FAIL: " + "; ".join(c.failures))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging("WARNING")
    a = parse_args(argv)
    try:
        c = run(a)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(summary(c))
    if a.out:
        a.out.write_text(json.dumps(asdict(c), indent=1))
    return 1 if c.failures else 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    raise SystemExit(main())
