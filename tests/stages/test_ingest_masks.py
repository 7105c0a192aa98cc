"""Ingest masks: the segmentation ground truth (CSV + PNGs + segmentable classes + their hierarchy) -> gt_masks,
seg_classes, seg_hierarchy. The good path decodes to the PNGs; every bad input ends in exit 2, a message naming
file, line and field, and no output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mu

from stages import ingest_masks as im
from stages.formats.io import read_canonical, read_table, write_table

W, H = 64, 48
CLASSES = [("/m/a", "Animal"), ("/m/cat", "Cat"), ("/m/dog", "Dog"), ("/m/car", "Car")]
SEG_CLASSES = [("/m/a", "Animal"), ("/m/cat", "Cat"), ("/m/dog", "Dog")]          # cars are not segmentable
SEG_HIERARCHY = {"LabelName": "/m/0bl9f", "Subcategory": [
    {"LabelName": "/m/a", "Subcategory": [{"LabelName": "/m/cat"}, {"LabelName": "/m/dog"}]}]}
HEADER = "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks"
#: (file, image, label, box XMin XMax YMin YMax, rectangle y0 x0 y1 x1 of the mask)
ROWS = [
    ("img0_mcat_1.png", "img0", "/m/cat", (0.1, 0.5, 0.1, 0.6), (5, 6, 29, 32)),
    ("img0_mdog_2.png", "img0", "/m/dog", (0.5, 0.9, 0.5, 0.9), (24, 32, 44, 58)),
    ("img1_mdog_3.png", "img1", "/m/dog", (0.2, 0.7, 0.2, 0.8), (10, 13, 38, 45)),
    ("img2_mcat_4.png", "img2", "/m/cat", (0.0, 1.0, 0.0, 1.0), (0, 0, 48, 64)),
]


def _mask(rect, h=H, w=W) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    y0, x0, y1, x1 = rect
    m[y0:y1, x0:x1] = 1
    return m


def _row(path, img, lab, box) -> str:
    return f"{path},{img},{lab},b,{box[0]},{box[1]},{box[2]},{box[3]},1.00,"


@pytest.fixture
def seg(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "oid"
    (d / "masks").mkdir(parents=True)
    for path, _, _, _, rect in ROWS:
        Image.fromarray(_mask(rect) * 255).save(d / "masks" / path)
    f = {"csv": d / "seg.csv", "dir": d / "masks", "seg_classes": d / "seg-classes.csv",
         "seg_hierarchy": d / "seg-hierarchy.json", "images": d / "images.parquet", "classes": d / "classes.csv"}
    f["csv"].write_text("\n".join([HEADER, *(_row(*r[:4]) for r in ROWS)]) + "\n")
    f["seg_classes"].write_text("".join(f"{m},{n}\n" for m, n in SEG_CLASSES))
    f["classes"].write_text("".join(f"{m},{n}\n" for m, n in CLASSES))
    f["seg_hierarchy"].write_text(json.dumps(SEG_HIERARCHY))
    write_table(f["images"], pd.DataFrame({"image_id": ["img0", "img1", "img2", "img3"],
                                           "path": [f"{i}.jpg" for i in range(4)], "width": W, "height": H}),
                "images")
    return f


def args(f: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--masks-csv", str(f["csv"]), "--mask-dir", str(f["dir"]), "--images", str(f["images"]),
            "--classes", str(f["classes"]), "--seg-classes", str(f["seg_classes"]),
            "--seg-hierarchy", str(f["seg_hierarchy"]), "--out-masks", str(out / "gt_masks.parquet"),
            "--out-classes", str(out / "seg_classes.parquet"),
            "--out-hierarchy", str(out / "seg_hierarchy.parquet"), *extra]


def run(f, out, capsys, *extra):
    rc = im.main(args(f, out, *extra))
    return rc, capsys.readouterr().err


def test_good_path_rles_decode_to_the_pngs(seg, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run(seg, out, capsys)
    assert rc == 0, err
    gt = read_table(out / "gt_masks.parquet", "gt_masks")
    assert read_canonical(out / "gt_masks.parquet")[0] == "gt_masks"
    assert list(gt["mask_path"]) == [r[0] for r in ROWS] and list(gt["label"]) == [r[2] for r in ROWS]
    for row, (path, img, lab, box, rect) in zip(gt.itertuples(), ROWS):
        assert (row.x_min, row.x_max, row.y_min, row.y_max) == box     # CSV order XMin XMax YMin YMax
        assert (row.mask_height, row.mask_width) == (H, W)
        m = mu.decode({"size": [H, W], "counts": row.rle.encode()})
        png = np.asarray(Image.open(seg["dir"] / path)) > 0
        assert np.array_equal(m.astype(bool), png) and m.sum() == png.sum() > 0
    classes = read_table(out / "seg_classes.parquet", "classes")
    assert list(classes["label"]) == [m for m, _ in SEG_CLASSES]
    h = read_table(out / "seg_hierarchy.parquet", "hierarchy")
    assert set(zip(h["child"], h["parent"])) == {("/m/cat", "/m/a"), ("/m/dog", "/m/a")}


def test_one_bit_and_zero_one_pngs_and_the_process_pool(seg, tmp_path, capsys):
    """Mode '1' PNGs and {0, 1} PNGs read as masks; decoding in 2 processes of 1-mask chunks equals serial."""
    Image.fromarray(_mask(ROWS[0][4]).astype(bool)).save(seg["dir"] / ROWS[0][0])      # mode "1"
    Image.fromarray(_mask(ROWS[1][4])).save(seg["dir"] / ROWS[1][0])                    # 0/1 in mode "L"
    assert Image.open(seg["dir"] / ROWS[0][0]).mode == "1"
    paths = [str(seg["dir"] / r[0]) for r in ROWS]
    sizes = np.array([[W, H]] * len(ROWS))
    serial = im.encode_mask_files(paths, sizes, threads=1)
    pooled = im.encode_mask_files(paths, sizes, threads=2, chunk=1, log_every=1)
    assert serial == pooled and serial[1] == -1
    for c, r in zip(serial[0], ROWS):
        assert np.array_equal(mu.decode({"size": [H, W], "counts": c.encode()}), _mask(r[4]))
    # the first bad mask is reported, whichever process finds it
    Image.fromarray(np.full((H, W), 7, np.uint8)).save(seg["dir"] / ROWS[2][0])
    assert im.encode_mask_files(paths, sizes, threads=2, chunk=1)[1] == 2


def test_resize_masks_option(seg, tmp_path, capsys):
    small = _mask(ROWS[3][4])[::2, ::2]
    Image.fromarray(small * 255).save(seg["dir"] / ROWS[3][0])     # half resolution
    rc, err = run(seg, tmp_path / "strict", capsys)
    assert rc == 2 and "32 x 24 px, its image 64 x 48 px" in err
    rc, err = run(seg, tmp_path / "out", capsys, "--resize-masks")
    assert rc == 0, err
    gt = read_table(tmp_path / "out" / "gt_masks.parquet", "gt_masks")
    assert (gt["mask_height"] == H).all() and mu.area({"size": [H, W], "counts": gt["rle"][3].encode()}) == H * W


def _assert_bad(rc, err, out, *needles):
    assert rc == 2, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert not out.exists() or not any(out.iterdir()), "no output may be written on bad input"


def _rewrite_row(f, i, **change):
    rows = [list(r) for r in ROWS]
    for k, v in change.items():
        rows[i][["path", "img", "lab", "box"].index(k)] = v
    f["csv"].write_text("\n".join([HEADER, *(_row(*r[:4]) for r in rows)]) + "\n")


def test_missing_png(seg, tmp_path, capsys):
    (seg["dir"] / ROWS[2][0]).unlink()
    rc, err = run(seg, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "seg.csv", "line 4", "'MaskPath'", "not found")


def test_unreadable_png(seg, tmp_path, capsys):
    (seg["dir"] / ROWS[1][0]).write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    rc, err = run(seg, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "seg.csv", "line 3", "'MaskPath'", "unreadable mask PNG")


def test_png_of_the_wrong_size(seg, tmp_path, capsys):
    Image.fromarray(_mask((1, 1, 9, 9), h=H, w=W + 1) * 255).save(seg["dir"] / ROWS[1][0])
    rc, err = run(seg, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "seg.csv", "line 3", "'MaskPath'", "65 x 48 px, its image 64 x 48 px")


@pytest.mark.parametrize("values, mode", [((0, 128, 255), "L"), ((0, 1, 255), "L"), ((0, 255), "RGB")])
def test_png_not_binary(seg, tmp_path, capsys, values, mode):
    m = np.zeros((H, W), np.uint8)
    for k, v in enumerate(values):
        m[k * 5:(k + 1) * 5] = v
    img = Image.fromarray(m).convert(mode) if mode != "L" else Image.fromarray(m)
    img.save(seg["dir"] / ROWS[0][0])
    rc, err = run(seg, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "seg.csv", "line 2", "'MaskPath'",
                "not binary" if mode == "L" else "not a single-channel binary mask")


@pytest.mark.parametrize("change, line, field, needle", [
    ({"lab": "/m/zebra"}, 3, "LabelName", "unknown label (MID) '/m/zebra'"),
    ({"lab": "/m/car"}, 4, "LabelName", "'/m/car' is not segmentable"),
    ({"box": (0.1, 1.2, 0.1, 0.6)}, 2, "BoxXMax", "outside [0, 1]"),
    ({"box": (-0.1, 0.5, 0.1, 0.6)}, 5, "BoxXMin", "outside [0, 1]"),
    ({"box": (0.1, 0.5, 0.7, 0.6)}, 3, "BoxYMin", "> BoxYMax"),
    ({"img": "img9"}, 4, "ImageID", "image 'img9' is not in the images table"),
    ({"box": ("x", 0.5, 0.1, 0.6)}, 2, "BoxXMin", "not a number"),
])
def test_bad_csv_rows(seg, tmp_path, capsys, change, line, field, needle):
    _rewrite_row(seg, line - 2, **change)
    rc, err = run(seg, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "seg.csv", f"line {line}", f"'{field}'", needle)


def test_mask_path_listed_twice(seg, tmp_path, capsys):
    _rewrite_row(seg, 2, path=ROWS[0][0])
    rc, err = run(seg, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "seg.csv", "line 4", "'MaskPath'", "listed twice")


def test_segmentable_class_that_is_not_a_detection_class(seg, tmp_path, capsys):
    seg["seg_classes"].write_text("".join(f"{m},{n}\n" for m, n in SEG_CLASSES) + "/m/ghost,Ghost\n")
    rc, err = run(seg, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "seg-classes.csv", "line 4", "'MID'", "not a detection class")


def test_hierarchy_label_that_is_not_segmentable(seg, tmp_path, capsys):
    h = json.loads(json.dumps(SEG_HIERARCHY))
    h["Subcategory"].append({"LabelName": "/m/car"})
    seg["seg_hierarchy"].write_text(json.dumps(h))
    rc, err = run(seg, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "seg-hierarchy.json", "$.Subcategory[1]", "'LabelName'",
                "'/m/car' is not a segmentable class")


def test_outputs_are_all_written_or_none(seg, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real = im.write_table
    calls = []

    def failing(path, df, name, **kw):
        calls.append(name)
        if name == "hierarchy":
            raise OSError("disk full")
        return real(path, df, name, **kw)

    monkeypatch.setattr(im, "write_table", failing)
    with pytest.raises(OSError):
        im.main(args(seg, out))
    assert calls == ["gt_masks", "classes", "hierarchy"]
    assert not out.exists() or not any(out.iterdir())
