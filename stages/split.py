"""Split labelled images into train / val_a / val_b, with the validation sets mined to match the whole dataset's
class distribution (the paper's two tuning sets).

Method: iterative stratification (rarest class first, each image goes to the part that still needs that class
most), then a seeded local search that swaps images between a validation part and train while the
Jensen-Shannon divergence of the parts' class frequencies against the whole keeps falling.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats.io import read_table, write_json, write_table

log = logging.getLogger(__name__)
PARTS = ("train", "val_a", "val_b")


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two count or probability vectors."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    p = p / p.sum() if p.sum() > 0 else p
    q = q / q.sum() if q.sum() > 0 else q
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    return float(0.5 * (kl_p + kl_q))


def class_counts(boxes: pd.DataFrame, image_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """[n_images, n_classes] box counts per image and class (rows in ``image_ids`` order)."""
    labels = sorted(boxes["label"].unique())
    img_idx = pd.Index(image_ids)
    r = img_idx.get_indexer(boxes["image_id"])
    c = pd.Index(labels).get_indexer(boxes["label"])
    keep = r >= 0
    m = np.zeros((len(image_ids), len(labels)), np.float64)
    np.add.at(m, (r[keep], c[keep]), 1.0)
    return m, labels


@dataclass(frozen=True)
class SplitResult:
    assignment: np.ndarray      # part index per image
    divergence: dict[str, float]


def stratified_split(counts: np.ndarray, fractions: Sequence[float], *, seed: int,
                     mining_iters: int = 2000) -> SplitResult:
    """Assign each row of ``counts`` ([n_images, n_classes]) to a part, matching class distributions."""
    rng = np.random.default_rng(seed)
    n, k = counts.shape
    f = np.asarray(fractions, np.float64)
    f = f / f.sum()
    sizes = np.floor(f * n).astype(int)
    sizes[0] += n - sizes.sum()
    need_imgs = sizes.astype(np.float64)
    need = f[:, None] * counts.sum(0)[None, :]          # [parts, classes] boxes still wanted
    assign = np.full(n, -1)
    order_classes = np.argsort(counts.astype(bool).sum(0), kind="stable")  # rarest first
    for c in order_classes:
        rows = np.flatnonzero((counts[:, c] > 0) & (assign < 0))
        rng.shuffle(rows)
        for r in rows:
            open_parts = np.flatnonzero(need_imgs > 0)
            if len(open_parts) == 0:
                open_parts = np.arange(len(f))
            score = need[open_parts, c] + 1e-6 * need_imgs[open_parts]
            s = open_parts[int(np.argmax(score))]
            assign[r] = s
            need[s] -= counts[r]
            need_imgs[s] -= 1
    rest = np.flatnonzero(assign < 0)
    rng.shuffle(rest)
    for r in rest:
        s = int(np.argmax(need_imgs))
        assign[r] = s
        need_imgs[s] -= 1

    total = counts.sum(0)
    part_counts = np.stack([counts[assign == s].sum(0) for s in range(len(f))])

    def cost(pc: np.ndarray) -> float:
        return sum(js_divergence(pc[s], total) for s in range(len(f)))

    cur = cost(part_counts)
    for _ in range(mining_iters):
        s = int(rng.integers(1, len(f)))                  # a validation part
        a = rng.choice(np.flatnonzero(assign == s))
        b = rng.choice(np.flatnonzero(assign == 0))
        delta = counts[b] - counts[a]
        if not delta.any():
            continue
        pc = part_counts.copy()
        pc[s] += delta
        pc[0] -= delta
        new = cost(pc)
        if new < cur:
            assign[a], assign[b] = 0, s
            part_counts, cur = pc, new
    div = {PARTS[s] if len(f) == 3 else str(s): js_divergence(part_counts[s], total) for s in range(len(f))}
    return SplitResult(assignment=assign, divergence=div)


def random_split(n: int, fractions: Sequence[float], *, seed: int) -> np.ndarray:
    f = np.asarray(fractions, np.float64) / np.sum(fractions)
    sizes = np.floor(f * n).astype(int)
    sizes[0] += n - sizes.sum()
    assign = np.repeat(np.arange(len(f)), sizes)
    return np.random.default_rng(seed).permutation(assign)


def split(*, images: pd.DataFrame, boxes: pd.DataFrame, fractions: Sequence[float] = (0.8, 0.1, 0.1),
          seed: int = 0, mining_iters: int = 2000) -> tuple[pd.DataFrame, dict]:
    """Return the ``splits`` table and a report (divergence of each part vs the whole, and a random split's)."""
    if len(fractions) != len(PARTS):
        raise ValueError(f"need {len(PARTS)} fractions, got {fractions}")
    ids = sorted(images["image_id"])
    if len(ids) < 3:
        raise InputError(f"need at least 3 labelled images to split, got {len(ids)}", field="image_id")
    counts, _ = class_counts(boxes, ids)
    res = stratified_split(counts, fractions, seed=seed, mining_iters=mining_iters)
    total = counts.sum(0)
    rnd = random_split(len(ids), fractions, seed=seed)
    rnd_div = {PARTS[s]: js_divergence(counts[rnd == s].sum(0), total) for s in range(len(PARTS))}
    table = pd.DataFrame({"image_id": ids, "split": [PARTS[s] for s in res.assignment]})
    report = {"images": {p: int((res.assignment == s).sum()) for s, p in enumerate(PARTS)},
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
    p.add_argument("--mining-iters", type=int, default=2000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", type=Path, required=True)
    a = p.parse_args(argv)
    table, report = split(images=read_table(a.images, "images"), boxes=read_table(a.boxes, "boxes"),
                          fractions=a.fractions, seed=a.seed, mining_iters=a.mining_iters)
    write_table(a.out, table, "splits", provenance={"stage": "split", "seed": a.seed})
    write_json(a.report, report)
    d = report["js_divergence"]
    r = report["random_split_js_divergence"]
    print(f"split: {report['images']}; JS vs whole: val_a {d['val_a']:.4f} (random {r['val_a']:.4f}), "
          f"val_b {d['val_b']:.4f} (random {r['val_b']:.4f})")


if __name__ == "__main__":
    raise SystemExit(main())
