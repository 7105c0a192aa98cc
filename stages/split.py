"""Split labelled images into train / val_a / val_b, with the validation sets mined to match the whole dataset's
class distribution (the paper's two tuning sets).

Method, vectorised over images (sparse image x class box counts; no loop over images):

1. Stratify, rarest class first (fewest images): the images containing the class that are still unassigned are
   dealt, in a seeded random order, to the parts in proportion to each part's remaining need of the class's
   boxes (a part that has all its images takes no more); images without a box fill the parts still short.
   Part sizes are then made exact by moving the images with the fewest classes.
2. Mine: swap batches of images between a validation part and train while the summed Jensen-Shannon divergence
   of the parts' class frequencies (box counts) against the whole falls. Each round ranks a sample of the
   images by the predicted change of the divergence if each moved alone (first and second order terms: one
   sparse product each); a batch of the best pairs is kept only if the exact divergence falls by a relative
   ``tol``, and its size doubles after a success and halves after a failure. At size one the best of the
   top k x top k pairs is found exactly, k growing after a failure; a part is done when k = 64 fails too.
   At most ``mining_iters`` rounds.

Image-level-only images (``images.box_annotated`` false) have no box ground truth to match: they all go to
train, and the box-annotated images are split exactly as they would be without them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import sparse

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats.columns import positions
from stages.formats.io import read_table, write_json, write_table

log = logging.getLogger(__name__)
PARTS = ("train", "val_a", "val_b")
_SAMPLE = 1 << 17   # images ranked per mining round, at most
_POOL = (8, 64)   # at batch size one, the top k x top k swaps are tried exactly: k from 8, doubling to 64


def js_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of each row of ``p`` [m, K] against ``q`` [K] (counts or
    probabilities) -> [m]."""
    p = np.atleast_2d(np.asarray(p, np.float64))
    q = np.asarray(q, np.float64).reshape(1, -1)
    ps = p.sum(1, keepdims=True)
    p = np.divide(p, ps, out=np.zeros_like(p), where=ps > 0)
    q = q / q.sum() if q.sum() > 0 else q
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(1)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(1)
    return 0.5 * (kl_p + kl_q)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two count or probability vectors."""
    return float(js_rows(np.asarray(p).ravel(), np.asarray(q).ravel())[0])


def _js_slope(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First derivative and (diagonal) second derivative of JS(p / sum p, q / sum q) in the counts ``p``."""
    s = p.sum()
    pn, qn = p / s + 1e-12, q / q.sum()
    m = 0.5 * (pn + qn)
    g = 0.5 * np.log2(pn / m)
    return (g - (pn * g).sum()) / s, qn / (4 * np.log(2) * pn * m) / s ** 2


def class_counts(boxes: pd.DataFrame, image_ids: Sequence[str]) -> tuple[sparse.csr_array, list[str]]:
    """Sparse [n_images, n_classes] box counts per image and class (rows in ``image_ids`` order, classes
    sorted); boxes of other images are ignored."""
    col, labels = pd.factorize(boxes["label"], sort=True)
    row = positions(boxes["image_id"], pd.Index(image_ids, dtype=object))
    keep = row >= 0
    m = sparse.csr_array((np.ones(int(keep.sum())), (row[keep], col[keep])), shape=(len(image_ids), len(labels)))
    m.sum_duplicates()
    return m, [str(v) for v in labels]


@dataclass(frozen=True)
class SplitResult:
    assignment: np.ndarray      # part index per image
    divergence: dict[str, float]


def _sizes(n: int, f: np.ndarray) -> np.ndarray:
    sizes = np.floor(f * n).astype(np.int64)
    sizes[0] += n - sizes.sum()
    return sizes


def _stratify(counts: sparse.csr_array, f: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rarest class first, deal the images containing it that are still unassigned to the parts in proportion
    to each part's remaining need of the class's boxes (parts that have their images are closed); then the
    images without a box to the parts short of images; then make part sizes exact (step 1 of the module doc)."""
    n, k = counts.shape
    csc = counts.tocsc()
    sizes = _sizes(n, f)
    need = f[:, None] * np.asarray(counts.sum(0)).ravel()[None, :]    # [parts, classes] boxes still wanted
    assign = np.full(n, -1, np.int64)
    filled = np.zeros(len(f), np.int64)
    tiebreak = rng.permutation(n)
    for c in np.argsort(np.diff(csc.indptr), kind="stable"):          # classes by images, rarest first
        rows = csc.indices[csc.indptr[c]:csc.indptr[c + 1]]
        boxes = csc.data[csc.indptr[c]:csc.indptr[c + 1]]
        todo = assign[rows] < 0
        if not todo.any():
            continue
        order = np.argsort(tiebreak[rows[todo]])
        rows, boxes = rows[todo][order], boxes[todo][order]
        want = np.where(filled < sizes, np.maximum(need[:, c], 0), 0)
        if want.sum() <= 0:
            want = np.maximum(sizes - filled, 0).astype(np.float64)
        part = np.searchsorted(np.cumsum(want) / want.sum() * boxes.sum(), np.cumsum(boxes) - 0.5 * boxes,
                               side="right")
        part = np.minimum(part, len(f) - 1)
        assign[rows] = part
        filled += np.bincount(part, minlength=len(f))
        for s in range(len(f)):
            if (part == s).any():
                need[s] -= np.asarray(counts[rows[part == s]].sum(0)).ravel()
    rest = np.flatnonzero(assign < 0)
    short = np.maximum(sizes - filled, 0)
    rest = rest[np.argsort(tiebreak[rest])]
    fill = np.repeat(np.arange(len(f)), short)[:len(rest)]
    assign[rest[:len(fill)]] = fill
    assign[rest[len(fill):]] = 0
    # exact part sizes: move the images with the fewest classes from the parts over their size
    weight = np.diff(counts.indptr)
    excess = np.bincount(assign, minlength=len(f)) - sizes
    movers = [np.flatnonzero(assign == s)[np.lexsort((tiebreak[assign == s], weight[assign == s]))][:e]
              for s, e in enumerate(excess) if e > 0]
    if movers:
        assign[np.concatenate(movers)] = np.repeat(np.flatnonzero(excess < 0), -excess[excess < 0])
    return assign


def _top(values: np.ndarray, members: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` members with the largest ``values``, largest first."""
    v = values[members]
    top = np.argpartition(-v, k - 1)[:k] if k < len(members) else np.arange(len(members))
    return members[top[np.argsort(-v[top], kind="stable")]]


def _mine(counts: sparse.csr_array, assign: np.ndarray, *, iters: int, tol: float,
          rng: np.random.Generator) -> np.ndarray:
    """Ranked batch swaps between each validation part and train (step 2 of the module doc). An image's rank is
    the predicted change of the divergence if it alone moved: first and (diagonal) second order terms, so an
    image whose many boxes of one class would overshoot ranks low. Each round ranks a sample of at most
    ``_SAMPLE`` images (every image of a smaller dataset), so a round costs the same at any size."""
    parts = int(assign.max()) + 1 if len(assign) else 0
    onehot = sparse.csr_array((np.ones(len(assign)), (assign, np.arange(len(assign)))),
                              shape=(parts, len(assign)))
    pc = np.asarray((onehot @ counts).todense(), np.float64)
    total = pc.sum(0)
    cost = js_rows(pc, total)
    squares = counts.multiply(counts).tocsr()
    batch = {s: max(1, int((assign == s).sum()) // 100) for s in range(1, parts)}   # 1: exact
    pool = {s: _POOL[0] for s in batch}
    for it in range(iters):
        open_parts = [s for s in batch if pool[s] <= _POOL[1]]
        if not open_parts:
            break
        s = open_parts[it % len(open_parts)]
        (g_s, h_s), (g_0, h_0) = _js_slope(pc[s], total), _js_slope(pc[0], total)
        stride = -(-len(assign) // _SAMPLE)      # every stride-th image from a random start: a fresh sample
        rows = np.arange(rng.integers(stride), len(assign), stride)
        lin, quad = counts[rows] @ (g_s - g_0), 0.5 * (squares[rows] @ (h_s + h_0))
        # predicted change of the divergence if an image of s leaves to train / an image of train joins s
        leave, join = quad - lin, quad + lin
        val, train = np.flatnonzero(assign[rows] == s), np.flatnonzero(assign[rows] == 0)
        exact = batch[s] == 1
        k = min(pool[s] if exact else batch[s], len(val), len(train))
        out, into = _top(-leave, val, k), _top(-join, train, k)
        if exact:   # every pair of the top candidates, exactly
            pairs = (counts[rows[into]].toarray()[None, :, :] - counts[rows[out]].toarray()[:, None, :]
                     ).reshape(k * k, -1)
            best = int(np.argmin(js_rows(pc[s] + pairs, total) + js_rows(pc[0] - pairs, total)))
            out, into, delta = out[best // k: best // k + 1], into[best % k: best % k + 1], pairs[best]
        else:       # the pairs predicted to help, together
            keep = int((leave[out] + join[into] < 0).sum())
            out, into = out[:keep], into[:keep]
            delta = counts[rows[into]].sum(0) - counts[rows[out]].sum(0) if keep else np.zeros_like(total)
        out, into = rows[out], rows[into]
        new = js_rows(np.stack([pc[s] + delta, pc[0] - delta]), total)
        if len(out) and new.sum() < (cost[s] + cost[0]) * (1 - tol):
            assign[out], assign[into] = 0, s
            pc[s] += delta
            pc[0] -= delta
            cost[s], cost[0] = new
            batch[s], pool[s] = min(2 * batch[s], _SAMPLE), _POOL[0]
        elif exact:
            pool[s] *= 2
        else:
            batch[s] //= 2
    return assign


def stratified_split(counts: sparse.csr_array | np.ndarray, fractions: Sequence[float], *, seed: int,
                     mining_iters: int = 2000, tol: float = 1e-4) -> SplitResult:
    """Assign each row of ``counts`` ([n_images, n_classes]) to a part, matching class distributions."""
    counts = sparse.csr_array(counts, dtype=np.float64)
    rng = np.random.default_rng(seed)
    f = np.asarray(fractions, np.float64)
    f = f / f.sum()
    assign = _mine(counts, _stratify(counts, f, rng), iters=mining_iters, tol=tol, rng=rng)
    total = counts.sum(0)
    div = {PARTS[s] if len(f) == 3 else str(s): js_divergence(counts[assign == s].sum(0), total)
           for s in range(len(f))}
    return SplitResult(assignment=assign, divergence=div)


def random_split(n: int, fractions: Sequence[float], *, seed: int) -> np.ndarray:
    f = np.asarray(fractions, np.float64) / np.sum(fractions)
    sizes = np.floor(f * n).astype(int)
    sizes[0] += n - sizes.sum()
    assign = np.repeat(np.arange(len(f)), sizes)
    return np.random.default_rng(seed).permutation(assign)


def split(*, images: pd.DataFrame, boxes: pd.DataFrame, fractions: Sequence[float] = (0.8, 0.1, 0.1),
          seed: int = 0, mining_iters: int = 2000) -> tuple[pd.DataFrame, dict]:
    """Return the ``splits`` table and a report (divergence of each part vs the whole, and a random split's).
    Images whose optional ``box_annotated`` is False go to train and take no part in the stratified split."""
    if len(fractions) != len(PARTS):
        raise ValueError(f"need {len(PARTS)} fractions, got {fractions}")
    all_ids = images["image_id"].to_numpy(dtype=object)
    annotated = images["box_annotated"].to_numpy(dtype=bool) if "box_annotated" in images.columns else \
        np.ones(len(all_ids), bool)
    weak = np.sort(all_ids[~annotated])
    ids = np.sort(all_ids[annotated])
    if len(ids) < 3:
        raise InputError(f"need at least 3 labelled images to split, got {len(ids)}", field="image_id")
    counts, _ = class_counts(boxes, ids)
    res = stratified_split(counts, fractions, seed=seed, mining_iters=mining_iters)
    total = counts.sum(0)
    rnd = random_split(len(ids), fractions, seed=seed)
    rnd_div = {PARTS[s]: js_divergence(counts[rnd == s].sum(0), total) for s in range(len(PARTS))}
    table = pd.DataFrame({"image_id": ids, "split": pd.Categorical.from_codes(res.assignment, PARTS)})
    if len(weak):
        table = pd.concat([table, pd.DataFrame({"image_id": weak, "split": pd.Categorical.from_codes(
            np.zeros(len(weak), np.int64), PARTS)})], ignore_index=True)
        order = np.argsort(table["image_id"].to_numpy(dtype=object), kind="stable")
        table = table.iloc[order].reset_index(drop=True)
    report = {"images": {p: int((res.assignment == s).sum()) + (len(weak) if s == 0 else 0)
                         for s, p in enumerate(PARTS)},
              "image_level_only_in_train": int(len(weak)),
              "js_divergence": res.divergence, "random_split_js_divergence": rnd_div,
              "classes_missing": {p: int(((counts[res.assignment == s].sum(0) == 0) & (total > 0)).sum())
                                  for s, p in enumerate(PARTS)}}
    return table, report


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.split", description=__doc__)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--boxes", type=Path, required=True)
    p.add_argument("--fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mining-iters", type=int, default=2000,
                   help="at most this many mining rounds (each tries a batch of swaps; see above)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", type=Path, required=True)
    a = p.parse_args(argv)
    cols = ["image_id"] + (["box_annotated"] if "box_annotated" in pq.read_schema(a.images).names else [])
    table, report = split(images=read_table(a.images, "images", columns=cols),
                          boxes=read_table(a.boxes, "boxes", columns=["image_id", "label"]),
                          fractions=a.fractions, seed=a.seed, mining_iters=a.mining_iters)
    write_table(a.out, table, "splits", provenance={"stage": "split", "seed": a.seed})
    write_json(a.report, report)
    d = report["js_divergence"]
    r = report["random_split_js_divergence"]
    print(f"split: {report['images']}; JS vs whole: val_a {d['val_a']:.2e} (random {r['val_a']:.2e}), "
          f"val_b {d['val_b']:.2e} (random {r['val_b']:.2e})")


if __name__ == "__main__":
    raise SystemExit(main())
