"""The auto ensemble (MMfruit §4.2): apply a tree of ensemble operators, or search one on validation data.

    python -m stages.autoensemble apply --tree tree.json --leaves NAME=PATH ... --classes classes.parquet \\
        --out out.parquet [--split-ids splits.parquet --split val_a]

    python -m stages.autoensemble search --search-leaves NAME=PATH ... --check-leaves NAME=PATH ... \\
        --boxes boxes.parquet --image-labels image_labels.parquet --hierarchy hierarchy.parquet \\
        --classes classes.parquet --split-ids splits.parquet --search-split val_a --check-split val_b \\
        --out-tree tree.json --log search.jsonl --scores scores.json [--max-candidates 200] [--seed 0] ...

Leaves are post-processed detections tables (one per model, test-time variant, expert or naive group), named on
the command line; the tree JSON names them (format: ``workflow/schemas/autoensemble_tree.schema.yaml`` and
stages/ops/README.md). Every leaf must hold the same split (the ``split`` in its provenance chain and, with
``--split-ids``, only that split's images) and only classes of the class list.

The search (:class:`Search`) is scored in process with the challenge metric on the search split:

1. tree shape, every node with the default operators (equal child weights): each leaf alone, then the leaves
   inserted best-first, each at the edge of the current tree where the mAP is highest, then passes that take
   out one leaf at a time (worst first) and put it back where it scores best, while that improves the mAP;
2. operators on the fixed shape: node by node, parents before children, an optuna TPE study (seeded) over the
   node's operators with the others fixed, starting from the current ones; passes until the budget is spent or
   a pass brings no gain;
3. the ``--confirm-top`` best trees of the search split are scored on the check split and one is chosen by
   ``--choice``: ``mean`` (highest mean of the two mAPs) or ``guard`` (highest search-split mAP among those
   whose check-split mAP is within ``--guard`` of the best check-split mAP among them).

Every candidate differs from the current best in one node or one leaf's place, so the subtree cache
(:class:`stages.ops.tree_merge.TreeRunner`) recomputes only the changed paths. Leaves are read once, kept as
compact arrays and cut down to the (image, class) pairs the metric scores (:func:`evaluated_only`); the ground
truth is prepared once per split. Every scored candidate is
appended to the JSONL log; a search started again with the same log and settings replays the logged scores
(no recomputation) and continues where it stopped, to the same result for a ``--max-candidates`` budget
(a ``--max-minutes`` budget stops where the time runs out, so it is not reproducible).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.cli import add_config_args, stage_main
from stages.core.config import schema_default
from stages.core.errors import InputError
from stages.formats.experts import read_expert_targets
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import read_json, read_provenance, write_json
from stages.formats.readers import (
    read_boxes,
    read_classes,
    read_image_labels,
    read_predictions,
    split_image_ids,
)
from stages.formats.stream import TableWriter
from stages.metrics.detection import PreparedGroundTruth, evaluate_detections, prepare_ground_truth
from stages.ops.ensemble_tree import Node, Tree, insert_leaf, make_node, parse_tree, remove_leaf, renumber
from stages.ops.tree_merge import Dets, TreeRunner, to_dets

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- leaves


def parse_named_paths(items: Sequence[str], flag: str) -> dict[str, Path]:
    """``NAME=PATH`` arguments -> {name: path} (InputError naming ``flag`` when malformed or repeated)."""
    out: dict[str, Path] = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise InputError(f"expected NAME=PATH, not {it!r}", field=flag)
        if name in out:
            raise InputError(f"leaf name {name!r} given twice", field=flag)
        out[name] = Path(path)
    return out


def declared_split(provenance: Mapping) -> str | None:
    """The ``split`` named in a table's provenance chain (``upstream`` records), or None."""
    while isinstance(provenance, Mapping):
        if isinstance(provenance.get("split"), str):
            return provenance["split"]
        provenance = provenance.get("upstream")
    return None


def load_leaves(paths: Mapping[str, Path], *, labels: pd.Index, split: str | None = None,
                split_images: np.ndarray | None = None) -> tuple[dict[str, Dets], pd.Index]:
    """Read and check the leaves of one split; returns their :class:`Dets` and the image index (the split's
    images when given, else the leaves' images), sorted."""
    declared = {}
    for name, p in paths.items():
        s = declared_split(read_provenance(p))
        if s is not None:
            if split is not None and s != split:
                raise InputError(f"leaf {name!r} holds split {s!r}, not {split!r}", file=p, field="split")
            other = next((n for n, t in declared.items() if t != s), None)
            if other is not None:
                raise InputError(f"leaf {name!r} holds split {s!r} but leaf {other!r} holds {declared[other]!r}",
                                 file=p, field="split")
            declared[name] = s
    known = set(labels)
    frames = {name: read_predictions(p, known) for name, p in paths.items()}
    ids = split_images if split_images is not None else np.concatenate(
        [f["image_id"].to_numpy(dtype=object) for f in frames.values()] or [np.zeros(0, dtype=object)])
    images = pd.Index(np.unique(np.asarray(ids, dtype=object)), dtype=object)
    dets = {name: to_dets(f, images=images, labels=labels, source=paths[name]) for name, f in frames.items()}
    return dets, images


def evaluated_only(d: Dets, *, images: pd.Index, gt: PreparedGroundTruth) -> Dets:
    """The rows of ``d`` whose (image, class) the metric scores. Every operator works within one image and
    class, so a tree's mAP is the same with or without the others (unless ``max_per_image`` caps the
    output: it counts every class of an image)."""
    n = gt.n_classes
    img = gt.image_index.get_indexer(images)[d.key // n]
    ok = img >= 0
    ok[ok] = gt.is_evaluated(img[ok] * n + d.key[ok] % n)
    return d.take(np.flatnonzero(ok))


def _in_file(exc: InputError, source: object) -> InputError:
    return exc if exc.file is not None else InputError(exc.message, file=source, row=exc.row, field=exc.field)


# -------------------------------------------------------------------------------------------------- apply


def apply_main(a: argparse.Namespace) -> None:
    paths = parse_named_paths(a.leaves, "--leaves")
    tree = parse_tree(read_json(a.tree), source=a.tree, leaves=set(paths))
    unused = sorted(set(paths) - set(tree.leaves))
    if unused:
        log.warning("leaves not in the tree (not read): %s", unused)
    classes = read_classes(a.classes)
    labels = pd.Index(classes["label"].to_numpy(dtype=object), dtype=object)
    split_images = split_image_ids(a.split_ids, a.split) if a.split_ids else None
    t0 = time.perf_counter()
    dets, images = load_leaves({n: paths[n] for n in tree.leaves}, labels=labels, split=a.split,
                               split_images=split_images)
    runner = TreeRunner(dets, images=images, labels=labels, cache_bytes=0, max_per_class=a.max_per_class)
    try:
        out = runner.frame(tree)
    except InputError as exc:
        raise _in_file(exc, a.tree) from exc
    prov = {"stage": "autoensemble", "tree": str(a.tree), "tree_key": tree.key(), "split": a.split,
            "max_per_class": a.max_per_class,
            "leaves": {n: str(paths[n]) for n in tree.leaves}}
    with TableWriter(a.out, "detections", provenance=prov) as w:
        w.write(out)
    print(f"autoensemble apply: {len(tree.leaves)} leaves, {sum(len(d.key) for d in dets.values())} -> "
          f"{w.rows} detections in {time.perf_counter() - t0:.2f} s -> {a.out}")


# ------------------------------------------------------------------------------------------------- search


@dataclass
class Split:
    """One split's leaves (in a :class:`TreeRunner`) and its prepared ground truth."""

    name: str
    runner: TreeRunner
    gt: PreparedGroundTruth

    def score(self, tree: Tree) -> float:
        """mAP of the tree's output."""
        return float(evaluate_detections(gt=self.gt, detections=self.runner.frame(tree)).map)


def _default(key: str):
    return schema_default("autoensemble", key)


@dataclass(frozen=True)
class SearchSettings:
    """Knobs of :class:`Search`: the keys of the config's ``autoensemble`` section (and CLI flags) of the same
    names, with the schema's defaults and descriptions. A budget must be given: candidates (reproducible)
    and/or minutes; 0 is no limit (for ``max_per_image`` too)."""

    seed: int = _default("seed")
    max_candidates: int = _default("max_candidates")
    max_minutes: float = _default("max_minutes")
    shape_share: float = _default("shape_share")
    node_trials: int = _default("node_trials")
    confirm_top: int = _default("confirm_top")
    choice: str = _default("choice")
    guard: float = _default("guard")
    max_per_image: int = _default("max_per_image")

    def __post_init__(self):
        if not self.max_candidates and not self.max_minutes:
            raise ValueError("give a budget: max_candidates and/or max_minutes")
        if self.choice not in ("mean", "guard"):
            raise ValueError(f"choice must be 'mean' or 'guard', not {self.choice!r}")
        if not 0 < self.shape_share <= 1:
            raise ValueError(f"shape_share must be in (0, 1], not {self.shape_share}")

    def fingerprint(self) -> dict:
        """What decides the search's path (the budget does not: a resumed search may be given more)."""
        d = dataclasses.asdict(self)
        for k in ("max_candidates", "max_minutes", "confirm_top", "choice", "guard"):
            del d[k]
        return d


class SearchLog:
    """Append-only JSONL: a header line (what the search depends on), then one line per scored candidate.
    A line cut short by a kill is dropped when the log is opened again. A log of another search (header) is an
    error, or with ``restart`` set aside as ``<path>.stale`` for a fresh start."""

    def __init__(self, path: Path, header: dict, *, restart: bool = False):
        self.path = path
        self.scores: dict[tuple[str, str], tuple[float, float]] = {}   # (split, tree key) -> (mAP, elapsed s)
        if path.exists() and path.stat().st_size:
            other = self._other_search(header)
            if other is None:
                self._read()
            elif restart:
                log.warning("%s; set aside as %s.stale, starting afresh", other, path)
                os.replace(path, f"{path}.stale")
            else:
                raise other
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(json.dumps({"header": header}) + "\n")

    def _other_search(self, header: dict) -> InputError | None:
        """Why the log is not this search's (its header line), or None."""
        with open(self.path, "rb") as f:
            line = f.readline()
        try:
            first = json.loads(line)["header"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            first = None
        if not isinstance(first, dict):
            return InputError("not a search log (no header line)", file=self.path, row=1)
        diff = next((k for k in sorted(set(first) | set(header)) if first.get(k) != header.get(k)), None)
        if diff is not None:
            return InputError("the log was written by a search with other settings or inputs; delete it to start "
                              "afresh", file=self.path, row=1, field=diff)
        return None

    def _read(self) -> None:
        raw = self.path.read_bytes()
        good = raw.rfind(b"\n") + 1
        lines = raw[:good].decode().splitlines()
        for i, ln in enumerate(lines[1:], start=2):
            try:
                r = json.loads(ln)
                self.scores[(r["split"], r["key"])] = (float(r["map"]), float(r["t"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise InputError(f"malformed log line: {exc}", file=self.path, row=i) from exc
        if good < len(raw):
            log.warning("%s: dropping a last line cut short (%d bytes)", self.path, len(raw) - good)
            with open(self.path, "r+b") as f:
                f.truncate(good)
        log.info("resuming: %d scored candidates in %s", len(self.scores), self.path)

    def add(self, record: dict) -> None:
        self.scores[(record["split"], record["key"])] = (record["map"], record["t"])
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class _BudgetSpent(Exception):
    pass


@dataclass
class Candidate:
    tree: Tree
    score: float
    order: int      # first evaluation index (ties go to the earlier candidate)
    stage: str


class Search:
    """The two-stage search (module doc) over ``leaves``; ``leaf_classes`` puts a class filter on the
    edge above those leaves (experts). Use :meth:`run`."""

    def __init__(self, *, search: Split, check: Split, leaves: Sequence[str], settings: SearchSettings,
                 log_path: Path, header: dict, leaf_classes: Mapping[str, Sequence[str]] | None = None,
                 restart_stale: bool = False):
        self.search, self.check, self.settings = search, check, settings
        self.leaves = list(leaves)
        self.leaf_classes = {k: tuple(v) for k, v in (leaf_classes or {}).items()}
        self.log = SearchLog(log_path, header, restart=restart_stale)
        self.n = 0
        self.computed = 0
        self.seen: dict[str, Candidate] = {}       # every tree scored on the search split, by key
        self.best: Candidate | None = None         # the best tree with all the leaves so far
        self._t, self._mark = 0.0, time.monotonic()

    # -- budget and bookkeeping
    def elapsed(self) -> float:
        return self._t + time.monotonic() - self._mark

    def _left(self, share: float = 1.0) -> bool:
        s = self.settings
        if s.max_candidates and self.n >= math.floor(share * s.max_candidates):
            return False
        return not s.max_minutes or self.elapsed() < share * s.max_minutes * 60

    def evaluate(self, tree: Tree, stage: str, split: Split | None = None) -> float:
        """mAP of ``tree`` on ``split`` (default the search split: one candidate of the budget)."""
        split = split or self.search
        key = tree.key()
        hit = self.log.scores.get((split.name, key))
        if hit is not None:
            score, self._t = hit[0], max(self._t, hit[1])
            self._mark = time.monotonic()
        else:
            t0 = time.monotonic()
            score = split.score(tree)
            self.computed += 1
            self._t, self._mark = self.elapsed(), time.monotonic()
            self.log.add({"split": split.name, "stage": stage, "key": key, "map": score, "t": round(self._t, 3),
                          "s": round(time.monotonic() - t0, 3), "tree": tree.to_json()})
        if split is self.search:
            self.n += 1
            if key not in self.seen:
                self.seen[key] = Candidate(tree, score, self.n, stage)
            full = len(tree.leaves) == len(self.leaves)
            if full and (self.best is None or score > self.best.score):
                self.best = self.seen[key]
            log.info("%s candidate %d%s: mAP %.5f (best full tree %s)%s", stage, self.n,
                     f"/{self.settings.max_candidates}" if self.settings.max_candidates else "", score,
                     "-" if self.best is None else f"{self.best.score:.5f}", "" if hit is None else " [logged]")
        return score

    def _filtered(self, tree: Tree) -> Tree:
        """``tree`` with the class filters of ``leaf_classes`` on the slots that hold those leaves."""
        nodes = {}
        for name, n in tree.nodes.items():
            cls = tuple(self.leaf_classes.get(c) for c in n.children)
            nodes[name] = n if cls == n.classes else dataclasses.replace(n, classes=cls)
        return Tree(tree.root, nodes, tree.max_per_image)

    # -- stage 1: shape
    def _best_insertion(self, tree: Tree, leaf: str) -> tuple[Tree, float] | None:
        best = None
        for v in list(tree.walk()):
            if not self._left(self.settings.shape_share):
                return best
            cand = self._filtered(insert_leaf(tree, leaf, v))
            s = self.evaluate(cand, "shape")
            if best is None or s > best[1]:
                best = (cand, s)
        return best

    def search_shape(self) -> Tree:
        mpi = self.settings.max_per_image or None
        alone = {leaf: self.evaluate(Tree(leaf, {}, mpi), "shape") for leaf in self.leaves}
        order = sorted(self.leaves, key=lambda x: (-alone[x], x))
        tree = Tree(order[0], {}, mpi)
        for leaf in order[1:]:
            found = self._best_insertion(tree, leaf)
            if found is None:       # stage-1 budget spent: the rest go above the root, unscored
                log.warning("shape budget spent: leaf %s joins at the root", leaf)
                tree = self._filtered(insert_leaf(tree, leaf, tree.root))
            else:
                tree = found[0]
        score = self.seen[tree.key()].score if tree.key() in self.seen else -math.inf
        improved = True
        while improved and self._left(self.settings.shape_share) and len(self.leaves) > 2:
            improved = False
            for leaf in reversed(order):
                found = self._best_insertion(self._filtered(remove_leaf(tree, leaf)), leaf)
                if found is not None and found[1] > score:
                    tree, score, improved = found[0], found[1], True
                if not self._left(self.settings.shape_share):
                    break
        return renumber(tree)

    # -- stage 2: operators
    def _tune_node(self, tree: Tree, name: str, trials: int, seed: int) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        node = tree.nodes[name]
        study = optuna.create_study(direction="maximize",
                                    sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, trials)))
        study.enqueue_trial(operator_params(node), skip_if_exists=False)

        def objective(trial: optuna.Trial) -> float:
            if not self._left():
                raise _BudgetSpent
            nodes = dict(tree.nodes)
            nodes[name] = suggest_node(trial, node)
            return self.evaluate(Tree(tree.root, nodes, tree.max_per_image), f"ops:{name}")

        try:
            study.optimize(objective, n_trials=trials)
        except _BudgetSpent:
            pass

    def search_operators(self, tree: Tree) -> Tree:
        # parents before children: the nodes nearest the root act on every box and hold the leaves that stage 1
        # placed last (the weakest alone, or those it had no budget left to place)
        inner = [v for v in tree.walk() if not tree.is_leaf(v)][::-1]
        visit = 0
        while inner and self._left():
            before = self.best.score
            for name in inner:
                if not self._left():
                    break
                self._tune_node(self.best.tree, name, self.settings.node_trials,
                                seed=self.settings.seed * 1_000_003 + visit)
                visit += 1
            if self.best.score <= before:
                break
        return self.best.tree

    # -- stage 3: confirmation
    def choose(self) -> tuple[Candidate, list[dict]]:
        full = [c for c in self.seen.values() if len(c.tree.leaves) == len(self.leaves)]
        ranked = sorted(full, key=lambda c: (-c.score, c.order))[: self.settings.confirm_top]
        rows = [{"key": c.tree.key(), "stage": c.stage, "search_map": c.score,
                 "check_map": self.evaluate(c.tree, "check", self.check)} for c in ranked]
        if self.settings.choice == "mean":
            pick = max(range(len(rows)), key=lambda i: ((rows[i]["search_map"] + rows[i]["check_map"]) / 2, -i))
        else:
            best_check = max(r["check_map"] for r in rows)
            pick = next(i for i, r in enumerate(rows) if r["check_map"] >= best_check - self.settings.guard)
        for i, r in enumerate(rows):
            r["chosen"] = i == pick
        return ranked[pick], rows

    def run(self) -> tuple[Tree, dict]:
        """Search, confirm, and describe: returns the chosen tree and a scores summary."""
        shape = self.search_shape()
        shape_score = self.evaluate(shape, "shape")
        # the same tree as the best full one so far, with its nodes renamed n1, n2, ... children first
        self.seen[shape.key()] = self.best = dataclasses.replace(self.seen[shape.key()], tree=shape)
        self.search_operators(shape)
        chosen, top = self.choose()
        tree = chosen.tree
        depth = tree.depths()
        vertices = {}
        for v in tree.walk():
            sub = Tree(v, {u: tree.nodes[u] for u in tree.walk(v) if not tree.is_leaf(u)}, tree.max_per_image)
            vertices[v] = {"leaf": tree.is_leaf(v), "depth": depth[v], "search_map": self.search.score(sub),
                           "check_map": self.check.score(sub)}
        summary = {
            "choice": self.settings.choice, "guard": self.settings.guard,
            "search_split": self.search.name, "check_split": self.check.name,
            "chosen": {"key": tree.key(), "tree": tree.to_json(), "search_map": chosen.score,
                       "check_map": next(r["check_map"] for r in top if r["chosen"])},
            "shape_only": {"key": shape.key(), "search_map": shape_score,
                           "check_map": self.evaluate(shape, "check", self.check)},
            "top": top, "vertices": vertices,
            "candidates": self.n, "computed": self.computed, "elapsed_s": round(self.elapsed(), 2),
        }
        return tree, summary


# search space of one node's operators (stage 2); the current operators are always tried first
WEIGHT_RANGE = (0.25, 4.0)
K_RANGE = (0, 8)
SCORE_WEIGHT_RANGE = (0.0, 0.2)
BOX_WEIGHT_RANGE = (0.4, 1.0)
IOU_RANGE = (0.3, 0.9)
SIGMA_RANGE = (0.1, 1.0)
DROPOUTS = ("none", "scores_0", "scores_1", "boxes_0", "boxes_1")
METHODS = ("adj_nms", "nms", "soft_nms", "soft_nms_linear", "none")


def operator_params(node: Node) -> dict:
    """The optuna parameters :func:`suggest_node` would ask for to rebuild ``node``'s operators."""
    p = {"w0": node.weights[0], "w1": node.weights[1], "merge": node.merge, "method": node.method}
    if node.merge == "vote":
        p["k"], p["dropout"] = node.k, node.dropout
        if node.k > 0:
            p["score_weight"], p["box_weight"] = node.score_weight, node.box_weight
    if node.merge == "keep_best" or node.dropout != "none":
        p["match_iou"] = node.match_iou
    if node.method != "none":
        p["iou_thr"] = node.iou_thr
    if node.method in ("adj_nms", "soft_nms"):
        p["sigma"] = node.sigma
    return p


def suggest_node(trial, node: Node) -> Node:
    """A node with ``node``'s children and class filters and operators drawn by an optuna ``trial``."""
    ops: dict = {"weights": [trial.suggest_float("w0", *WEIGHT_RANGE, log=True),
                             trial.suggest_float("w1", *WEIGHT_RANGE, log=True)],
                 "merge": trial.suggest_categorical("merge", ["vote", "keep_best"])}
    if ops["merge"] == "vote":
        ops["k"] = trial.suggest_int("k", *K_RANGE)
        if ops["k"] > 0:
            ops["score_weight"] = trial.suggest_float("score_weight", *SCORE_WEIGHT_RANGE)
            ops["box_weight"] = trial.suggest_float("box_weight", *BOX_WEIGHT_RANGE)
        ops["dropout"] = trial.suggest_categorical("dropout", DROPOUTS)
    if ops["merge"] == "keep_best" or ops.get("dropout", "none") != "none":
        ops["match_iou"] = trial.suggest_float("match_iou", *IOU_RANGE)
    ops["method"] = trial.suggest_categorical("method", METHODS)
    if ops["method"] != "none":
        ops["iou_thr"] = trial.suggest_float("iou_thr", *IOU_RANGE)
    if ops["method"] in ("adj_nms", "soft_nms"):
        ops["sigma"] = trial.suggest_float("sigma", *SIGMA_RANGE)
    ops = {k: round(v, 4) if isinstance(v, float) else v for k, v in ops.items()}    # readable trees
    ops["weights"] = [round(w, 4) for w in ops["weights"]]
    return make_node(node.children, classes=[None if c is None else list(c) for c in node.classes],
                     min_iou=node.min_iou, score_thr=node.score_thr, **ops)


def file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def search_main(a: argparse.Namespace) -> None:
    s_paths = parse_named_paths(a.search_leaves, "--search-leaves")
    c_paths = parse_named_paths(a.check_leaves, "--check-leaves")
    for flag, x, y in (("--check-leaves", s_paths, c_paths), ("--search-leaves", c_paths, s_paths)):
        missing = sorted(set(x) - set(y))
        if missing:
            raise InputError(f"leaf {missing[0]!r} is missing (both splits need the same leaves)", field=flag)
    leaf_classes = {}
    for name, p in parse_named_paths(a.leaf_classes or [], "--leaf-classes").items():
        if name not in s_paths:
            raise InputError(f"{name!r} is not a leaf", field="--leaf-classes")
        leaf_classes[name] = read_expert_targets(p)   # an expert contributes its targets only
    settings = SearchSettings(**{k: getattr(a, k) for k in SearchSettings.__dataclass_fields__})
    classes = read_classes(a.classes)
    known = set(classes["label"])
    labels = pd.Index(classes["label"].to_numpy(dtype=object), dtype=object)
    unknown = sorted({c for v in leaf_classes.values() for c in v} - known)
    if unknown:
        raise InputError(f"class {unknown[0]!r} is not in the class list", field="--leaf-classes")
    hierarchy = Hierarchy.read(a.hierarchy, labels=classes["label"])
    boxes, image_labels = read_boxes(a.boxes, known), read_image_labels(a.image_labels, known)
    t0 = time.perf_counter()

    def split(name: str, paths: Mapping[str, Path]) -> Split:
        ids = split_image_ids(a.split_ids, name)
        dets, images = load_leaves(paths, labels=labels, split=name, split_images=ids)
        gt = prepare_ground_truth(boxes=boxes, image_labels=image_labels, hierarchy=hierarchy, classes=classes,
                                  image_ids=ids)
        if not (gt.num_gt > 0).any():
            raise InputError(f"split {name!r} has no ground-truth box: nothing to score", file=a.split_ids,
                             field="split")
        if not settings.max_per_image:
            dets = {k: evaluated_only(v, images=images, gt=gt) for k, v in dets.items()}
        return Split(name, TreeRunner(dets, images=images, labels=labels, cache_bytes=a.cache_mb << 20,
                                      max_per_class=a.max_per_class), gt)

    search, check = split(a.search_split, s_paths), split(a.check_split, c_paths)
    log.info("leaves and ground truth ready in %.1f s", time.perf_counter() - t0)
    inputs = {f"leaf {n}": [file_digest(s_paths[n]), file_digest(c_paths[n])] for n in sorted(s_paths)}
    inputs.update({k: file_digest(Path(getattr(a, k))) for k in ("boxes", "image_labels", "classes", "split_ids")})
    header = {"settings": settings.fingerprint(), "max_per_class": a.max_per_class,
              "splits": [a.search_split, a.check_split], "inputs": inputs,
              "leaf_classes": {k: list(v) for k, v in sorted(leaf_classes.items())}}
    s = Search(search=search, check=check, leaves=sorted(s_paths), settings=settings, log_path=a.log,
               header=header, leaf_classes=leaf_classes, restart_stale=a.stale_log == "restart")
    tree, summary = s.run()
    write_json(a.out_tree, tree.to_json())
    write_json(a.scores, summary)
    print(f"autoensemble search: {summary['candidates']} candidates ({summary['computed']} computed) in "
          f"{summary['elapsed_s']:.0f} s; chosen tree mAP {summary['chosen']['search_map']:.4f} on "
          f"{a.search_split}, {summary['chosen']['check_map']:.4f} on {a.check_split} -> {a.out_tree}")


# -------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.autoensemble", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ap = sub.add_parser("apply", help="run a tree over its leaves")
    ap.add_argument("--tree", required=True, type=Path)
    ap.add_argument("--leaves", required=True, nargs="+", metavar="NAME=PATH")
    ap.add_argument("--classes", required=True, type=Path, help="class list (classes parquet or challenge CSV)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--split-ids", type=Path, help="splits parquet: the leaves must hold only --split's images")
    ap.add_argument("--split", help="the split the leaves hold (checked against their provenance)")
    add_config_args(ap, "postprocess", ["max_per_class"])
    sp = sub.add_parser("search", help="search a tree on one split, confirm on another")
    sp.add_argument("--search-leaves", required=True, nargs="+", metavar="NAME=PATH")
    sp.add_argument("--check-leaves", required=True, nargs="+", metavar="NAME=PATH")
    for f in ("boxes", "image-labels", "hierarchy", "classes", "split-ids"):
        sp.add_argument(f"--{f}", required=True, type=Path)
    sp.add_argument("--search-split", required=True)
    sp.add_argument("--check-split", required=True)
    sp.add_argument("--leaf-classes", nargs="*", metavar="NAME=EXPERTS_JSON",
                    help="class filter above these leaves (stages.experts output: an expert's targets)")
    sp.add_argument("--out-tree", required=True, type=Path)
    sp.add_argument("--log", required=True, type=Path, help="JSONL search log (resumed when it exists)")
    sp.add_argument("--scores", required=True, type=Path, help="summary JSON")
    add_config_args(sp, "autoensemble", SearchSettings.__dataclass_fields__)
    add_config_args(sp, "postprocess", ["max_per_class"])
    sp.add_argument("--cache-mb", type=int, default=1024, help="node-output cache per split")
    sp.add_argument("--stale-log", choices=("error", "restart"), default="error",
                    help="a log written by a search with other settings or inputs: an error, or set aside "
                    "(renamed *.stale) to start afresh")
    a = p.parse_args(argv)
    if a.command == "apply" and a.split_ids and not a.split:
        p.error("--split-ids needs --split")
    if a.command == "search" and not a.max_candidates and not a.max_minutes:
        p.error("give a budget: --max-candidates and/or --max-minutes")
    return a


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    (apply_main if a.command == "apply" else search_main)(a)


if __name__ == "__main__":
    raise SystemExit(main())
