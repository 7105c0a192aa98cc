"""Submit segmentation: masks table -> segmentation submission; read back it gives the same masks; only
segmentable classes, empty masks left out, every test image once, bad input named by file/row/field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mu

from stages import submit_seg as ss
from stages.formats.io import write_table
from stages.formats.seg_submission import decode_counts, read_segmentation_submission

SIZES = {"t0": (48, 64), "t1": (40, 32), "t2": (30, 30), "a,b": (20, 24)}   # image -> (height, width)
SEG = ["/m/a", "/m/cat", "/m/dog"]


def _m(img, rect):
    h, w = SIZES[img]
    m = np.zeros((h, w), np.uint8)
    y0, x0, y1, x1 = rect
    m[y0:y1, x0:x1] = 1
    return m


#: (image, label, score, mask rectangle y0 x0 y1 x1)
ITEMS = [
    ("t0", "/m/cat", 0.5, (5, 6, 29, 32)),
    ("t0", "/m/dog", 0.9, (24, 32, 44, 58)),
    ("t0", "/m/car", 0.95, (0, 0, 10, 10)),       # not segmentable: left out
    ("t1", "/m/a", 0.25, (3, 3, 30, 20)),
    ("t1", "/m/dog", 0.75, (0, 0, 0, 0)),         # empty: left out
    ("t0", "/m/cat", 0.123456789, (1, 1, 2, 2)),  # one pixel
    ("a,b", "/m/dog", 0.6, (2, 2, 18, 20)),       # an image id CSV must quote
]


def masks_table(items=ITEMS) -> pd.DataFrame:
    rows = []
    for img, lab, s, rect in items:
        m = _m(img, rect)
        r = mu.encode(np.asfortranarray(m))
        x, y, w, h = mu.toBbox(r)
        H, W = m.shape
        rows.append((img, lab, s, x / W, y / H, (x + w) / W, (y + h) / H, r["counts"].decode(), H, W))
    return pd.DataFrame(rows, columns=["image_id", "label", "score", "x_min", "y_min", "x_max", "y_max", "rle",
                                       "mask_height", "mask_width"])


def images_table() -> pd.DataFrame:
    ids = list(SIZES)
    return pd.DataFrame({"image_id": ids, "path": [f"{i}.jpg" for i in ids],
                         "width": [SIZES[i][1] for i in ids], "height": [SIZES[i][0] for i in ids]})


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    f = {"masks": tmp_path / "masks.parquet", "images": tmp_path / "test_images.parquet",
         "seg": tmp_path / "seg_classes.parquet", "out": tmp_path / "sub" / "segmentation.csv"}
    write_table(f["masks"], masks_table(), "masks")
    write_table(f["images"], images_table(), "images")
    write_table(f["seg"], pd.DataFrame({"label": SEG, "name": ["A", "Cat", "Dog"]}), "classes")
    return f


def argv(f, *extra):
    return ["--masks", str(f["masks"]), "--images", str(f["images"]), "--seg-classes", str(f["seg"]),
            "--out", str(f["out"]), *extra]


def test_round_trip_segmentable_only_and_every_image_once(files, capsys):
    assert ss.main(argv(files)) == 0
    assert "4 images (3 with masks), 5 masks; left out: 1 not segmentable, 1 empty" in capsys.readouterr().out
    raw = pd.read_csv(files["out"], dtype=str, keep_default_na=False)
    assert list(raw.columns) == ["ImageID", "ImageWidth", "ImageHeight", "PredictionString"]
    assert list(raw["ImageID"]) == sorted(SIZES)                           # every test image once, sorted
    assert dict(zip(raw["ImageID"], zip(raw["ImageHeight"].astype(int), raw["ImageWidth"].astype(int)))) == SIZES
    assert raw.set_index("ImageID").loc["t2", "PredictionString"] == ""   # no mask: empty string
    back = read_segmentation_submission(files["out"])
    want = [it for it in ITEMS if it[1] in SEG and _m(it[0], it[3]).any()]
    assert len(back) == len(want) == 5
    for img, lab, s, rect in want:
        row = back[(back["image_id"] == img) & (back["label"] == lab) & np.isclose(back["score"], s, atol=1e-6)]
        assert len(row) == 1
        r = row.iloc[0]
        got = mu.decode({"size": [int(r.mask_height), int(r.mask_width)], "counts": r.rle.encode()})
        assert np.array_equal(got, _m(img, rect))
    # within an image by decreasing confidence; confidences with 6 decimals
    t0 = back[back["image_id"] == "t0"]
    assert list(t0["score"]) == sorted(t0["score"], reverse=True) and 0.123457 in list(t0["score"])
    ps = raw.set_index("ImageID").loc["t0", "PredictionString"].split()
    assert ps[0::3] == ["/m/dog", "/m/cat", "/m/cat"]
    assert decode_counts(ps[2]) == masks_table()["rle"][1].encode()


def test_max_per_image_keeps_the_best(files):
    assert ss.main(argv(files, "--max-per-image", "1")) == 0
    back = read_segmentation_submission(files["out"])
    assert back.groupby("image_id").size().max() == 1
    assert set(zip(back["image_id"], back["label"])) == {("t0", "/m/dog"), ("t1", "/m/a"), ("a,b", "/m/dog")}


def test_no_masks_at_all_still_lists_every_image(files):
    write_table(files["masks"], masks_table([]), "masks")
    assert ss.main(argv(files)) == 0
    raw = pd.read_csv(files["out"], dtype=str, keep_default_na=False)
    assert list(raw["ImageID"]) == sorted(SIZES) and (raw["PredictionString"] == "").all()


def _assert_bad(rc, err, out, *needles):
    assert rc == 2, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_unknown_image(files, capsys):
    df = masks_table()
    df.loc[3, "image_id"] = "t9"
    write_table(files["masks"], df, "masks")
    rc = ss.main(argv(files))
    _assert_bad(rc, capsys.readouterr().err, files["out"], "masks.parquet", "row 3", "'image_id'",
                "'t9', which is not a test image")


@pytest.mark.parametrize("col, field", [("mask_height", "mask_height"), ("mask_width", "mask_width")])
def test_mask_of_another_size_than_its_image(files, capsys, col, field):
    df = masks_table()
    df.loc[1, col] += 1
    write_table(files["masks"], df, "masks")
    rc = ss.main(argv(files))
    _assert_bad(rc, capsys.readouterr().err, files["out"], "masks.parquet", "row 1", f"'{field}'",
                "the image 64 x 48")


def test_not_a_masks_table(files, capsys):
    pd.DataFrame({"image_id": ["t0"]}).to_parquet(files["masks"])
    rc = ss.main(argv(files))
    _assert_bad(rc, capsys.readouterr().err, files["out"], "masks.parquet", "missing column")


def test_a_failed_round_trip_leaves_no_file(files, monkeypatch):
    real = ss.read_segmentation_submission

    def lossy(path, **kw):
        df = real(path, **kw)
        df.loc[0, "rle"] = df.loc[0, "rle"][:-1] + "0"
        return df

    monkeypatch.setattr(ss, "read_segmentation_submission", lossy)
    with pytest.raises(RuntimeError, match="round trip: rle"):
        ss.main(argv(files))
    assert not any(files["out"].parent.iterdir())


def test_core_function_rejects_contradictions():
    with pytest.raises(ValueError):
        ss.segmentation_submission(masks=masks_table(), images=images_table(), seg_labels=SEG, max_per_image=0)
