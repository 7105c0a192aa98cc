"""The segmentation metric from the ingested gt_masks table equals the metric from the segmentation CSV + PNGs,
on orchard-mini data (generate -> ingest -> ingest_masks), with the segmentable classes and hierarchy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mu

from stages import evaluate, generate as gen, ingest, ingest_masks
from stages.data import taxonomy as tx
from stages.formats.io import read_table, write_table


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("segeval")
    data = root / "orchard-mini"
    assert gen.main(["--n-images", "12", "--n-test", "2", "--seed", "1", "--out", str(data)]) == 0
    ing = root / "ingest"
    assert ingest.main(["--boxes-csv", str(data / gen.BBOX_CSV), "--labels-csv", str(data / gen.LABELS_CSV),
                        "--classes-csv", str(data / gen.CLASSES_CSV),
                        "--hierarchy-json", str(data / gen.HIERARCHY_JSON),
                        "--images-dir", str(data / gen.IMAGES_DIR), "--test-dir", str(data / gen.TEST_DIR),
                        "--test-list", str(data / gen.TEST_CSV), "--workers", "1", "--out-dir", str(ing)]) == 0
    seg = root / "ingest_masks"
    assert ingest_masks.main([
        "--masks-csv", str(data / gen.SEGMENTATION_CSV), "--mask-dir", str(data / gen.MASKS_DIR),
        "--images", str(ing / "images.parquet"), "--classes", str(ing / "classes.parquet"),
        "--seg-classes", str(data / gen.SEG_CLASSES_CSV), "--seg-hierarchy", str(data / gen.SEG_HIERARCHY_JSON),
        "--out-masks", str(seg / "gt_masks.parquet"), "--out-classes", str(seg / "seg_classes.parquet"),
        "--out-hierarchy", str(seg / "seg_hierarchy.parquet")]) == 0
    return {"data": data, "ingest": ing, "seg": seg, "root": root}


def _predictions(run: dict[str, Path]) -> pd.DataFrame:
    """Masks of every image: the true ones (some shifted, some dropped) with random scores, blobs that match
    nothing, masks of the non-segmentable Frame class; one image's masks at half its resolution."""
    rng = np.random.default_rng(0)
    gt = read_table(run["seg"] / "gt_masks.parquet", "gt_masks")
    boxes = read_table(run["ingest"] / "boxes.parquet", "boxes")
    rows = []
    half = gt["image_id"].iloc[0]

    def add(img, lab, m):
        if img == half:
            m = np.asarray(Image.fromarray(m * 255).resize((m.shape[1] // 2, m.shape[0] // 2), Image.NEAREST)) > 0
            m = m.astype(np.uint8)
        r = mu.encode(np.asfortranarray(m))
        x, y, w, h = mu.toBbox(r)
        H, W = m.shape
        rows.append((img, lab, float(rng.random()), x / W, y / H, (x + w) / W, (y + h) / H, r["counts"].decode(),
                     H, W))

    for g in gt.itertuples():
        m = mu.decode({"size": [g.mask_height, g.mask_width], "counts": g.rle.encode()})
        u = rng.random()
        if u < 0.15:
            continue
        if u < 0.45:
            m = np.roll(m, int(rng.integers(1, 6)), axis=int(rng.integers(0, 2)))
        add(g.image_id, g.label, m)
        if rng.random() < 0.3:
            blob = np.zeros_like(m)
            y, x = int(rng.integers(0, m.shape[0] - 10)), int(rng.integers(0, m.shape[1] - 10))
            blob[y:y + 10, x:x + 10] = 1
            add(g.image_id, g.label, blob)
    for b in boxes[(boxes["label"] == tx.FRAME).to_numpy()].itertuples():
        size = gt.loc[gt["image_id"] == b.image_id, ["mask_height", "mask_width"]]
        if len(size):
            m = np.zeros(tuple(size.iloc[0]), np.uint8)
            m[2:20, 2:20] = 1
            add(b.image_id, tx.FRAME, m)
    cols = ["image_id", "label", "score", "x_min", "y_min", "x_max", "y_max", "rle", "mask_height", "mask_width"]
    return pd.DataFrame(rows, columns=cols)


def test_gt_masks_table_scores_like_the_pngs(run, capsys):
    preds = _predictions(run)
    assert (preds["label"] == tx.FRAME).any() and preds["mask_height"].nunique() > 1
    write_table(run["root"] / "preds.parquet", preds, "masks")
    data, ing, seg = run["data"], run["ingest"], run["seg"]
    common = ["--image-labels", str(ing / "image_labels.parquet"), "--boxes", str(ing / "boxes.parquet"),
              "--predictions", str(run["root"] / "preds.parquet")]
    a, b = run["root"] / "png.json", run["root"] / "table.json"
    assert evaluate.main([*common, "--masks", str(data / gen.SEGMENTATION_CSV),
                          "--mask-dir", str(data / gen.MASKS_DIR), "--classes", str(data / gen.SEG_CLASSES_CSV),
                          "--hierarchy", str(data / gen.SEG_HIERARCHY_JSON), "--out", str(a)]) == 0
    assert evaluate.main([*common, "--gt-masks", str(seg / "gt_masks.parquet"),
                          "--classes", str(seg / "seg_classes.parquet"),
                          "--hierarchy", str(seg / "seg_hierarchy.parquet"), "--out", str(b)]) == 0
    ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ma == mb
    assert 0.1 < ma["mAP"] < 0.95 and ma["counts"]["n_tp"] > 0
    assert tx.FRAME not in ma["per_class"] and set(ma["per_class"]) == set(tx.SEGMENTABLE)
    assert ma["per_class"][tx.DIGIT]["n_gt"] > 0   # the seg hierarchy expands masks to their parents


def test_gt_masks_split_and_argument_errors(run, tmp_path, capsys):
    ing, seg = run["ingest"], run["seg"]
    preds = _predictions(run)
    write_table(tmp_path / "preds.parquet", preds, "masks")
    ids = sorted(preds["image_id"].unique())
    split = ["val_a"] * 4 + ["x"] * (len(ids) - 4)
    write_table(tmp_path / "splits.parquet", pd.DataFrame({"image_id": ids, "split": split}), "splits")
    base = ["--image-labels", str(ing / "image_labels.parquet"), "--predictions", str(tmp_path / "preds.parquet"),
            "--classes", str(seg / "seg_classes.parquet"), "--hierarchy", str(seg / "seg_hierarchy.parquet"),
            "--gt-masks", str(seg / "gt_masks.parquet")]
    assert evaluate.main([*base, "--split-ids", str(tmp_path / "splits.parquet"), "--split", "val_a",
                          "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["counts"]["n_images"] == 4
    with pytest.raises(SystemExit):
        evaluate.main([*base, "--masks", "x.csv", "--mask-dir", "d", "--out", str(tmp_path / "n.json")])
    # a gt_masks label outside the classes is an error, not silently dropped
    gt = read_table(seg / "gt_masks.parquet", "gt_masks")
    gt.loc[3, "label"] = "/m/nope"
    write_table(tmp_path / "gt.parquet", gt, "gt_masks")
    base[-1] = str(tmp_path / "gt.parquet")
    assert evaluate.main([*base, "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "gt.parquet" in err and "row 3" in err and "'label'" in err
