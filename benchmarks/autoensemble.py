"""Benchmark one auto-ensemble candidate evaluation (apply the changed path + the metric), with and without caching.

Synthetic data (``tests/autoensemble_data.py``): ``--leaves`` models x ``--images`` images x ``--per-image``
boxes over ``--classes`` synthetic MIDs. Candidates are the search's stage-2 steps: one random node of a fixed
8-leaf tree gets random operators from the search space. The same candidates are scored three ways, side by side:

- cached: leaves in memory in compact form, pruned to the (image, class) pairs the metric scores; ground truth
  prepared once; node outputs cached by subtree (only the edited node's path to the root is recomputed);
- no node cache: the same, but every node of the tree is recomputed;
- no caching: every candidate reads the leaf files, prepares the ground truth and runs the whole tree on the
  full leaves (what ``stages.autoensemble apply`` followed by ``stages.evaluate`` would do).

All three must give the same mAP for every candidate (checked). Prints candidates per minute.

    python benchmarks/autoensemble.py [--images 5000 --leaves 8 --per-image 100 --classes 500]
        [--candidates 20 --uncached 4] [--shape balanced|chain]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages import autoensemble as ae  # noqa: E402
from stages.formats.hierarchy import Hierarchy  # noqa: E402
from stages.formats.io import write_table  # noqa: E402
from stages.metrics.detection import prepare_ground_truth  # noqa: E402
from stages.ops.ensemble_tree import Tree, insert_leaf, make_node  # noqa: E402
from stages.ops.tree_merge import TreeRunner  # noqa: E402
from tests import autoensemble_data as ad  # noqa: E402


def shape(leaves: list[str], kind: str) -> Tree:
    if kind == "chain":             # best leaf on top, each worse one a level deeper
        t, prev = Tree(leaves[-1], {}), leaves[-1]
        for leaf in reversed(leaves[:-1]):
            t, prev = insert_leaf(t, leaf, prev), leaf
        return t
    level = list(leaves)            # balanced
    nodes, i = {}, 0
    while len(level) > 1:
        nxt = []
        for a, b in zip(level[::2], level[1::2]):
            i += 1
            nodes[f"n{i}"] = make_node((a, b))
            nxt.append(f"n{i}")
        level = nxt + ([level[-1]] if len(level) % 2 else [])
    return Tree(level[0], nodes)


def random_ops(rng: np.random.Generator) -> dict:
    """Operators drawn from the search space of :func:`stages.autoensemble.suggest_node`."""
    ops = {"weights": [float(np.exp(rng.uniform(*np.log(ae.WEIGHT_RANGE)))) for _ in range(2)],
           "merge": str(rng.choice(["vote", "keep_best"])), "method": str(rng.choice(ae.METHODS)),
           "iou_thr": float(rng.uniform(*ae.IOU_RANGE)), "sigma": float(rng.uniform(*ae.SIGMA_RANGE)),
           "match_iou": float(rng.uniform(*ae.IOU_RANGE))}
    if ops["merge"] == "vote":
        ops.update(k=int(rng.integers(ae.K_RANGE[0], ae.K_RANGE[1] + 1)), dropout=str(rng.choice(ae.DROPOUTS)),
                   score_weight=float(rng.uniform(*ae.SCORE_WEIGHT_RANGE)),
                   box_weight=float(rng.uniform(*ae.BOX_WEIGHT_RANGE)))
    return ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--leaves", type=int, default=8)
    p.add_argument("--per-image", type=int, default=100)
    p.add_argument("--classes", type=int, default=500)
    p.add_argument("--candidates", type=int, default=20, help="candidates timed with the caches")
    p.add_argument("--uncached", type=int, default=4, help="of those, timed without any caching")
    p.add_argument("--shape", choices=("balanced", "chain"), default="balanced")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    t0 = time.perf_counter()
    boxes, image_labels, dis = ad.scene(rng, n_images=a.images, n_labels=a.classes)
    frames = ad.leaves(rng, boxes, dis, a.leaves, per_image=a.per_image, n_labels=a.classes)
    names = ad.labels(a.classes)
    classes = pd.DataFrame({"label": names, "name": names})
    labels = pd.Index(names, dtype=object)
    hierarchy = Hierarchy.from_edges(pd.DataFrame({"child": [], "parent": []}, dtype=object), labels=names)
    tmp = tempfile.TemporaryDirectory()
    paths = {n: Path(tmp.name) / f"{n}.parquet" for n in frames}
    for n, f in frames.items():
        write_table(paths[n], f, "detections")
    n_rows = sum(len(f) for f in frames.values())
    del frames
    print(f"data: {a.leaves} leaves x {a.images} images x {a.per_image} boxes = {n_rows} detections, "
          f"{a.classes} classes, {len(boxes)} ground-truth boxes (built in {time.perf_counter() - t0:.1f} s)")

    def load(prune: bool) -> tuple[ae.Split, float]:
        t = time.perf_counter()
        dets, images = ae.load_leaves(paths, labels=labels)
        gt = prepare_ground_truth(boxes=boxes, image_labels=image_labels, hierarchy=hierarchy, classes=classes)
        if prune:
            dets = {k: ae.evaluated_only(v, images=images, gt=gt) for k, v in dets.items()}
        return ae.Split("bench", TreeRunner(dets, images=images, labels=labels), gt), time.perf_counter() - t

    cached, t_load = load(prune=True)
    kept = sum(len(d.key) for d in cached.runner.leaves.values())
    print(f"leaves loaded and pruned to scored (image, class) pairs once: {t_load:.1f} s, {kept} of {n_rows} "
          f"rows kept")
    nocache = ae.Split("bench", TreeRunner(cached.runner.leaves, images=cached.runner.images, labels=labels,
                                           cache_bytes=0), cached.gt)
    tree = shape(sorted(paths), a.shape)
    depth = tree.depths()
    t = time.perf_counter()
    base = cached.score(tree)
    print(f"tree ({a.shape}, depth {max(depth.values())}): default operators mAP {base:.4f}; "
          f"cold evaluation (every node) {time.perf_counter() - t:.2f} s")
    cands, path_len = [], []
    for _ in range(a.candidates):
        v = sorted(tree.nodes)[rng.integers(0, len(tree.nodes))]
        nodes = dict(tree.nodes)
        nodes[v] = make_node(nodes[v].children, **random_ops(rng))
        tree = Tree(tree.root, nodes)
        cands.append(tree)
        path_len.append(depth[v] + 1)

    def timed(split_of, trees):
        out, t = [], time.perf_counter()
        for tr in trees:
            out.append(split_of().score(tr))
        return out, time.perf_counter() - t

    s_cached, t_cached = timed(lambda: cached, cands)
    s_node, t_node = timed(lambda: nocache, cands)
    s_none, t_none = timed(lambda: load(prune=False)[0], cands[: a.uncached])
    assert s_cached == s_node and s_cached[: a.uncached] == s_none, "caching changed a score"
    rate = {k: 60 * n / t for k, n, t in (("cached", len(cands), t_cached), ("node", len(cands), t_node),
                                          ("none", a.uncached, t_none))}
    print(f"{len(cands)} candidates, one node edited each (mean path to the root: {np.mean(path_len):.2f} of "
          f"{len(tree.nodes)} nodes); best mAP {max(s_cached):.4f}; identical scores in all three modes")
    print(f"{'mode':<44}{'s/candidate':>12}{'candidates/min':>16}{'cached x faster':>17}")
    for key, label, t, n in (("cached", "cached (leaves, ground truth, subtrees)", t_cached, len(cands)),
                             ("node", "no subtree cache (leaves, ground truth kept)", t_node, len(cands)),
                             ("none", "no caching (read, prepare, run all, score)", t_none, a.uncached)):
        print(f"{label:<44}{t / n:>12.2f}{rate[key]:>16.1f}{rate['cached'] / rate[key]:>16.1f}x")
    tmp.cleanup()


if __name__ == "__main__":
    main()
