"""Mask-derived boxes (paper 5.9, insufficient labels): instance boxes from the instance masks of the classes whose
boxes are mostly group-of.

Some classes are annotated almost only with group-of boxes (a bunch of flowers, a shelf of books): the detector
then learns few instances of them. Where such a class has instance masks, the tight bounding box of each mask's
pixels (computed from the mask itself, not from the segmentation CSV's box) is an instance box. This stage adds
those boxes to the ``boxes`` table as ordinary instance boxes (``is_group_of`` False, ``mask_path`` naming the
mask they come from; the original rows keep ``mask_path`` empty) for the images of the train split only: the
validation sets' ground truth stays the annotators' boxes, so their AP measures the same thing with and without
the option.

Which classes (``--classes``): ``auto`` picks every class whose share of group-of boxes (over all images) is above
``--group-of-share`` and that has at least one mask; or an explicit list of MIDs (each must be a class with masks).
For a chosen class, a mask is skipped, and counted in the report, when it is empty (no foreground pixel), when its
image is not in train, or when its box overlaps an existing instance box of its class in its image with IoU >=
``--dedupe-iou`` (it is that box's mask). The report (JSON) lists every class's figures, the classes chosen and the
boxes added and skipped per class::

    python -m stages.mask_boxes --boxes results/ingest/boxes.parquet \\
        --gt-masks results/ingest_masks/gt_masks.parquet --splits results/split/splits.parquet \\
        --known-classes results/ingest/classes.parquet \\
        --classes auto --group-of-share 0.5 --dedupe-iou 0.7 \\
        --out results/mask_boxes/boxes.parquet --report results/mask_boxes/report.json
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from stages.core.cli import stage_main
from stages.core.config import schema_default
from stages.core.errors import InputError
from stages.formats.io import read_table, write_json, write_table
from stages.formats.readers import read_classes
from stages.ops.boxes import paired_iou

log = logging.getLogger(__name__)


def _default(key: str):
    return schema_default("dataset", "mask_boxes", key)


def mask_tight_boxes(gt_masks: pd.DataFrame) -> np.ndarray:
    """``[n, 4]`` ``xyxy_norm`` tight boxes of the masks' foreground pixels (pycocotools' ``toBbox`` on the RLE,
    no decoding): pixel columns ``x0..x1`` (inclusive) give ``x_min = x0 / W``, ``x_max = (x1 + 1) / W`` (pixel
    edges, as the generator's and OpenImages' boxes). An empty mask gives a row of NaN."""
    n = len(gt_masks)
    if n == 0:
        return np.zeros((0, 4), np.float64)
    h = gt_masks["mask_height"].to_numpy(np.int64)
    w = gt_masks["mask_width"].to_numpy(np.int64)
    rles = [{"size": [int(a), int(b)], "counts": c.encode() if isinstance(c, str) else c}
            for c, a, b in zip(gt_masks["rle"], h, w)]
    xywh = np.asarray(mask_utils.toBbox(rles), np.float64).reshape(n, 4)
    out = np.stack([xywh[:, 0] / w, xywh[:, 1] / h, (xywh[:, 0] + xywh[:, 2]) / w, (xywh[:, 1] + xywh[:, 3]) / h],
                   axis=1)
    out[(xywh[:, 2] <= 0) | (xywh[:, 3] <= 0)] = np.nan
    return out


def class_figures(boxes: pd.DataFrame, gt_masks: pd.DataFrame) -> pd.DataFrame:
    """Per class (of the boxes or the masks): boxes, group-of boxes, their share, masks. Sorted by label."""
    lab = boxes["label"].astype(object)
    g = pd.DataFrame({"boxes": lab.value_counts(),
                      "group_of": lab[boxes["is_group_of"].to_numpy(bool)].value_counts(),
                      "masks": gt_masks["label"].astype(object).value_counts()}).fillna(0).astype(np.int64)
    g.index = g.index.astype(object)
    g["group_of_share"] = np.where(g["boxes"] > 0, g["group_of"] / g["boxes"].clip(lower=1), 0.0)
    return g.sort_index().rename_axis("label").reset_index()


def select_classes(figures: pd.DataFrame, *, group_of_share: float, classes: str | Sequence[str] = "auto",
                   known: Collection[str] | None = None, source: object = None) -> list[str]:
    """The classes to derive boxes for: ``auto``, every class with group-of share > ``group_of_share`` and at
    least one mask; else the listed MIDs, each a known class (``known``; None: any class of ``figures``) with at
    least one mask (else an :class:`InputError` naming ``source`` and the field ``classes``)."""
    if isinstance(classes, str):
        if classes != "auto":
            raise ValueError(f"classes must be 'auto' or a list of MIDs, got {classes!r}")
        pick = figures[(figures["group_of_share"] > group_of_share) & (figures["masks"] > 0)]
        return sorted(pick["label"])
    masks = dict(zip(figures["label"], figures["masks"]))
    known = set(figures["label"]) if known is None else set(known)
    seen: set[str] = set()
    for i, lab in enumerate(classes):
        if lab not in known:
            raise InputError(f"unknown label (MID) {lab!r}: not in the class list", file=source, row=f"item {i}",
                             field="classes")
        if lab in seen:
            raise InputError(f"class {lab!r} listed twice", file=source, row=f"item {i}", field="classes")
        if masks.get(lab, 0) == 0:
            raise InputError(f"class {lab!r} has no instance mask: no box can be derived for it", file=source,
                             row=f"item {i}", field="classes")
        seen.add(lab)
    return sorted(seen)


@dataclass(frozen=True)
class MaskBoxes:
    boxes: pd.DataFrame     # the input boxes (mask_path empty) + the derived ones, appended
    report: dict


def mask_derived_boxes(*, boxes: pd.DataFrame, gt_masks: pd.DataFrame, train_ids: Collection[str] | None = None,
                       group_of_share: float = 0.5, classes: str | Sequence[str] = "auto",
                       dedupe_iou: float = 0.7, known: Collection[str] | None = None,
                       source: object = None) -> MaskBoxes:
    """Add the tight boxes of the chosen classes' masks (module docstring) to ``boxes`` (canonical ``boxes``
    table) from ``gt_masks`` (canonical ``gt_masks`` table). ``train_ids``: the images that may get boxes (None:
    every image). Returns the augmented table (input rows first, in order; then the derived rows, in
    ``gt_masks`` order) and the report."""
    if not 0.0 <= group_of_share <= 1.0 or not 0.0 <= dedupe_iou <= 1.0:
        raise ValueError("group_of_share and dedupe_iou must be in [0, 1]")
    fig = class_figures(boxes, gt_masks)
    chosen = select_classes(fig, group_of_share=group_of_share, classes=classes, known=known, source=source)
    m = gt_masks[gt_masks["label"].astype(object).isin(chosen).to_numpy()].reset_index(drop=True)
    tight = mask_tight_boxes(m)
    empty = np.isnan(tight[:, 0])
    in_train = np.ones(len(m), bool) if train_ids is None else \
        m["image_id"].astype(object).isin(set(train_ids)).to_numpy()
    cand = np.flatnonzero(~empty & in_train)
    dup = np.zeros(len(m), bool)
    if len(cand):
        inst = boxes[~boxes["is_group_of"].to_numpy(bool)]
        inst = pd.DataFrame({"image_id": inst["image_id"].astype(object).to_numpy(),
                             "label": inst["label"].astype(object).to_numpy(),
                             "bx": list(inst[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float64))})
        c = pd.DataFrame({"k": cand, "image_id": m["image_id"].astype(object).to_numpy()[cand],
                          "label": m["label"].astype(object).to_numpy()[cand]})
        pairs = c.merge(inst, on=["image_id", "label"])
        if len(pairs):
            iou = paired_iou(tight[pairs["k"].to_numpy()], np.stack(pairs["bx"].to_numpy()))
            best = pd.Series(iou).groupby(pairs["k"].to_numpy()).max()
            dup[best.index.to_numpy()[best.to_numpy() >= dedupe_iou]] = True
    add = ~empty & in_train & ~dup
    labels = m["label"].astype(object).to_numpy()

    def per_class(mask: np.ndarray) -> dict[str, int]:
        vc = pd.Series(labels[mask], dtype=object).value_counts()
        return {lab: int(vc.get(lab, 0)) for lab in chosen}

    new = pd.DataFrame({"image_id": m["image_id"].astype(object).to_numpy()[add], "label": labels[add],
                        "x_min": tight[add, 0], "y_min": tight[add, 1], "x_max": tight[add, 2],
                        "y_max": tight[add, 3], "is_group_of": np.zeros(int(add.sum()), bool),
                        "mask_path": m["mask_path"].astype(object).to_numpy()[add]})
    for col in ("is_occluded", "is_truncated", "is_depiction", "is_inside"):
        if col in boxes.columns:
            new[col] = np.zeros(len(new), np.int8)
    old = boxes.copy()
    if "mask_path" not in old.columns:
        old["mask_path"] = pd.Series([None] * len(old), dtype=object)
    out = pd.concat([old, new[[c for c in old.columns if c in new.columns]]], ignore_index=True)
    added = per_class(add)
    report = {
        "rule": "auto" if isinstance(classes, str) else "list",
        "group_of_share": group_of_share, "dedupe_iou": dedupe_iou,
        "train_only": train_ids is not None,
        "classes_chosen": chosen,
        "boxes_added": added, "boxes_added_total": int(add.sum()),
        "skipped_empty_mask": per_class(empty), "skipped_empty_mask_total": int(empty.sum()),
        "skipped_not_train": per_class(~empty & ~in_train),
        "skipped_duplicate": per_class(dup),
        "classes": fig.to_dict(orient="records"),
    }
    return MaskBoxes(boxes=out, report=report)


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.mask_boxes", description=__doc__.split("\n\n")[0])
    p.add_argument("--boxes", type=Path, required=True, help="boxes table (stages.ingest)")
    p.add_argument("--gt-masks", type=Path, required=True, help="gt_masks table (stages.ingest_masks)")
    p.add_argument("--splits", type=Path, help="splits table (stages.split): only its train images get boxes "
                   "(without it: every image)")
    p.add_argument("--known-classes", type=Path,
                   help="the classes (classes parquet or class-description CSV) a listed MID must be among")
    p.add_argument("--classes", nargs="+", default=[_default("classes")] if isinstance(_default("classes"), str)
                   else _default("classes"), help="'auto' (the group-of rule) or the MIDs to derive boxes for")
    p.add_argument("--group-of-share", type=float, default=_default("group_of_share"),
                   help="auto: a class whose share of group-of boxes is above this (and that has masks)")
    p.add_argument("--dedupe-iou", type=float, default=_default("dedupe_iou"),
                   help="a mask box with IoU >= this with an instance box of its class in its image is not added")
    p.add_argument("--out", type=Path, required=True, help="the augmented boxes table")
    p.add_argument("--report", type=Path, required=True,
                   help="JSON: classes chosen, boxes added / skipped per class")
    a = p.parse_args(argv)
    if not 0 <= a.group_of_share <= 1 or not 0 <= a.dedupe_iou <= 1:
        p.error("need --group-of-share and --dedupe-iou in [0, 1]")
    classes: str | list[str] = "auto" if a.classes == ["auto"] else list(a.classes)
    if classes != "auto" and "auto" in classes:
        p.error("--classes takes 'auto' alone or a list of MIDs")
    boxes = read_table(a.boxes, "boxes")
    gt = read_table(a.gt_masks, "gt_masks")
    train = None
    if a.splits is not None:
        sp = read_table(a.splits, "splits")
        train = set(sp["image_id"][sp["split"].astype(str).to_numpy() == "train"])
    known = set(read_classes(a.known_classes)["label"]) if a.known_classes is not None else None
    res = mask_derived_boxes(boxes=boxes, gt_masks=gt, train_ids=train, group_of_share=a.group_of_share,
                             classes=classes, dedupe_iou=a.dedupe_iou, known=known, source="--classes")
    write_table(a.out, res.boxes, "boxes", provenance={"stage": "mask_boxes", "source": str(a.boxes)})
    write_json(a.report, res.report)
    r = res.report
    if r["skipped_empty_mask_total"]:
        log.warning("%d empty masks skipped", r["skipped_empty_mask_total"])
    print(f"mask_boxes: {len(r['classes_chosen'])} classes chosen ({r['rule']}), {r['boxes_added_total']} boxes "
          f"added, {r['skipped_empty_mask_total']} empty masks skipped -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
