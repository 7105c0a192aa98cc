"""The built-in dataset orchard-mini: determinism, OpenImages formats, the phenomena, atomic writing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages import generate as gen
from stages.data import taxonomy as tx
from stages.formats.hierarchy import Hierarchy
from stages.formats.openimages import read_boxes, read_classes, read_image_labels, read_masks_csv

CSVS = [gen.BBOX_CSV, gen.LABELS_CSV, gen.CLASSES_CSV, gen.SEGMENTATION_CSV, gen.TEST_CSV, gen.HIERARCHY_JSON]


@pytest.fixture(scope="module")
def default_plan() -> gen.DatasetPlan:
    return gen.plan_dataset(n_train_images=400, n_test_images=40, seed=0)


@pytest.fixture(scope="module")
def easy_plan() -> gen.DatasetPlan:
    return gen.plan_dataset(n_train_images=400, n_test_images=40, seed=0, difficulty=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "orchard-mini"
    gen.generate(out_dir=out, n_train_images=30, n_test_images=6, seed=3)
    return out


# ----- the plan -----------------------------------------------------------------------------------------------
def test_plan_is_deterministic_and_seed_dependent():
    a = gen.plan_dataset(n_train_images=20, n_test_images=3, seed=5)
    b = gen.plan_dataset(n_train_images=20, n_test_images=3, seed=5)
    c = gen.plan_dataset(n_train_images=20, n_test_images=3, seed=6)
    pd.testing.assert_frame_equal(a.bbox_frame(), b.bbox_frame())
    assert a == b
    assert not a.bbox_frame().equals(c.bbox_frame())
    assert {im.image_id for im in a.images}.isdisjoint({im.image_id for im in c.images})


def test_test_set_size_does_not_change_the_labelled_images():
    a = gen.plan_dataset(n_train_images=15, n_test_images=2, seed=1)
    b = gen.plan_dataset(n_train_images=15, n_test_images=9, seed=1)
    assert a.train == b.train


def test_image_ids_and_sizes(default_plan):
    ids = [im.image_id for im in default_plan.images]
    assert len(set(ids)) == len(ids) == 440
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    w = np.array([im.width for im in default_plan.images])
    h = np.array([im.height for im in default_plan.images])
    assert w.min() >= 256 and h.min() >= 256 and w.max() <= 320 and h.max() <= 320
    assert (w != h).mean() > 0.8 and len(set(w)) > 30


def test_long_tail_at_the_default_size(default_plan):
    counts = default_plan.class_counts().set_index("label")["boxes"]
    assert set(counts.index) == set(tx.LEAVES)
    assert counts.max() >= 20 * counts.min()
    assert counts.min() >= 10


def _sides(plan: gen.DatasetPlan) -> np.ndarray:
    return np.array([max(o.x1 - o.x0, o.y1 - o.y0) for im in plan.train for o in im.boxes
                     if o.label != tx.FRAME and not o.is_group_of])


@pytest.mark.parametrize("plan, n_boxes, mean_boxes, min_side", [
    ("easy_plan", (1, 9), (2.5, 5), 20),
    ("default_plan", (2, 16), (4.5, 7), 12),
])
def test_boxes_per_image_objects_inside_the_image_and_sized(plan, n_boxes, mean_boxes, min_side, request):
    plan = request.getfixturevalue(plan)
    for im in plan.train:
        assert n_boxes[0] <= len(im.boxes) <= n_boxes[1]
        for o in im.objects:
            assert 0 <= o.x0 < o.x1 <= im.width and 0 <= o.y0 < o.y1 <= im.height
    sides = _sides(plan)
    assert sides.min() >= min_side and sides.max() <= 130
    n = np.array([len(im.boxes) for im in plan.train])
    assert mean_boxes[0] <= n.mean() <= mean_boxes[1]


def test_difficulty_zero_is_the_original_dataset(easy_plan):
    """Level 0 keeps the original generator's random streams: the annotations equal (by checksum) those the
    generator wrote before the difficulty knob existed (seed 0, 400 + 40 images)."""
    def sha(df):
        return hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()

    assert sha(easy_plan.bbox_frame()) == "163d2c78c45b7add30e777aea6c17539523e287c6a0d1b5f2dc606018c8a0b45"
    labels = "be61785daadba1eacfffb0ec64b8ed86ba0db0dd892d5b698528bdd3e66c4f43"
    assert sha(easy_plan.image_labels_frame()) == labels


def test_difficulty_makes_objects_smaller_more_numerous_occluded_and_off_colour(easy_plan, default_plan):
    easy, hard = _sides(easy_plan), _sides(default_plan)
    assert np.median(hard) < 0.75 * np.median(easy)
    assert ((hard >= 16) & (hard <= 40)).mean() > 0.6 > ((easy >= 16) & (easy <= 40)).mean()
    assert sum(len(im.boxes) for im in default_plan.train) > 1.4 * sum(len(im.boxes) for im in easy_plan.train)

    def occluded(plan):
        return np.mean([o.is_occluded for im in plan.train for o in im.boxes if o.label != tx.POLE])

    assert occluded(easy_plan) == 0 and occluded(default_plan) > 0.04
    # an occluded object is covered by a later placement, but never by more than max_cover of its box
    for im in default_plan.train:
        for i, o in enumerate(im.boxes):
            for p in im.boxes[i + 1:]:
                if p.x0 >= o.x0 and p.y0 >= o.y0 and p.x1 <= o.x1 and p.y1 <= o.y1:
                    assert o.label == tx.FRAME  # only a frame holds whole objects
    # colour does not name the class any more, and the confusable pairs are still alike in colour
    for plan, varies in ((easy_plan, False), (default_plan, True)):
        for lab in (tx.digit_label(3), tx.digit_label(8)):
            cols = np.array([o.color for im in plan.train for o in im.objects
                             if o.label == lab and o.kind != "group"])
            assert (cols.std(axis=0).mean() > 20) == varies
            if varies:
                assert np.abs(np.median(cols, axis=0) - tx.BY_LABEL[lab].color).max() < 60
    with pytest.raises(ValueError):
        gen.plan_dataset(n_train_images=2, n_test_images=0, difficulty=-0.5)


def test_group_of_boxes_enclose_unboxed_same_class_members(default_plan):
    groups = 0
    for im in default_plan.train:
        for g in (o for o in im.objects if o.is_group_of):
            groups += 1
            inside = [o for o in im.objects if o.x0 >= g.x0 and o.y0 >= g.y0 and o.x1 <= g.x1 and o.y1 <= g.y1
                      and o is not g]
            members = [o for o in inside if not o.boxed]
            assert len(members) >= 4 and {o.label for o in members} == {g.label}
            assert not any(o.boxed for o in inside)  # the individual ones are not boxed
    assert groups >= 20


def test_negative_labels_are_absent_and_prefer_the_confusable_partner(default_plan):
    lab = default_plan.image_labels_frame()
    assert set(lab["Confidence"]) == {0, 1}
    boxes = default_plan.bbox_frame()
    present = set(zip(boxes["ImageID"], boxes["LabelName"]))
    pos = lab[lab["Confidence"] == 1]
    neg = lab[lab["Confidence"] == 0]
    assert set(zip(pos["ImageID"], pos["LabelName"])) == present
    assert present.isdisjoint(zip(neg["ImageID"], neg["LabelName"]))
    assert len(neg) >= len(default_plan.train)
    # "Digit seven" (confusable with the frequent "Digit one") is verified absent far more than its share
    n_neg = neg["LabelName"].value_counts()
    assert n_neg[tx.digit_label(7)] > 2 * n_neg.median()


def test_cooccurrence_inside_and_aspect_phenomena(default_plan):
    s = gen.summarize(default_plan, image_size=(256, 320))["phenomena"]
    assert s["cooccurrence"]["fraction_with_pole"] >= 0.9
    assert s["inside"]["fraction_of_class_inside"] >= 0.6
    assert s["inside"]["boxes_inside_a_frame"] >= 30
    assert s["extreme_aspect"]["median_height_over_width"] >= 6
    assert s["hierarchy_depth"] >= 3 and s["multi_parent_classes"] == [tx.digit_label(6)]
    for a, b in tx.CONFUSED_PAIRS:
        assert tx.BY_LABEL[a].color == tx.BY_LABEL[b].color


def test_plan_rejects_contradictions():
    with pytest.raises(ValueError):
        gen.plan_dataset(n_train_images=2, n_test_images=0, image_size=(320, 256))
    with pytest.raises(ValueError):
        gen.plan_dataset(n_train_images=-1, n_test_images=0)


# ----- the files ----------------------------------------------------------------------------------------------
def test_files_parse_with_the_openimages_readers(small):
    classes = read_classes(small / gen.CLASSES_CSV)
    known = set(classes["label"])
    assert known == {c.label for c in tx.CLASSES}
    boxes = read_boxes(small / gen.BBOX_CSV, known_labels=known)
    labels = read_image_labels(small / gen.LABELS_CSV, known_labels=known)
    masks = read_masks_csv(small / gen.SEGMENTATION_CSV, known_labels=known)
    h = Hierarchy.from_json(small / gen.HIERARCHY_JSON)
    assert h.depth() >= 3
    assert set(h.labels) == known
    assert [c for c, ps in h.parents.items() if len(ps) > 1] == [tx.digit_label(6)]
    leaves = {c for c in h.labels if not h.children.get(c)}
    assert set(boxes["label"]) <= leaves and set(labels["label"]) <= leaves  # parents only by expansion
    assert boxes["is_group_of"].any() and (labels["confidence"] == 0).any()
    assert len(masks) == int((~boxes["is_group_of"] & boxes["label"].isin(set(tx.SEGMENTABLE))).sum())
    assert set(boxes["image_id"]) == {p.stem for p in (small / gen.IMAGES_DIR).iterdir()}
    test_ids = pd.read_csv(small / gen.TEST_CSV, dtype=str)["ImageID"]
    assert set(test_ids) == {p.stem for p in (small / gen.TEST_DIR).iterdir()} and len(test_ids) == 6
    assert set(test_ids).isdisjoint(boxes["image_id"])
    summary = json.loads((small / gen.SUMMARY_JSON).read_text())
    assert summary["n_boxes"] == len(boxes) and summary["n_masks"] == len(masks)


def test_images_decode_with_their_planned_sizes_and_real_content(small):
    plan = gen.plan_dataset(n_train_images=30, n_test_images=6, seed=3)
    for im in plan.images:
        sub = gen.IMAGES_DIR if im.split == "train" else gen.TEST_DIR
        with Image.open(small / sub / f"{im.image_id}.jpg") as f:
            assert f.format == "JPEG" and f.mode == "RGB" and f.size == (im.width, im.height)
            arr = np.asarray(f)
        assert arr.std() > 10  # a photo, not a flat fill


def test_masks_exist_and_match_their_boxes(small):
    masks = read_masks_csv(small / gen.SEGMENTATION_CSV)
    sizes = {}
    for row in masks.itertuples():
        if row.image_id not in sizes:
            with Image.open(small / gen.IMAGES_DIR / f"{row.image_id}.jpg") as f:
                sizes[row.image_id] = f.size
        w, h = sizes[row.image_id]
        with Image.open(small / gen.MASKS_DIR / row.mask_path) as f:
            assert f.size == (w, h)
            m = np.asarray(f)
        assert set(np.unique(m)) <= {0, 255} and m.any()
        ys, xs = np.nonzero(m)
        mx0, mx1, my0, my1 = xs.min() / w, (xs.max() + 1) / w, ys.min() / h, (ys.max() + 1) / h
        # the mask lies in its box (1 px slack) and fills most of it
        assert mx0 >= row.x_min - 1 / w and mx1 <= row.x_max + 1 / w
        assert my0 >= row.y_min - 1 / h and my1 <= row.y_max + 1 / h
        box_area = (row.x_max - row.x_min) * (row.y_max - row.y_min)
        assert (mx1 - mx0) * (my1 - my0) >= 0.6 * box_area


# ----- the CLI --------------------------------------------------------------------------------------------------
def test_cli_is_byte_identical_for_a_seed(tmp_path):
    args = ["--n-images", "6", "--n-test", "2"]
    assert gen.main([*args, "--seed", "1", "--out", str(tmp_path / "a")]) == 0
    assert gen.main([*args, "--seed", "1", "--out", str(tmp_path / "b")]) == 0
    assert gen.main([*args, "--seed", "2", "--out", str(tmp_path / "c")]) == 0
    for name in CSVS + [gen.SUMMARY_JSON]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    jpgs = sorted((tmp_path / "a" / gen.IMAGES_DIR).iterdir())
    assert all(p.read_bytes() == (tmp_path / "b" / gen.IMAGES_DIR / p.name).read_bytes() for p in jpgs)
    assert (tmp_path / "a" / gen.BBOX_CSV).read_bytes() != (tmp_path / "c" / gen.BBOX_CSV).read_bytes()


def test_cli_writes_atomically(tmp_path, monkeypatch):
    out = tmp_path / "orchard-mini"
    stale = tmp_path / ".orchard-mini.tmp"
    stale.mkdir()
    (stale / "junk").write_text("left by a killed run")
    assert gen.main(["--n-images", "3", "--n-test", "1", "--seed", "0", "--out", str(out)]) == 0
    assert not stale.exists() and (out / gen.BBOX_CSV).exists()
    before = (out / gen.BBOX_CSV).read_bytes()

    calls = {"n": 0}
    real = gen.render_image

    def failing(im):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("disk full")
        return real(im)

    monkeypatch.setattr(gen, "render_image", failing)
    with pytest.raises(RuntimeError):
        gen.main(["--n-images", "5", "--n-test", "1", "--seed", "9", "--out", str(out)])
    # the previous complete output is untouched and no partial directory is left
    assert (out / gen.BBOX_CSV).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orchard-mini"]
    with pytest.raises(RuntimeError):
        gen.main(["--n-images", "5", "--n-test", "1", "--seed", "9", "--out", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists()


def test_jpeg_quality_varies_with_difficulty_and_hard_rendering_is_deterministic():
    """Level 0 keeps the given JPEG quality for every image; level 1 lowers it per image. Rendering with clutter,
    blur and noise is still a function of the plan, and every masked object stays visible."""
    easy = gen.plan_dataset(n_train_images=6, n_test_images=0, seed=4, difficulty=0)
    hard = gen.plan_dataset(n_train_images=6, n_test_images=0, seed=4, difficulty=1)
    assert all(gen.jpeg_quality_of(im, 90) == 90 for im in easy.images)
    q = [gen.jpeg_quality_of(im, 90) for im in
         gen.plan_dataset(n_train_images=40, n_test_images=0, seed=4, difficulty=1).images]
    assert min(q) < 70 and max(q) <= 90 and len(set(q)) > 5
    for im in hard.images:
        img, masks = gen.render_image(im)
        again, _ = gen.render_image(im)
        assert np.array_equal(img, again)
        for m in masks.values():
            assert m.any()


def test_cli_rejects_bad_sizes(tmp_path):
    with pytest.raises(SystemExit) as e:
        gen.main(["--n-images", "3", "--min-size", "320", "--max-size", "256", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as e:
        gen.main(["--n-images", "3", "--difficulty", "5", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
