"""Running a tree of ensemble operators (:mod:`stages.ops.ensemble_tree`) on detections, with a subtree cache.

Detections travel between nodes in a compact form, :class:`Dets` (int64 keys, float64 boxes and scores; no
strings), built once per leaf. An inner node (:func:`merge`) takes its children's outputs and:

1. class filter: keeps only the listed classes of a child (``classes[i]``, e.g. an expert's);
2. weights: multiplies child ``i``'s scores by ``weights[i]``;
3. pools child 0's then child 1's boxes and keeps the ``max_per_class`` highest-scoring of each (image, class)
   (:func:`stages.ops.nms.cap_per_group`; a runner setting, not an operator: it bounds the pairwise blocks);
   ``merge: vote`` runs top-k voting across the two children
   (:func:`stages.ops.ensemble.topk_vote` with ``k, score_weight, box_weight, min_iou``); ``merge: keep_best``
   drops every box that has a higher-scoring box of the other child (same image and class) with
   IoU > ``match_iou`` (ties: child 0 wins), so each matched pair goes on as its best box, untouched;
4. element dropout (vote only; a box is *matched* when a box of the other child has IoU > ``match_iou`` with
   it, IoUs of the unvoted boxes): ``scores_i`` = child i's matched boxes keep their own (weighted) score,
   without score votes, and the other child's matched boxes are dropped; ``boxes_i`` = child i's matched boxes
   keep their own coordinates and the other child's matched boxes are dropped;
5. suppression: ``method`` (adj-NMS, NMS, soft-NMS, linear soft-NMS or none) with ``iou_thr, sigma,
   score_thr`` (:func:`stages.ops.nms.suppress_arrays`);
6. output sorted by image, then score descending.

With the default operators (weights 1, vote k=4, no dropout, adj-NMS) a node over two leaves is exactly
:func:`stages.ops.ensemble.naive_ensemble` of the two tables without AP re-weighting.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import pandas as pd

from stages.core.errors import InputError
from stages.formats.tables import BOX_COLUMNS
from stages.formats.columns import positions
from stages.ops.boxes import box_iou
from stages.ops.ensemble import topk_vote
from stages.ops.ensemble_tree import Node, Tree
from stages.ops.nms import cap_per_group, group_blocks, row_chunks, segment_order, suppress_arrays, top_per_image


class Dets(NamedTuple):
    """Detections in compact form: ``key [M]`` int64 = image index * n_classes + class index, ``boxes [M, 4]``
    xyxy float64, ``scores [M]`` float64. Arrays held by a cache are read-only."""

    key: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def take(self, idx: np.ndarray) -> Dets:
        return Dets(self.key[idx], self.boxes[idx], self.scores[idx])

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.boxes.nbytes + self.scores.nbytes

    def frozen(self) -> Dets:
        for a in self:
            a.flags.writeable = False
        return self


def to_dets(dets: pd.DataFrame, *, images: pd.Index, labels: pd.Index, source: object = None) -> Dets:
    """A ``detections`` table as :class:`Dets` over the given image and class indexes, in table row order;
    an image or label not in its index is an :class:`InputError`."""
    img = positions(dets["image_id"], images)
    cls = positions(dets["label"], labels)
    for c, col in ((img, "image_id"), (cls, "label")):
        if (c < 0).any():
            i = int(np.flatnonzero(c < 0)[0])
            what = "image not in the split" if col == "image_id" else "label not in the class list"
            raise InputError(f"{what}: {dets[col].iloc[i]!r}", file=source, row=f"row {i}", field=col)
    boxes = np.stack([dets[c].to_numpy(np.float64) for c in BOX_COLUMNS], 1)
    return Dets(img * len(labels) + cls, boxes, dets["score"].to_numpy(np.float64).copy())


def to_frame(d: Dets, *, images: pd.Index, labels: pd.Index, max_per_image: int | None = None) -> pd.DataFrame:
    """:class:`Dets` back to a ``detections`` table (image_id and label as categoricals of the indexes)."""
    n = len(labels)
    out = pd.DataFrame({
        "image_id": pd.Categorical.from_codes(d.key // n, categories=images),
        "label": pd.Categorical.from_codes(d.key % n, categories=labels),
        "score": d.scores,
        **{c: d.boxes[:, j] for j, c in enumerate(BOX_COLUMNS)},
    })
    return top_per_image(out, max_per_image=max_per_image) if max_per_image else out


def cross_match(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, sources: np.ndarray, *,
                iou_thr: float) -> tuple[np.ndarray, np.ndarray]:
    """``(matched [M], beaten [M])`` bool: a box of another source in the same group has IoU > ``iou_thr`` with
    the box; and one of those comes first in score order (higher score; equal scores: lower index)."""
    matched = np.zeros(len(scores), dtype=bool)
    beaten = np.zeros(len(scores), dtype=bool)
    lay = group_blocks(groups, scores, square=True)
    bp, srcp = boxes[lay.perm], sources[lay.perm]
    mp, btp = np.zeros_like(matched), np.zeros_like(beaten)
    for off, g, n in lay.spans:
        if n == 1:
            continue
        src = lay.views(srcp, off, g, n)
        b = lay.views(bp, off, g, n)
        for r0, r1 in row_chunks(g, n):                               # [G, R, N] IoU slices
            hit = (box_iou(b[:, r0:r1], b) > iou_thr) & (src[:, r0:r1, None] != src[:, None, :])
            lay.views(mp, off, g, n)[:, r0:r1] = hit.any(2)
            lay.views(btp, off, g, n)[:, r0:r1] = np.tril(hit, r0 - 1).any(2)   # rows are in score order
    matched[lay.perm], beaten[lay.perm] = mp, btp
    return matched, beaten


def merge(children: tuple[Dets, Dets], node: Node, *, n_classes: int,
          class_masks: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
          max_per_class: int | None = None) -> Dets:
    """Merge two children's detections with ``node``'s operators (module doc); ``class_masks[i]`` is a bool
    array over class indexes (child i's class filter) or None; ``max_per_class`` caps the pool per (image,
    class) before any pairwise step (None: no cap)."""
    parts = []
    for d, w, mask in zip(children, node.weights, class_masks):
        if mask is not None:
            d = d.take(np.flatnonzero(mask[d.key % n_classes]))
        parts.append(Dets(d.key, d.boxes, d.scores * w))
    key = np.concatenate([p.key for p in parts])
    boxes = np.concatenate([p.boxes for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    src = np.repeat(np.arange(2, dtype=np.int64), [len(p.key) for p in parts])
    if len(key) == 0:
        return Dets(key, boxes, scores)
    if max_per_class is not None:
        idx = cap_per_group(key, scores, max_per_class=max_per_class)
        if len(idx) < len(key):
            key, boxes, scores, src = key[idx], boxes[idx], scores[idx], src[idx]
    nb, ns = boxes, scores
    if node.merge == "vote" and node.k > 0:
        nb, ns = topk_vote(boxes, scores, key, src, k=node.k, score_weight=node.score_weight,
                           box_weight=node.box_weight, min_iou=node.min_iou)
    keep = None
    if node.merge == "keep_best" or node.dropout != "none":
        matched, beaten = cross_match(boxes, scores, key, src, iou_thr=node.match_iou)
        if node.merge == "keep_best":
            keep = ~beaten
        else:
            c = int(node.dropout[-1])
            own = matched & (src == c)
            keep = ~(matched & (src != c))
            if node.dropout.startswith("scores"):
                ns = np.where(own, scores, ns)
            else:
                nb = np.where(own[:, None], boxes, nb)
        idx = np.flatnonzero(keep)
        key, nb, ns = key[idx], nb[idx], ns[idx]
    kept, new = suppress_arrays(nb, ns, key, method=node.method, iou_thr=node.iou_thr, sigma=node.sigma,
                                score_thr=node.score_thr)
    order = segment_order(key[kept] // n_classes, new)
    kept = kept[order]
    return Dets(key[kept], nb[kept], new[order])


class TreeRunner:
    """Runs trees over one set of leaves, caching every subtree's output by its content key.

    ``leaves``: name -> :class:`Dets` over ``images`` x ``labels``. The cache holds at most ``cache_bytes``
    of node outputs (least recently used dropped first); ``cache_bytes=0`` recomputes every node.
    ``max_per_class``: every node's pool is capped per (image, class) before its pairwise steps (None: no cap).
    ``computed`` counts the node merges run.
    """

    def __init__(self, leaves: Mapping[str, Dets], *, images: pd.Index, labels: pd.Index,
                 cache_bytes: int = 2 << 30, max_per_class: int | None = None):
        self.leaves = {k: v.frozen() for k, v in leaves.items()}
        self.images, self.labels = images, labels
        self.cache_bytes = cache_bytes
        self.max_per_class = max_per_class
        self._cache: OrderedDict[str, Dets] = OrderedDict()
        self._masks: dict[tuple[str, ...], np.ndarray] = {}
        self.computed = 0

    def _mask(self, classes: tuple[str, ...] | None, node: str) -> np.ndarray | None:
        if classes is None:
            return None
        if classes not in self._masks:
            idx = self.labels.get_indexer(list(classes))
            if (idx < 0).any():
                raise InputError(f"class {classes[int(np.flatnonzero(idx < 0)[0])]!r} is not in the class list",
                                 row=f"node {node}", field="classes")
            m = np.zeros(len(self.labels), dtype=bool)
            m[idx] = True
            self._masks[classes] = m
        return self._masks[classes]

    def output(self, tree: Tree) -> Dets:
        """The detections at the tree's root, before its ``max_per_image``."""
        missing = [v for v in tree.leaves if v not in self.leaves]
        if missing:
            parent = tree.parent().get(missing[0])
            raise InputError(f"no detections given for leaf {missing[0]!r}",
                             row=None if parent is None else f"node {parent[0]}", field="children")
        return self._run(tree, tree.root, tree.keys())

    def _run(self, tree: Tree, name: str, keys: dict[str, str]) -> Dets:
        if tree.is_leaf(name):
            return self.leaves[name]
        key = keys[name]
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        node = tree.nodes[name]
        kids = (self._run(tree, node.children[0], keys), self._run(tree, node.children[1], keys))
        out = merge(kids, node, n_classes=len(self.labels),
                    class_masks=(self._mask(node.classes[0], name), self._mask(node.classes[1], name)),
                    max_per_class=self.max_per_class).frozen()
        self.computed += 1
        if self.cache_bytes > 0:
            self._cache[key] = out
            total = sum(d.nbytes for d in self._cache.values())
            while total > self.cache_bytes and len(self._cache) > 1:
                total -= self._cache.popitem(last=False)[1].nbytes
        return out

    def frame(self, tree: Tree) -> pd.DataFrame:
        """The tree's output as a ``detections`` table, capped at ``tree.max_per_image``."""
        return to_frame(self.output(tree), images=self.images, labels=self.labels,
                        max_per_image=tree.max_per_image)
