"""Properties of the OpenImages Challenge metric (hypothesis)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metric_reference import reference_evaluate  # noqa: E402

from stages.formats.hierarchy import Hierarchy  # noqa: E402
from stages.metrics import evaluate_detections, prepare_ground_truth  # noqa: E402

H = Hierarchy(parents={"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c"), "e": ()})
CLASSES = pd.DataFrame({"label": list("abcde"), "name": list("ABCDE")})
LEAVES = ["b", "c", "d", "e"]
COLS = ["image_id", "label", "x_min", "y_min", "x_max", "y_max"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def scene(draw):
    """Disjoint ground-truth boxes (one per 4x4 grid cell at most), image labels of both signs."""
    n_img = draw(st.integers(1, 3))
    rows = []
    for i in range(n_img):
        cells = draw(st.lists(st.integers(0, 15), min_size=0, max_size=6, unique=True))
        for c in cells:
            x0, y0 = (c % 4) / 4, (c // 4) / 4
            m = draw(st.floats(0.0, 0.08))
            lab = draw(st.sampled_from(LEAVES))
            rows.append((f"i{i}", lab, x0 + m, y0 + m, x0 + 0.25 - m, y0 + 0.25 - m, draw(st.booleans())))
    boxes = pd.DataFrame(rows, columns=[*COLS, "is_group_of"])
    lab_rows = draw(st.lists(st.tuples(st.sampled_from([f"i{i}" for i in range(n_img)]),
                                       st.sampled_from(list("abcde")), st.integers(0, 1)), max_size=6))
    labels = pd.DataFrame(lab_rows, columns=["image_id", "label", "confidence"]).astype({"confidence": np.int8})
    return boxes, labels


def expanded_gt_as_predictions(boxes: pd.DataFrame) -> pd.DataFrame:
    pairs = H.expansion_pairs(up=True)
    e = boxes.merge(pairs, on="label")
    out = e.assign(label=e["expanded"])[COLS].copy()
    out["score"] = np.linspace(1.0, 0.5, len(out)) if len(out) else []
    return out


def score(boxes, labels, dets):
    gt = prepare_ground_truth(boxes=boxes, image_labels=labels, hierarchy=H, classes=CLASSES)
    return evaluate_detections(gt=gt, detections=dets)


@SETTINGS
@given(scene())
def test_perfect_predictions_score_one(sc):
    boxes, labels = sc
    r = score(boxes, labels, expanded_gt_as_predictions(boxes))
    if len(boxes):
        assert r.map == pytest.approx(1.0, abs=1e-12)
        assert (r.per_class.dropna()["ap"] == 1.0).all()
    else:
        assert np.isnan(r.map)


@SETTINGS
@given(scene(), st.data())
def test_prediction_of_unverified_class_changes_nothing(sc, data):
    boxes, labels = sc
    dets = expanded_gt_as_predictions(boxes).iloc[::2].reset_index(drop=True)
    r1 = score(boxes, labels, dets)
    gt = prepare_ground_truth(boxes=boxes, image_labels=labels, hierarchy=H, classes=CLASSES)
    img = data.draw(st.sampled_from(["i0", "i1", "i2", "nogt"]))
    verified = {k for k in gt.eval_keys.tolist()}
    ii = gt.image_index.get_indexer([img])[0]
    free = [lab for c, lab in enumerate(CLASSES["label"]) if ii < 0 or ii * 5 + c not in verified]
    if not free:
        return
    lab = data.draw(st.sampled_from(free))
    extra = pd.DataFrame([(img, lab, 0.1, 0.2, 0.3, 0.4, data.draw(st.floats(0, 1)))],
                         columns=[*COLS, "score"])
    r2 = score(boxes, labels, pd.concat([dets, extra], ignore_index=True))
    assert r1.map == r2.map or (np.isnan(r1.map) and np.isnan(r2.map))
    pd.testing.assert_frame_equal(r1.per_class.drop(columns="n_det"), r2.per_class.drop(columns="n_det"))


@SETTINGS
@given(scene(), st.integers(0, 2**31 - 1))
def test_permuting_rows_changes_nothing(sc, seed):
    boxes, labels = sc
    rng = np.random.default_rng(seed)
    dets = expanded_gt_as_predictions(boxes)
    n = len(dets)
    jit = rng.normal(0, 0.03, (n, 4))
    xy = np.clip(dets[["x_min", "y_min", "x_max", "y_max"]].to_numpy() + jit, 0, 1)
    dets[["x_min", "y_min"]] = np.minimum(xy[:, :2], xy[:, 2:])
    dets[["x_max", "y_max"]] = np.maximum(xy[:, :2], xy[:, 2:])
    dets["score"] = rng.permutation(n) / max(n, 1) + 0.01  # distinct scores: no tie to break
    r1 = score(boxes, labels, dets)
    r2 = score(boxes.sample(frac=1.0, random_state=seed % 1000), labels.sample(frac=1.0, random_state=1),
               dets.sample(frac=1.0, random_state=seed % 997))
    assert r1.map == r2.map or (np.isnan(r1.map) and np.isnan(r2.map))
    pd.testing.assert_frame_equal(r1.per_class, r2.per_class)


@st.composite
def noisy(draw):
    """Random overlapping boxes on a coarse grid: ties in scores and IoUs, group-of boxes, negative labels."""
    grid = st.sampled_from([0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0])
    imgs = ["i0", "i1", "i2"]

    def box():
        x = sorted([draw(grid), draw(grid)])
        y = sorted([draw(grid), draw(grid)])
        return x[0], y[0], x[1], y[1]

    b = [(draw(st.sampled_from(imgs)), draw(st.sampled_from(LEAVES)), *box(), draw(st.booleans()))
         for _ in range(draw(st.integers(0, 10)))]
    lab = [(draw(st.sampled_from(imgs)), draw(st.sampled_from(list("abcde"))), draw(st.integers(0, 1)))
           for _ in range(draw(st.integers(0, 5)))]
    d = [(draw(st.sampled_from(imgs + ["zz"])), draw(st.sampled_from(list("abcde"))), *box(),
          draw(st.sampled_from([0.0, 0.3, 0.5, 0.9]))) for _ in range(draw(st.integers(0, 30)))]
    return (pd.DataFrame(b, columns=[*COLS, "is_group_of"]),
            pd.DataFrame(lab, columns=["image_id", "label", "confidence"]).astype({"confidence": np.int8}),
            pd.DataFrame(d, columns=[*COLS, "score"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(noisy())
def test_agrees_with_slow_reference(case):
    boxes, labels, dets = case
    r = score(boxes, labels, dets)
    ref = reference_evaluate(boxes=boxes, image_labels=labels, hierarchy=H, classes=CLASSES, detections=dets)
    ap = r.per_class.set_index("label")["ap"]
    for k, v in ref["ap"].items():
        assert (np.isnan(v) and np.isnan(ap[k])) or abs(ap[k] - v) <= 1e-9
    assert (np.isnan(r.map) and np.isnan(ref["mAP"])) or abs(r.map - ref["mAP"]) <= 1e-9
