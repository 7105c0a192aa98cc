"""One hand-worked case per rule of the OpenImages Challenge metric; each fails if its rule is dropped."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metric_reference import reference_evaluate  # noqa: E402

from stages.formats.hierarchy import Hierarchy  # noqa: E402
from stages.metrics import average_precision, evaluate_detections, prepare_ground_truth  # noqa: E402

# a -> b -> d, a -> c -> d (d has two parents), e alone
H = Hierarchy(parents={"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c"), "e": ()})
CLASSES = pd.DataFrame({"label": list("abcde"), "name": ["A", "B", "C", "D", "E"]})


def boxes(*rows) -> pd.DataFrame:
    """rows: (image, label, x_min, y_min, x_max, y_max[, group_of])"""
    rows = [r if len(r) == 7 else (*r, False) for r in rows]
    return pd.DataFrame(rows, columns=["image_id", "label", "x_min", "y_min", "x_max", "y_max", "is_group_of"])


def labels(*rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["image_id", "label", "confidence"]).astype({"confidence": np.int8})


def dets(*rows) -> pd.DataFrame:
    """rows: (image, label, score, x_min, y_min, x_max, y_max)"""
    return pd.DataFrame(rows, columns=["image_id", "label", "score", "x_min", "y_min", "x_max", "y_max"])


def run(b, lab, d, **kw):
    gt = prepare_ground_truth(boxes=b, image_labels=lab, hierarchy=H, classes=CLASSES, **kw)
    r = evaluate_detections(gt=gt, detections=d)
    ref = reference_evaluate(boxes=b, image_labels=lab, hierarchy=H, classes=CLASSES, detections=d) \
        if not kw else None
    ap = r.per_class.set_index("label")["ap"]
    if ref is not None:  # every hand case also agrees with the slow reference
        for k, v in ref["ap"].items():
            assert (np.isnan(v) and np.isnan(ap[k])) or ap[k] == pytest.approx(v, abs=1e-12)
    return r, ap


BOX = (0.1, 0.1, 0.5, 0.5)
FAR = (0.6, 0.6, 0.9, 0.9)


def test_gt_boxes_are_expanded_to_all_ancestors():
    r, ap = run(boxes(("i", "d", *BOX)), labels(), dets(("i", "a", 0.9, *BOX), ("i", "b", 0.9, *BOX)))
    # d's box is also a box of b, c and a (both parent paths); a and b are detected, c and d are not
    assert ap["a"] == 1.0 and ap["b"] == 1.0 and ap["c"] == 0.0 and ap["d"] == 0.0
    assert np.isnan(ap["e"])
    assert r.per_class.set_index("label")["n_gt"].to_dict() == {"a": 1, "b": 1, "c": 1, "d": 1, "e": 0}


def test_already_expanded_input_is_not_expanded_again():
    _, ap = run(boxes(("i", "d", *BOX)), labels(), dets(("i", "d", 0.9, *BOX)), expanded=True)
    assert ap["d"] == 1.0 and np.isnan(ap["a"])


def test_positive_image_label_is_expanded_up():
    # image j has only a positive label d; a detection of a (d's ancestor) on j is evaluated -> FP
    b = boxes(("i", "a", *BOX))
    d = dets(("i", "a", 0.5, *BOX), ("j", "a", 0.9, *BOX))
    _, ap = run(b, labels(("j", "d", 1)), d)
    assert ap["a"] == pytest.approx(0.5)  # FP at 0.9 first, then TP: precision 1/2 at recall 1
    _, ap_unexpanded = run(b, labels(("j", "e", 1)), d)
    assert ap_unexpanded["a"] == 1.0  # a not verified on j: the detection is ignored


def test_negative_image_label_is_expanded_down():
    b = boxes(("i", "d", *BOX))
    d = dets(("i", "d", 0.5, *BOX), ("j", "d", 0.9, *BOX))
    _, ap = run(b, labels(("j", "b", 0)), d)  # b verified absent -> d verified absent on j
    assert ap["d"] == pytest.approx(0.5)
    _, ap2 = run(b, labels(("j", "e", 0)), d)
    assert ap2["d"] == 1.0


def test_negative_label_is_not_expanded_up():
    b = boxes(("i", "b", *BOX))
    d = dets(("i", "b", 0.5, *BOX), ("j", "b", 0.9, *BOX))
    _, ap = run(b, labels(("j", "d", 0)), d)  # d absent says nothing about b
    assert ap["b"] == 1.0


def test_detections_of_unverified_classes_and_images_without_gt_are_ignored():
    b = boxes(("i", "e", *BOX))
    base = dets(("i", "e", 0.5, *BOX))
    extra = dets(("i", "a", 0.9, *FAR), ("nogt", "e", 0.99, *BOX))
    r1, ap1 = run(b, labels(), base)
    r2, ap2 = run(b, labels(), pd.concat([base, extra], ignore_index=True))
    assert ap1["e"] == ap2["e"] == 1.0 and r1.map == r2.map
    assert r2.counts["n_det_scored"] == 1 and r2.counts["n_det_input"] == 3


def test_iou_threshold_is_inclusive_at_exactly_half():
    b = boxes(("i", "e", 0.0, 0.0, 1.0, 1.0))
    _, ap = run(b, labels(), dets(("i", "e", 0.9, 0.0, 0.0, 0.5, 1.0)))  # IoU exactly 0.5
    assert ap["e"] == 1.0
    _, ap = run(b, labels(), dets(("i", "e", 0.9, 0.0, 0.0, 0.4999, 1.0)))
    assert ap["e"] == 0.0


def test_no_fallback_to_the_second_best_box():
    # det1 takes box A; det2 overlaps A most (IoU .8) and B enough (IoU .6) but does not fall back to B
    b = boxes(("i", "e", 0.0, 0.0, 0.5, 1.0), ("i", "e", 0.1, 0.0, 0.6, 1.0))
    d = dets(("i", "e", 0.9, 0.0, 0.0, 0.5, 1.0), ("i", "e", 0.8, 0.02, 0.0, 0.52, 1.0))
    _, ap = run(b, labels(), d)
    assert ap["e"] == pytest.approx(0.5)  # TP, FP; recall 1/2


def test_detections_are_matched_in_score_order():
    b = boxes(("i", "e", *BOX))
    d = dets(("i", "e", 0.3, *BOX), ("i", "e", 0.9, 0.1, 0.1, 0.5, 0.45))  # both IoU >= .5; higher score wins
    r, ap = run(b, labels(), d)
    assert ap["e"] == 1.0  # the 0.9 one is TP, the 0.3 one FP ranks last


def test_group_of_box_is_one_true_positive_at_the_best_score_and_others_are_ignored():
    b = boxes(("i", "e", 0.0, 0.0, 1.0, 1.0, True), ("i", "e", 0.0, 0.0, 0.05, 0.05))
    d = dets(("i", "e", 0.4, 0.1, 0.1, 0.2, 0.2), ("i", "e", 0.7, 0.3, 0.3, 0.4, 0.4),
             ("i", "e", 0.6, 0.5, 0.5, 0.6, 0.6))
    r, ap = run(b, labels(), d)
    assert r.per_class.set_index("label").loc["e", "n_gt"] == 2  # the group-of box counts once
    assert ap["e"] == pytest.approx(0.5)  # one TP (0.7) of 2 gt, the other two removed, the small box missed
    assert r.counts["n_det_in_group_of"] == 3


def test_group_of_matching_uses_intersection_over_detection_area():
    b = boxes(("i", "e", 0.0, 0.0, 1.0, 1.0, True))
    _, ap = run(b, labels(), dets(("i", "e", 0.5, 0.5, 0.5, 0.9, 0.9), ("i", "e", 0.9, 0.9, 0.9, 1.0, 1.0)))
    assert ap["e"] == 1.0  # tiny boxes inside: IoU tiny but IoA = 1


def test_ordinary_boxes_are_matched_before_group_of_boxes():
    b = boxes(("i", "e", 0.0, 0.0, 1.0, 1.0, True), ("i", "e", *BOX))
    _, ap = run(b, labels(), dets(("i", "e", 0.9, *BOX)))
    assert ap["e"] == pytest.approx(0.5)  # TP on the ordinary box; the group-of box stays undetected


def test_group_of_entry_with_zero_score_is_dropped():
    b = boxes(("i", "e", 0.0, 0.0, 1.0, 1.0, True))
    r, ap = run(b, labels(), dets(("i", "e", 0.0, 0.1, 0.1, 0.2, 0.2)))
    assert ap["e"] == 0.0 and r.counts["n_tp"] == 0


def test_voc_all_point_interpolated_ap():
    # TP .9, FP .8, TP .7, 3 gt: p = [1, .5, 2/3], r = [1/3, 1/3, 2/3] -> 1/3 * 1 + 1/3 * 2/3
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1.0, 0.0, 1.0]), 3) == pytest.approx(5 / 9)
    assert average_precision(np.array([]), np.array([]), 2) == 0.0
    assert np.isnan(average_precision(np.array([0.5]), np.array([0.0]), 0))


def test_map_averages_classes_with_gt_and_undetected_class_scores_zero():
    b = boxes(("i", "e", *BOX), ("i", "d", *FAR))
    r, ap = run(b, labels(), dets(("i", "e", 0.9, *BOX)))
    assert ap["e"] == 1.0 and ap["d"] == 0.0 and ap["a"] == 0.0
    assert r.map == pytest.approx(1 / 5)  # e, d, b, c, a have ground truth; only e is detected
    assert r.counts["n_classes_with_gt"] == 5


def test_invalid_boxes_and_very_low_scores_are_dropped_not_counted():
    b = boxes(("i", "e", *BOX))
    d = dets(("i", "e", 0.9, 0.3, 0.3, 0.3, 0.6), ("i", "e", -11.0, 0.7, 0.7, 0.8, 0.8), ("i", "e", 0.5, *BOX))
    r, ap = run(b, labels(), d)
    assert ap["e"] == 1.0 and r.counts["n_det_scored"] == 1


def test_ties_follow_numpy_argsort_like_the_official_evaluator():
    rng = np.random.default_rng(3)
    n = 40
    b = boxes(*[("i", "e", x, 0.0, x + 0.02, 0.5) for x in np.linspace(0, 0.9, 20)])
    xs = rng.choice(np.linspace(0, 0.9, 20), n)
    d = dets(*[("i", "e", s, x, 0.0, x + 0.02, 0.5) for s, x in zip(rng.choice([0.2, 0.5], n), xs)])
    gt = prepare_ground_truth(boxes=b, image_labels=labels(), hierarchy=H, classes=CLASSES)
    ap = evaluate_detections(gt=gt, detections=d).per_class.set_index("label")["ap"]["e"]
    ref = reference_evaluate(boxes=b, image_labels=labels(), hierarchy=H, classes=CLASSES, detections=d)
    assert ap == ref["ap"]["e"]


def test_split_restriction_scores_only_those_images():
    b = boxes(("i", "e", *BOX), ("j", "e", *BOX))
    d = dets(("i", "e", 0.9, *BOX))
    _, ap_all = run(b, labels(), d)
    _, ap_i = run(b, labels(), d, image_ids=["i"])
    assert ap_all["e"] == pytest.approx(0.5) and ap_i["e"] == 1.0


def test_unknown_gt_label_is_an_input_error():
    from stages.core.errors import InputError

    with pytest.raises(InputError, match="unknown label"):
        prepare_ground_truth(boxes=boxes(("i", "zz", *BOX)), image_labels=labels(), hierarchy=H, classes=CLASSES)


def test_agrees_with_reference_on_random_inputs():
    rng = np.random.default_rng(7)
    grid = np.linspace(0, 1, 7)
    for _ in range(150):
        imgs = [f"i{k}" for k in range(rng.integers(1, 5))]

        def rand(n):
            x = np.sort(rng.choice(grid, (n, 2)), 1)
            y = np.sort(rng.choice(grid, (n, 2)), 1)
            return x, y

        nb = int(rng.integers(0, 14))
        x, y = rand(nb)
        b = pd.DataFrame({"image_id": rng.choice(imgs, nb), "label": rng.choice(list("bcde"), nb),
                          "x_min": x[:, 0], "y_min": y[:, 0], "x_max": x[:, 1], "y_max": y[:, 1],
                          "is_group_of": rng.random(nb) < 0.3})
        nl = int(rng.integers(0, 8))
        lab = labels(*zip(rng.choice(imgs, nl), rng.choice(list("abcde"), nl), rng.integers(0, 2, nl)))
        nd = int(rng.integers(0, 50))
        x, y = rand(nd)
        d = pd.DataFrame({"image_id": rng.choice(imgs + ["nogt"], nd), "label": rng.choice(list("abcde"), nd),
                          "score": rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], nd),
                          "x_min": x[:, 0], "y_min": y[:, 0], "x_max": x[:, 1], "y_max": y[:, 1]})
        r, _ = run(b, lab, d)  # run() asserts per-class agreement to 1e-12
        ref = reference_evaluate(boxes=b, image_labels=lab, hierarchy=H, classes=CLASSES, detections=d)
        assert (np.isnan(r.map) and np.isnan(ref["mAP"])) or r.map == pytest.approx(ref["mAP"], abs=1e-12)
