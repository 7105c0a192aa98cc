"""Masks made by the vote stage (stages.segment) drawn filled: by stages.inspect --image and in the report's
sample drawings, the pixels that change against the same rows drawn as detections only are the masks' pixels."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mu

from stages import inspect, report, segment
from stages.formats.io import read_table, write_table
from stages.formats.mask_probs import write_mask_probs

SIZES = {"i0": (400, 384), "i1": (384, 420)}   # width, height: no side under the report's 384 (no upscaling)
GREY = (128, 128, 128)


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """Two grey images, four boxes with disc-shaped maps, the vote's masks table and the same rows as a
    detections table."""
    rows = []
    for image_id, (w, h) in SIZES.items():
        Image.new("RGB", (w, h), GREY).save(tmp_path / f"{image_id}.png")
        rows.append({"image_id": image_id, "path": str(tmp_path / f"{image_id}.png"), "width": w, "height": h})
    write_table(tmp_path / "images.parquet", pd.DataFrame(rows), "images")
    dets = pd.DataFrame({"image_id": ["i0", "i0", "i1", "i1"], "label": ["/m/cat", "/m/dog", "/m/cat", "/m/dog"],
                         "score": [0.9, 0.6, 0.8, 0.7], "x_min": [0.1, 0.5, 0.2, 0.55],
                         "y_min": [0.2, 0.3, 0.1, 0.6], "x_max": [0.45, 0.9, 0.5, 0.95],
                         "y_max": [0.7, 0.8, 0.5, 0.9]})
    wh = np.array([SIZES[i] for i in dets["image_id"]])
    yy, xx = np.mgrid[:16, :16]
    disc = ((yy - 7.5) ** 2 + (xx - 7.5) ** 2 < 36).astype(np.float64)
    write_mask_probs(tmp_path / "p.npz", dets.assign(width=wh[:, 0], height=wh[:, 1]),
                     np.broadcast_to(disc, (1, len(dets), 16, 16)), ["s32"])
    assert segment.main(["--probs", str(tmp_path / "p.npz"), "--out", str(tmp_path / "masks.parquet")]) == 0
    write_table(tmp_path / "dets.parquet", dets, "detections")
    return {"root": tmp_path, "images": tmp_path / "images.parquet", "masks": tmp_path / "masks.parquet",
            "dets": tmp_path / "dets.parquet"}


def _masks_of(path: Path, image_id: str) -> np.ndarray:
    """The union of ``image_id``'s masks of a masks table, boolean [H, W]."""
    m = read_table(path, "masks")
    m = m[m["image_id"] == image_id]
    w, h = SIZES[image_id]
    out = np.zeros((h, w), bool)
    for r in m.itertuples():
        out |= mu.decode({"size": [r.mask_height, r.mask_width], "counts": r.rle.encode()}).astype(bool)
    return out


def _check_filled(with_masks: Image.Image, boxes_only: Image.Image, masks: np.ndarray) -> None:
    a, b = np.asarray(with_masks.convert("RGB"), np.int16), np.asarray(boxes_only.convert("RGB"), np.int16)
    assert a.shape == b.shape == (*masks.shape, 3)
    diff = (a != b).any(axis=2)
    assert masks.sum() > 1000
    assert not (diff & ~masks).any()           # nothing changes outside the masks
    assert diff[masks].mean() > 0.9            # and the masks are filled (outlines and tags drawn over some)


def test_inspect_draws_the_vote_masks_filled(world, tmp_path, capsys):
    for image_id in SIZES:
        out = {}
        for name in ("masks", "dets"):
            out[name] = tmp_path / f"{image_id}_{name}.png"
            assert inspect.main([str(world[name]), "--image", image_id, "--images", str(world["images"]),
                                 "--min-side", "0", "--score-thr", "0", "--out", str(out[name])]) == 0
        assert f"drew 2 masks rows of {image_id}" in capsys.readouterr().out
        with Image.open(out["masks"]) as a, Image.open(out["dets"]) as b:
            _check_filled(a, b, _masks_of(world["masks"], image_id))


def _samples(page: str) -> dict[str, Image.Image]:
    import io

    found = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    return {alt: Image.open(io.BytesIO(base64.b64decode(b))) for alt, b in found if alt in SIZES}


def test_report_draws_a_masks_table_filled(world, tmp_path):
    rows, _, ids = report.read_sample_detections(world["masks"], read_table(world["images"], "images"), n=6,
                                                 score_thr=0.3)
    assert ids == ["i0", "i1"] and {"rle", "mask_height", "mask_width"} <= set(rows.columns) and len(rows) == 4
    metric = tmp_path / "results" / "evaluate" / "segment" / "default" / "vote" / "val_a.json"
    metric.parent.mkdir(parents=True)
    metric.write_text(json.dumps({"mAP": 0.5, "per_class": {"/m/cat": {"name": "Cat", "ap": 0.5, "n_gt": 1}}}))
    pages = {}
    for name in ("masks", "dets"):
        html = tmp_path / f"{name}.html"
        assert report.main(["--metrics", str(metric), "--out-html", str(html), "--detections", str(world[name]),
                            "--images", str(world["images"]), "--samples", "2", "--score-thr", "0.3"]) == 0
        pages[name] = _samples(html.read_text())
    assert set(pages["masks"]) == set(pages["dets"]) == set(SIZES)
    for image_id in SIZES:
        _check_filled(pages["masks"][image_id], pages["dets"][image_id], _masks_of(world["masks"], image_id))
