"""The vote stage (stages.segment): stages.infer_masks files, written here by hand, -> the masks table. One map
is the paste of that map; the mean vote the paste of the mean map; majority of two the intersection; views
chosen; files of different boxes refused (exit 2, no output); the CLI's table keeps every row in order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mu

from stages import segment
from stages.formats.io import read_table
from stages.formats.mask_probs import write_mask_probs
from stages.ops.masks import paste_masks

ROOT = Path(__file__).resolve().parents[2]
BOX = ["x_min", "y_min", "x_max", "y_max"]
M = 8


def _dets() -> pd.DataFrame:
    """Five boxes on two images (40x30 and 50x20); rows 1 and 2 are one box under two labels."""
    return pd.DataFrame({
        "image_id": ["a", "a", "a", "b", "b"],
        "label": ["/m/cat", "/m/dog", "/m/a", "/m/cat", "/m/dog"],
        "score": [0.9, 0.8, 0.8, 0.7, 0.25],
        "x_min": [0.1, 0.3, 0.3, 0.0, 0.42], "y_min": [0.05, 0.4, 0.4, 0.1, 0.0],
        "x_max": [0.6, 0.95, 0.95, 0.5, 1.0], "y_max": [0.7, 1.0, 1.0, 0.9, 0.55],
        "width": [40, 40, 40, 50, 50], "height": [30, 30, 30, 20, 20]})


def _maps(seed: int, views: int = 1, n: int = 5) -> np.ndarray:
    """[V, N, 8, 8] maps of multiples of 1/16 (exact in float16, and so are their means): smooth-ish blobs, so
    the masks are neither empty nor full."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:M, :M]
    out = np.empty((views, n, M, M))
    for v in range(views):
        for i in range(n):
            cy, cx, r = rng.uniform(2, 6), rng.uniform(2, 6), rng.uniform(2, 4)
            blob = np.clip(1.2 - np.hypot(yy - cy, xx - cx) / r, 0, 1) + rng.uniform(-0.2, 0.2, (M, M))
            out[v, i] = np.round(np.clip(blob, 0, 1) * 16) / 16
    return out


def _write(path: Path, probs: np.ndarray, dets: pd.DataFrame | None = None) -> Path:
    views = ["s32", "s32_flip", "s48", "s48_flip"][: probs.shape[0]]
    write_mask_probs(path, _dets() if dets is None else dets, probs, views)
    return path


def _paste(probs: np.ndarray, thr: float = 0.5) -> list[str]:
    d = _dets()
    rles = paste_masks(probs, d[BOX].to_numpy(), height=d["height"].to_numpy(), width=d["width"].to_numpy(),
                       thr=thr)
    return [r["counts"].decode() for r in rles]


def _decode(rle: str, h: int, w: int) -> np.ndarray:
    return mu.decode({"size": [h, w], "counts": rle.encode()}).astype(bool)


def test_one_file_one_view_is_the_paste_of_its_map(tmp_path):
    probs = _maps(0)
    masks, m = segment.segment([_write(tmp_path / "p.npz", probs)], vote="mean", thr=0.5)
    assert m == 1
    assert list(masks["rle"]) == _paste(probs[0])
    d = _dets()
    pd.testing.assert_frame_equal(masks[segment.KEY_COLUMNS], d[segment.KEY_COLUMNS])
    assert list(masks["mask_height"]) == list(d["height"]) and list(masks["mask_width"]) == list(d["width"])
    # every mask is inside its box and neither empty nor the whole box (the maps are blobs)
    for r in masks.itertuples():
        mk = _decode(r.rle, r.mask_height, r.mask_width)
        c0, c1 = int(np.ceil(r.x_min * r.mask_width - 0.5)), int(np.ceil(r.x_max * r.mask_width - 0.5))
        r0, r1 = int(np.ceil(r.y_min * r.mask_height - 0.5)), int(np.ceil(r.y_max * r.mask_height - 0.5))
        inside = np.zeros_like(mk)
        inside[r0:r1, c0:c1] = True
        assert mk.any() and not (mk & ~inside).any() and mk.sum() < inside.sum()
    # a lower threshold gives the paste at that threshold (a larger mask)
    low, _ = segment.segment([tmp_path / "p.npz"], vote="mean", thr=0.25)
    assert list(low["rle"]) == _paste(probs[0], thr=0.25) != list(masks["rle"])


def test_mean_vote_of_two_files_is_the_paste_of_the_mean_map(tmp_path):
    a, b = _maps(1), _maps(2)
    files = [_write(tmp_path / "a.npz", a), _write(tmp_path / "b.npz", b)]
    masks, m = segment.segment(files, vote="mean", thr=0.5)
    assert m == 2
    assert list(masks["rle"]) == _paste((a[0] + b[0]) / 2)
    assert list(masks["rle"]) != _paste(a[0]) and list(masks["rle"]) != _paste(b[0])
    # two views in each file: all four maps vote
    a2, b2 = _maps(3, views=2), _maps(4, views=2)
    files = [_write(tmp_path / "a2.npz", a2), _write(tmp_path / "b2.npz", b2)]
    masks, m = segment.segment(files, vote="mean", thr=0.5)
    assert m == 4 and list(masks["rle"]) == _paste((a2[0] + a2[1] + b2[0] + b2[1]) / 4)


def test_views_first_uses_view_0_of_each_file(tmp_path):
    a, b = _maps(5, views=2), _maps(6, views=2)
    files = [_write(tmp_path / "a.npz", a), _write(tmp_path / "b.npz", b)]
    first, m = segment.segment(files, views="first", vote="mean", thr=0.5)
    assert m == 2 and list(first["rle"]) == _paste((a[0] + b[0]) / 2)
    one, m = segment.segment(files[:1], views="first", vote="mean", thr=0.5)
    assert m == 1 and list(one["rle"]) == _paste(a[0])
    every, _ = segment.segment(files, views="all", vote="mean", thr=0.5)
    assert list(every["rle"]) != list(first["rle"])
    with pytest.raises(ValueError):
        segment.select_views(a, ["s32", "s32_flip"], "second")


def test_majority_of_two_maps_is_their_intersection(tmp_path):
    a, b = _maps(7), _maps(8)
    files = [_write(tmp_path / "a.npz", a), _write(tmp_path / "b.npz", b)]
    masks, _ = segment.segment(files, vote="majority", thr=0.5)
    d = _dets()
    strict = 0
    for i, (ra, rb, rv) in enumerate(zip(_paste(a[0]), _paste(b[0]), masks["rle"])):
        h, w = d.loc[i, "height"], d.loc[i, "width"]
        ma, mb, mv = _decode(ra, h, w), _decode(rb, h, w), _decode(rv, h, w)
        np.testing.assert_array_equal(mv, ma & mb)
        strict += int((ma & mb).sum() < min(ma.sum(), mb.sum()))
    assert strict >= 3   # the maps differ: the intersection is smaller than either mask for most boxes
    # three maps: foreground where at least two say so
    c = _maps(9)
    masks3, m = segment.segment([*files, _write(tmp_path / "c.npz", c)], vote="majority", thr=0.5)
    assert m == 3
    for i, (ra, rb, rc, rv) in enumerate(zip(_paste(a[0]), _paste(b[0]), _paste(c[0]), masks3["rle"])):
        h, w = d.loc[i, "height"], d.loc[i, "width"]
        votes = sum(_decode(r, h, w).astype(int) for r in (ra, rb, rc))
        np.testing.assert_array_equal(_decode(rv, h, w), votes >= 2)


def test_a_file_of_no_boxes_gives_an_empty_table(tmp_path):
    empty = _dets().iloc[:0]
    _write(tmp_path / "e.npz", np.zeros((1, 0, M, M)), empty)
    assert segment.main(["--probs", str(tmp_path / "e.npz"), "--out", str(tmp_path / "e.parquet")]) == 0
    got = read_table(tmp_path / "e.parquet", "masks")
    assert len(got) == 0 and "rle" in got.columns


@pytest.mark.parametrize("change, field", [("drop_row", "image_id"), ("label", "label"), ("x_max", "x_max"),
                                           ("score", "score"), ("image_id", "image_id"), ("order", "label")])
def test_files_of_different_boxes_exit_2_naming_file_and_field(tmp_path, capsys, change, field):
    good = _write(tmp_path / "good.npz", _maps(10))
    d = _dets()
    n = len(d)
    if change == "drop_row":
        d, n = d.iloc[:4], 4
    elif change == "label":
        d.loc[3, "label"] = "/m/car"
    elif change == "x_max":
        d.loc[3, "x_max"] = 0.51
    elif change == "score":
        d.loc[3, "score"] = 0.71
    elif change == "image_id":
        d.loc[3, "image_id"] = "c"
    else:
        d = d.iloc[[0, 1, 2, 4, 3]].reset_index(drop=True)
    bad = _write(tmp_path / "bad.npz", _maps(11, n=n), d)
    out = tmp_path / "m.parquet"
    assert segment.main(["--probs", str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.npz" in err and "good.npz" in err and f"field {field!r}" in err and "same boxes" in err
    if change != "drop_row":
        assert "row 3" in err and "np." not in err   # plain values: ('c' vs 'b' there), (0.51 vs 0.5 there)
    if change == "x_max":
        assert "(0.51 vs 0.5 there)" in err
    assert not out.exists()


def test_cli_end_to_end_writes_a_masks_table(tmp_path):
    a, b = _maps(12, views=2), _maps(13, views=2)
    files = [_write(tmp_path / "a.npz", a), _write(tmp_path / "b.npz", b)]
    out = tmp_path / "x.parquet"
    run = subprocess.run([sys.executable, "-m", "stages.segment", "--probs", *map(str, files), "--views", "first",
                          "--vote", "majority", "--thr", "0.4", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "5 masks from 2 map(s) per box (majority vote) of 2 images" in run.stdout
    got = read_table(out, "masks")
    d = _dets()
    # every input row, in order; scores, labels and boxes unchanged
    pd.testing.assert_frame_equal(got[segment.KEY_COLUMNS], d[segment.KEY_COLUMNS])
    assert got["mask_height"].tolist() == d["height"].tolist()
    assert got["mask_width"].tolist() == d["width"].tolist()
    direct, _ = segment.segment(files, views="first", vote="majority", thr=0.4)
    assert got["rle"].tolist() == direct["rle"].tolist()
    # the defaults (mean vote, thr 0.5 from the schema, every view) through main()
    assert segment.main(["--probs", *map(str, files), "--out", str(tmp_path / "y.parquet")]) == 0
    assert read_table(tmp_path / "y.parquet", "masks")["rle"].tolist() == _paste((a[0] + a[1] + b[0] + b[1]) / 4)
    # a missing file: exit 2 naming it, nothing written
    assert segment.main(["--probs", str(files[0]), str(tmp_path / "nope.npz"),
                         "--out", str(tmp_path / "z.parquet")]) == 2
    assert not (tmp_path / "z.parquet").exists()


def test_read_image_sizes_without_the_maps(tmp_path):
    from stages.core.errors import InputError
    from stages.formats.mask_probs import read_image_sizes

    _write(tmp_path / "p.npz", _maps(14))
    assert read_image_sizes(tmp_path / "p.npz") == {"a": (30, 40), "b": (20, 50)}   # (height, width)
    with pytest.raises(InputError, match="nope.npz: file not found"):
        read_image_sizes(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(InputError, match="junk.npz: not a readable npz file"):
        read_image_sizes(tmp_path / "junk.npz")
    with np.load(tmp_path / "p.npz") as z:
        arrs = {k: v for k, v in z.items() if k != "height"}
    np.savez(tmp_path / "noh.npz", **arrs)
    with pytest.raises(InputError, match="field 'height'"):
        read_image_sizes(tmp_path / "noh.npz")
