"""mAP is summed exactly as the official evaluator sums it: ``np.nanmean`` over every class, in class order."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.formats.hierarchy import Hierarchy
from stages.metrics import evaluate_detections, prepare_ground_truth

# per class: k = rank of its only true positive (AP 1/k); 0 = no ground truth (AP NaN). Chosen so that the mean
# over the classes with ground truth and np.nanmean over all classes differ in the last bit.
RANKS = [0, 5, 6, 3, 4, 7, 6, 7, 3, 5, 7, 5, 6, 5, 0, 3]
LABELS = [f"/m/c{i:02d}" for i in range(len(RANKS))]
HIER = Hierarchy(parents={lab: () for lab in LABELS})
CLASSES = pd.DataFrame({"label": LABELS, "name": LABELS})
BOX = (0.1, 0.1, 0.5, 0.5)
FAR = (0.6, 0.6, 0.9, 0.9)


def test_map_is_nanmean_over_all_classes_bit_for_bit():
    gt_rows, det_rows = [], []
    for lab, k in zip(LABELS, RANKS):
        if not k:
            continue
        img = "img" + lab[-2:]
        gt_rows.append((img, lab, *BOX, False))
        det_rows += [(img, lab, 0.9 - 0.1 * j, *FAR) for j in range(k - 1)]  # k - 1 false positives first
        det_rows.append((img, lab, 0.05, *BOX))                               # then the true positive
    boxes = pd.DataFrame(gt_rows, columns=["image_id", "label", "x_min", "y_min", "x_max", "y_max", "is_group_of"])
    labels = pd.DataFrame({"image_id": [], "label": [], "confidence": []})
    dets = pd.DataFrame(det_rows, columns=["image_id", "label", "score", "x_min", "y_min", "x_max", "y_max"])
    gt = prepare_ground_truth(boxes=boxes, image_labels=labels, hierarchy=HIER, classes=CLASSES)
    r = evaluate_detections(gt=gt, detections=dets)
    ap = r.per_class["ap"].to_numpy()
    expected = np.array([1.0 / k if k else np.nan for k in RANKS])
    np.testing.assert_array_equal(ap, expected)
    assert r.map == np.nanmean(expected)                       # what the official evaluator reports
    assert np.mean(expected[~np.isnan(expected)]) != r.map     # the case does tell the two summations apart
