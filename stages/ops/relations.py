"""Relationship statistics mined from training boxes, and the rescoring of detections with them (MMfruit §5.8).

Statistics (all counts over the images of the mining split):

- ``class_count[i]`` = C_i, images with a box of class i; ``cooc[i, j]`` = C_ij, images with both.
  The conditional used for rescoring is ``p(i|j) = C_ij / C_j`` = P(class i present | class j present)
  (the issue writes it ``C_ij / C_i`` with the roles of the indices swapped; the meaning is the same: the chance
  of ``i`` given that ``j`` is seen). See :meth:`RelationStats.conditional`.
- ``inside[a, b]``: boxes of class b lying inside (IoA >= ``ioa_thr``) some box of class a, counted over
  images that have a box of a; ``inner_total[a, b]``: all boxes of b in images with a box of a.
  ``inside / inner_total`` = "b's boxes are usually surrounded by a's" (a face inside a person).
- ``contains[a, b]``: boxes of a containing some box of b, over images with b; ``outer_total[a, b]``: all
  boxes of a in images with b. ``contains / outer_total`` = "a's boxes usually surround a b" (a wheel in a bike).

Rescoring (:func:`rescore`), per image:

1. co-occurrence: m_i = max score of class i, J = classes with m_j >= ``conf_thr``;
   t_i = max_{j in J, j != i} m_j * p(i|j). If t_i > m_i every box of class i is scaled by
   (m_i + ``cooc_weight`` * (t_i - m_i)) / m_i, so the image's max for i moves that fraction towards t_i.
2. surround: for each rule (a, b) whose ratio is >= ``surround_thr`` with >= ``min_support`` boxes counted, when
   the image has a confident (>= ``conf_thr``) detection of the other class: a box that respects the rule
   (it lies inside / contains a confident one) is multiplied by ``1 + boost``, a box that breaks it by
   ``1 - penalty`` (at most one factor per box: respecting any rule wins).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stages.core.errors import InputError
from stages.formats.columns import codes
from stages.formats.tables import BOX_COLUMNS
from stages.ops.boxes import paired_ioa

_MATRICES = ("cooc", "inside", "inner_total", "contains", "outer_total")


@dataclass(frozen=True)
class RelationStats:
    labels: tuple[str, ...]
    n_images: int
    class_count: np.ndarray          # [L]
    cooc: np.ndarray                 # [L, L]
    inside: np.ndarray               # [L, L] (outer a, inner b)
    inner_total: np.ndarray          # [L, L]
    contains: np.ndarray             # [L, L] (outer a, inner b)
    outer_total: np.ndarray          # [L, L]
    ioa_thr: float                   # a box is inside another when IoA >= this (mining and rescoring)

    def conditional(self) -> np.ndarray:
        """``P[i, j] = p(i|j) = C_ij / C_j`` (0 where C_j = 0)."""
        cj = self.class_count[None, :].astype(np.float64)
        return np.where(cj > 0, self.cooc / np.maximum(cj, 1), 0.0)

    def to_json_obj(self) -> dict:
        """Sparse JSON form: each matrix as ``[[i, j, count], ...]`` over the nonzero cells."""
        obj: dict = {"labels": list(self.labels), "n_images": int(self.n_images), "ioa_thr": self.ioa_thr,
                     "class_count": [int(v) for v in self.class_count]}
        for name in _MATRICES:
            m = getattr(self, name)
            i, j = np.nonzero(m)
            obj[name] = np.stack([i, j, m[i, j]], 1).astype(np.int64).tolist()
        return obj

    @classmethod
    def from_json_obj(cls, obj: Mapping, *, source: object = None) -> RelationStats:
        try:
            labels = tuple(obj["labels"])
            n = len(labels)
            mats = {}
            for name in _MATRICES:
                m = np.zeros((n, n), dtype=np.int64)
                cells = np.asarray(obj[name], dtype=np.int64).reshape(-1, 3)
                m[cells[:, 0], cells[:, 1]] = cells[:, 2]
                mats[name] = m
            cc = np.asarray(obj["class_count"], dtype=np.int64)
            if cc.shape != (n,):
                raise ValueError(f"class_count has {cc.size} entries for {n} labels")
            return cls(labels=labels, n_images=int(obj["n_images"]), class_count=cc,
                       ioa_thr=float(obj["ioa_thr"]), **mats)
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise InputError(f"not a relation statistics file: {exc!r}", file=source) from exc


def mine_relations(boxes: pd.DataFrame, *, ioa_thr: float, images_per_chunk: int = 20000) -> RelationStats:
    """Count co-occurrence and surround statistics over all images of a ``boxes`` table (filter it to the
    training split first). Memory is bounded by ``images_per_chunk`` images' box pairs."""
    labels, lab = np.unique(boxes["label"].to_numpy().astype(str), return_inverse=True)
    img, img_u = pd.factorize(boxes["image_id"].to_numpy())
    n_lab, n_img = len(labels), len(img_u)
    # per-image class presence X and box counts Y (dense over chunks of images)
    mats = {name: np.zeros((n_lab, n_lab), dtype=np.int64) for name in _MATRICES}
    class_count = np.zeros(n_lab, dtype=np.int64)
    xy = boxes[list(BOX_COLUMNS)].to_numpy(np.float64)
    order = np.argsort(img, kind="stable")
    img_s = img[order]
    bounds = np.searchsorted(img_s, np.arange(0, n_img + images_per_chunk, images_per_chunk))
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = order[a:b]
        if len(rows) == 0:
            continue
        ci = img[rows] - img[rows].min()
        n_c = int(ci.max()) + 1
        y = np.zeros((n_c, n_lab), dtype=np.int64)
        np.add.at(y, (ci, lab[rows]), 1)
        x = (y > 0).astype(np.int64)
        class_count += x.sum(0)
        mats["cooc"] += x.T @ x
        mats["inner_total"] += x.T @ y          # [a, b]: boxes of b in images with a
        mats["outer_total"] += y.T @ x          # [a, b]: boxes of a in images with b
        # box pairs of the same image, different classes: inner box q, outer box p
        df = pd.DataFrame({"img": ci, "row": np.arange(len(rows))})
        pairs = df.merge(df, on="img", suffixes=("_p", "_q"))
        p, q = pairs["row_p"].to_numpy(), pairs["row_q"].to_numpy()
        lp, lq = lab[rows][p], lab[rows][q]
        keep = lp != lq
        p, q, lp, lq = p[keep], q[keep], lp[keep], lq[keep]
        ins = paired_ioa(xy[rows][q], xy[rows][p]) >= ioa_thr
        # inside[a, b]: distinct inner boxes q (class b) inside some box of class a
        u = np.unique(np.stack([q[ins], lp[ins]], 1), axis=0)
        if len(u):
            np.add.at(mats["inside"], (u[:, 1], lab[rows][u[:, 0]]), 1)
        # contains[a, b]: distinct outer boxes p (class a) containing some box of class b
        u = np.unique(np.stack([p[ins], lq[ins]], 1), axis=0)
        if len(u):
            np.add.at(mats["contains"], (lab[rows][u[:, 0]], u[:, 1]), 1)
    for name in ("cooc", "inner_total", "outer_total", "inside", "contains"):
        np.fill_diagonal(mats[name], 0)
    return RelationStats(labels=tuple(labels.tolist()), n_images=n_img, class_count=class_count, ioa_thr=ioa_thr,
                         **mats)


def rescore(dets: pd.DataFrame, stats: RelationStats, *, conf_thr: float, cooc_weight: float,
            surround_thr: float, min_support: int, boost: float, penalty: float) -> pd.DataFrame:
    """Rescore a ``detections`` table with ``stats`` (see module doc). Rows, order and boxes are unchanged;
    only ``score`` changes. Labels unknown to ``stats`` are left alone."""
    if len(dets) == 0:
        return dets.copy()
    out = dets.reset_index(drop=True).copy()
    li = pd.Index(stats.labels).get_indexer(out["label"]).astype(np.int64)  # -1: a label unknown to stats
    img, _ = codes(out["image_id"])
    score = out["score"].to_numpy(np.float64).copy()
    known = li >= 0
    # ---- co-occurrence
    t = pd.DataFrame({"img": img[known], "lab": li[known], "s": score[known]})
    m = t.groupby(["img", "lab"], sort=False)["s"].max().reset_index()
    conf = m[m["s"] >= conf_thr]
    if cooc_weight > 0 and len(conf):
        pairs = m.merge(conf, on="img", suffixes=("", "_j"))
        pairs = pairs[pairs["lab"] != pairs["lab_j"]]
        if len(pairs):
            cond = stats.conditional()
            pairs = pairs.assign(t=pairs["s_j"].to_numpy() * cond[pairs["lab"].to_numpy(), pairs["lab_j"].to_numpy()])
            tgt = pairs.groupby(["img", "lab"], sort=False).agg(t=("t", "max"), m=("s", "first")).reset_index()
            tgt = tgt[(tgt["t"] > tgt["m"]) & (tgt["m"] > 0)]
            fac = (tgt["m"] + cooc_weight * (tgt["t"] - tgt["m"])) / tgt["m"]
            key = pd.MultiIndex.from_arrays([tgt["img"], tgt["lab"]])
            f = pd.Series(fac.to_numpy(), index=key).reindex(pd.MultiIndex.from_arrays([img, li])).to_numpy()
            score = np.where(np.isnan(f), score, score * np.nan_to_num(f, nan=1.0))
    # ---- surround / being surrounded
    respect = np.zeros(len(out), dtype=bool)
    applies = np.zeros(len(out), dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        r_in = np.where(stats.inner_total >= min_support, stats.inside / stats.inner_total, 0.0)
        r_out = np.where(stats.outer_total >= min_support, stats.contains / stats.outer_total, 0.0)
    xy = out[list(BOX_COLUMNS)].to_numpy(np.float64)
    confident = np.flatnonzero(known & (out["score"].to_numpy() >= conf_thr))
    for ratio, det_is_inner in ((r_in, True), (r_out, False)):
        a_idx, b_idx = np.nonzero(ratio >= surround_thr)           # rule (outer a, inner b)
        if len(a_idx) == 0 or len(confident) == 0:
            continue
        # rule table keyed by the rescored box's class -> the other class
        mine, other = (b_idx, a_idx) if det_is_inner else (a_idx, b_idx)
        rules = pd.DataFrame({"lab": mine, "other": other})
        d = pd.DataFrame({"row": np.flatnonzero(known), "img": img[known], "lab": li[known]}).merge(rules, on="lab")
        c = pd.DataFrame({"crow": confident, "img": img[confident], "other": li[confident]})
        pr = d.merge(c, on=["img", "other"])
        pr = pr[pr["row"] != pr["crow"]]
        if len(pr) == 0:
            continue
        inner, outer = (pr["row"], pr["crow"]) if det_is_inner else (pr["crow"], pr["row"])
        ok = paired_ioa(xy[inner.to_numpy()], xy[outer.to_numpy()]) >= stats.ioa_thr
        rows = pr["row"].to_numpy()
        applies[rows] = True
        respect[rows[ok]] = True
    score = np.where(respect, score * (1 + boost), np.where(applies, score * (1 - penalty), score))
    out["score"] = score
    return out
