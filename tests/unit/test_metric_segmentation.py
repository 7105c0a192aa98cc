"""The instance-segmentation metric on COCO RLE: mask matching, mask-less boxes ignored, CLI with PNG masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mu

from stages.evaluate import main
from stages.formats.hierarchy import Hierarchy
from stages.formats.seg_submission import decode_counts, encode_mask
from stages.metrics import segmentation as seg

H, W = 40, 60
HIER = Hierarchy(parents={"/m/a": (), "/m/b": ("/m/a",)})
CLASSES = pd.DataFrame({"label": ["/m/a", "/m/b"], "name": ["A", "B"]})


def mask(*rects) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    for y0, x0, y1, x1 in rects:
        m[y0:y1, x0:x1] = 1
    return m


def rle(m: np.ndarray) -> dict:
    return mu.encode(np.asfortranarray(m))


def box_of(m: np.ndarray) -> tuple[float, float, float, float]:
    x, y, w, h = mu.toBbox(rle(m))
    return x / W, y / H, (x + w) / W, (y + h) / H


def gt_frame(items):
    """items: (image, label, mask or None, box or None, group_of)"""
    rows, masks = [], []
    for img, lab, m, b, g in items:
        rows.append((img, lab, *(box_of(m) if b is None else b), g))
        masks.append(None if m is None else rle(m))
    cols = ["image_id", "label", "x_min", "y_min", "x_max", "y_max", "is_group_of"]
    return pd.DataFrame(rows, columns=cols), masks


def det_frame(items):
    rows = []
    for img, lab, s, m in items:
        rows.append((img, lab, s, *box_of(m), rle(m)["counts"].decode(), H, W))
    return pd.DataFrame(rows, columns=["image_id", "label", "score", "x_min", "y_min", "x_max", "y_max", "rle",
                                       "mask_height", "mask_width"])


def score(gt_items, det_items, labels=None):
    b, masks = gt_frame(gt_items)
    lab = labels if labels is not None else pd.DataFrame({"image_id": [], "label": [], "confidence": []})
    gt = seg.prepare_mask_ground_truth(boxes=b, image_labels=lab.astype({"confidence": np.int8}),
                                       hierarchy=HIER, classes=CLASSES, masks=masks)
    r = seg.evaluate_masks(gt=gt, masks=det_frame(det_items))
    return r, r.per_class.set_index("label")["ap"]


SQ = mask((5, 5, 25, 25))


def test_matching_masks_are_true_positives_and_expand_to_parents():
    r, ap = score([("i", "/m/b", SQ, None, False)], [("i", "/m/b", 0.9, SQ), ("i", "/m/a", 0.8, SQ)])
    assert ap["/m/b"] == 1.0 and ap["/m/a"] == 1.0


def test_mask_iou_not_box_iou_decides():
    gt = mask((0, 0, 10, 10), (10, 10, 20, 20))       # two opposite corners
    det = mask((0, 10, 10, 20), (10, 0, 20, 10))      # the other two: same box, mask IoU 0
    assert box_of(gt) == box_of(det)
    _, ap = score([("i", "/m/b", gt, None, False)], [("i", "/m/b", 0.9, det)])
    assert ap["/m/b"] == 0.0


def test_boxes_without_masks_leave_the_total_and_their_detections_are_ignored():
    other = mask((30, 40, 38, 58))
    items = [("i", "/m/b", SQ, None, False), ("i", "/m/b", None, box_of(other), False)]
    r, ap = score(items, [("i", "/m/b", 0.95, other), ("i", "/m/b", 0.9, SQ)])
    assert r.per_class.set_index("label").loc["/m/b", "n_gt"] == 1
    assert ap["/m/b"] == 1.0  # the 0.95 detection on the mask-less box is neither TP nor FP
    assert r.counts["n_det_ignored"] == 1


def test_second_detection_on_a_maskless_box_is_a_false_positive():
    other = mask((30, 40, 38, 58))
    items = [("i", "/m/b", SQ, None, False), ("i", "/m/b", None, box_of(other), False)]
    _, ap = score(items, [("i", "/m/b", 0.95, other), ("i", "/m/b", 0.93, other), ("i", "/m/b", 0.9, SQ)])
    assert ap["/m/b"] == pytest.approx(0.5)  # official: only the first claim on a mask-less box is ignored


def test_maskless_group_of_box_makes_detections_inside_ignored():
    items = [("i", "/m/b", SQ, None, False), ("i", "/m/b", None, (0.5, 0.5, 1.0, 1.0), True)]
    _, ap = score(items, [("i", "/m/b", 0.95, mask((25, 35, 30, 40))), ("i", "/m/b", 0.9, SQ)])
    assert ap["/m/b"] == 1.0


def test_rle_overlaps_equal_dense_overlaps():
    rng = np.random.default_rng(0)
    for crowd in (False, True):
        ms = [mask((int(a), int(b), int(a) + 15, int(b) + 20)) for a, b in rng.integers(0, 25, (12, 2))]
        d = np.array([rle(m) for m in ms[:7]], dtype=object)
        g = np.array([rle(m) for m in ms[7:]], dtype=object)
        best, arg = seg._best_mask_overlap(np.zeros(7, np.int64), d, np.zeros(5, np.int64), g, crowd)
        dm = np.stack(ms[:7]).reshape(7, -1).astype(float)
        gm = np.stack(ms[7:]).reshape(5, -1).astype(float)
        inter = dm @ gm.T
        iou = inter / dm.sum(1)[:, None] if crowd else inter / (dm.sum(1)[:, None] + gm.sum(1)[None] - inter)
        np.testing.assert_allclose(best, iou.max(1), rtol=1e-12)
        np.testing.assert_array_equal(arg, iou.argmax(1))


def test_encoded_mask_round_trip():
    m = mask((3, 4, 20, 30))
    assert np.array_equal(mu.decode({"size": [H, W], "counts": decode_counts(encode_mask(m))}), m)


def test_cli_with_png_masks_and_segmentation_submission(tmp_path: Path, capsys):
    (tmp_path / "masks").mkdir()
    gt_small = np.zeros((H // 2, W // 2), dtype=np.uint8)  # PNG at half resolution: resized to the image size
    gt_small[2:12, 2:12] = 255
    Image.fromarray(gt_small).save(tmp_path / "masks" / "m1.png")
    (tmp_path / "seg.csv").write_text("MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,"
                                      "PredictedIoU,Clicks\nm1.png,i,/m/b,x,0.0667,0.4,0.1,0.6,0,\n")
    (tmp_path / "labels.csv").write_text("ImageID,Source,LabelName,Confidence\ni,v,/m/b,1\n")
    (tmp_path / "classes.csv").write_text("/m/a,A\n/m/b,B\n")
    (tmp_path / "h.json").write_text(json.dumps(HIER.to_json_obj()))
    good = mask((4, 4, 24, 24))
    bad = mask((30, 40, 38, 58))
    (tmp_path / "sub.csv").write_text(
        f"ImageID,ImageWidth,ImageHeight,PredictionString\n"
        f"i,{W},{H},/m/b 0.9 {encode_mask(good)} /m/a 0.8 {encode_mask(good)} /m/b 0.95 {encode_mask(bad)}\n")
    out = tmp_path / "m.json"
    argv = ["--masks", str(tmp_path / "seg.csv"), "--mask-dir", str(tmp_path / "masks"),
            "--image-labels", str(tmp_path / "labels.csv"), "--hierarchy", str(tmp_path / "h.json"),
            "--classes", str(tmp_path / "classes.csv"), "--predictions", str(tmp_path / "sub.csv"),
            "--out", str(out)]
    assert main(argv) == 0
    m = json.loads(out.read_text())
    assert m["per_class"]["/m/b"]["ap"] == pytest.approx(0.5) and m["per_class"]["/m/a"]["ap"] == 1.0
    assert capsys.readouterr().out.startswith("mAP 0.75")
    (tmp_path / "sub.csv").write_text(f"ImageID,ImageWidth,ImageHeight,PredictionString\ni,{W},{H},/m/b 0.9 @@@\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sub.csv" in err and "line 2" in err and "PredictionString" in err
