"""Weak labels in the data (issue 15): image-level-only and plain-background images in the generator, ingest and
split; the planted confusing pair; group-of classes with member masks; mask-derived boxes (stages.mask_boxes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy.stats import spearmanr

from stages import generate as gen
from stages import ingest, mask_boxes, split
from stages.core.errors import InputError
from stages.data import taxonomy as tx
from stages.formats.io import read_table, write_table
from stages.ingest_masks import encode_mask_files
from tests.conftest import LABEL_ROWS, ingest_args

OPTIONS = {"image_level_images": 12, "plain_images": 4}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ----- generator ------------------------------------------------------------------------------------------------
def test_options_off_reproduce_the_unchanged_generator():
    """Hashes of the CSVs and summary that the generator wrote before the options existed (main at 36bf754,
    same call): with the options off (their defaults) nothing changes."""
    p = gen.plan_dataset(n_train_images=40, n_test_images=3, seed=11, image_level_images=0, plain_images=0,
                         confusing_pair=False, group_of_masks=False)
    assert _sha(p.bbox_frame().to_csv(index=False)) == \
        "92d38559a61c56453480b47fb9787bd4c6daba3979921fe9650b8bed41bd2cb6"
    assert _sha(p.image_labels_frame().to_csv(index=False)) == \
        "8c17dd9de96e3b3787edf4dc4fd5214f8b6062245e0e57ac2a83f3f1f762ff08"
    assert _sha(p.segmentation_frame().to_csv(index=False)) == \
        "ccccdd919c1c33fe24b53ba41fa54ea812ae0f8d43a0a6fe86821a0da9db08f8"
    assert _sha(json.dumps(gen.summarize(p, image_size=(256, 320)), indent=2)) == \
        "8744929312e57108ab2ef1ec2f14c91ee0639cb5c33ac028c60080b9b0d7e0ae"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("weak")
    gen.generate(out_dir=root / "off", n_train_images=12, n_test_images=2, seed=4)
    gen.generate(out_dir=root / "on", n_train_images=12, n_test_images=2, seed=4, **OPTIONS)
    return root / "off", root / "on"


def test_image_level_images_are_appended_and_leave_everything_else_identical(pair):
    off, on = pair
    for name in (gen.BBOX_CSV, gen.SEGMENTATION_CSV, gen.CLASSES_CSV, gen.HIERARCHY_JSON, gen.TEST_CSV):
        assert (off / name).read_bytes() == (on / name).read_bytes(), name
    for sub in (gen.IMAGES_DIR, gen.MASKS_DIR, gen.TEST_DIR):
        for f in (off / sub).iterdir():
            assert f.read_bytes() == (on / sub / f.name).read_bytes(), f
    a, b = (off / gen.LABELS_CSV).read_bytes(), (on / gen.LABELS_CSV).read_bytes()
    assert b.startswith(a) and len(b) > len(a)   # appended rows
    assert not (off / gen.PLAIN_CSV).exists()
    s_off, s_on = (json.loads((d / gen.SUMMARY_JSON).read_text()) for d in pair)
    assert "image_level_only" not in s_off and "confusing_pair" not in s_off
    assert {k: v for k, v in s_on.items() if k != "image_level_only"} == s_off
    # the new images: JPEGs, labels (positives and verified negatives), no box or mask rows
    labels = pd.read_csv(on / gen.LABELS_CSV)
    boxed = set(pd.read_csv(on / gen.BBOX_CSV)["ImageID"])
    new = set(labels["ImageID"]) - boxed
    assert len(new) == 12 + 4
    assert new <= {p.stem for p in (on / gen.IMAGES_DIR).iterdir()}
    assert new.isdisjoint(pd.read_csv(on / gen.SEGMENTATION_CSV)["ImageID"])
    wl = labels[labels["ImageID"].isin(new)]
    assert set(wl.groupby("ImageID")["Confidence"].max()) == {1}
    assert (wl["Confidence"] == 0).sum() >= 16
    plain = set(pd.read_csv(on / gen.PLAIN_CSV)["ImageID"])
    assert len(plain) == 4 and plain <= new
    assert s_on["image_level_only"]["n_image_level"] == 12 and s_on["image_level_only"]["n_plain_background"] == 4


def test_image_level_classes_are_skewed_to_the_tail():
    plan = gen.plan_dataset(n_train_images=150, n_test_images=0, seed=2, image_level_images=150)
    boxes = plan.class_counts().set_index("label")["boxes"]
    weak = plan.weak_class_counts().set_index("label")["images"].reindex(boxes.index)
    rho = spearmanr(boxes.to_numpy(), weak.to_numpy()).statistic
    assert rho < -0.3, rho   # co-occurring classes (a disc's pole, a frame around a nine) dilute the skew
    assert weak.idxmax() == boxes.idxmin()
    order = boxes.sort_values().index
    third = len(order) // 3
    tail, head = order[:third], order[-third:]
    # the tail classes' share of the image-level labels is several times their share of the boxes
    assert weak[tail].sum() / weak.sum() > 2 * boxes[tail].sum() / boxes.sum()
    assert weak[tail].sum() > weak[head].sum()
    assert all(not im.box_annotated for im in plan.weak)


def test_plain_images_show_one_large_object_on_a_flat_background(pair):
    _, on = pair
    plan = gen.plan_dataset(n_train_images=12, n_test_images=2, seed=4, **OPTIONS)
    plain = [im for im in plan.weak if im.plain]
    assert len(plain) == 4
    for im in plain:
        (o,) = im.objects
        assert tx.BY_LABEL[o.label].kind in gen.PLAIN_KINDS
        assert max(o.x1 - o.x0, o.y1 - o.y0) >= 0.7 * min(im.width, im.height)
        assert 0 <= o.x0 and o.x1 <= im.width and 0 <= o.y0 and o.y1 <= im.height
        px = np.asarray(Image.open(on / gen.IMAGES_DIR / f"{im.image_id}.jpg"), np.float32)
        corner = px[:6, :6].reshape(-1, 3)
        assert corner.std(0).max() < 12   # flat (noise and JPEG only)
        inside = px[(o.y0 + o.y1) // 2, o.x0:o.x1]
        assert np.abs(inside - corner.mean(0)).max() > 40   # the object stands out


def test_confusing_pair_option():
    off = gen.plan_dataset(n_train_images=60, n_test_images=0, seed=0)
    on = gen.plan_dataset(n_train_images=60, n_test_images=0, seed=0, confusing_pair=True)
    _, targets = gen.draw.digits()
    seven, one = gen.CONFUSING_PAIR

    def digits_drawn(plan, label):
        return {int(targets[o.glyph]) for im in plan.train for o in im.objects
                if o.label == label and o.glyph >= 0}

    assert digits_drawn(off, seven) == {7}
    assert digits_drawn(on, seven) == {1, 7} and digits_drawn(on, one) == {1}
    s = gen.summarize(on, image_size=(256, 320))
    assert s["confusing_pair"]["classes"] == [seven, one]
    assert "confusing_pair" not in gen.summarize(off, image_size=(256, 320))


def test_group_of_masks_option_makes_a_mostly_group_of_class_with_member_masks():
    plan = gen.plan_dataset(n_train_images=150, n_test_images=0, seed=1, group_of_masks=True)
    c = plan.class_counts().set_index("label").loc[gen.GROUP_OF_HEAVY]
    assert c["group_of"] > 0.5 * c["boxes"]
    seg = plan.segmentation_frame()
    members = [(im, o) for im in plan.train for o in im.objects if o.member_mask]
    assert members and all(not o.boxed for _, o in members)
    assert {gen.mask_path(im.image_id, o) for im, o in members} <= set(seg["MaskPath"])
    assert gen.summarize(plan, image_size=(256, 320))["group_of_masks"]["member_masks"] == len(members)


# ----- ingest ---------------------------------------------------------------------------------------------------
def _add_weak_image(files: dict[str, Path], rows: list[str], image_id: str = "img4") -> None:
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(files["images"] / f"{image_id}.jpg")
    files["labels"].write_text("\n".join(["ImageID,Source,LabelName,Confidence", *LABEL_ROWS, *rows]) + "\n")


def _run(files, out, capsys, *extra):
    rc = ingest.main([*ingest_args(files, out), *extra])
    return rc, capsys.readouterr().err


def test_ingest_flags_image_level_only_and_plain_images(tiny, tmp_path, capsys):
    _add_weak_image(tiny, ["img4,x,/m/dog,1", "img4,x,/m/cat,0"])
    plain = tmp_path / "plain.csv"
    plain.write_text("ImageID\nimg4\n")
    out = tmp_path / "out"
    rc, err = _run(tiny, out, capsys, "--plain-list", str(plain))
    assert rc == 0, err
    im = read_table(out / "images.parquet", "images").set_index("image_id")
    assert im["box_annotated"].to_dict() == {"img0": True, "img1": True, "img2": True, "img3": True, "img4": False}
    assert im["plain_background"].to_dict() == {"img0": False, "img1": False, "img2": False, "img3": False,
                                                "img4": True}
    s = json.loads((out / "summary.json").read_text())
    assert (s["image_level_only_images"], s["plain_background_images"], s["image_level_only_dropped"]) == (1, 1, 0)
    assert s["image_level_only_per_class"] == {"/m/cat": {"positive": 0, "negative": 1},
                                               "/m/dog": {"positive": 1, "negative": 0}}
    assert set(read_table(out / "image_labels.parquet", "image_labels")["image_id"]) >= {"img4"}
    # drop: the image and its labels are left out
    out2 = tmp_path / "out2"
    rc, err = _run(tiny, out2, capsys, "--image-level-only", "drop")
    assert rc == 0, err
    assert "img4" not in set(read_table(out2 / "images.parquet", "images")["image_id"])
    assert "img4" not in set(read_table(out2 / "image_labels.parquet", "image_labels")["image_id"])
    assert json.loads((out2 / "summary.json").read_text())["image_level_only_dropped"] == 1


def test_ingest_tables_unchanged_without_image_level_images(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _run(tiny, out, capsys, "--plain-list", str(tmp_path / "absent.csv"))   # a missing list: none
    assert rc == 0, err
    assert list(read_table(out / "images.parquet", "images").columns) == ["image_id", "path", "width", "height"]


def _assert_bad(rc, err, out, *needles):
    assert rc == 2, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert not out.exists() or not any(out.iterdir()), "no output may be written on bad input"


def test_image_level_only_image_with_an_unknown_mid(tiny, tmp_path, capsys):
    _add_weak_image(tiny, ["img4,x,/m/dog,1", "img4,x,/m/unicorn,1"])
    rc, err = _run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "labels.csv", "/m/unicorn", f"line {len(LABEL_ROWS) + 3}", "LabelName")


def test_image_level_only_image_with_contradicting_labels(tiny, tmp_path, capsys):
    _add_weak_image(tiny, ["img4,x,/m/dog,1", "img4,x,/m/car,0", "img4,x,/m/dog,0"])
    rc, err = _run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "labels.csv", "contradicting", "/m/dog", "img4",
                f"line {len(LABEL_ROWS) + 4}", "Confidence")


def test_plain_list_naming_an_unlabelled_image(tiny, tmp_path, capsys):
    plain = tmp_path / "plain.csv"
    plain.write_text("ImageID\nimg1\nnope\n")
    rc, err = _run(tiny, tmp_path / "out", capsys, "--plain-list", str(plain))
    _assert_bad(rc, err, tmp_path / "out", "plain.csv", "nope", "line 3", "ImageID")


# ----- split ----------------------------------------------------------------------------------------------------
def test_split_puts_image_level_only_images_in_train_and_leaves_the_rest_unchanged():
    plan = gen.plan_dataset(n_train_images=60, n_test_images=0, seed=5, image_level_images=20, plain_images=5)
    bf = plan.bbox_frame()
    boxes = pd.DataFrame({"image_id": bf["ImageID"], "label": bf["LabelName"]})
    box_ids = [im.image_id for im in plan.train]
    weak_ids = [im.image_id for im in plan.weak]
    base, _ = split.split(images=pd.DataFrame({"image_id": box_ids}), boxes=boxes, seed=3)
    images = pd.DataFrame({"image_id": box_ids + weak_ids,
                           "box_annotated": [True] * len(box_ids) + [False] * len(weak_ids)})
    table, report = split.split(images=images.sample(frac=1, random_state=0), boxes=boxes, seed=3)
    s = table.set_index("image_id")["split"].astype(str)
    assert (s[weak_ids] == "train").all()
    pd.testing.assert_series_equal(s[base["image_id"]], base.set_index("image_id")["split"].astype(str))
    assert list(table["image_id"]) == sorted(box_ids + weak_ids)
    assert report["image_level_only_in_train"] == 25
    assert report["images"]["train"] == int((base["split"] == "train").sum()) + 25


def test_split_cli_reads_the_box_annotated_column(tmp_path, capsys):
    ids = [f"i{k:02d}" for k in range(12)]
    images = pd.DataFrame({"image_id": ids, "path": ids, "width": 8, "height": 8,
                           "box_annotated": [k < 9 for k in range(12)]})
    boxes = pd.DataFrame({"image_id": ids[:9], "label": ["/m/a", "/m/b", "/m/c"] * 3, "x_min": 0.1, "y_min": 0.1,
                          "x_max": 0.5, "y_max": 0.5, "is_group_of": False})
    write_table(tmp_path / "images.parquet", images, "images")
    write_table(tmp_path / "boxes.parquet", boxes, "boxes")
    assert split.main(["--images", str(tmp_path / "images.parquet"), "--boxes", str(tmp_path / "boxes.parquet"),
                       "--out", str(tmp_path / "s.parquet"), "--report", str(tmp_path / "r.json")]) == 0
    s = read_table(tmp_path / "s.parquet", "splits").set_index("image_id")["split"]
    assert (s[ids[9:]] == "train").all()


# ----- mask-derived boxes ---------------------------------------------------------------------------------------
def _rle(m: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()


def _gt(rows: list[tuple[str, str, np.ndarray]]) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [r[0] for r in rows], "label": [r[1] for r in rows],
                         "x_min": 0.0, "y_min": 0.0, "x_max": 1.0, "y_max": 1.0,   # the CSV's box: not used
                         "rle": [_rle(r[2]) for r in rows], "mask_height": [r[2].shape[0] for r in rows],
                         "mask_width": [r[2].shape[1] for r in rows],
                         "mask_path": [f"m{i}.png" for i in range(len(rows))]})


def _mask(h=10, w=20, ys=(2, 5), xs=(3, 8)) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[ys[0]:ys[1] + 1, xs[0]:xs[1] + 1] = True
    return m


def test_tight_box_of_a_hand_drawn_mask(tmp_path):
    m = _mask()
    m[4, 3] = False   # holes inside do not matter; the extreme pixels do
    gt = _gt([("a", "/m/x", m)])
    np.testing.assert_allclose(mask_boxes.mask_tight_boxes(gt), [[3 / 20, 2 / 10, 9 / 20, 6 / 10]])
    # the same through a PNG read by ingest_masks' decoder
    Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "m.png")
    counts, bad, _ = encode_mask_files([str(tmp_path / "m.png")], np.array([[20, 10]]))
    assert bad == -1 and counts[0] == gt["rle"].iloc[0]
    # one pixel in the corner: a box of one pixel's size
    one = np.zeros((10, 20), bool)
    one[9, 19] = True
    np.testing.assert_allclose(mask_boxes.mask_tight_boxes(_gt([("a", "/m/x", one)])), [[19 / 20, 0.9, 1.0, 1.0]])


def _boxes(rows: list[tuple[str, str, bool, tuple[float, float, float, float]]]) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [r[0] for r in rows], "label": [r[1] for r in rows],
                         "x_min": [r[3][0] for r in rows], "y_min": [r[3][1] for r in rows],
                         "x_max": [r[3][2] for r in rows], "y_max": [r[3][3] for r in rows],
                         "is_group_of": [r[2] for r in rows]})


FULL = (0.0, 0.0, 1.0, 1.0)


@pytest.fixture
def case() -> tuple[pd.DataFrame, pd.DataFrame]:
    # /m/g: 3 of 4 boxes group-of, masks -> chosen; /m/h: 1 of 4, masks -> not; /m/n: 3 of 4, no mask -> not
    boxes = _boxes([("t1", "/m/g", True, FULL), ("t2", "/m/g", True, FULL), ("v1", "/m/g", True, FULL),
                    ("t1", "/m/g", False, (3 / 20, 2 / 10, 9 / 20, 6 / 10)),
                    ("t1", "/m/h", True, FULL), *[("t1", "/m/h", False, FULL)] * 3,
                    *[("t1", "/m/n", True, FULL)] * 3, ("t1", "/m/n", False, FULL)])
    gt = _gt([("t1", "/m/g", _mask()),                        # its instance box exists: a duplicate
              ("t1", "/m/g", _mask(ys=(7, 9), xs=(10, 19))),  # added
              ("t2", "/m/g", _mask(ys=(0, 0), xs=(0, 0))),    # added (one pixel)
              ("t2", "/m/g", np.zeros((10, 20), bool)),       # empty: skipped, counted
              ("v1", "/m/g", _mask()),                        # not a train image
              ("t1", "/m/h", _mask())])
    return boxes, gt


def test_mask_derived_boxes_hand_worked(case):
    boxes, gt = case
    res = mask_boxes.mask_derived_boxes(boxes=boxes, gt_masks=gt, train_ids={"t1", "t2"}, group_of_share=0.5)
    r = res.report
    assert r["classes_chosen"] == ["/m/g"]
    assert r["boxes_added"] == {"/m/g": 2} and r["boxes_added_total"] == 2
    assert r["skipped_empty_mask"] == {"/m/g": 1} and r["skipped_empty_mask_total"] == 1
    assert r["skipped_not_train"] == {"/m/g": 1} and r["skipped_duplicate"] == {"/m/g": 1}
    fig = {c["label"]: c for c in r["classes"]}
    assert fig["/m/g"]["group_of_share"] == 0.75 and fig["/m/n"]["masks"] == 0
    out = res.boxes
    pd.testing.assert_frame_equal(out.iloc[:len(boxes)].drop(columns="mask_path"), boxes)
    new = out.iloc[len(boxes):]
    assert list(new["image_id"]) == ["t1", "t2"] and not new["is_group_of"].any()
    np.testing.assert_allclose(new[["x_min", "y_min", "x_max", "y_max"]].to_numpy(),
                               [[10 / 20, 7 / 10, 20 / 20, 10 / 10], [0, 0, 1 / 20, 1 / 10]])
    assert list(new["mask_path"]) == ["m1.png", "m2.png"] and out["mask_path"].iloc[:len(boxes)].isna().all()


def test_class_selection_rule_threshold_and_list(case):
    boxes, gt = case
    fig = mask_boxes.class_figures(boxes, gt)
    assert mask_boxes.select_classes(fig, group_of_share=0.74) == ["/m/g"]
    assert mask_boxes.select_classes(fig, group_of_share=0.75) == []   # strictly above
    assert mask_boxes.select_classes(fig, group_of_share=0.2) == ["/m/g", "/m/h"]
    assert mask_boxes.select_classes(fig, group_of_share=0.9, classes=["/m/h"]) == ["/m/h"]
    with pytest.raises(InputError, match="unknown label"):
        mask_boxes.select_classes(fig, group_of_share=0.5, classes=["/m/zzz"])
    with pytest.raises(InputError, match="no instance mask"):
        mask_boxes.select_classes(fig, group_of_share=0.5, classes=["/m/n"])
    with pytest.raises(InputError, match="twice"):
        mask_boxes.select_classes(fig, group_of_share=0.5, classes=["/m/g", "/m/g"])


def test_mask_boxes_cli_round_trip_and_bad_class(case, tmp_path, capsys):
    boxes, gt = case
    write_table(tmp_path / "boxes.parquet", boxes, "boxes")
    write_table(tmp_path / "gt.parquet", gt, "gt_masks")
    write_table(tmp_path / "splits.parquet", pd.DataFrame({"image_id": ["t1", "t2", "v1"],
                                                           "split": ["train", "train", "val_a"]}), "splits")
    args = ["--boxes", str(tmp_path / "boxes.parquet"), "--gt-masks", str(tmp_path / "gt.parquet"),
            "--splits", str(tmp_path / "splits.parquet"), "--out", str(tmp_path / "o.parquet"),
            "--report", str(tmp_path / "r.json")]
    assert mask_boxes.main(args) == 0
    assert len(read_table(tmp_path / "o.parquet", "boxes")) == len(boxes) + 2
    assert json.loads((tmp_path / "r.json").read_text())["skipped_empty_mask_total"] == 1
    out = tmp_path / "bad"
    out.mkdir()
    rc = mask_boxes.main([*args[:6], "--classes", "/m/zzz", "--out", str(out / "o.parquet"),
                          "--report", str(out / "r.json")])
    assert rc == 2 and "/m/zzz" in capsys.readouterr().err and not any(out.iterdir())
