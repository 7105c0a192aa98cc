"""The OpenImages Challenge detection metric, vectorized, giving the official evaluator's numbers.

Semantics (those of the TF Object Detection API ``OpenImagesChallengeEvaluator`` with its defaults:
IoU 0.5, group-of weight 1, no NMS, at most 10,000 detections per image and class):

* Ground-truth boxes are expanded to every ancestor class (not the root); positive image labels are expanded
  up, negative ones down (:func:`prepare_ground_truth`; pass ``expanded=True`` for already-expanded inputs).
* The evaluated images are those with any ground truth (a box or a verified image label). Per image, the
  evaluated classes are its image-level labels (both signs) plus its box classes; other detections are ignored.
* Detections with ``x_min >= x_max`` or ``y_min >= y_max`` are dropped, as are scores ``<= -10``.
* Per image and class, detections are ordered as the official code orders them: ``np.argsort(scores)[::-1]``
  over the detections in input order (so ties are broken exactly as numpy breaks them on this machine).
* A detection is a true positive if its IoU with the non-group-of box it overlaps most (first such box on a
  tie) is >= 0.5 and that box is not yet taken; there is no fallback to the next box.
* Remaining detections whose intersection over the detection's area with the group-of box they overlap most is
  >= 0.5 are removed; each group-of box that got any of them (with a score > 0) is one true positive scored at
  their highest score. Every box, group-of or not, counts once in the ground-truth total.
* Per class, scores are concatenated over images in sorted image-id order (per image: kept detections, then
  group-of entries) and ranked with ``np.argsort(scores)[::-1]``; AP is the VOC all-point interpolated area.
  mAP is the mean AP over classes with ground truth (a class with ground truth and no detection scores 0).

Everything is done with sorts and segment operations over all images and classes at once; the only Python
loops are over classes (AP) and over the rare (image, class) groups whose scores contain exact ties.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from stages.core.errors import InputError
from stages.formats.columns import positions
from stages.formats.hierarchy import Hierarchy
from stages.formats.tables import check_labels
from stages.ops.boxes import paired_ioa, paired_iou

log = logging.getLogger(__name__)

IOU_THR = 0.5
MAX_DETS_PER_IMAGE_CLASS = 10_000  # the official evaluator's nms_max_output_boxes
MIN_SCORE = -10.0  # the official evaluator keeps scores strictly greater than this
_PAIR_CHUNK = 1 << 21  # (detection, box) pairs evaluated at once: bounds peak memory


# ----- ground truth ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PreparedGroundTruth:
    """Hierarchy-expanded ground truth in the arrays the metric needs; build with :func:`prepare_ground_truth`.

    ``key = image_index * n_classes + class_index`` identifies an (image, class); image indices follow sorted
    image ids. Box arrays are ``[n, 4]`` float64 in the official order ``(y_min, x_min, y_max, x_max)``,
    sorted by key and, within a key, by input row.
    """

    labels: np.ndarray            # [C] class MIDs (object)
    names: np.ndarray             # [C] display names (object)
    image_ids: np.ndarray         # [I] sorted image ids (object)
    num_gt: np.ndarray            # [C] float64, ground-truth instances per class (group-of boxes count once)
    eval_keys: np.ndarray         # sorted unique int64 keys of evaluated (image, class) pairs
    box_key: np.ndarray           # [B] int64 keys of non-group-of boxes
    box: np.ndarray               # [B, 4]
    group_key: np.ndarray         # [G] int64 keys of group-of boxes
    group_box: np.ndarray         # [G, 4]
    extra: dict = field(default_factory=dict, repr=False)  # per-box payloads (e.g. masks) aligned with rows
    _cache: dict = field(default_factory=dict, repr=False)

    def is_evaluated(self, key: np.ndarray) -> np.ndarray:
        """Boolean per key: is this (image, class) evaluated? (a bitmap lookup when it fits in 256 MB)."""
        size = len(self.image_ids) * self.n_classes
        if size > 1 << 28:
            return np.isin(key, self.eval_keys)
        if "eval_bitmap" not in self._cache:
            bm = np.zeros(size, dtype=bool)
            bm[self.eval_keys] = True
            self._cache["eval_bitmap"] = bm
        return self._cache["eval_bitmap"][key]

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    @property
    def image_index(self) -> pd.Index:
        return pd.Index(self.image_ids, dtype=object)

    @property
    def label_index(self) -> pd.Index:
        return pd.Index(self.labels, dtype=object)


def expansion_csr(hierarchy: Hierarchy, labels: np.ndarray, *, up: bool) -> tuple[np.ndarray, np.ndarray]:
    """For each class index ``c``: ``idx[ptr[c]:ptr[c + 1]]`` = ``c`` and its ancestors (``up``) or descendants,
    restricted to ``labels``. Ancestors outside ``labels`` are skipped (the root never appears)."""
    pos = {lab: i for i, lab in enumerate(labels)}
    ptr = [0]
    idx: list[int] = []
    for i, lab in enumerate(labels):
        rel = hierarchy.ancestors(lab) if up else hierarchy.descendants(lab)
        idx.append(i)
        idx.extend(sorted(pos[r] for r in rel if r in pos))
        ptr.append(len(idx))
    return np.asarray(ptr, dtype=np.int64), np.asarray(idx, dtype=np.int64)


def _expand(cls: np.ndarray, ptr: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``r`` with class ``cls[r]`` -> (source row, expanded class) pairs, source rows in order."""
    cnt = ptr[cls + 1] - ptr[cls]
    src = np.repeat(np.arange(len(cls), dtype=np.int64), cnt)
    first = np.cumsum(cnt) - cnt
    off = np.arange(len(src), dtype=np.int64) - first[src]
    return src, idx[ptr[cls[src]] + off]


def _class_of(labels: pd.Series, index: pd.Index, table: str) -> np.ndarray:
    c = positions(labels, index)
    if (c < 0).any():
        check_labels(labels, index, source=table)
    return c


def _yxyx(df: pd.DataFrame) -> np.ndarray:
    return np.stack([df["y_min"].to_numpy(np.float64), df["x_min"].to_numpy(np.float64),
                     df["y_max"].to_numpy(np.float64), df["x_max"].to_numpy(np.float64)], axis=1)


def prepare_ground_truth(*, boxes: pd.DataFrame, image_labels: pd.DataFrame, hierarchy: Hierarchy,
                         classes: pd.DataFrame, image_ids: Iterable[str] | None = None,
                         expanded: bool = False, box_payload: dict[str, np.ndarray] | None = None
                         ) -> PreparedGroundTruth:
    """Expand and index the ground truth once; reuse the result for any number of scorings.

    Args:
      boxes: ``boxes`` table (normalized xyxy, ``is_group_of``), leaf-level labels unless ``expanded``.
      image_labels: ``image_labels`` table (confidence 1 verified present, 0 verified absent).
      hierarchy: the class hierarchy; classes: the ``classes`` table (label, name), the evaluated classes.
      image_ids: if given, only these images are scored (e.g. one split's images).
      expanded: the inputs are already hierarchy-expanded (as the official evaluator's inputs are).
      box_payload: arrays aligned with ``boxes`` rows carried through expansion into ``extra`` (masks).
    """
    labels = classes["label"].to_numpy(dtype=object)
    names = classes["name"].to_numpy(dtype=object)
    lindex = pd.Index(labels, dtype=object)
    if not lindex.is_unique:
        raise InputError("duplicate MID in the class list", file="classes", field="label")
    if image_ids is not None:
        keep = pd.Index(pd.unique(np.asarray(list(image_ids), dtype=object)), dtype=object)
        bsel = boxes["image_id"].isin(keep).to_numpy()
        boxes = boxes[bsel]
        if box_payload:
            box_payload = {k: np.asarray(v)[bsel] for k, v in box_payload.items()}
        image_labels = image_labels[image_labels["image_id"].isin(keep).to_numpy()]
    n_cls = len(labels)
    bcls = _class_of(boxes["label"], lindex, "boxes")
    lcls = _class_of(image_labels["label"], lindex, "image_labels")
    pos = image_labels["confidence"].to_numpy() == 1
    if expanded:
        bsrc, bexp = np.arange(len(bcls), dtype=np.int64), bcls
        lsrc, lexp = np.arange(len(lcls), dtype=np.int64), lcls
    else:
        up_ptr, up_idx = expansion_csr(hierarchy, labels, up=True)
        dn_ptr, dn_idx = expansion_csr(hierarchy, labels, up=False)
        bsrc, bexp = _expand(bcls, up_ptr, up_idx)
        psrc, pexp = _expand(lcls[pos], up_ptr, up_idx)
        nsrc, nexp = _expand(lcls[~pos], dn_ptr, dn_idx)
        lsrc = np.concatenate([np.flatnonzero(pos)[psrc], np.flatnonzero(~pos)[nsrc]])
        lexp = np.concatenate([pexp, nexp])
    b_img_ids = boxes["image_id"].to_numpy(dtype=object)
    l_img_ids = image_labels["image_id"].to_numpy(dtype=object)
    image_index = pd.Index(np.unique(np.concatenate([b_img_ids, l_img_ids]).astype(object)), dtype=object)
    bimg = image_index.get_indexer(b_img_ids).astype(np.int64)[bsrc]
    limg = image_index.get_indexer(l_img_ids).astype(np.int64)[lsrc]
    bkey = bimg * n_cls + bexp
    lkey = limg * n_cls + lexp
    eval_keys = np.unique(np.concatenate([bkey, lkey]))
    order = np.argsort(bkey, kind="stable")  # within a key: input row order, as the official evaluator
    bsrc, bkey = bsrc[order], bkey[order]
    coords = _yxyx(boxes)[bsrc]
    group = boxes["is_group_of"].to_numpy(dtype=bool)[bsrc]
    num_gt = np.bincount(bkey % n_cls, minlength=n_cls).astype(np.float64) if n_cls else np.zeros(0)
    extra = {}
    for k, v in (box_payload or {}).items():
        v = np.asarray(v)[bsrc]
        extra[k] = v[~group]
        extra["group_" + k] = v[group]
    return PreparedGroundTruth(labels=labels, names=names, image_ids=image_index.to_numpy(dtype=object),
                               num_gt=num_gt, eval_keys=eval_keys, box_key=bkey[~group], box=coords[~group],
                               group_key=bkey[group], group_box=coords[group], extra=extra)


# ----- detections -----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Dets:
    """Kept detections in the official per-(image, class) order."""

    key: np.ndarray     # int64
    score: np.ndarray   # float64
    box: np.ndarray     # [n, 4] yxyx
    row: np.ndarray     # positions in the input table
    n_input: int


def _official_order(key: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Order rows by key, then as ``np.argsort(group_scores)[::-1]`` over each group's rows in input order."""
    n = len(key)
    if n and int(key.max()) < (1 << 62) // max(n, 1):
        # one sort of key * n + (rank of -score): ties get arbitrary ranks here and are redone below
        rank = np.empty(n, dtype=np.int64)
        rank[np.argsort(-score)] = np.arange(n, dtype=np.int64)
        o = np.argsort(key * n + rank)
    else:
        o = np.lexsort((-score, key))
    ks, ss = key[o], score[o]
    tie = (ks[1:] == ks[:-1]) & (ss[1:] == ss[:-1])
    if tie.any():
        # numpy's default argsort is not stable (and SIMD-dependent): reproduce it on the exact same arrays
        tkeys = np.unique(ks[1:][tie])
        lo = np.searchsorted(ks, tkeys, "left")
        hi = np.searchsorted(ks, tkeys, "right")
        for a, b in zip(lo.tolist(), hi.tolist()):
            rows = np.sort(o[a:b])
            o[a:b] = rows[np.argsort(score[rows])[::-1]]
    return o


def run_starts(sorted_key: np.ndarray) -> np.ndarray:
    """First position of each run of equal values in a sorted array."""
    if not len(sorted_key):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate([[True], sorted_key[1:] != sorted_key[:-1]]))


def prepare_detections(*, gt: PreparedGroundTruth, detections: pd.DataFrame) -> _Dets:
    """Keep evaluated, valid detections; order them as the official evaluator does."""
    n_in = len(detections)
    img = positions(detections["image_id"], gt.image_index)
    cls = positions(detections["label"], gt.label_index)
    score = detections["score"].to_numpy(np.float64)
    x0, y0 = detections["x_min"].to_numpy(np.float64), detections["y_min"].to_numpy(np.float64)
    x1, y1 = detections["x_max"].to_numpy(np.float64), detections["y_max"].to_numpy(np.float64)
    key = img * gt.n_classes + cls
    ok = (img >= 0) & (cls >= 0) & (y0 < y1) & (x0 < x1) & (score > MIN_SCORE)
    ok[ok] = gt.is_evaluated(key[ok])
    rows = np.flatnonzero(ok)
    key, score = key[rows], score[rows]
    o = _official_order(key, score)
    key, score, rows = key[o], score[o], rows[o]
    if len(key):
        starts = run_starts(key)
        if np.diff(np.append(starts, len(key))).max() > MAX_DETS_PER_IMAGE_CLASS:
            lens = np.diff(np.append(starts, len(key)))
            keep = (np.arange(len(key)) - np.repeat(starts, lens)) < MAX_DETS_PER_IMAGE_CLASS
            key, score, rows = key[keep], score[keep], rows[keep]
    box = np.empty((len(rows), 4))
    for j, col in enumerate((y0, x0, y1, x1)):
        box[:, j] = col[rows]
    return _Dets(key=key, score=score, box=box, row=rows, n_input=n_in)


# ----- overlaps -------------------------------------------------------------------------------------------
def segment_pairs(lo: np.ndarray, cnt: np.ndarray, chunk: int = _PAIR_CHUNK):
    """Yield ``(sel, rep, target, seg_start)`` chunks of the pairs (i, lo[i] + j) for j < cnt[i].

    ``sel`` are the rows i in the chunk (only rows with cnt > 0), ``rep`` the pair -> position in ``sel``,
    ``target`` the pair's target index, ``seg_start`` the first pair of each row in the chunk.
    """
    has = np.flatnonzero(cnt > 0)
    if not len(has):
        return
    c_all = cnt[has]
    cum = np.cumsum(c_all)
    start = 0
    while start < len(has):
        base = int(cum[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(cum, base + chunk, "right")))
        sel = has[start:stop]
        c = c_all[start:stop]
        seg_start = np.cumsum(c) - c
        rep = np.repeat(np.arange(len(sel), dtype=np.int64), c)
        target = lo[sel][rep] + (np.arange(len(rep), dtype=np.int64) - seg_start[rep])
        yield sel, rep, target, seg_start
        start = stop


def best_overlap(det_box: np.ndarray, det_key: np.ndarray, gt_key: np.ndarray, gt_box: np.ndarray,
                 kind: str) -> tuple[np.ndarray, np.ndarray]:
    """For each detection (``det_key`` sorted): the highest overlap with a ground-truth box of the same key and
    that box's index (the first one on a tie, like ``np.argmax``); ``(-inf, -1)`` where the key has no box."""
    # on yxyx boxes the paired ops do the official evaluator's floating-point operations (see stages.ops.boxes)
    overlap = {"iou": paired_iou, "ioa": paired_ioa}[kind]
    n = len(det_key)
    best = np.full(n, -np.inf)
    arg = np.full(n, -1, dtype=np.int64)
    # det_key is sorted: look up each distinct key once
    starts = run_starts(det_key)
    lens = np.diff(np.append(starts, n))
    uk = det_key[starts]
    ulo = np.searchsorted(gt_key, uk, "left")
    lo = np.repeat(ulo, lens)
    cnt = np.repeat(np.searchsorted(gt_key, uk, "right") - ulo, lens)
    for sel, rep, tgt, seg_start in segment_pairs(lo, cnt):
        v = overlap(det_box[sel][rep], gt_box[tgt])
        m = np.maximum.reduceat(v, seg_start)
        pos = np.arange(len(v), dtype=np.int64)
        first = np.minimum.reduceat(np.where(v == m[rep], pos, len(v)), seg_start)
        best[sel] = m
        arg[sel] = tgt[np.minimum(first, len(v) - 1)]
    return best, arg


def first_claims(eligible: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Greedy matching in row order without fallback: row i wins iff it is eligible and no earlier eligible row
    claimed the same target."""
    win = np.zeros(len(eligible), dtype=bool)
    idx = np.flatnonzero(eligible)
    if len(idx):
        _, first = np.unique(target[idx], return_index=True)
        win[idx[first]] = True
    return win


def group_of_entries(score: np.ndarray, matched: np.ndarray, target: np.ndarray, n_groups: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per group-of box: the highest score of the detections it absorbed, floored at 0 as officially; returns
    (group indices with a score > 0, their scores)."""
    gs = np.zeros(n_groups)
    np.maximum.at(gs, target[matched], score[matched])
    hit = np.flatnonzero(gs > 0)
    return hit, gs[hit]


# ----- AP -------------------------------------------------------------------------------------------------
def average_precision(scores: np.ndarray, tp: np.ndarray, num_gt: float) -> float:
    """VOC all-point interpolated AP of one class, as the official evaluator computes it.

    ``scores``/``tp`` are in the official concatenation order (ties are ranked by ``np.argsort(scores)[::-1]``
    on that array). NaN when ``num_gt == 0``; 0 when there is no scored entry.
    """
    if num_gt == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    o = np.argsort(scores)[::-1]
    t = tp[o].astype(np.float64)
    ctp = np.cumsum(t)
    cfp = np.cumsum((t <= 0).astype(np.float64))
    precision = ctp / (ctp + cfp)
    recall = ctp / num_gt
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[idx] - recall[idx - 1]) * precision[idx]))


@dataclass(frozen=True)
class MetricResult:
    """``map``: mean AP over classes with ground truth; ``per_class``: one row per class (label, name, ap — NaN
    without ground truth —, n_gt, n_det scored detections, n_tp); ``counts``: totals."""

    map: float
    per_class: pd.DataFrame
    counts: dict

    def to_json(self) -> dict:
        pc = {}
        for r in self.per_class.itertuples(index=False):
            pc[r.label] = {"name": r.name, "ap": None if np.isnan(r.ap) else float(r.ap), "n_gt": int(r.n_gt),
                           "n_det": int(r.n_det), "n_tp": int(r.n_tp)}
        return {"mAP": None if np.isnan(self.map) else float(self.map), "per_class": pc,
                "counts": {k: int(v) for k, v in self.counts.items()}}

    def summary(self) -> str:
        c = self.counts
        return (f"mAP {self.map:.6f} over {c['n_classes_with_gt']} classes with ground truth; "
                f"{c['n_images']} images, {c['n_gt']} ground-truth boxes, {c['n_det_scored']} of "
                f"{c['n_det_input']} detections scored")


def per_class_ap(*, entry_key: np.ndarray, entry_score: np.ndarray, entry_tp: np.ndarray, n_classes: int,
                 num_gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries already in official order within each key (keys sorted) -> (AP per class, TP count per class)."""
    cls = entry_key % n_classes if n_classes else entry_key
    if n_classes < (1 << 15):
        cls = cls.astype(np.int16)  # stable sort of int16 is a radix sort
    o = np.argsort(cls, kind="stable")  # per class: images ascending, within image the given order
    cls, sc, tp = cls[o], entry_score[o], entry_tp[o]
    bounds = np.searchsorted(cls, np.arange(n_classes + 1), "left")
    ap = np.full(n_classes, np.nan)
    ntp = np.zeros(n_classes, dtype=np.int64)
    for c in np.flatnonzero(num_gt > 0).tolist():
        a, b = bounds[c], bounds[c + 1]
        ap[c] = average_precision(sc[a:b], tp[a:b], num_gt[c])
        ntp[c] = int(np.count_nonzero(tp[a:b] > 0))
    return ap, ntp


def evaluate_detections(*, gt: PreparedGroundTruth, detections: pd.DataFrame,
                        iou_thr: float = IOU_THR) -> MetricResult:
    """Score a ``detections`` table (image_id, label, score, normalized xyxy) against prepared ground truth.

    Detections are taken as they are (no hierarchy expansion: a submission must contain the parents).
    Detections of images without ground truth, of classes not evaluated on their image, or of unknown classes
    are ignored. Pure: neither input is modified.
    """
    d = prepare_detections(gt=gt, detections=detections)
    n = len(d.key)
    best_iou, arg_box = best_overlap(d.box, d.key, gt.box_key, gt.box, "iou")
    tp = first_claims(best_iou >= iou_thr, arg_box)
    best_ioa, arg_grp = best_overlap(d.box, d.key, gt.group_key, gt.group_box, "ioa")
    in_group = ~tp & (best_ioa >= iou_thr)
    g_idx, g_score = group_of_entries(d.score, in_group, arg_grp, len(gt.group_key))
    keep = ~in_group
    # official per-(image, class) layout: kept detections in order, then group-of entries in box order
    key = np.concatenate([d.key[keep], gt.group_key[g_idx]])
    score = np.concatenate([d.score[keep], g_score])
    lab = np.concatenate([tp[keep].astype(np.float64), np.ones(len(g_idx))])
    o = np.argsort(key, kind="stable")
    ap, ntp = per_class_ap(entry_key=key[o], entry_score=score[o], entry_tp=lab[o], n_classes=gt.n_classes,
                           num_gt=gt.num_gt)
    n_det = np.bincount(d.key % gt.n_classes, minlength=gt.n_classes) if gt.n_classes else np.zeros(0, int)
    per_class = pd.DataFrame({"label": gt.labels, "name": gt.names, "ap": ap, "n_gt": gt.num_gt.astype(np.int64),
                              "n_det": n_det.astype(np.int64), "n_tp": ntp})
    with_gt = gt.num_gt > 0
    # the official evaluator takes np.nanmean over all classes (NaN = no ground truth): summing the same values
    # over the subset instead can differ in the last bit
    m = float(np.nanmean(ap)) if with_gt.any() else float("nan")
    counts = {"n_images": len(gt.image_ids), "n_classes": gt.n_classes, "n_classes_with_gt": int(with_gt.sum()),
              "n_gt": int(gt.num_gt.sum()), "n_gt_group_of": len(gt.group_key), "n_det_input": d.n_input,
              "n_det_scored": n, "n_det_in_group_of": int(in_group.sum()), "n_tp": int(ntp.sum())}
    log.debug("scored %d of %d detections", n, d.n_input)
    return MetricResult(map=m, per_class=per_class, counts=counts)
