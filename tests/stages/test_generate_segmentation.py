"""orchard-mini's segmentation track: the segmentable classes (every class but "Frame") and their pruned
hierarchy, masks only for segmentable classes, and detection files unchanged by it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from stages import generate as gen
from stages.data import taxonomy as tx
from stages.formats.hierarchy import Hierarchy
from stages.formats.openimages import read_boxes, read_classes, read_masks_csv

# sha256[:16] of `python -m stages.generate --n-images 12 --n-test 3 --seed 1` written by the generator before the
# segmentable subset existed (commit 43b3340): the detection files, the images, and the segmentation CSV and mask
# PNGs without their "Frame" instances
BEFORE = {
    gen.BBOX_CSV: "ec1bde535f08ff1c",
    gen.LABELS_CSV: "4733922c0471b155",
    gen.CLASSES_CSV: "789c68cd09ca13d6",
    gen.HIERARCHY_JSON: "5135933721f3b207",
    gen.TEST_CSV: "59b3b16d59ce1a8f",
}
BEFORE_JPGS = "606091cf184cd226"
BEFORE_SEG_WITHOUT_FRAME = "d09033243b676d5e"
BEFORE_PNGS_WITHOUT_FRAME = "0c08b5a727996f5d"


def _h(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "orchard-mini"
    assert gen.main(["--n-images", "12", "--n-test", "3", "--seed", "1", "--out", str(out)]) == 0
    return out


def test_segmentable_classes_are_all_but_frame_with_their_parents():
    assert tx.NOT_SEGMENTABLE == {tx.FRAME}
    assert set(tx.SEGMENTABLE) == {c.label for c in tx.CLASSES} - {tx.FRAME}
    assert list(tx.SEGMENTABLE) == [c.label for c in tx.CLASSES if c.label != tx.FRAME]   # CLASSES order
    full = Hierarchy.from_json_obj(tx.hierarchy_json())
    seg = Hierarchy.from_json_obj(tx.hierarchy_json(tx.SEGMENTABLE))
    assert set(seg.labels) == set(tx.SEGMENTABLE)
    assert {(c, p) for c, ps in seg.parents.items() for p in ps} == \
        {(c, p) for c, ps in full.parents.items() for p in ps if c != tx.FRAME}
    assert seg.parents[tx.digit_label(6)] == full.parents[tx.digit_label(6)]   # still two parents
    assert tx.hierarchy_json(labels=None) == tx.hierarchy_json()
    with pytest.raises(ValueError, match="ancestors"):
        tx.hierarchy_json([tx.POLE])   # without its parent "Shape"


def test_detection_files_and_images_are_byte_identical_to_before(data):
    for name, digest in BEFORE.items():
        assert _h((data / name).read_bytes()) == digest, name
    jpgs = b"".join(p.name.encode() + p.read_bytes() for d in (gen.IMAGES_DIR, gen.TEST_DIR)
                    for p in sorted((data / d).iterdir()))
    assert _h(jpgs) == BEFORE_JPGS
    # the segmentation CSV and the PNGs are the earlier ones less the Frame instances
    assert _h((data / gen.SEGMENTATION_CSV).read_bytes()) == BEFORE_SEG_WITHOUT_FRAME
    pngs = b"".join(p.name.encode() + p.read_bytes() for p in sorted((data / gen.MASKS_DIR).iterdir()))
    assert _h(pngs) == BEFORE_PNGS_WITHOUT_FRAME


def test_segmentable_files_parse_and_masks_are_only_of_segmentable_classes(data):
    classes = read_classes(data / gen.CLASSES_CSV)
    seg = read_classes(data / gen.SEG_CLASSES_CSV)
    assert list(seg["label"]) == list(tx.SEGMENTABLE)
    assert dict(zip(seg["label"], seg["name"])) == {lab: tx.BY_LABEL[lab].name for lab in tx.SEGMENTABLE}
    assert set(seg["label"]) < set(classes["label"])
    h = Hierarchy.from_json(data / gen.SEG_HIERARCHY_JSON)
    assert set(h.labels) == set(seg["label"]) and h.root == tx.ROOT and h.depth() >= 3
    boxes = read_boxes(data / gen.BBOX_CSV)
    masks = read_masks_csv(data / gen.SEGMENTATION_CSV, known_labels=set(seg["label"]))
    assert (boxes["label"] == tx.FRAME).any(), "the sample must have Frame boxes for this test to mean anything"
    assert tx.FRAME not in set(masks["label"])
    want = boxes[~boxes["is_group_of"] & boxes["label"].isin(set(tx.SEGMENTABLE))]
    assert len(masks) == len(want)
    assert sorted(p.name for p in (data / gen.MASKS_DIR).iterdir()) == sorted(masks["mask_path"])
    key = ["image_id", "label", "x_min", "y_min", "x_max", "y_max"]
    a = masks[key].sort_values(key).to_numpy()
    b = want[key].astype({"image_id": object, "label": object}).sort_values(key).to_numpy()
    assert np.array_equal(a[:, :2], b[:, :2]) and np.allclose(a[:, 2:].astype(float), b[:, 2:].astype(float))
    import json
    summary = json.loads((data / gen.SUMMARY_JSON).read_text())
    assert summary["n_masks"] == len(masks) and summary["segmentable_classes"] == len(tx.SEGMENTABLE)
    assert summary["not_segmentable"] == [tx.FRAME]
