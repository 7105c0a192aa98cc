"""Inspect: the summary's numbers on a hand-built table, drawings (stages.viz.overlay) that change exactly the pixels
of the boxes (and masks), reading any canonical table, and every bad input ending in exit 2 with a message."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from stages import inspect
from stages.formats.io import read_canonical, write_table
from stages.viz import overlay

W, H = 100, 80
GREY = (128, 128, 128)


def dets_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": ["i0", "i0", "i0", "i1", "i2", "i2"],
        "label": ["/m/cat", "/m/cat", "/m/dog", "/m/cat", "/m/car", "/m/dog"],
        "score": [0.95, 0.05, 0.55, 0.25, 0.15, 1.0],
        "x_min": [0.1, 0.2, 0.5, 0.0, 0.3, 0.1], "y_min": [0.1, 0.2, 0.5, 0.0, 0.3, 0.1],
        "x_max": [0.5, 0.4, 0.9, 1.0, 0.6, 0.2], "y_max": [0.6, 0.4, 0.9, 1.0, 0.7, 0.2],
        "model": ["a", "a", "b", "b", "b", "b"], "scale": [600, 800, 600, 600, 600, 800],
        "flip": [False, True, False, False, True, False],
    })


def outline(x0: int, y0: int, x1: int, y1: int, lw: int) -> np.ndarray:
    """Boolean [H, W]: PIL's rectangle outline of width lw (drawn inwards from the inclusive corners)."""
    m = np.zeros((H, W), bool)
    m[y0:y1 + 1, x0:x1 + 1] = True
    m[y0 + lw:y1 + 1 - lw, x0 + lw:x1 + 1 - lw] = False
    return m


def changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    return (np.asarray(a, np.int16) != np.asarray(b, np.int16)).any(axis=2)


@pytest.fixture
def grey() -> Image.Image:
    return Image.new("RGB", (W, H), GREY)


def test_summary_numbers():
    s = inspect.summarize(dets_frame(), table="detections", provenance={"stage": "merge"},
                          names={"/m/cat": "Cat"}, top=2, bins=4)
    assert (s.table, s.rows, s.images, s.classes) == ("detections", 6, 3, 3)
    assert s.score_bins == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert s.score_counts == [2, 1, 1, 2]  # 0.25 opens the second bin; 1.0 closes the last
    assert (s.score_min, s.score_max) == (0.05, 1.0)
    assert s.groups == {"model": {"a": 2, "b": 4}, "scale": {"600": 4, "800": 2}, "flip": {"False": 4, "True": 2}}
    assert s.top_classes == [("/m/cat", "Cat", 3), ("/m/dog", "/m/dog", 2)]
    assert s.per_image == {"min": 1.0, "median": 2.0, "mean": 2.0, "max": 3.0}
    text = inspect.format_summary(s)
    assert "rows: 6" in text and "stage: merge" in text and "Cat (/m/cat)" in text
    assert "by model: a=2, b=4" in text


def test_summary_of_a_table_without_scores():
    boxes = dets_frame().drop(columns=["score", "model", "scale", "flip"]).assign(is_group_of=False)
    s = inspect.summarize(boxes, table="boxes")
    assert s.score_counts == [] and s.groups == {} and s.rows == 6 and s.classes == 3


def test_main_prints_summary_and_provenance(tmp_path, capsys):
    write_table(tmp_path / "d.parquet", dets_frame(), "detections", provenance={"stage": "merge", "model": "x"})
    (tmp_path / "classes.csv").write_text("/m/cat,Cat\n/m/dog,Dog\n/m/car,Car\n")
    assert inspect.main([str(tmp_path / "d.parquet"), "--classes", str(tmp_path / "classes.csv")]) == 0
    out = capsys.readouterr().out
    assert "table: detections" in out and "stage: merge" in out and "images: 3" in out
    assert "3  Cat (/m/cat)" in out and "by scale: 600=4, 800=2" in out


def test_table_guessed_without_metadata(tmp_path):
    dets_frame().drop(columns=["model"]).to_parquet(tmp_path / "plain.parquet")
    name, df, prov = read_canonical(tmp_path / "plain.parquet")
    assert (name, prov, len(df)) == ("detections", {}, 6)
    pd.DataFrame({"image_id": ["a"], "split": ["val_a"]}).to_parquet(tmp_path / "s.parquet")
    assert read_canonical(tmp_path / "s.parquet")[0] == "splits"


def test_drawn_pixels_are_exactly_the_box_outline(grey):
    d = pd.DataFrame({"image_id": ["i"], "label": ["/m/cat"], "score": [0.9],
                      "x_min": [0.1], "y_min": [0.25], "x_max": [0.5], "y_max": [0.75]})
    out = overlay.draw_detections(grey, d, labels=False, line_width=2)
    assert out.size == grey.size
    # x: 10 .. ceil(50)-1 = 49; y: 20 .. 59
    np.testing.assert_array_equal(changed(grey, out), outline(10, 20, 49, 59, 2))
    colour = overlay.class_colours(["/m/cat"])["/m/cat"]
    assert tuple(np.asarray(out)[20, 30]) == colour

    tagged = overlay.draw_detections(grey, d, labels=True, line_width=2)
    diff = changed(grey, tagged)
    band = outline(10, 20, 49, 59, 2)
    assert diff[band].all()
    extra = diff & ~band
    ys, xs = np.nonzero(extra)
    assert len(ys) > 20 and ys.max() < 20 and xs.min() >= 10  # the tag sits above the box, at its left edge


def test_threshold_and_ground_truth_dashed(grey):
    d = pd.DataFrame({"image_id": ["i"], "label": ["/m/cat"], "score": [0.2],
                      "x_min": [0.1], "y_min": [0.25], "x_max": [0.5], "y_max": [0.75]})
    assert not changed(grey, overlay.draw_detections(grey, d, score_thr=0.3)).any()
    gt = d.drop(columns=["score"]).assign(is_group_of=False)
    out = overlay.draw_detections(grey, d.iloc[:0], gt=gt, labels=False, line_width=1)
    diff, band = changed(grey, out), outline(10, 20, 49, 59, 1)
    assert not (diff & ~band).any()
    assert 0.3 * band.sum() < diff.sum() < 0.8 * band.sum()  # dashed: part of the outline only


def test_masks_filled_inside_their_rle(grey):
    m = np.zeros((H, W), np.uint8)
    m[30:50, 20:40] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    d = pd.DataFrame({"image_id": ["i"], "label": ["/m/dog"], "score": [0.9], "x_min": [0.2], "y_min": [0.375],
                      "x_max": [0.4], "y_max": [0.625], "rle": [rle["counts"].decode()], "mask_height": [H],
                      "mask_width": [W]})
    out = overlay.draw_detections(grey, d, labels=False, line_width=1)
    diff = changed(grey, out)
    np.testing.assert_array_equal(diff, m.astype(bool))  # the outline lies on the mask's border pixels
    colour = np.asarray(overlay.class_colours(["/m/dog"])["/m/dog"], float)
    inner = np.asarray(out)[40, 30].astype(float)
    np.testing.assert_allclose(inner, np.round(0.55 * np.asarray(GREY) + 0.45 * colour), atol=1)
    # a mask stored at another resolution is resized onto the image
    half = mask_utils.encode(np.asfortranarray(m[::2, ::2].copy()))
    d2 = d.assign(rle=[half["counts"].decode()], mask_height=[H // 2], mask_width=[W // 2])
    assert changed(grey, overlay.draw_detections(grey, d2, labels=False, line_width=1)).sum() == m.sum()


def _files(tmp_path):
    Image.new("RGB", (W, H), GREY).save(tmp_path / "i0.png")
    write_table(tmp_path / "images.parquet", pd.DataFrame({"image_id": ["i0"], "path": [str(tmp_path / "i0.png")],
                                                            "width": [W], "height": [H]}), "images")
    write_table(tmp_path / "d.parquet", dets_frame(), "detections")
    gt = dets_frame().drop(columns=["score", "model", "scale", "flip"]).assign(is_group_of=False)
    write_table(tmp_path / "boxes.parquet", gt, "boxes")
    return tmp_path / "d.parquet", tmp_path / "images.parquet", tmp_path / "boxes.parquet"


def test_main_draws_png(tmp_path, capsys):
    d, images, boxes = _files(tmp_path)
    rc = inspect.main([str(d), "--image", "i0", "--images", str(images), "--boxes", str(boxes), "--min-side", "0",
                       "--out", str(tmp_path / "x.png"), "--score-thr", "0.5"])
    assert rc == 0
    assert "drew 2 detections rows of i0" in capsys.readouterr().out
    with Image.open(tmp_path / "x.png") as im:
        assert im.size == (W, H)
        assert changed(Image.new("RGB", (W, H), GREY), im.convert("RGB")).any()
    rc = inspect.main([str(d), "--image", "i0", "--images", str(images), "--out", str(tmp_path / "big.png")])
    assert rc == 0
    with Image.open(tmp_path / "big.png") as im:
        assert min(im.size) == 480  # upscaled for legible tags


@pytest.mark.parametrize("case", ["unknown_image", "not_parquet", "garbage", "missing", "no_images",
                                  "not_canonical", "missing_image_file"])
def test_bad_input_exits_2(tmp_path, capsys, case):
    d, images, boxes = _files(tmp_path)
    draw = ["--images", str(images), "--out", str(tmp_path / "x.png")]
    if case == "unknown_image":
        argv, msg = [str(d), "--image", "nope", *draw], "unknown image id 'nope'"
    elif case == "not_parquet":
        (tmp_path / "d.csv").write_text("a,b\n")
        argv, msg = [str(tmp_path / "d.csv")], "not a parquet file"
    elif case == "garbage":
        (tmp_path / "g.parquet").write_text("hello")
        argv, msg = [str(tmp_path / "g.parquet")], "not a readable parquet file"
    elif case == "missing":
        argv, msg = [str(tmp_path / "none.parquet")], "file not found"
    elif case == "no_images":
        argv, msg = [str(d), "--image", "i0", "--out", str(tmp_path / "x.png")], "--image needs --images"
    elif case == "not_canonical":
        pd.DataFrame({"foo": [1]}).to_parquet(tmp_path / "f.parquet")
        argv, msg = [str(tmp_path / "f.parquet")], "not a canonical table"
    else:
        (tmp_path / "i0.png").unlink()
        argv, msg = [str(d), "--image", "i0", *draw], "cannot open image 'i0'"
    assert inspect.main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
