"""Expert mining by each of the paper's three definitions of confusion, on orchard-mini's classes with its planted
confusable pairs (3/8 and 1/7 share a colour): a linear classifier is trained on features in which a class's
colour speaks loudly and its glyph softly; its FC weights are the base model's classifier and its class
probabilities make the base model's detections on synthetic ground truth; the project's metric scores them (the
targets are the lowest-AP classes). Then: ``cosine`` and ``matrix`` find both pairs, ``siblings`` finds the one
the hierarchy groups (1/7: "Straight digit") and not the other (3 is a "Curvy digit", 8 a "Round digit").
Plus the confusion matrix against a slow reference loop and at its thresholds, and the CLI with bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from stages import experts
from stages.data import taxonomy as tx
from stages.formats.experts import read_experts
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import write_json, write_table
from stages.metrics.detection import evaluate_detections, prepare_ground_truth

LEAVES = sorted(tx.LEAVES)
PARTNER = {a: b for p in tx.CONFUSED_PAIRS for a, b in (p, p[::-1])}
HIERARCHY = Hierarchy.from_json_obj(tx.hierarchy_json())
CLASSES = pd.DataFrame({"label": [c.label for c in tx.CLASSES], "name": [c.name for c in tx.CLASSES]})
SLOTS = [(0.0, 0.3), (0.35, 0.65), (0.7, 1.0)]      # three objects side by side per image


def train_classifier(rng: np.random.Generator, *, dim: int = 16, per_class: int = 100):
    """A softmax classifier over the leaves (row 0: background) fitted by L-BFGS with an L2 penalty (a convex
    problem: one answer) on features ``colour prototype + 0.1 * glyph prototype + noise``. Returns (FC weight
    [C+1, D], bias [C+1], a function drawing the features of a list of class indices)."""
    colours = sorted({tx.BY_LABEL[c].color for c in LEAVES})
    colour_proto = rng.normal(0, 1, (len(colours), dim))
    glyph_proto = rng.normal(0, 1, (len(LEAVES), dim))
    colour_of = np.array([colours.index(tx.BY_LABEL[c].color) for c in LEAVES])

    def features(idx: np.ndarray, r: np.random.Generator) -> np.ndarray:
        return colour_proto[colour_of[idx]] + 0.1 * glyph_proto[idx] + r.normal(0, 0.5, (len(idx), dim))

    y = np.repeat(np.arange(len(LEAVES)), per_class)
    x = torch.tensor(features(y, rng))
    target = torch.tensor(y + 1)
    w = torch.zeros(len(LEAVES) + 1, dim, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(LEAVES) + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, target) + 0.01 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy(), features


@pytest.fixture(scope="module")
def base() -> dict:
    """The base model: classifier weights, its detections on 168 validation images (3 objects each, every leaf
    36 times) plus stray boxes over no object, the ground truth, and the per-class AP by the project's metric."""
    rng = np.random.default_rng(0)
    weight, bias, features = train_classifier(rng)
    cls = rng.permutation(np.repeat(np.arange(len(LEAVES)), 36))
    n = len(cls)
    img = np.repeat([f"v{i:03d}" for i in range(n // 3)], 3)
    slot = np.tile(np.arange(3), n // 3)
    x0 = np.array([SLOTS[s][0] for s in slot])
    x1 = np.array([SLOTS[s][1] for s in slot])
    gt = pd.DataFrame({"image_id": img, "label": [LEAVES[c] for c in cls], "x_min": x0, "y_min": 0.2,
                       "x_max": x1, "y_max": 0.8, "is_group_of": False})
    logits = features(cls, rng) @ weight.T + bias
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    box, k = np.nonzero(prob[:, 1:] >= 0.01)     # one detection per (object, class) scoring >= 0.01
    jitter = rng.uniform(-0.02, 0.02, (len(box), 4))
    dets = pd.DataFrame({"image_id": img[box], "label": [LEAVES[c] for c in k], "score": prob[box, k + 1],
                         "x_min": x0[box] + jitter[:, 0], "y_min": 0.2 + jitter[:, 1],
                         "x_max": x1[box] + jitter[:, 2], "y_max": 0.8 + jitter[:, 3]})
    # confident detections over no object (below every ground-truth box): they land nowhere
    stray = pd.DataFrame({"image_id": img[::3], "label": rng.choice(LEAVES, n // 3), "score": 0.9,
                          "x_min": 0.1, "y_min": 0.85, "x_max": 0.4, "y_max": 0.98})
    dets = pd.concat([dets, stray], ignore_index=True)
    labels = pd.DataFrame({"image_id": gt["image_id"], "label": gt["label"], "confidence": 1}).drop_duplicates()
    prepared = prepare_ground_truth(boxes=gt, image_labels=labels, hierarchy=HIERARCHY, classes=CLASSES)
    per_class = evaluate_detections(gt=prepared, detections=dets).per_class
    ap = dict(zip(per_class["label"], per_class["ap"]))
    return {"weight": weight, "gt": gt, "dets": dets, "ap": ap}


def mine(base: dict, confusion: str, **kw) -> dict:
    return experts.mine_experts(ap=base["ap"], fc_weight=base["weight"], labels=LEAVES, n_lowest=2, sim_thr=0.5,
                                confusion=confusion, hierarchy=HIERARCHY, detections=base["dets"],
                                boxes=base["gt"], confusion_thr=0.1, confusion_score_thr=0.3, **kw)


def test_the_confusable_classes_have_the_lowest_ap(base):
    leaf_ap = sorted((base["ap"][c], c) for c in LEAVES)
    assert {c for _, c in leaf_ap[:2]} <= set(PARTNER)
    assert np.mean([base["ap"][c] for c in PARTNER]) < min(base["ap"][c] for c in LEAVES if c not in PARTNER)


@pytest.mark.parametrize("confusion", ["cosine", "matrix"])
def test_cosine_and_matrix_find_both_planted_pairs(base, confusion):
    out = mine(base, confusion)
    targets = out["targets"]
    assert set(targets) <= set(PARTNER) and len(targets) == 2
    assert out["confusion"] == confusion
    assert out["negatives"] == sorted({PARTNER[t] for t in targets} - set(targets))
    for t in targets:
        if PARTNER[t] not in targets:
            assert list(out["similarity"][t]) == [PARTNER[t]]
    # every negative carries its cosine to the nearest target, and that target
    cos = experts.cosine_matrix(base["weight"])
    for c in out["negatives"]:
        t = out["nearest_target"][c]
        assert out["nearest_cosine"][c] == pytest.approx(cos[LEAVES.index(c), LEAVES.index(t)])
        assert out["nearest_cosine"][c] == pytest.approx(max(cos[LEAVES.index(c), LEAVES.index(u)]
                                                             for u in targets))
    # whichever confusable classes are the targets, both pairs are found
    for t in PARTNER:
        one = experts.mine_experts(ap={t: 0.0, **{c: 0.9 for c in LEAVES if c != t}}, fc_weight=base["weight"],
                                   labels=LEAVES, n_lowest=1, sim_thr=0.5, confusion=confusion,
                                   detections=base["dets"], boxes=base["gt"], hierarchy=HIERARCHY)
        assert one["targets"] == [t] and one["negatives"] == [PARTNER[t]], (t, one["similarity"])


def test_the_planted_pairs_by_their_measures(base):
    """The pair's FC cosine stands far above every other class's; half or so of a target's objects get a
    confident false positive of its partner; the measures are those the JSON carries."""
    cos = experts.cosine_matrix(base["weight"])
    for t, p in PARTNER.items():
        i = LEAVES.index(t)
        others = np.delete(cos[i], [i, LEAVES.index(p)])
        assert cos[i, LEAVES.index(p)] > 0.5 > others.max()
    shares, n_boxes = experts.confusion_shares(detections=base["dets"], boxes=base["gt"], targets=list(PARTNER),
                                               score_thr=0.3, hierarchy=HIERARCHY)
    for t, p in PARTNER.items():
        assert n_boxes[t] == 36
        assert max(shares[t], key=shares[t].get) == p and shares[t][p] >= 0.2
        assert all(v < 0.1 for c, v in shares[t].items() if c != p)
    out = mine(base, "matrix")
    t = out["targets"][0]
    assert out["similarity"][t] == {c: v for c, v in shares[t].items() if v >= 0.1}
    assert out["n_boxes"] == {u: 36 for u in out["targets"]}


def test_siblings_find_the_pair_the_hierarchy_groups(base):
    one, seven, three, eight = tx.digit_label(1), tx.digit_label(7), tx.digit_label(3), tx.digit_label(8)
    for t, expected in ((one, [seven]), (seven, [one]), (three, [tx.digit_label(5)])):
        out = experts.mine_experts(ap={t: 0.0, **{c: 0.9 for c in LEAVES if c != t}}, fc_weight=base["weight"],
                                   labels=LEAVES, n_lowest=1, sim_thr=0.5, confusion="siblings",
                                   hierarchy=HIERARCHY)
        assert out["negatives"] == expected
        assert eight not in out["negatives"]
        # siblings carry their FC cosine (the hierarchy gives no number)
        cos = experts.cosine_matrix(base["weight"])
        assert out["similarity"][t] == pytest.approx({c: cos[LEAVES.index(t), LEAVES.index(c)] for c in expected})
    # "Digit six" has two parents (Round, Even): its siblings are both families; the root is no parent (Pole's
    # siblings are under "Shape", not every top-level class)
    assert experts.sibling_classes(tx.digit_label(6), labels=LEAVES, hierarchy=HIERARCHY) == sorted(
        tx.digit_label(d) for d in (0, 8, 9, 2, 4))
    assert experts.sibling_classes(tx.POLE, labels=LEAVES, hierarchy=HIERARCHY) == [tx.FRAME]
    # only trained classes: a sibling the base model did not learn is no negative
    assert experts.sibling_classes(one, labels=[c for c in LEAVES if c != seven], hierarchy=HIERARCHY) == []


# ----- the confusion matrix -------------------------------------------------------------------------------------
def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_shares(dets, boxes, targets, score_thr, hierarchy, iou_thr=0.5):
    """The definition, one detection at a time."""
    def related(a, b):
        return a == b or (hierarchy is not None and (a in hierarchy.ancestors(b) or b in hierarchy.ancestors(a)))

    cols = ["x_min", "y_min", "x_max", "y_max"]
    landed = set()
    for d in dets.itertuples(index=False):
        if d.score < score_thr:
            continue
        here = [(i, b) for i, b in enumerate(boxes.itertuples(index=False)) if b.image_id == d.image_id]
        db = [getattr(d, c) for c in cols]
        if any(related(d.label, b.label) and _iou(db, [getattr(b, c) for c in cols]) >= iou_thr for _, b in here):
            continue
        best, best_iou = None, -1.0
        for i, b in here:
            v = _iou(db, [getattr(b, c) for c in cols])
            if not b.is_group_of and not related(d.label, b.label) and v >= iou_thr and v > best_iou:
                best, best_iou = i, v
        if best is not None:
            landed.add((best, d.label))
    out = {}
    for t in targets:
        own = [i for i, b in enumerate(boxes.itertuples(index=False)) if b.label == t and not b.is_group_of]
        counts = {}
        for i, c in landed:
            if i in own:
                counts[c] = counts.get(c, 0) + 1
        out[t] = {c: n / len(own) for c, n in counts.items()} if own else {}
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_shares_match_a_reference_loop(seed):
    rng = np.random.default_rng(seed)
    h = Hierarchy.from_edges(pd.DataFrame({"child": ["/m/b", "/m/c"], "parent": ["/m/p", "/m/p"]}),
                             labels=["/m/a", "/m/d"])
    labs = ["/m/a", "/m/b", "/m/c", "/m/d", "/m/p"]
    n = 60
    x0, y0 = rng.uniform(0, 0.6, n), rng.uniform(0, 0.6, n)
    boxes = pd.DataFrame({"image_id": rng.choice(["i0", "i1", "i2", "i3"], n), "label": rng.choice(labs[:4], n),
                          "x_min": x0, "y_min": y0, "x_max": x0 + rng.uniform(0.1, 0.4, n),
                          "y_max": y0 + rng.uniform(0.1, 0.4, n), "is_group_of": rng.random(n) < 0.15})
    # detections near ground-truth boxes (of any image's box: some on no object) with random classes and scores
    m = 400
    src = rng.integers(0, n, m)
    jitter = rng.normal(0, 0.04, (m, 4))
    xyxy = boxes[["x_min", "y_min", "x_max", "y_max"]].to_numpy()[src] + jitter
    dets = pd.DataFrame({"image_id": rng.choice(["i0", "i1", "i2", "i3", "i9"], m), "label": rng.choice(labs, m),
                         "score": rng.random(m), "x_min": xyxy[:, 0], "y_min": xyxy[:, 1],
                         "x_max": np.maximum(xyxy[:, 2], xyxy[:, 0] + 0.01),
                         "y_max": np.maximum(xyxy[:, 3], xyxy[:, 1] + 0.01)})
    targets = ["/m/a", "/m/b", "/m/c", "/m/d"]
    for hierarchy in (h, None):
        got, n_boxes = experts.confusion_shares(detections=dets, boxes=boxes, targets=targets, score_thr=0.3,
                                                hierarchy=hierarchy)
        want = reference_shares(dets, boxes, targets, 0.3, hierarchy)
        assert got.keys() == want.keys()
        for t in targets:
            assert got[t] == pytest.approx(want[t]), t
        assert n_boxes == {t: int(((boxes["label"] == t) & ~boxes["is_group_of"]).sum()) for t in targets}
    assert any(got[t] for t in targets)        # the random case does exercise landings


def test_confusion_shares_at_their_thresholds():
    h = Hierarchy.from_edges(pd.DataFrame({"child": ["/m/t"], "parent": ["/m/p"]}), labels=["/m/c", "/m/o"])
    box = dict(x_min=0.0, y_min=0.0, x_max=0.5, y_max=0.5)
    gt = pd.DataFrame([
        {"image_id": "i0", "label": "/m/t", **box, "is_group_of": False},
        {"image_id": "i1", "label": "/m/t", **box, "is_group_of": False},
        {"image_id": "i2", "label": "/m/t", **box, "is_group_of": False},
        {"image_id": "i2", "label": "/m/o", "x_min": 0.0, "y_min": 0.0, "x_max": 0.5, "y_max": 0.3,
         "is_group_of": False},
        {"image_id": "i3", "label": "/m/t", **box, "is_group_of": False},
        {"image_id": "i3", "label": "/m/c", **box, "is_group_of": False},
        {"image_id": "i4", "label": "/m/t", **box, "is_group_of": True},
    ])
    half = dict(x_min=0.0, y_min=0.0, x_max=0.5, y_max=0.25)        # IoU with `box` exactly 0.5
    dets = pd.DataFrame([
        {"image_id": "i0", "label": "/m/c", "score": 0.3, **half},   # lands: IoU and score at their thresholds
        {"image_id": "i0", "label": "/m/o", "score": 0.29, **box},   # below the score threshold
        {"image_id": "i1", "label": "/m/p", "score": 0.9, **box},    # the parent of /m/t: expansion, no confusion
        {"image_id": "i1", "label": "/m/o", "score": 0.9, "x_min": 0.0, "y_min": 0.0, "x_max": 0.5,
         "y_max": 0.2},                                              # IoU 0.4: lands nowhere
        {"image_id": "i2", "label": "/m/c", "score": 0.9, **half},   # IoU .5 with t, .833 with o: lands on o
        {"image_id": "i3", "label": "/m/c", "score": 0.9, **box},    # a true positive of the /m/c box there
        {"image_id": "i4", "label": "/m/c", "score": 0.9, **box},    # on a group-of /m/t box: not counted
    ])
    shares, n_boxes = experts.confusion_shares(detections=dets, boxes=gt, targets=["/m/t", "/m/o"], score_thr=0.3,
                                               hierarchy=h)
    assert n_boxes == {"/m/t": 4, "/m/o": 1}
    assert shares == {"/m/t": {"/m/c": 0.25}, "/m/o": {"/m/c": 1.0}}
    # without the hierarchy the parent's detection is a confusion of /m/t with /m/p
    shares, _ = experts.confusion_shares(detections=dets, boxes=gt, targets=["/m/t"], score_thr=0.3)
    assert shares == {"/m/t": {"/m/c": 0.25, "/m/p": 0.25}}
    # a target without a non-group-of box gets no share; no detection at all: no share
    shares, n_boxes = experts.confusion_shares(detections=dets.iloc[:0], boxes=gt, targets=["/m/t", "/m/zz"],
                                               score_thr=0.3)
    assert shares == {"/m/t": {}, "/m/zz": {}} and n_boxes == {"/m/t": 4, "/m/zz": 0}


def test_bad_arguments_of_the_core(base):
    with pytest.raises(ValueError, match="needs the class hierarchy"):
        experts.mine_experts(ap=base["ap"], fc_weight=base["weight"], labels=LEAVES, n_lowest=1, sim_thr=0.5,
                             confusion="siblings")
    with pytest.raises(ValueError, match="validation detections"):
        experts.mine_experts(ap=base["ap"], fc_weight=base["weight"], labels=LEAVES, n_lowest=1, sim_thr=0.5,
                             confusion="matrix", boxes=base["gt"])
    with pytest.raises(ValueError, match="confusion must be one of"):
        experts.mine_experts(ap=base["ap"], fc_weight=base["weight"], labels=LEAVES, n_lowest=1, sim_thr=0.5,
                             confusion="siblings_of")


# ----- the CLI ----------------------------------------------------------------------------------------------
@pytest.fixture
def files(base, tmp_path) -> dict:
    state = {"roi_heads.box_predictor.cls_score.weight": torch.tensor(base["weight"], dtype=torch.float32)}
    torch.save({"model": state, "labels": LEAVES}, tmp_path / "model.pt")
    per_class = {c: {"name": c, "ap": None if np.isnan(a) else float(a)} for c, a in base["ap"].items()}
    write_json(tmp_path / "val_a.json", {"mAP": 0.5, "per_class": per_class})
    write_table(tmp_path / "dets.parquet", base["dets"], "detections")
    # the ground truth also holds training images, which --splits/--split leave out
    train_gt = base["gt"].assign(image_id=lambda d: "t" + d["image_id"], label=tx.digit_label(8))
    write_table(tmp_path / "boxes.parquet", pd.concat([base["gt"], train_gt], ignore_index=True), "boxes")
    ids = pd.unique(pd.concat([base["gt"]["image_id"], train_gt["image_id"]]))
    write_table(tmp_path / "splits.parquet", pd.DataFrame({"image_id": ids, "split": [
        "train" if i.startswith("t") else "val_a" for i in ids]}), "splits")
    write_table(tmp_path / "hierarchy.parquet", HIERARCHY.to_edges(), "hierarchy")
    write_table(tmp_path / "classes.parquet", CLASSES, "classes")
    return {k: str(tmp_path / f) for k, f in [("model", "model.pt"), ("metrics", "val_a.json"),
                                               ("dets", "dets.parquet"), ("boxes", "boxes.parquet"),
                                               ("splits", "splits.parquet"), ("hierarchy", "hierarchy.parquet"),
                                               ("classes", "classes.parquet")]} | {"dir": tmp_path}


def test_cli_matrix_with_names_and_nearest_cosine(base, files, capsys):
    out = files["dir"] / "experts" / "x.json"
    args = ["--model", files["model"], "--metrics", files["metrics"], "--hierarchy", files["hierarchy"],
            "--classes", files["classes"], "--n-lowest", "2", "--confusion", "matrix",
            "--detections", files["dets"], "--boxes", files["boxes"], "--splits", files["splits"],
            "--split", "val_a", "--confusion-thr", "0.1", "--confusion-score-thr", "0.3", "--out", str(out)]
    assert experts.main(args) == 0
    got = json.loads(out.read_text())
    want = mine(base, "matrix")
    for key in ("confusion", "targets", "negatives", "nearest_target", "n_boxes"):
        assert got[key] == want[key], key
    assert got["similarity"].keys() == want["similarity"].keys()
    for t, near in want["similarity"].items():
        assert got["similarity"][t] == pytest.approx(near)
    assert got["nearest_cosine"] == pytest.approx(want["nearest_cosine"], abs=1e-6)   # float32 checkpoint
    names = dict(zip(CLASSES["label"], CLASSES["name"]))
    assert got["names"] == {c: names[c] for c in [*got["targets"], *got["negatives"]]}
    assert got["ap"] == {t: pytest.approx(base["ap"][t]) for t in got["targets"]}
    assert got["confusion_thr"] == 0.1 and got["confusion_score_thr"] == 0.3 and "sim_thr" not in got
    assert "experts (matrix): 2 targets" in capsys.readouterr().out
    assert read_experts(out) == [*got["targets"], *got["negatives"]]


def test_cli_siblings_and_an_expert_without_negatives(base, files):
    out = files["dir"] / "s.json"
    five = tx.digit_label(5)
    # the lowest AP is Digit five's: a sibling of Digit three only
    metrics = {"mAP": 0.5, "per_class": {c: {"ap": 0.0 if c == five else 0.9} for c in LEAVES}}
    write_json(files["dir"] / "m.json", metrics)
    assert experts.main(["--model", files["model"], "--metrics", str(files["dir"] / "m.json"), "--hierarchy",
                         files["hierarchy"], "--n-lowest", "1", "--confusion", "siblings", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["targets"] == [five] and got["negatives"] == [tx.digit_label(3)] and "names" not in got
    # a lone class with no trained sibling mines a set of targets only: what the expert then trains on
    metrics["per_class"] = {c: {"ap": 0.0 if c == tx.FRAME else 0.9} for c in LEAVES}
    write_json(files["dir"] / "m.json", metrics)
    model = files["dir"] / "no_pole.pt"
    keep = [i for i, c in enumerate(LEAVES) if c != tx.POLE]
    w = torch.tensor(base["weight"][[0, *[i + 1 for i in keep]]], dtype=torch.float32)
    torch.save({"model": {"roi_heads.box_predictor.cls_score.weight": w}, "labels": [LEAVES[i] for i in keep]},
               model)
    assert experts.main(["--model", str(model), "--metrics", str(files["dir"] / "m.json"), "--hierarchy",
                         files["hierarchy"], "--n-lowest", "1", "--confusion", "siblings", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["targets"] == [tx.FRAME] and got["negatives"] == [] and got["similarity"] == {tx.FRAME: {}}
    assert read_experts(out) == [tx.FRAME]


@pytest.mark.parametrize("case,match", [
    ("no_ap", "val_a.json: field 'per_class': no trained class has a validation AP"),
    ("siblings_no_hierarchy", "field '--hierarchy'"),
    ("matrix_no_boxes", "field '--boxes'"),
    ("matrix_no_detections", "field '--detections'"),
    ("labels_mismatch", "field 'labels': classifier weight has 15 rows for 13 labels"),
    ("bad_split", "field 'split': no image in split 'val_z'"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(files, capsys, case, match):
    d = files["dir"]
    out = d / "bad.json"
    base_args = ["--model", files["model"], "--metrics", files["metrics"], "--out", str(out)]
    if case == "no_ap":
        write_json(d / "val_a.json", {"mAP": None, "per_class": {c: {"ap": None} for c in LEAVES}})
        args = base_args
    elif case == "siblings_no_hierarchy":
        args = [*base_args, "--confusion", "siblings"]
    elif case == "matrix_no_boxes":
        args = [*base_args, "--confusion", "matrix", "--detections", files["dets"]]
    elif case == "matrix_no_detections":
        args = [*base_args, "--confusion", "matrix", "--boxes", files["boxes"]]
    elif case == "labels_mismatch":
        ckpt = torch.load(files["model"], weights_only=False)
        torch.save({**ckpt, "labels": LEAVES[:-1]}, files["model"])
        args = base_args
    else:
        args = [*base_args, "--confusion", "matrix", "--detections", files["dets"], "--boxes", files["boxes"],
                "--splits", files["splits"], "--split", "val_z"]
    assert experts.main(args) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args", [["--confusion", "confusing"], ["--splits", "s.parquet"]])
def test_cli_usage_errors(files, args):
    with pytest.raises(SystemExit) as exc:
        experts.main(["--model", files["model"], "--metrics", files["metrics"], "--out", "x.json", *args])
    assert exc.value.code == 2
