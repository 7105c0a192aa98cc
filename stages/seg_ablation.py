"""The segmentation ablation (the paper's Table 5 in miniature) on val_a and val_b -> JSON + Markdown.

Mask mAP (the OpenImages segmentation metric on the segmentable classes and their hierarchy) of:

- each HRNet mask model alone on the refined boxes: its first (unflipped) test view, then with its flip;
- the vote of the configured models (every view), on the refined boxes (what segmentation.csv holds);
- the same vote on the unrefined boxes (the ensemble's own) and on the ground-truth boxes, an oracle that
  separates mask quality from detection quality (each box scored 1, expanded up the segmentation hierarchy).

And the box refiner's own effect on the detection ensemble (every class): AP@0.5, AP@0.75 and the mean IoU of
the detections matched to a ground-truth box, before and after refinement.

The probability maps come from :mod:`stages.infer_masks` (``--probs SPLIT:SOURCE:MODEL:SHARD=FILE``); the masks
are made here exactly as :mod:`stages.segment` makes them, so the vote's row on refined boxes equals the
pipeline's own ``results/evaluate_seg`` figure.
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from stages.core.cli import add_config_args, stage_main
from stages.core.errors import InputError
from stages.evaluate import mask_ground_truth
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import read_table, write_json, write_text
from stages.formats.mask_probs import read_image_sizes, read_mask_probs
from stages.formats.readers import read_boxes, read_classes, read_image_labels, split_image_ids
from stages.metrics.detection import evaluate_detections, prepare_ground_truth
from stages.metrics.segmentation import evaluate_masks
from stages.ops.hierarchy import expand_hierarchy
from stages.ops.masks import retain_freed_memory
from stages.refine import matched_iou
from stages.segment import same_boxes, vote_rows

log = logging.getLogger(__name__)

SOURCES = ("refined", "raw", "gt")
SOURCE_TEXT = {"refined": "refined boxes", "raw": "unrefined boxes", "gt": "ground-truth boxes (oracle)"}


def parse_keyed(items: Sequence[str], n_parts: int, flag: str) -> list[tuple[tuple[str, ...], str]]:
    """``A:B:…=PATH`` arguments -> [((A, B, …), PATH)]."""
    out = []
    for item in items:
        key, sep, path = item.partition("=")
        parts = tuple(key.split(":"))
        if not sep or len(parts) != n_parts or not all(parts) or not path:
            raise InputError(f"{flag} takes {':'.join(['X'] * n_parts)}=PATH, got {item!r}", field=flag)
        out.append((parts, path))
    return out


def load_maps(paths: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """The image shards of one model on one box source, joined: (boxes, probs [V, N, h, w], view names)."""
    parts = [read_mask_probs(p) for p in paths]
    names = parts[0][2]
    for p, (_, _, v) in zip(paths, parts):
        if list(v) != list(names):
            raise InputError(f"views {list(v)} differ from the other shards' {list(names)}", file=p, field="views")
    dets = pd.concat([d for d, _, _ in parts], ignore_index=True)
    probs = np.concatenate([pr for _, pr, _ in parts], axis=1)
    return dets, probs, list(names)


def mask_map(masks: pd.DataFrame, gt, *, hierarchy: Hierarchy | None) -> float:
    if hierarchy is not None:
        masks = expand_hierarchy(masks, hierarchy)
    return float(evaluate_masks(gt=gt, masks=masks).map)


def ablate(*, probs: Mapping[tuple[str, str, str], list[str]], models: Sequence[str], splits: Sequence[str],
           gts: Mapping[str, object], seg_hierarchy: Hierarchy, vote: str, thr: float) -> list[dict]:
    """Mask mAP of every row of the table on each split (see the module docstring)."""
    rows: dict[str, dict] = {}

    def put(name: str, split: str, value: float, **info) -> None:
        rows.setdefault(name, {"variant": name, **info})[split] = value

    all_models = sorted({m for (_, _, m) in probs})
    for split in splits:
        gt = gts[split]
        own = "refined" if any(sp == split and s == "refined" for (sp, s, _) in probs) else "raw"
        for source in SOURCES:
            have = [m for m in all_models if (split, source, m) in probs]
            if not have:
                continue
            loaded = {m: load_maps(probs[(split, source, m)]) for m in have}
            first = loaded[have[0]][0]
            for m in have[1:]:
                same_boxes(first, loaded[m][0], source=", ".join(probs[(split, source, m)]),
                           reference=", ".join(probs[(split, source, have[0])]))
            expand = seg_hierarchy if source == "gt" else None
            if source == own:  # each model alone, on the boxes the pipeline segments
                for m in have:
                    dets, pr, views = loaded[m]
                    put(f"{m} ({views[0]})", split, mask_map(vote_rows(dets, pr[:1], vote=vote, thr=thr), gt,
                                                             hierarchy=expand), kind="model", source=source)
                    if len(views) > 1:
                        put(f"{m} + {', '.join(views[1:])}", split,
                            mask_map(vote_rows(dets, pr, vote=vote, thr=thr), gt, hierarchy=expand),
                            kind="model+flip", source=source)
            voters = [m for m in models if m in loaded]
            if not voters:
                continue
            stacked = np.concatenate([loaded[m][1] for m in voters], axis=0)
            name = f"vote of {', '.join(voters)} ({stacked.shape[0]} maps), {SOURCE_TEXT[source]}"
            put(name, split, mask_map(vote_rows(first, stacked, vote=vote, thr=thr), gt, hierarchy=expand),
                kind="vote", source=source)
            log.info("%s %s: done", split, source)
    return list(rows.values())


def box_effect(*, raw: Mapping[str, list[str]], refined: Mapping[str, list[str]], gts: Mapping[str, object],
               boxes: Mapping[str, pd.DataFrame], hierarchy: Hierarchy) -> list[dict]:
    """AP@0.5, AP@0.75 and the mean matched IoU of the ensemble's boxes before and after refinement."""
    out = []
    for name, files in (("unrefined", raw), ("refined", refined)):
        row = {"boxes": name}
        for split, paths in files.items():
            dets = pd.concat([read_table(p, "detections") for p in paths], ignore_index=True)
            gt = gts[split]
            row[split] = {"ap50": float(evaluate_detections(gt=gt, detections=dets, iou_thr=0.5).map),
                          "ap75": float(evaluate_detections(gt=gt, detections=dets, iou_thr=0.75).map),
                          "mean_iou": matched_iou(dets, boxes[split], hierarchy=hierarchy).mean_iou}
        out.append(row)
    return out


def _fmt(v: float | None) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.4f}"


def markdown(rows: list[dict], effect: list[dict], splits: Sequence[str], *, vote: str) -> str:
    lines = ["# Segmentation ablation (paper Table 5 in miniature)", "",
             f"Mask mAP (OpenImages segmentation metric, segmentable classes) on {' and '.join(splits)}; "
             f"`{vote}` vote of the probability maps.", "",
             "| variant | boxes | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['source']} | " + " | ".join(_fmt(r.get(s)) for s in splits) + " |")
    own = "refined" if any(r["source"] == "refined" for r in rows) else "raw"
    best = {s: max((r.get(s, float("nan")) for r in rows if r["kind"] in ("model", "model+flip")
                    and r["source"] == own), default=float("nan")) for s in splits}
    votes = [r for r in rows if r["kind"] == "vote" and r["source"] == own]
    if votes:
        v = votes[0]
        gains = ", ".join(f"{s}: {v.get(s, float('nan')) - best[s]:+.4f}" for s in splits)
        lines += ["", f"The vote on {SOURCE_TEXT[own]} vs the best single model (with or without flip): {gains}."]
    if effect:
        lines += ["", "## Box refinement (the detection ensemble, every class)", "",
                  "| boxes | " + " | ".join(f"{s} AP@0.5 | {s} AP@0.75 | {s} mean IoU" for s in splits) + " |",
                  "|---|" + "---|---|---|" * len(splits)]
        for r in effect:
            lines.append(f"| {r['boxes']} | " + " | ".join(
                f"{_fmt(r[s]['ap50'])} | {_fmt(r[s]['ap75'])} | {_fmt(r[s]['mean_iou'])}" for s in splits) + " |")
    return "\n".join(lines) + "\n"


def records(rows: list[dict], effect: list[dict], splits: Sequence[str]) -> list[dict]:
    """Both tables as one list of flat records (measure, variant, boxes, one column per split): what
    :func:`stages.report.read_ablation` shows in the HTML report."""
    out = [{"measure": "mask mAP", "variant": r["variant"], "boxes": r["source"],
            **{s: r.get(s) for s in splits}} for r in rows]
    for r in effect:
        for key, text in (("ap50", "box AP@0.5"), ("ap75", "box AP@0.75"), ("mean_iou", "box mean matched IoU")):
            out.append({"measure": text, "variant": "detection ensemble", "boxes": r["boxes"],
                        **{s: r[s][key] for s in splits if s in r}})
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.seg_ablation", description=__doc__.split("\n")[0])
    p.add_argument("--probs", nargs="+", required=True, metavar="SPLIT:SOURCE:MODEL:SHARD=NPZ",
                   help=f"stages.infer_masks files; SOURCE is one of {SOURCES}")
    p.add_argument("--models", nargs="+", required=True, help="the mask models the vote combines")
    p.add_argument("--raw", nargs="*", default=[], metavar="SPLIT=PARQUET", help="the unrefined final detections")
    p.add_argument("--refined", nargs="*", default=[], metavar="SPLIT=PARQUET",
                   help="the refined final detections (a split may repeat, once per image shard)")
    p.add_argument("--gt-masks", required=True, help="gt_masks parquet (stages.ingest_masks)")
    p.add_argument("--boxes", required=True, help="boxes parquet (group-of boxes without masks are ignored regions)")
    p.add_argument("--image-labels", required=True)
    p.add_argument("--seg-classes", required=True)
    p.add_argument("--seg-hierarchy", required=True)
    p.add_argument("--classes", required=True, help="the detection classes (the box table)")
    p.add_argument("--hierarchy", required=True, help="the detection hierarchy (the box table)")
    p.add_argument("--split-ids", required=True)
    add_config_args(p, "segmentation", ["vote", "thr"])
    p.add_argument("--out-json", required=True)
    p.add_argument("--out-md", required=True)
    return p.parse_args(argv)


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    retain_freed_memory()
    probs: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for (split, source, model, _), path in parse_keyed(args.probs, 4, "--probs"):
        if source not in SOURCES:
            raise InputError(f"unknown box source {source!r}; sources are {SOURCES}", field="--probs")
        probs[(split, source, model)].append(path)
    raw, refined = defaultdict(list), defaultdict(list)
    for target, items, flag in ((raw, args.raw, "--raw"), (refined, args.refined, "--refined")):
        for (split,), path in parse_keyed(items, 1, flag):
            target[split].append(path)
    splits = sorted({s for (s, _, _) in probs})
    seg_classes = read_classes(args.seg_classes)
    seg_h = Hierarchy.read(args.seg_hierarchy, labels=seg_classes["label"])
    classes = read_classes(args.classes)
    hier = Hierarchy.read(args.hierarchy, labels=classes["label"])
    known = set(classes["label"])
    seg_gts, box_gts, boxes_by_split = {}, {}, {}
    for split in splits:
        ids = split_image_ids(args.split_ids, split)
        boxes = read_boxes(args.boxes, known, ids)
        labels = read_image_labels(args.image_labels, known, ids)
        # ground-truth masks stored at another size are resized to the images' (as stages.evaluate resizes them
        # to the predictions' size; the boxes' image sizes are in the probability files)
        sizes = {}
        for (sp, _, _), paths in probs.items():
            if sp == split:
                for p in paths:
                    sizes.update(read_image_sizes(p))
        seg_gts[split] = mask_ground_truth(gt_masks=args.gt_masks, boxes=boxes, image_labels=labels,
                                           hierarchy=seg_h, classes=seg_classes, image_ids=ids, sizes=sizes)
        box_gts[split] = prepare_ground_truth(boxes=boxes, image_labels=labels, hierarchy=hier, classes=classes,
                                              image_ids=ids)
        boxes_by_split[split] = boxes
    rows = ablate(probs=probs, models=args.models, splits=splits, gts=seg_gts, seg_hierarchy=seg_h,
                  vote=args.vote, thr=args.thr)
    effect = box_effect(raw=raw, refined=refined, gts=box_gts, boxes=boxes_by_split,
                        hierarchy=hier) if raw and refined else []
    write_json(args.out_json, records(rows, effect, splits))
    md = markdown(rows, effect, splits, vote=args.vote)
    write_text(args.out_md, md)
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
