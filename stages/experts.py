"""Mine the class subset of an expert model (MMfruit §4.1, expert models).

An expert detector is trained on the classes its base model detects worst (targets), plus the classes that the
base model confuses with them (negatives):

- targets: the ``n_lowest`` classes with the lowest validation AP of the base model, among the classes with
  ground truth that the base model was trained on (with a hierarchy and ``only_leaves``, leaf classes only:
  a parent's AP is mostly made of its children's expanded detections);
- negatives, by one of the paper's three definitions of confusion (``confusion``), always among the base
  model's trained classes other than the targets:

  ``cosine`` (the default)
      classes whose classifier FC weight row has cosine similarity ``>= sim_thr`` to the row of a target (the
      background row 0 never counts). Needs only the checkpoint, but a *trained* classifier: the rows of an
      untrained head are random, and so are its neighbours.
  ``siblings``
      the target's siblings in the class hierarchy: classes sharing a direct parent with it (the hierarchy's
      root is no parent, so top-level classes are not all siblings of each other). Depends on the hierarchy
      alone, not on what the model learnt: it finds confusable pairs that the taxonomy groups (orchard-mini's
      1/7, both "Straight digit") and misses those it does not (3 is a "Curvy digit", 8 a "Round digit").
  ``matrix``
      the validation confusion matrix. A base-model detection of class ``c`` scoring ``>= score_thr`` that
      overlaps no ground-truth box of ``c`` (or of a hierarchy relative of ``c``) at IoU >= 0.5 is a false
      positive; it lands on the non-group-of ground-truth box it overlaps most, if at IoU >= 0.5.
      ``share[t, c]`` = the fraction of target ``t``'s non-group-of boxes on which a false positive of class
      ``c`` lands; negatives are the classes with ``share >= confusion_thr`` (``c`` never an ancestor or
      descendant of ``t``: a parent's detection on its child's box is the hierarchy's expansion, not a
      confusion). Needs the base model's validation detections and the ground truth; finds what the model
      actually confuses, whatever the taxonomy says (both of orchard-mini's pairs, once the model has learnt
      the colours but not the glyphs).

The JSON written (``results/experts/<expert>.json``) holds ``targets`` (lowest AP first), ``negatives``
(sorted), ``confusion`` (the definition), ``similarity`` (per target, its negatives with the definition's
measure: the cosine for ``cosine`` and ``siblings``, the confusion share for ``matrix``), ``nearest_cosine``
and ``nearest_target`` (per negative, the FC-weight cosine to its most similar target, and that target, for
every definition), ``ap`` (per target), ``names`` (MID -> display name of targets and negatives, with
``--classes``) and the parameters. A set with no target (no trained class has a validation AP) is an error and
nothing is written. A set with targets and no negatives is fine: the expert then trains on its targets' images
and boxes only (its classifier has ``len(targets) + 1`` outputs), and at inference drops what it finds
background.

The expert is trained on the images holding a box of a target or a negative, with the other classes' boxes
dropped (``stages.train --classes``), and runs with ``expert: true`` at inference (an RoI whose background
score wins is dropped before regression).

    python -m stages.experts --model results/train/<base>/model.pt \\
        --metrics results/evaluate/postprocess/default/<base>/val_a.json --n-lowest 3 \\
        [--confusion cosine --sim-thr 0.3 | --confusion siblings | --confusion matrix \\
         --detections results/postprocess/default/<base>/val_a.parquet --boxes results/ingest/boxes.parquet \\
         --splits results/split/splits.parquet --split val_a --confusion-thr 0.1 --confusion-score-thr 0.3] \\
        [--hierarchy results/ingest/hierarchy.parquet] [--classes results/ingest/classes.parquet] \\
        --out results/experts/<expert>.json
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core.cli import stage_main
from stages.core.config import schema_default, schema_property
from stages.core.errors import InputError
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import write_json
from stages.formats.readers import read_class_aps
from stages.formats.columns import positions
from stages.metrics.detection import IOU_THR, segment_pairs
from stages.ops.boxes import paired_iou

log = logging.getLogger(__name__)

#: the definitions of confusion (the ``expert_confusion`` config key)
CONFUSIONS = ("cosine", "siblings", "matrix")

#: state-dict keys of a classifier FC weight [C+1, D]: sibling / cascade (``box_predictor[.t]``) and TSD /
#: TSD cascade (``decoupled[.t]``); the decoupled branch is the one that classifies when both are present
_CLS_KEY = re.compile(r"roi_heads\.(box_predictor|decoupled)(?:\.(\d+))?\.cls_score\.weight")


def classifier_weight(state: Mapping[str, Any], *, source: object = None) -> np.ndarray:
    """The classifier FC weight ``[C+1, D]`` (row 0: background) of a detector state dict: the decoupled (TSD)
    classifier over the sibling one, and the last cascade stage over earlier ones."""
    found = []
    for key in state:
        m = _CLS_KEY.fullmatch(key)
        if m:
            found.append((m.group(1) == "decoupled", int(m.group(2) or 0), key))
    if not found:
        raise InputError("no classifier weight (roi_heads.*.cls_score.weight) in the model's state dict",
                         file=source, field="model")
    key = max(found)[2]
    log.info("classifier weight %s", key)
    return np.asarray(state[key].detach().float().cpu().numpy(), dtype=np.float64)


def load_classifier(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(trained class MIDs, classifier FC weight ``[C+1, D]``) of a ``stages.train`` checkpoint."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise InputError(f"cannot load the model: {exc}", file=path) from exc
    if not isinstance(ckpt, Mapping) or "model" not in ckpt or "labels" not in ckpt:
        raise InputError("not a stages.train checkpoint (needs 'model' and 'labels')", file=path)
    labels = [str(x) for x in ckpt["labels"]]
    weight = classifier_weight(ckpt["model"], source=path)
    if weight.shape[0] != len(labels) + 1:
        raise InputError(f"classifier weight has {weight.shape[0]} rows for {len(labels)} labels (+1 background)",
                         file=path, field="labels")
    return labels, weight


def cosine_matrix(fc_weight: np.ndarray) -> np.ndarray:
    """``[C, C]`` cosine similarity of the class rows of a classifier FC weight ``[C+1, D]`` (row 0, the
    background, left out); a zero row has cosine 0 to everything."""
    rows = np.asarray(fc_weight, dtype=np.float64)[1:]
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = rows / np.where(norms > 0, norms, 1.0)
    return unit @ unit.T


def _ap_value(v: object) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def pick_targets(*, ap: Mapping[str, float | None], labels: Sequence[str], n_lowest: int,
                 hierarchy: Hierarchy | None = None, only_leaves: bool = True, source: object = None) -> list[str]:
    """The ``n_lowest`` trained classes with the lowest AP (lowest first, ties by label); classes without AP
    (None / NaN: no ground truth) and, with a hierarchy and ``only_leaves``, parent classes are never targets.
    No candidate at all is an :class:`InputError` (``source``: the metric file)."""
    if n_lowest < 1:
        raise ValueError(f"n_lowest must be >= 1, not {n_lowest}")
    parents = set()
    if hierarchy is not None and only_leaves:
        known = set(hierarchy.labels)
        parents = {c for c in labels if c in known and hierarchy.descendants(c)}
    candidates = [(v, c) for c in labels if c not in parents and (v := _ap_value(ap.get(c))) is not None]
    if not candidates:
        raise InputError("no trained class has a validation AP (ground truth) to pick experts from: the mined "
                         "set would be empty", file=source, field="per_class")
    targets = [c for _, c in sorted(candidates)[:n_lowest]]
    if len(targets) < n_lowest:
        log.warning("only %d classes have a validation AP; n_lowest=%d", len(targets), n_lowest)
    return targets


def sibling_classes(target: str, *, labels: Sequence[str], hierarchy: Hierarchy) -> list[str]:
    """The classes of ``labels`` (other than ``target``) that share a direct parent with ``target``, sorted."""
    mine = set(hierarchy.parents.get(target, ()))
    return sorted(c for c in labels if c != target and mine & set(hierarchy.parents.get(c, ())))


def _related_keys(hierarchy: Hierarchy | None, index: pd.Index) -> np.ndarray:
    """Sorted int64 keys ``a * K + b`` of the (class, class) pairs of ``index`` (size K) that are an ancestor /
    descendant of each other."""
    if hierarchy is None:
        return np.zeros(0, dtype=np.int64)
    k = len(index)
    keys = []
    for i, lab in enumerate(index):
        anc = index.get_indexer(list(hierarchy.ancestors(lab)))
        anc = anc[anc >= 0]
        keys.append(i * k + anc)     # (child, ancestor)
        keys.append(anc * k + i)     # (ancestor, child)
    return np.unique(np.concatenate(keys)).astype(np.int64) if keys else np.zeros(0, dtype=np.int64)


def _xyxy(df: pd.DataFrame) -> np.ndarray:
    return np.stack([df[c].to_numpy(np.float64) for c in ("x_min", "y_min", "x_max", "y_max")], axis=1)


def confusion_shares(*, detections: pd.DataFrame, boxes: pd.DataFrame, targets: Sequence[str],
                     score_thr: float, iou_thr: float = IOU_THR, hierarchy: Hierarchy | None = None
                     ) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """The rows of the validation confusion matrix of ``targets``: ``({t: {c: share}}, {t: n_boxes})``.

    ``detections`` (image_id, label, score, normalized xyxy): the base model's detections on the validation
    images; ``boxes`` (image_id, label, xyxy, is_group_of): the ground truth of the same images. A detection
    scoring ``>= score_thr`` is a false positive unless it overlaps a box (group-of or not) of its own class or of
    a hierarchy relative at IoU ``>= iou_thr``; a false positive lands on the non-group-of box of another,
    unrelated class that it overlaps most (IoU ``>= iou_thr``; the first such box on a tie), if any.
    ``share[t][c]`` = (boxes of ``t`` with at least one false positive of ``c`` landed on them) / ``n_boxes[t]``
    (the non-group-of boxes of ``t``); only classes with a share > 0 are listed.
    """
    targets = list(targets)
    dets = detections[detections["score"].to_numpy(np.float64) >= score_thr]
    index = pd.Index(pd.unique(np.concatenate([np.asarray(targets, dtype=object),
                                                boxes["label"].to_numpy(dtype=object),
                                                dets["label"].to_numpy(dtype=object)])), dtype=object)
    k = len(index)
    gt_cls = positions(boxes["label"], index)
    gt_group = boxes["is_group_of"].to_numpy(dtype=bool)
    tcode = index.get_indexer(targets)
    n_boxes = np.bincount(gt_cls[~gt_group], minlength=k)
    # ground truth sorted by image; each detection meets the boxes of its image
    images = pd.Index(pd.unique(boxes["image_id"].to_numpy(dtype=object)), dtype=object)
    gt_img = positions(boxes["image_id"], images)
    order = np.argsort(gt_img, kind="stable")
    gt_img, gt_cls, gt_group = gt_img[order], gt_cls[order], gt_group[order]
    gt_box = _xyxy(boxes)[order]
    det_img = positions(dets["image_id"], images)
    det_cls = positions(dets["label"], index)
    det_box = _xyxy(dets)
    lo = np.searchsorted(gt_img, det_img, "left")
    cnt = np.where(det_img >= 0, np.searchsorted(gt_img, det_img, "right") - lo, 0)
    related = _related_keys(hierarchy, index)
    explained = np.zeros(len(dets), dtype=bool)
    cand_det, cand_gt, cand_iou = [], [], []
    for sel, rep, tgt, _ in segment_pairs(lo, cnt):
        d = sel[rep]
        iou = paired_iou(det_box[d], gt_box[tgt])
        hit = iou >= iou_thr
        dc, gc = det_cls[d], gt_cls[tgt]
        own = (dc == gc) | np.isin(dc * k + gc, related)
        explained[d[hit & own]] = True
        land = hit & ~own & ~gt_group[tgt]
        cand_det.append(d[land])
        cand_gt.append(tgt[land])
        cand_iou.append(iou[land])
    shares: dict[str, dict[str, float]] = {t: {} for t in targets}
    if cand_det:
        d, g, v = np.concatenate(cand_det), np.concatenate(cand_gt), np.concatenate(cand_iou)
        fp = ~explained[d]
        d, g, v = d[fp], g[fp], v[fp]
        # each false positive lands on the box it overlaps most (the lowest box index on a tie)
        o = np.lexsort((g, -v, d))
        d, g = d[o], g[o]
        first = np.concatenate([[True], d[1:] != d[:-1]]) if len(d) else np.zeros(0, dtype=bool)
        d, g = d[first], g[first]
        # (box, detected class) once per box, then counted per (true class, detected class)
        pairs = np.unique(g * k + det_cls[d])
        box, cls = pairs // k, pairs % k
        counts = np.bincount(gt_cls[box] * k + cls, minlength=k * k).reshape(k, k)
        for t, tc in zip(targets, tcode):
            if n_boxes[tc]:
                row = counts[tc] / n_boxes[tc]
                shares[t] = {index[c]: float(row[c]) for c in np.flatnonzero(row > 0)}
    for t, tc in zip(targets, tcode):
        if not n_boxes[tc]:
            log.warning("target %s has no non-group-of ground-truth box in the validation images: no negative "
                        "from the confusion matrix", t)
    return shares, {t: int(n_boxes[tc]) for t, tc in zip(targets, tcode)}


def _sorted(d: Mapping[str, float]) -> dict[str, float]:
    return dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def mine_experts(*, ap: Mapping[str, float | None], fc_weight: np.ndarray, labels: Sequence[str], n_lowest: int,
                 sim_thr: float, confusion: str = "cosine", hierarchy: Hierarchy | None = None,
                 only_leaves: bool = True, detections: pd.DataFrame | None = None,
                 boxes: pd.DataFrame | None = None, confusion_thr: float = 0.1, confusion_score_thr: float = 0.3,
                 ap_source: object = None) -> dict[str, Any]:
    """The class subset of one expert model.

    ``ap``: the base model's validation AP per class (None / NaN: no ground truth); ``fc_weight`` ``[C+1, D]``:
    its classifier FC weight, row 0 background, row ``i`` the class ``labels[i-1]``; ``labels``: the base
    model's trained classes; ``confusion``: how negatives are found (see the module docstring) — ``siblings``
    needs ``hierarchy``, ``matrix`` needs ``detections`` and ``boxes`` (the validation images' ground truth)
    and uses ``confusion_thr`` / ``confusion_score_thr``; ``cosine`` uses ``sim_thr``.

    Returns ``{"confusion", "targets": [...] (lowest AP first, ties by label), "negatives": [...] (sorted),
    "similarity": {target: {negative: value}} (the definition's measure, highest first), "nearest_cosine":
    {negative: cosine to its most similar target}, "nearest_target": {negative: that target}}`` (plus
    ``"n_boxes": {target: boxes}`` for ``matrix``).
    """
    if confusion not in CONFUSIONS:
        raise ValueError(f"confusion must be one of {CONFUSIONS}, not {confusion!r}")
    labels = list(labels)
    w = np.asarray(fc_weight, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != len(labels) + 1:
        raise ValueError(f"fc_weight must be [C+1, D] with C = {len(labels)} labels, got shape {w.shape}")
    if confusion == "siblings" and hierarchy is None:
        raise ValueError("confusion 'siblings' needs the class hierarchy")
    if confusion == "matrix" and (detections is None or boxes is None):
        raise ValueError("confusion 'matrix' needs the base model's validation detections and the ground truth")
    targets = pick_targets(ap=ap, labels=labels, n_lowest=n_lowest, hierarchy=hierarchy, only_leaves=only_leaves,
                           source=ap_source)
    cos = cosine_matrix(w)
    index = {c: i for i, c in enumerate(labels)}
    tset = set(targets)
    extra: dict[str, Any] = {}
    similarity: dict[str, dict[str, float]] = {}
    if confusion == "cosine":
        for t in targets:
            sims = cos[index[t]]
            similarity[t] = {labels[j]: float(sims[j]) for j in np.flatnonzero(sims >= sim_thr)
                             if labels[j] not in tset}
    elif confusion == "siblings":
        for t in targets:
            similarity[t] = {c: float(cos[index[t], index[c]])
                             for c in sibling_classes(t, labels=labels, hierarchy=hierarchy) if c not in tset}
    else:
        shares, n_boxes = confusion_shares(detections=detections, boxes=boxes, targets=targets,
                                           score_thr=confusion_score_thr, hierarchy=hierarchy)
        for t in targets:
            similarity[t] = {c: v for c, v in shares[t].items() if v >= confusion_thr and c in index
                             and c not in tset}
        extra["n_boxes"] = n_boxes
    similarity = {t: _sorted(s) for t, s in similarity.items()}
    negatives = sorted({c for s in similarity.values() for c in s})
    tcols = [index[t] for t in targets]
    nearest_cosine, nearest_target = {}, {}
    for c in negatives:
        row = cos[index[c], tcols]
        j = int(np.argmax(row))
        nearest_cosine[c], nearest_target[c] = float(row[j]), targets[j]
    return {"confusion": confusion, "targets": targets, "negatives": negatives, "similarity": similarity,
            "nearest_cosine": nearest_cosine, "nearest_target": nearest_target, **extra}


def _model_option(p: argparse.ArgumentParser, flag: str, key: str) -> None:
    """An option whose default, type, choices and help come from the schema's model key ``key``."""
    node = schema_property("model", key)
    typ = {"number": float, "integer": int, "string": str}[node["type"]]
    desc = node.get("description", "").replace("%", "%%")
    p.add_argument(flag, dest=key, type=typ, default=schema_default("model", key), choices=node.get("enum"),
                   help=f"{desc} (config {key}; default: %(default)s)")


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    from stages.formats.io import read_table
    from stages.formats.readers import read_class_names, split_image_ids

    p = argparse.ArgumentParser(prog="python -m stages.experts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="the base model's checkpoint (stages.train --out)")
    p.add_argument("--metrics", type=Path, required=True, help="the base model's metric JSON (stages.evaluate)")
    p.add_argument("--hierarchy", type=Path, help="hierarchy table/JSON: targets are leaf classes only; needed "
                   "by --confusion siblings; with matrix, relatives are no confusion")
    p.add_argument("--classes", type=Path, help="classes table or CSV: display names in the JSON ('names')")
    _model_option(p, "--n-lowest", "expert_n_lowest")
    _model_option(p, "--confusion", "expert_confusion")
    _model_option(p, "--sim-thr", "expert_sim_thr")
    _model_option(p, "--confusion-thr", "expert_confusion_thr")
    _model_option(p, "--confusion-score-thr", "expert_confusion_score_thr")
    p.add_argument("--detections", type=Path, help="matrix: the base model's detections on the validation split")
    p.add_argument("--boxes", type=Path, help="matrix: the ground-truth boxes table")
    p.add_argument("--splits", type=Path, help="matrix: splits table; with --split, the ground truth of that split")
    p.add_argument("--split", help="matrix: the split the detections are of (e.g. val_a)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if bool(a.splits) != bool(a.split):
        p.error("--splits and --split go together")
    if a.expert_confusion == "siblings" and not a.hierarchy:
        raise InputError("--confusion siblings needs --hierarchy", field="--hierarchy")
    if a.expert_confusion == "matrix" and not (a.detections and a.boxes):
        raise InputError("--confusion matrix needs --detections and --boxes",
                         field="--detections" if not a.detections else "--boxes")
    labels, weight = load_classifier(a.model)
    ap = read_class_aps(a.metrics)
    hierarchy = Hierarchy.read(a.hierarchy, labels=labels) if a.hierarchy else None
    detections = boxes = None
    if a.expert_confusion == "matrix":
        ids = split_image_ids(a.splits, a.split) if a.splits else None
        detections = read_table(a.detections, "detections",
                                columns=["image_id", "label", "score", "x_min", "y_min", "x_max", "y_max"])
        boxes = read_table(a.boxes, "boxes", image_ids=ids)
    out = mine_experts(ap=ap, fc_weight=weight, labels=labels, n_lowest=a.expert_n_lowest, sim_thr=a.expert_sim_thr,
                       confusion=a.expert_confusion, hierarchy=hierarchy, detections=detections, boxes=boxes,
                       confusion_thr=a.expert_confusion_thr, confusion_score_thr=a.expert_confusion_score_thr,
                       ap_source=a.metrics)
    params: dict[str, Any] = {"base_model": str(a.model), "n_lowest": a.expert_n_lowest}
    if a.expert_confusion == "cosine":
        params["sim_thr"] = a.expert_sim_thr
    elif a.expert_confusion == "matrix":
        params |= {"confusion_thr": a.expert_confusion_thr, "confusion_score_thr": a.expert_confusion_score_thr,
                   "iou_thr": IOU_THR}
    out = {**out, "ap": {c: ap.get(c) for c in out["targets"]}, **params}
    if a.classes:
        names = read_class_names(a.classes)
        out["names"] = {c: names.get(c, c) for c in [*out["targets"], *out["negatives"]]}
    write_json(a.out, out)
    print(f"experts ({a.expert_confusion}): {len(out['targets'])} targets, {len(out['negatives'])} negatives "
          f"-> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
