"""The segmentation ablation (stages.seg_ablation) on a tiny consistent world: orchard-mini (generate -> ingest
-> ingest_masks) split in val_a and val_b, and probability maps of two fake mask models written by hand on three
box sources: ``perfect`` (each box's map is its instance's true mask, resampled) and ``noisy`` (that map shifted,
blurred and noised). The oracle of perfect maps scores 1; the vote row is what stages.segment +
stages.evaluate give on the same files; the JSON is what the report reads; bad keys exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mu

from stages import evaluate, generate as gen, ingest, ingest_masks, report, seg_ablation, segment
from stages.formats.io import read_table, write_table
from stages.formats.mask_probs import write_mask_probs
from stages.infer import shard
from stages.ops.masks import box_pixels

BOX = ["x_min", "y_min", "x_max", "y_max"]
M = 32
VIEWS = ["s32", "s32_flip"]


def _data(root: Path) -> dict[str, Path]:
    data = root / "orchard-mini"
    assert gen.main(["--out", str(data), "--n-images", "12", "--n-test", "2", "--min-size", "128",
                     "--max-size", "128", "--external-images", "0", "--seed", "1"]) == 0
    ing, seg = root / "ingest", root / "ingest_masks"
    assert ingest.main(["--boxes-csv", str(data / gen.BBOX_CSV), "--labels-csv", str(data / gen.LABELS_CSV),
                        "--classes-csv", str(data / gen.CLASSES_CSV),
                        "--hierarchy-json", str(data / gen.HIERARCHY_JSON),
                        "--images-dir", str(data / gen.IMAGES_DIR), "--test-dir", str(data / gen.TEST_DIR),
                        "--test-list", str(data / gen.TEST_CSV), "--workers", "1", "--out-dir", str(ing)]) == 0
    assert ingest_masks.main([
        "--masks-csv", str(data / gen.SEGMENTATION_CSV), "--mask-dir", str(data / gen.MASKS_DIR),
        "--images", str(ing / "images.parquet"), "--classes", str(ing / "classes.parquet"),
        "--seg-classes", str(data / gen.SEG_CLASSES_CSV), "--seg-hierarchy", str(data / gen.SEG_HIERARCHY_JSON),
        "--out-masks", str(seg / "gt_masks.parquet"), "--out-classes", str(seg / "seg_classes.parquet"),
        "--out-hierarchy", str(seg / "seg_hierarchy.parquet")]) == 0
    return {"gt_masks": seg / "gt_masks.parquet", "seg_classes": seg / "seg_classes.parquet",
            "seg_hierarchy": seg / "seg_hierarchy.parquet", "boxes": ing / "boxes.parquet",
            "image_labels": ing / "image_labels.parquet", "classes": ing / "classes.parquet",
            "hierarchy": ing / "hierarchy.parquet", "images": ing / "images.parquet"}


def _crop_map(mask: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The M x M map of a full-image 0/1 mask inside a normalized box: the pixels the paste covers
    (:func:`box_pixels`), sampled at the map's cell centres."""
    h, w = mask.shape
    r0, r1, c0, c1 = (int(v[0]) for v in box_pixels(box[None], h, w))
    if r1 <= r0 or c1 <= c0:
        return np.zeros((M, M))
    ys = r0 + np.floor((np.arange(M) + 0.5) * (r1 - r0) / M).astype(int)
    xs = c0 + np.floor((np.arange(M) + 0.5) * (c1 - c0) / M).astype(int)
    return mask[np.ix_(ys, xs)].astype(np.float64)


def _noisy(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A worse model: the map shifted by a few cells, box-blurred and noised."""
    q = np.roll(p, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
    q = sum(np.roll(q, (dy, dx), axis=(0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    return np.clip(q + rng.uniform(-0.35, 0.35, q.shape), 0, 1)


def _boxes(gt: pd.DataFrame, source: str, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """Boxes of one source with the index of their true instance (-1: a false positive). gt: the instances'
    own boxes, score 1; refined: those boxes moved a little; raw: moved more; both with random scores and one
    false positive per image."""
    if source == "gt":
        return gt[["image_id", "label", *BOX, "width", "height"]].assign(score=1.0), np.arange(len(gt))
    step = {"refined": 0.04, "raw": 0.2}[source]   # of the box's side: a box never inverts
    b = gt[BOX].to_numpy()
    side = np.tile(b[:, 2:] - b[:, :2], 2)
    xy = b + rng.uniform(-step, step, b.shape) * side
    rows = gt[["image_id", "label", "width", "height"]].assign(score=rng.uniform(0.3, 1.0, len(gt)))
    rows[BOX] = np.clip(xy, 0, 1)
    fps = gt.drop_duplicates("image_id")[["image_id", "label", "width", "height"]].assign(
        score=0.2, x_min=0.0, y_min=0.0, x_max=0.25, y_max=0.25)
    out = pd.concat([rows, fps], ignore_index=True)
    inst = np.r_[np.arange(len(gt)), np.full(len(fps), -1)]
    order = np.argsort(out["image_id"].to_numpy(str), kind="stable")
    return out.iloc[order].reset_index(drop=True), inst[order]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("segabl")
    f = _data(root)
    gt = read_table(f["gt_masks"], "gt_masks")
    images = read_table(f["images"], "images")
    gt = gt.merge(images[["image_id", "width", "height"]], on="image_id")
    assert (gt["mask_width"] == gt["width"]).all() and (gt["mask_height"] == gt["height"]).all()
    masks = [mu.decode({"size": [r.mask_height, r.mask_width], "counts": r.rle.encode()})
             for r in gt.itertuples()]
    ids = sorted(images["image_id"])
    split_of = {i: ("val_a" if k < 6 else "val_b") for k, i in enumerate(ids)}
    write_table(root / "splits.parquet", pd.DataFrame({"image_id": ids, "split": [split_of[i] for i in ids]}),
                "splits")
    rng = np.random.default_rng(0)
    probs, dets = [], {}   # --probs items; detections tables per (split, source, shard)
    for split in ("val_a", "val_b"):
        mine = gt[gt["image_id"].map(split_of) == split].reset_index(drop=True)
        mine_masks = [masks[i] for i in np.flatnonzero(gt["image_id"].map(split_of) == split)]
        # val_a in two image shards (as the pipeline writes them), val_b in one
        n_shards = 2 if split == "val_a" else 1
        split_images = images[images["image_id"].map(split_of) == split]
        for source in ("refined", "raw", "gt"):
            boxes, inst = _boxes(mine, source, rng)
            perfect = np.stack([_crop_map(mine_masks[j], b) if j >= 0 else np.zeros((M, M))
                                for j, b in zip(inst, boxes[BOX].to_numpy())])
            fp = inst < 0
            perfect[fp, 4:12, 4:12] = 1.0   # a false positive has some mask
            maps = {"perfect": np.stack([perfect, perfect]),
                    "noisy": np.stack([np.stack([_noisy(p, rng) for p in perfect]) for _ in VIEWS])}
            for k in range(n_shards):
                keep = boxes["image_id"].isin(shard(split_images, k, n_shards)["image_id"]).to_numpy()
                d = boxes[keep].reset_index(drop=True)
                dets[(split, source, k)] = d
                if source != "gt":
                    write_table(root / f"dets_{split}_{source}_{k}.parquet", d, "detections")
                for model, pr in maps.items():
                    path = root / f"{split}_{source}_{model}_{k}.npz"
                    write_mask_probs(path, d, pr[:, keep], VIEWS)
                    probs.append(f"{split}:{source}:{model}:{k}={path}")
    common = ["--gt-masks", str(f["gt_masks"]), "--boxes", str(f["boxes"]),
              "--image-labels", str(f["image_labels"]), "--seg-classes", str(f["seg_classes"]),
              "--seg-hierarchy", str(f["seg_hierarchy"]), "--classes", str(f["classes"]),
              "--hierarchy", str(f["hierarchy"]), "--split-ids", str(root / "splits.parquet")]
    box_args = ["--raw", *(f"{s}={root / f'dets_{s}_raw_{k}.parquet'}" for (s, src, k) in dets if src == "raw"),
                "--refined", *(f"{s}={root / f'dets_{s}_refined_{k}.parquet'}" for (s, src, k) in dets
                               if src == "refined")]
    return {"root": root, "files": f, "probs": probs, "common": common, "box_args": box_args, "dets": dets}


def _ablation(world, tmp_path, models, *extra) -> list[dict]:
    out = tmp_path / "abl.json"
    rc = seg_ablation.main(["--probs", *world["probs"], "--models", *models, *world["common"], *extra,
                            "--out-json", str(out), "--out-md", str(tmp_path / "abl.md")])
    assert rc == 0
    return json.loads(out.read_text())


def _pipeline_map(world, tmp_path, split: str, source: str, models, views: str = "all") -> float:
    """stages.segment on each shard's files of ``models``, then stages.evaluate of the shards together."""
    root, f = world["root"], world["files"]
    shards = sorted(k for (s, src, k) in world["dets"] if s == split and src == source)
    parts = []
    for k in shards:
        out = tmp_path / f"seg_{split}_{source}_{k}_{'_'.join(models)}_{views}.parquet"
        assert segment.main(["--probs", *(str(root / f"{split}_{source}_{m}_{k}.npz") for m in models),
                             "--views", views, "--out", str(out)]) == 0
        parts.append(str(out))
    metrics = tmp_path / f"eval_{split}_{source}.json"
    assert evaluate.main(["--gt-masks", str(f["gt_masks"]), "--boxes", str(f["boxes"]),
                          "--image-labels", str(f["image_labels"]), "--classes", str(f["seg_classes"]),
                          "--hierarchy", str(f["seg_hierarchy"]), "--predictions", *parts,
                          "--split-ids", str(world["root"] / "splits.parquet"), "--split", split,
                          "--out", str(metrics)]) == 0
    return json.loads(metrics.read_text())["mAP"]


def _row(recs: list[dict], measure: str, variant: str) -> dict:
    found = [r for r in recs if r["measure"] == measure and r["variant"] == variant]
    assert len(found) == 1, (variant, [r["variant"] for r in recs])
    return found[0]


def test_oracle_of_perfect_maps_scores_1(world, tmp_path):
    recs = _ablation(world, tmp_path, ["perfect"])
    oracle = _row(recs, "mask mAP", "vote of perfect (2 maps), ground-truth boxes (oracle)")
    assert oracle["boxes"] == "gt"
    # every instance's mask comes back from its map (resampled to 32 x 32 and pasted back: IoU well above 0.5),
    # every box is its own instance's, expanded up the hierarchy like the ground truth: every class's AP is 1
    assert oracle["val_a"] == pytest.approx(1.0) and oracle["val_b"] == pytest.approx(1.0)
    # the refined boxes are not expanded up the hierarchy (the pipeline's detections are, before infer_masks):
    # the parent classes have no detection there, so the refined vote scores below the oracle
    refined = _row(recs, "mask mAP", "vote of perfect (2 maps), refined boxes")
    assert 0 < refined["val_a"] < 1 and 0 < refined["val_b"] < 1


def test_vote_and_model_rows_equal_segment_then_evaluate(world, tmp_path):
    recs = _ablation(world, tmp_path, ["perfect", "noisy"], *world["box_args"])
    for split in ("val_a", "val_b"):
        vote = _row(recs, "mask mAP", "vote of perfect, noisy (4 maps), refined boxes")
        assert vote[split] == pytest.approx(_pipeline_map(world, tmp_path, split, "refined", ["perfect", "noisy"]),
                                            abs=1e-12)
        alone = _row(recs, "mask mAP", "noisy (s32)")
        assert alone["boxes"] == "refined"
        assert alone[split] == pytest.approx(_pipeline_map(world, tmp_path, split, "refined", ["noisy"], "first"),
                                             abs=1e-12)
        flip = _row(recs, "mask mAP", "noisy + s32_flip")
        assert flip[split] == pytest.approx(_pipeline_map(world, tmp_path, split, "refined", ["noisy"]), abs=1e-12)
        raw = _row(recs, "mask mAP", "vote of perfect, noisy (4 maps), unrefined boxes")
        assert raw[split] == pytest.approx(_pipeline_map(world, tmp_path, split, "raw", ["perfect", "noisy"]),
                                           abs=1e-12)
        # the perfect model beats the noisy one
        assert _row(recs, "mask mAP", "perfect (s32)")[split] > alone[split]
    # per model rows only on the boxes the pipeline segments (refined, as there are refined maps)
    assert {r["boxes"] for r in recs if r["measure"] == "mask mAP" and not r["variant"].startswith("vote")} \
        == {"refined"}
    # the box refiner's effect: the refined boxes sit closer to the ground truth than the raw ones
    for split in ("val_a", "val_b"):
        iou = {r["boxes"]: r[split] for r in recs if r["measure"] == "box mean matched IoU"}
        assert iou["refined"] > iou["unrefined"] > 0.5
        ap75 = {r["boxes"]: r[split] for r in recs if r["measure"] == "box AP@0.75"}
        assert ap75["refined"] >= ap75["unrefined"]
    md = (tmp_path / "abl.md").read_text()
    assert "| vote of perfect, noisy (4 maps), refined boxes | refined |" in md and "## Box refinement" in md


def test_json_is_flat_records_the_report_reads(world, tmp_path):
    recs = _ablation(world, tmp_path, ["perfect", "noisy"], *world["box_args"])
    assert isinstance(recs, list) and recs
    for r in recs:
        assert {"measure", "variant", "boxes"} <= set(r) <= {"measure", "variant", "boxes", "val_a", "val_b"}
        assert all(isinstance(v, (str, float, int)) or v is None for v in r.values())
    df = report.read_ablation(tmp_path / "abl.json")
    assert list(df.columns) == ["measure", "variant", "boxes", "val_a", "val_b"] and len(df) == len(recs)
    assert set(df["measure"]) == {"mask mAP", "box AP@0.5", "box AP@0.75", "box mean matched IoU"}
    assert df["val_a"].dtype.kind == "f" and df[["val_a", "val_b"]].notna().all().all()


@pytest.mark.parametrize("item, msg", [("val_a:refined:perfect=X", "--probs takes X:X:X:X=PATH"),
                                       ("val_a:refined:perfect:0", "--probs takes X:X:X:X=PATH"),
                                       ("val_a::perfect:0=X", "--probs takes X:X:X:X=PATH"),
                                       ("val_a:boxes:perfect:0=X", "unknown box source 'boxes'")])
def test_bad_probs_keys_exit_2(world, tmp_path, capsys, item, msg):
    out = tmp_path / "abl.json"
    rc = seg_ablation.main(["--probs", *world["probs"][:2], item, "--models", "perfect", *world["common"],
                            "--out-json", str(out), "--out-md", str(tmp_path / "abl.md")])
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err and "'--probs'" in err
    assert not out.exists() and not (tmp_path / "abl.md").exists()


def test_models_of_different_boxes_exit_2(world, tmp_path, capsys):
    root = world["root"]
    probs = [p for p in world["probs"] if p.startswith("val_b:refined:")]
    other = str(root / "val_b_raw_noisy_0.npz")
    probs = [p if ":noisy:" not in p else f"val_b:refined:noisy:0={other}" for p in probs]
    rc = seg_ablation.main(["--probs", *probs, "--models", "perfect", "noisy", *world["common"],
                            "--out-json", str(tmp_path / "a.json"), "--out-md", str(tmp_path / "a.md")])
    assert rc == 2
    err = capsys.readouterr().err
    # the reference (the first model in name order, noisy) and the file that differs (perfect's) are named
    assert "val_b_raw_noisy_0.npz" in err and "val_b_refined_perfect_0.npz" in err and "same boxes" in err
    assert "field 'score'" in err and "np.float64" not in err
    assert not (tmp_path / "a.json").exists()


def test_ground_truth_masks_stored_at_another_size(world, tmp_path):
    """OpenImages masks need not be at the image's size: one image's masks at half resolution are resized to
    the image (as stages.evaluate resizes them to the predictions' size); the rows still equal the pipeline's."""
    f = world["files"]
    gt = read_table(f["gt_masks"], "gt_masks")
    val_b = sorted(read_table(world["root"] / "splits.parquet", "splits").query("split == 'val_b'")["image_id"])
    half = gt["image_id"] == val_b[0]
    assert half.sum() >= 2
    for i in np.flatnonzero(half):
        r = gt.iloc[i]
        m = mu.decode({"size": [int(r.mask_height), int(r.mask_width)], "counts": r.rle.encode()})[::2, ::2]
        gt.loc[i, "rle"] = mu.encode(np.asfortranarray(m))["counts"].decode()
        gt.loc[i, ["mask_height", "mask_width"]] = m.shape
    write_table(tmp_path / "gt_half.parquet", gt, "gt_masks")
    small = {**world, "files": {**f, "gt_masks": tmp_path / "gt_half.parquet"},
             "common": [str(tmp_path / "gt_half.parquet") if a == str(f["gt_masks"]) else a
                        for a in world["common"]]}
    recs = _ablation(small, tmp_path, ["perfect", "noisy"])
    vote = _row(recs, "mask mAP", "vote of perfect, noisy (4 maps), refined boxes")
    assert vote["val_b"] == pytest.approx(_pipeline_map(small, tmp_path, "val_b", "refined", ["perfect", "noisy"]),
                                          abs=1e-12)
    oracle = _ablation(small, tmp_path, ["perfect"])
    assert _row(oracle, "mask mAP", "vote of perfect (2 maps), ground-truth boxes (oracle)")["val_b"] == \
        pytest.approx(1.0)
