"""Node operators of the auto ensemble against slow references; the naive ensemble as the default two-leaf tree;
the subtree cache and the pruning to scored (image, class) pairs against plain recomputation."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from stages.autoensemble import Split, evaluated_only
from stages.formats.hierarchy import Hierarchy
from stages.metrics.detection import prepare_ground_truth
from stages.ops.ensemble import naive_ensemble
from stages.ops.ensemble_tree import Tree, insert_leaf, make_node, remove_leaf
from stages.ops.tree_merge import Dets, TreeRunner, merge, to_dets
from tests import autoensemble_data as ad
from tests import ops_reference as ref

LABELS = pd.Index(["/m/c0", "/m/c1", "/m/c2"], dtype=object)
IMAGES = pd.Index(["i0", "i1"], dtype=object)
COLS = ["image_id", "label", "score", "x_min", "y_min", "x_max", "y_max"]


def _table(rng, n, objects):
    """``n`` detections around ``objects`` (jittered copies, so boxes of two tables overlap) and some strays."""
    pick = rng.integers(0, len(objects), n)
    b = np.clip(objects[pick] + rng.normal(0, 0.04, (n, 4)), 0, 1)
    b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], 1)
    stray = rng.random(n) < 0.2
    b[stray] = ref.random_boxes(rng, int(stray.sum()))
    return pd.DataFrame({"image_id": IMAGES.to_numpy()[rng.integers(0, 2, n)],
                         "label": LABELS.to_numpy()[rng.integers(0, 3, n)], "score": rng.random(n),
                         "x_min": b[:, 0], "y_min": b[:, 1], "x_max": b[:, 2], "y_max": b[:, 3]})


def _pair(seed, n0=40, n1=35):
    rng = np.random.default_rng(seed)
    objects = ref.random_boxes(rng, 6)
    return _table(rng, n0, objects), _table(rng, n1, objects)


def _dets(df):
    return to_dets(df, images=IMAGES, labels=LABELS)


def _rows(d: Dets):
    """Rows as a sorted array (key, box, score) for order-free comparison."""
    a = np.column_stack([d.key.astype(np.float64), d.boxes, d.scores])
    return a[np.lexsort(a.T[::-1])]


def reference_merge(children, node):
    """The node operators (stages.ops.tree_merge module doc), one box at a time."""
    key, box, score, src = [], [], [], []
    for i, (d, w, cls) in enumerate(zip(children, node.weights, node.classes)):
        for r in range(len(d.key)):
            if cls is None or LABELS[d.key[r] % len(LABELS)] in cls:
                key.append(int(d.key[r]))
                box.append(d.boxes[r])
                score.append(d.scores[r] * w)
                src.append(i)
    m = len(key)
    box, score = np.array(box).reshape(-1, 4), np.array(score)
    nb, ns = box.copy(), score.copy()
    if node.merge == "vote" and node.k > 0:
        nb, ns = ref.vote(box, score, key, src, k=node.k, score_weight=node.score_weight,
                          box_weight=node.box_weight, min_iou=node.min_iou)

    def partners(i):
        return [j for j in range(m) if key[j] == key[i] and src[j] != src[i]
                and ref.iou(box[i], box[j]) > node.match_iou]

    alive = np.ones(m, dtype=bool)
    for i in range(m):
        if node.merge == "keep_best":
            alive[i] = not any(score[j] > score[i] or (score[j] == score[i] and j < i) for j in partners(i))
        elif node.dropout != "none" and partners(i):
            if src[i] != int(node.dropout[-1]):
                alive[i] = False
            elif node.dropout.startswith("scores"):
                ns[i] = score[i]
            else:
                nb[i] = box[i]
    idx = np.flatnonzero(alive)
    b, s, k = nb[idx], ns[idx], [key[i] for i in idx]
    if node.method == "none":
        out = {i: s[i] for i in range(len(s)) if s[i] > node.score_thr}
    elif node.method == "nms":
        out = {i: s[i] for i in ref.nms(b, s, k, node.iou_thr)}
    elif node.method in ("soft_nms", "soft_nms_linear"):
        out = ref.soft_nms(b, s, k, method="gaussian" if node.method == "soft_nms" else "linear",
                           thr=node.iou_thr, sigma=node.sigma, score_thr=node.score_thr)
    else:   # adj-NMS: NMS, then gaussian soft-NMS over the survivors
        kept = sorted(ref.nms(b, s, k, node.iou_thr))
        soft = ref.soft_nms(b[kept], s[kept], [k[i] for i in kept], method="gaussian", sigma=node.sigma,
                            score_thr=node.score_thr)
        out = {kept[i]: v for i, v in soft.items()}
    sel = sorted(out)
    return Dets(np.array([k[i] for i in sel], dtype=np.int64), b[sel].reshape(-1, 4),
                np.array([out[i] for i in sel]))


OPERATORS = [
    {},
    {"weights": [0.5, 2.0]},
    {"classes": [["/m/c0", "/m/c2"], None]},
    {"classes": [None, ["/m/c1"]], "weights": [1.0, 3.0]},
    {"merge": "keep_best", "match_iou": 0.4, "method": "none"},
    {"merge": "keep_best", "method": "nms", "iou_thr": 0.6, "weights": [0.7, 1.0]},
    {"dropout": "scores_0"},
    {"dropout": "scores_1", "k": 2, "match_iou": 0.3},
    {"dropout": "boxes_0", "match_iou": 0.3, "method": "nms"},
    {"dropout": "boxes_1", "score_weight": 0.2, "box_weight": 0.5},
    {"k": 1, "min_iou": 0.3, "method": "soft_nms", "sigma": 0.3},
    {"k": 0, "method": "soft_nms_linear", "iou_thr": 0.4},
    {"method": "nms", "iou_thr": 0.3},
    {"method": "none", "score_thr": 0.3},
]


@pytest.mark.parametrize("ops", OPERATORS, ids=[str(o) for o in OPERATORS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_node_matches_reference(ops, seed):
    a, b = _pair(seed)
    node = make_node(("a", "b"), **ops)
    kids = (_dets(a), _dets(b))
    got = merge(kids, node, n_classes=len(LABELS),
                class_masks=tuple(None if c is None else LABELS.isin(c) for c in node.classes))
    want = reference_merge(kids, node)
    assert len(got.key) == len(want.key) > 0
    np.testing.assert_allclose(_rows(got), _rows(want), rtol=0, atol=1e-12)
    img = got.key // len(LABELS)
    assert (np.diff(img) >= 0).all() and all((np.diff(got.scores[img == i]) <= 0).all() for i in range(2))


def test_operators_change_the_output():
    """Each operator tested above does something on these inputs (the reference test is not vacuous)."""
    a, b = _pair(0)
    kids = (_dets(a), _dets(b))
    default = _rows(merge(kids, make_node(("a", "b")), n_classes=3))
    for ops in OPERATORS[1:]:
        node = make_node(("a", "b"), **ops)
        masks = tuple(None if c is None else LABELS.isin(c) for c in node.classes)
        out = _rows(merge(kids, node, n_classes=3, class_masks=masks))
        assert out.shape != default.shape or not np.allclose(out, default), ops


def _runner(frames, **kw):
    return TreeRunner({n: _dets(f) for n, f in frames.items()}, images=IMAGES, labels=LABELS, **kw)


def _same(frame, want):
    got = frame.astype({"image_id": object, "label": object})[COLS].reset_index(drop=True)
    want = want[COLS].reset_index(drop=True).astype({"image_id": object, "label": object})
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_one_leaf_tree_is_the_leaf():
    a, _ = _pair(3)
    _same(_runner({"a": a}).frame(Tree("a", {})), a)


@pytest.mark.parametrize("seed", range(4))
def test_two_leaf_default_tree_is_the_naive_ensemble(seed):
    a, b = _pair(seed, 80, 60)
    r = _runner({"a": a, "b": b})
    _same(r.frame(Tree("n1", {"n1": make_node(("a", "b"))})), naive_ensemble([a, b], device="cpu"))
    # child weights are PFDet re-weighting with one AP for every class
    aps = [{c: 0.8 for c in LABELS}, {c: 0.2 for c in LABELS}]
    weighted = Tree("n1", {"n1": make_node(("a", "b"), weights=[1.0, 0.25])})
    _same(r.frame(weighted), naive_ensemble([a, b], ap_per_model=aps, device="cpu"))


def _top_per_key(keys: np.ndarray, scores: np.ndarray, cap: int) -> np.ndarray:
    """The rows among the ``cap`` best of their key, ascending (slow reference; ties: lower row first)."""
    top = []
    for k in np.unique(keys):
        top += sorted(np.flatnonzero(keys == k), key=lambda i: (-scores[i], i))[:cap]
    return np.array(sorted(top), dtype=np.int64)


@pytest.mark.parametrize("ops", [{}, {"merge": "keep_best", "method": "nms"}, {"dropout": "scores_0"}],
                         ids=["vote", "keep_best", "dropout"])
def test_node_cap_per_class(ops):
    """``max_per_class`` above every pool changes nothing; one that bites = the node on each pool's top boxes
    (the cap comes after the class filters and weights)."""
    a, b = _pair(5, 120, 100)
    node = make_node(("a", "b"), weights=[1.0, 0.6], **ops)
    kids = (_dets(a), _dets(b))
    plain = merge(kids, node, n_classes=3)
    np.testing.assert_array_equal(_rows(merge(kids, node, n_classes=3, max_per_class=220)), _rows(plain))
    keys = np.concatenate([kids[0].key, kids[1].key])
    scores = np.concatenate([kids[0].scores, kids[1].scores * 0.6])
    top = _top_per_key(keys, scores, 6)
    n0 = len(kids[0].key)
    want = merge((kids[0].take(top[top < n0]), kids[1].take(top[top >= n0] - n0)), node, n_classes=3)
    got = merge(kids, node, n_classes=3, max_per_class=6)
    np.testing.assert_array_equal(_rows(got), _rows(want))
    assert not np.array_equal(_rows(got), _rows(plain))
    r = _runner({"a": a, "b": b}, max_per_class=6)
    np.testing.assert_array_equal(_rows(r.output(Tree("n1", {"n1": node}))), _rows(got))


# ------------------------------------------------------------------------------- caching and pruning

EDITS = [{}, {"method": "nms", "iou_thr": 0.6}, {"weights": [0.5, 1.5]}, {"merge": "keep_best", "method": "none"},
         {"dropout": "boxes_1"}, {"k": 1, "score_weight": 0.2}, {"method": "soft_nms_linear"}]


@pytest.fixture(scope="module")
def scored():
    """Five leaves over 40 images and their prepared ground truth."""
    rng = np.random.default_rng(7)
    boxes, image_labels, dis = ad.scene(rng, n_images=40, n_labels=6, objects=3, distractors=4)
    names = ad.labels(6)
    labels = pd.Index(names, dtype=object)
    gt = prepare_ground_truth(boxes=boxes, image_labels=image_labels, classes=pd.DataFrame({"label": names,
                              "name": names}), hierarchy=Hierarchy.from_edges(
                              pd.DataFrame({"child": [], "parent": []}, dtype=object), labels=names))
    frames = ad.leaves(rng, boxes, dis, 5, per_image=10, n_labels=6)
    images = pd.Index(np.unique(np.concatenate([f["image_id"] for f in frames.values()])), dtype=object)
    return {n: to_dets(f, images=images, labels=labels) for n, f in frames.items()}, images, labels, gt


def _random_tree(rng, leaves):
    t = Tree(leaves[0], {})
    for leaf in leaves[1:]:
        t = insert_leaf(t, leaf, list(t.walk())[rng.integers(0, len(t.nodes) * 2 + 1)])
    return t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cache_recomputes_only_changed_paths_and_scores_the_same(scored, seed):
    dets, images, labels, gt = scored
    rng = np.random.default_rng(seed)
    cached = Split("a", TreeRunner(dets, images=images, labels=labels), gt)
    tiny = Split("a", TreeRunner(dets, images=images, labels=labels, cache_bytes=20_000), gt)   # evicts
    tree = _random_tree(rng, sorted(dets))
    done: set[str] = set()
    for step in range(14):
        edited = None
        if step:
            if rng.random() < 0.6:
                inner = sorted(tree.nodes)
                edited = inner[rng.integers(0, len(inner))]
                nodes = dict(tree.nodes)
                nodes[edited] = make_node(nodes[edited].children, **EDITS[rng.integers(0, len(EDITS))])
                tree = Tree(tree.root, nodes)
            else:
                leaf = sorted(dets)[rng.integers(0, len(dets))]
                rest = remove_leaf(tree, leaf)
                tree = insert_leaf(rest, leaf, list(rest.walk())[rng.integers(0, len(rest.nodes) * 2 + 1)])
        keys = tree.keys()
        new = {keys[v] for v in tree.nodes} - done
        before = cached.runner.computed
        s = cached.score(tree)
        assert cached.runner.computed - before == len(new)
        if edited is not None:
            assert len(new) <= tree.depths()[edited] + 1        # a one-node edit: at most its path to the root
        done |= new
        plain = Split("a", TreeRunner(dets, images=images, labels=labels, cache_bytes=0), gt)
        assert s == plain.score(tree) == tiny.score(tree)
        np.testing.assert_array_equal(_rows(cached.runner.output(tree)), _rows(plain.runner.output(tree)))


def test_one_node_edit_recomputes_exactly_its_path(scored):
    dets, images, labels, _ = scored
    runner = TreeRunner(dets, images=images, labels=labels)
    tree = _random_tree(np.random.default_rng(3), sorted(dets))
    runner.output(tree)
    depths = tree.depths()
    for v in sorted(tree.nodes):
        nodes = dict(tree.nodes)
        nodes[v] = dataclasses.replace(nodes[v], iou_thr=0.37)
        before = runner.computed
        runner.output(Tree(tree.root, nodes))
        assert runner.computed - before == depths[v] + 1


def test_pruning_to_scored_pairs_keeps_the_score(scored):
    dets, images, labels, gt = scored
    pruned = {n: evaluated_only(d, images=images, gt=gt) for n, d in dets.items()}
    assert sum(len(d.key) for d in pruned.values()) < sum(len(d.key) for d in dets.values())
    rng = np.random.default_rng(5)
    for _ in range(4):
        tree = _random_tree(rng, sorted(dets))
        nodes = {v: make_node(n.children, **EDITS[rng.integers(0, len(EDITS))]) for v, n in tree.nodes.items()}
        tree = Tree(tree.root, nodes)
        full = Split("a", TreeRunner(dets, images=images, labels=labels), gt).score(tree)
        assert full == Split("a", TreeRunner(pruned, images=images, labels=labels), gt).score(tree)
