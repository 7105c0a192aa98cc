"""The mask stages on a tiny synthetic dataset: train_masks (plan, schedule, checkpoints, resume) and
infer_masks (shapes, order, flip views, bad input), and the mask probabilities file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from stages import infer_masks, train_masks
from stages.core.config import schema_default
from stages.core.errors import InputError
from stages.formats.io import write_table
from stages.formats.mask_probs import read_mask_probs, write_mask_probs

TINY = {"backbone": "hrnet_tiny", "head_channels": 4, "batch_size": 4, "train_scales": [32, 32], "epochs": 2,
        "warmup_iters": 1, "test_scale": 32, "lr": 0.02, "seed": 1}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gt_masks(rows: list[tuple[str, str, np.ndarray]]) -> pd.DataFrame:
    """The ground-truth masks table (the ingest_masks stage's columns) of (image id, label, full mask) rows; the
    box is the mask's extent."""
    out = []
    for image_id, label, m in rows:
        ys, xs = np.nonzero(m)
        h, w = m.shape
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        out.append({"image_id": image_id, "label": label, "x_min": xs.min() / w, "y_min": ys.min() / h,
                    "x_max": (xs.max() + 1) / w, "y_max": (ys.max() + 1) / h, "rle": rle["counts"].decode(),
                    "mask_height": h, "mask_width": w, "mask_path": f"{image_id}_{len(out)}.png"})
    df = pd.DataFrame(out)
    return df.astype({"mask_height": "int32", "mask_width": "int32"})


def _dataset(root: Path, n: int = 6) -> dict[str, Path]:
    """n images 48x64 with a bright disc and a dark rectangle (their masks; image 0's masks stored at half
    resolution, as OpenImages masks may be); images 0..n-3 train, the last two val_a."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :64]
    rows, imgs = [], []
    for i in range(n):
        img = rng.integers(60, 140, (48, 64, 3)).astype(np.uint8)
        cx, cy, r = rng.integers(12, 24), rng.integers(12, 36), rng.integers(6, 10)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        x0, y0 = rng.integers(34, 48), rng.integers(4, 30)
        rect = (xx >= x0) & (xx < x0 + 12) & (yy >= y0) & (yy < y0 + 14)
        img[disc] = 230
        img[rect] = 20
        Image.fromarray(img).save(root / f"im{i}.png")
        imgs.append({"image_id": f"im{i}", "path": str(root / f"im{i}.png"), "width": 64, "height": 48})
        for lab, m in (("/m/disc", disc), ("/m/rect", rect)):
            rows.append((f"im{i}", lab, m[::2, ::2] if i == 0 else m))
    write_table(root / "images.parquet", pd.DataFrame(imgs), "images")
    write_table(root / "splits.parquet", pd.DataFrame({"image_id": [f"im{i}" for i in range(n)],
                                                       "split": ["train"] * (n - 2) + ["val_a"] * 2}), "splits")
    _gt_masks(rows).to_parquet(root / "gt_masks.parquet", index=False)
    return {"images": root / "images.parquet", "splits": root / "splits.parquet",
            "masks": root / "gt_masks.parquet"}


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    return _dataset(tmp_path / "data")


def _train(data, out: Path, cfg=TINY, *extra) -> int:
    return train_masks.main(["--config", json.dumps(cfg), "--masks", str(data["masks"]), "--images",
                             str(data["images"]), "--splits", str(data["splits"]), "--device", "cpu",
                             "--ckpt-dir", str(out / "ckpt"), "--metrics", str(out / "m.jsonl"),
                             "--log-every", "1", "--out", str(out / "model.pt"), *extra])


# ------------------------------------------------------------------------------------------------ config, plan
def test_mask_config_fills_defaults_and_rejects_bad_keys():
    cfg = train_masks.mask_config({})
    assert cfg["backbone"] == "hrnet_tiny" and cfg["lr"] == 0.08 and cfg["poly_power"] == 0.9
    assert set(train_masks.mask_part(cfg, "infer")) == {"test_scale", "test_flip"}
    for bad, field in (({"nope": 1}, "(top level)"), ({"train_scales": [50, 64]}, "train_scales/0"),
                       ({"train_scales": [64, 48]}, "train_scales"), ({"backbone": "resnet50"}, "backbone")):
        with pytest.raises(InputError) as e:
            train_masks.mask_config(bad)
        assert e.value.field == field


def test_lr_scaled_by_batch_warmed_up_then_poly():
    cfg = train_masks.mask_config({"lr": 0.08, "batch_size": 8, "warmup_iters": 4, "poly_power": 0.9})
    base = 0.08 * 8 / 16
    assert train_masks.lr_at(0, 100, cfg) == pytest.approx(base * 1 / 5)
    assert train_masks.lr_at(3, 100, cfg) == pytest.approx(base * 0.97 ** 0.9 * 4 / 5)
    assert train_masks.lr_at(50, 100, cfg) == pytest.approx(base * 0.5 ** 0.9)
    assert train_masks.lr_at(50, 100, cfg, world=2) == pytest.approx(2 * base * 0.5 ** 0.9)
    assert train_masks.lr_at(99, 100, cfg) < 0.02 * base


def test_plan_packs_whole_images_once_per_epoch(data):
    gt = train_masks.read_gt_masks(data["masks"])
    extra = gt[gt["image_id"] == "im1"].assign(label="/m/more")
    gt = pd.concat([gt] + [extra] * 3, ignore_index=True)  # im1: 8 instances, more than a batch
    inst = train_masks.Instances(gt, pd.read_parquet(data["images"]))
    plan = train_masks.plan_epoch(inst, epoch=0, seed=3, batch_size=5, train_scales=[40, 52])
    images = [item.image for batch in plan for item in batch]
    assert sorted(images) == list(range(inst.n_images))  # every image, once
    for batch in plan:
        assert sum(len(item.instances) for item in batch) <= 5
        assert len({item.size for item in batch}) == 1 and batch[0].size in (40, 44, 48, 52)
    big = next(item for batch in plan for item in batch if item.image == 1)
    assert len(big.instances) == 5 and len(set(big.instances)) == 5
    assert plan == train_masks.plan_epoch(inst, epoch=0, seed=3, batch_size=5, train_scales=[40, 52])
    assert plan != train_masks.plan_epoch(inst, epoch=1, seed=3, batch_size=5, train_scales=[40, 52])


def test_crops_depend_on_the_item_alone_and_targets_follow_the_masks(data):
    gt = train_masks.read_gt_masks(data["masks"])
    inst = train_masks.Instances(gt, pd.read_parquet(data["images"]))
    ds = train_masks.CropSet(inst, seed=0, jitter=0.0, rotate_sigma=0.0)
    item = train_masks.CropItem(0, 2, (4, 5), 32)
    x1, y1 = ds[item]
    x2, y2 = ds[item]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (2, 3, 32, 32) and y1.shape == (2, 1, 32, 32)
    # no jitter: the box is the mask's extent, the disc fills most of it and its crop is bright where the mask is
    assert 0.6 < y1[0].mean() < 0.9 and y1[1].mean() > 0.9
    assert x1[0].mean(0)[y1[0, 0] > 0].mean() > x1[0].mean(0)[y1[0, 0] == 0].mean()
    # image 0's masks are stored at half resolution: resized to the image, the crop still matches its shape
    _, y0 = ds[train_masks.CropItem(0, 0, (0, 1), 32)]
    assert 0.6 < y0[0].mean() < 0.9 and y0[1].mean() > 0.9


# ------------------------------------------------------------------------------------------------ train CLI
def test_train_masks_end_to_end_resume_and_changed_config(data, tmp_path, capsys):
    assert _train(data, tmp_path / "full") == 0
    ckpt = torch.load(tmp_path / "full" / "model.pt", weights_only=False)
    assert set(ckpt) == {"state_dict", "cfg", "meta"} and ckpt["meta"]["epochs"] == 2
    assert ckpt["cfg"]["head_channels"] == 4 and ckpt["cfg"]["momentum"] == 0.9  # the defaults filled in
    assert sorted(p.name for p in (tmp_path / "full" / "ckpt").iterdir()) == ["epoch_001.pt"]
    lines = [json.loads(x) for x in (tmp_path / "full" / "m.jsonl").read_text().splitlines()]
    assert lines and all(x["loss"] > 0 and x["crops_per_s"] > 0 for x in lines)

    # stopped after epoch 1, rerun: resumes and ends with the uninterrupted run's weights
    assert _train(data, tmp_path / "resumed", TINY, "--stop-after-epoch", "1") == 0
    capsys.readouterr()
    assert _train(data, tmp_path / "resumed") == 0
    assert "resuming from" in capsys.readouterr().err
    a, b = ckpt["state_dict"], torch.load(tmp_path / "resumed" / "model.pt", weights_only=False)["state_dict"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k

    # a changed training key: the old checkpoint is not resumed
    assert _train(data, tmp_path / "resumed", {**TINY, "jitter": 0.2}) == 0
    assert "resuming from" not in capsys.readouterr().err
    # a changed inference key is not part of the hash
    assert _train(data, tmp_path / "resumed", {**TINY, "jitter": 0.2, "test_flip": True}) == 0
    assert "resuming from" in capsys.readouterr().err


def test_loader_workers_do_not_change_the_result(data, tmp_path):
    cfg = {**TINY, "train_scales": [32, 40], "epochs": 1}
    assert _train(data, tmp_path / "w0", cfg) == 0
    assert _train(data, tmp_path / "w2", cfg, "--workers", "2") == 0
    a = torch.load(tmp_path / "w0" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "w2" / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_masks_bad_input(data, tmp_path, capsys):
    gt = pd.read_parquet(data["masks"])
    gt.loc[3, "x_max"] = 1.5
    gt.to_parquet(tmp_path / "bad.parquet", index=False)
    rc = train_masks.main(["--masks", str(tmp_path / "bad.parquet"), "--images", str(data["images"]),
                           "--ckpt-dir", str(tmp_path / "c"), "--out", str(tmp_path / "m.pt")])
    assert rc == 2 and not (tmp_path / "m.pt").exists()
    assert "bad.parquet: row 3: field 'x_max'" in capsys.readouterr().err
    rc = train_masks.main(["--masks", str(data["masks"]), "--images", str(data["images"]), "--config", "[1]",
                           "--ckpt-dir", str(tmp_path / "c"), "--out", str(tmp_path / "m.pt")])
    assert rc == 2


# ------------------------------------------------------------------------------------------------ infer CLI
@pytest.fixture
def model(data, tmp_path) -> Path:
    assert _train(data, tmp_path / "model", {**TINY, "epochs": 1}) == 0
    return tmp_path / "model" / "model.pt"


def _infer(model, data, out, *extra) -> int:
    return infer_masks.main(["--model", str(model), "--images", str(data["images"]), "--device", "cpu",
                             "--out", str(out), *extra])


def _flipped(data, root: Path) -> dict[str, Path]:
    """The dataset mirrored left-right (images and boxes)."""
    root.mkdir()
    images = pd.read_parquet(data["images"])
    for r in images.itertuples():
        Image.open(r.path).transpose(Image.FLIP_LEFT_RIGHT).save(root / Path(r.path).name)
    images["path"] = [str(root / Path(p).name) for p in images["path"]]
    write_table(root / "images.parquet", images, "images")
    gt = pd.read_parquet(data["masks"])
    gt["x_min"], gt["x_max"] = 1 - gt["x_max"], 1 - gt["x_min"]
    gt.to_parquet(root / "gt_masks.parquet", index=False)
    return {**data, "images": root / "images.parquet", "masks": root / "gt_masks.parquet"}


def test_infer_masks_oracle_shapes_order_and_flip_view(model, data, tmp_path):
    out = tmp_path / "p.npz"
    assert _infer(model, data, out, "--masks", str(data["masks"]), "--splits", str(data["splits"]), "--split",
                  "val_a", "--flip", "true", "--map-size", "20") == 0
    dets, probs, views = read_mask_probs(out)
    assert views == ["s32", "s32_flip"] and probs.shape == (2, 4, 20, 20) and probs.dtype == np.float16
    assert list(dets["image_id"]) == ["im4", "im4", "im5", "im5"] and (dets["score"] == 1.0).all()
    assert (dets["width"] == 64).all() and (dets["height"] == 48).all()
    assert ((probs >= 0) & (probs <= 1)).all()
    gt = pd.read_parquet(data["masks"])
    gt = gt[gt["image_id"].isin(["im4", "im5"])].reset_index(drop=True)
    assert np.allclose(dets[["x_min", "y_min", "x_max", "y_max"]].to_numpy(),
                       gt[["x_min", "y_min", "x_max", "y_max"]].to_numpy())

    # the flipped view equals the (flipped back) unflipped view of the mirrored images
    fl = _flipped(data, tmp_path / "flipped")
    out2 = tmp_path / "p2.npz"
    assert _infer(model, fl, out2, "--masks", str(fl["masks"]), "--splits", str(data["splits"]), "--split",
                  "val_a", "--flip", "false", "--map-size", "20") == 0
    _, probs2, views2 = read_mask_probs(out2)
    assert views2 == ["s32"]
    assert np.allclose(probs[1].astype(np.float32), probs2[0, :, :, ::-1].astype(np.float32), atol=2e-3)
    assert not np.allclose(probs[0].astype(np.float32), probs[1].astype(np.float32), atol=2e-3)


def test_infer_masks_detections_top_n_by_score(model, data, tmp_path):
    dets = pd.DataFrame({"image_id": ["im5", "im4", "im5", "im5", "im4"], "label": ["a", "b", "c", "d", "e"],
                         "score": [0.2, 0.5, 0.9, 0.4, 0.7], "x_min": 0.1, "y_min": 0.2, "x_max": 0.5,
                         "y_max": 0.9})
    write_table(tmp_path / "dets.parquet", dets, "detections")
    out = tmp_path / "p.npz"
    assert _infer(model, data, out, "--dets", str(tmp_path / "dets.parquet"), "--top-n", "2") == 0
    got, probs, views = read_mask_probs(out)
    assert list(got["label"]) == ["e", "b", "c", "d"] and list(got["score"]) == [0.7, 0.5, 0.9, 0.4]
    m = schema_default("segmentation", "map_size")
    assert views == ["s32"] and probs.shape == (1, 4, m, m)  # the model's test_scale, the schema's map size
    # identical boxes of one image give identical maps
    assert np.array_equal(probs[0, 0], probs[0, 1])


@pytest.mark.parametrize("change, field", [({"x_max": 1.2}, "x_max"), ({"y_min": -0.1}, "y_min"),
                                           ({"x_min": 0.6}, "x_max"), ({"image_id": "nope"}, "image_id")])
def test_infer_masks_bad_boxes(model, data, tmp_path, capsys, change, field):
    dets = pd.DataFrame({"image_id": ["im4", "im5"], "label": "a", "score": [0.5, 0.6], "x_min": 0.1,
                         "y_min": 0.2, "x_max": 0.5, "y_max": 0.9})
    for k, v in change.items():
        dets.loc[1, k] = v
    write_table(tmp_path / "dets.parquet", dets, "detections")
    out = tmp_path / "p.npz"
    assert _infer(model, data, out, "--dets", str(tmp_path / "dets.parquet")) == 2
    assert f"dets.parquet: row 1: field '{field}'" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ the format
def test_mask_probs_round_trip_and_bad_files(tmp_path):
    dets = pd.DataFrame({"image_id": ["a", "b"], "label": ["/m/x", "/m/y"], "score": [0.5, 1.0], "x_min": 0.1,
                         "y_min": 0.2, "x_max": 0.3, "y_max": 0.4, "width": [10, 20], "height": [30, 40]})
    probs = np.random.default_rng(0).random((2, 2, 5, 5))
    write_mask_probs(tmp_path / "p.npz", dets, probs, ["s8", "s8_flip"])
    got, p, views = read_mask_probs(tmp_path / "p.npz")
    pd.testing.assert_frame_equal(got, dets.astype({"width": "int32", "height": "int32"}))
    assert p.dtype == np.float16 and np.allclose(p, probs, atol=1e-3) and views == ["s8", "s8_flip"]
    with pytest.raises(ValueError):
        write_mask_probs(tmp_path / "q.npz", dets, probs[:, :1], ["s8", "s8_flip"])
    with np.load(tmp_path / "p.npz") as z:
        arrs = dict(z)
    np.savez(tmp_path / "short.npz", **{**arrs, "score": arrs["score"][:1]})
    with pytest.raises(InputError, match="short.npz: field 'score'"):
        read_mask_probs(tmp_path / "short.npz")
    np.savez(tmp_path / "nov.npz", **{k: v for k, v in arrs.items() if k != "views"})
    with pytest.raises(InputError, match="field 'views'"):
        read_mask_probs(tmp_path / "nov.npz")
    np.savez(tmp_path / "f32.npz", **{**arrs, "probs": arrs["probs"].astype(np.float32)})
    with pytest.raises(InputError, match="field 'probs'"):
        read_mask_probs(tmp_path / "f32.npz")
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(InputError, match="junk.npz"):
        read_mask_probs(tmp_path / "junk.npz")


# ------------------------------------------------------------------------------------------------ infer options
def _dets_on_every_image(n: int = 6) -> pd.DataFrame:
    """Three boxes on each image: two of /m/disc (one of them also under the parent label /m/shape, the same
    box), one of /m/rect scored highest."""
    rows = []
    for i in range(n):
        rows += [(f"im{i}", "/m/rect", 0.95, 0.55, 0.1, 0.9, 0.7), (f"im{i}", "/m/disc", 0.8, 0.1, 0.2, 0.5, 0.8),
                 (f"im{i}", "/m/shape", 0.8, 0.1, 0.2, 0.5, 0.8), (f"im{i}", "/m/disc", 0.3, 0.0, 0.0, 0.4, 0.5)]
    return pd.DataFrame(rows, columns=["image_id", "label", "score", "x_min", "y_min", "x_max", "y_max"])


def test_infer_masks_classes_filter_before_top_n(model, data, tmp_path):
    write_table(tmp_path / "dets.parquet", _dets_on_every_image(), "detections")
    (tmp_path / "seg.csv").write_text("/m/disc,Disc\n/m/shape,Shape\n")
    out = tmp_path / "p.npz"
    assert _infer(model, data, out, "--dets", str(tmp_path / "dets.parquet"), "--classes",
                  str(tmp_path / "seg.csv"), "--top-n", "2", "--map-size", "8") == 0
    got, probs, _ = read_mask_probs(out)
    # the rect (the best score, not segmentable) is dropped first, so each image keeps two of its other boxes
    assert (got["label"] != "/m/rect").all() and len(got) == 12
    assert got.groupby("image_id").size().tolist() == [2] * 6
    assert got["score"].tolist() == [0.8] * 12 and set(got["label"]) == {"/m/disc", "/m/shape"}
    # without the filter the rect takes one of the two places
    assert _infer(model, data, tmp_path / "q.npz", "--dets", str(tmp_path / "dets.parquet"), "--top-n", "2",
                  "--map-size", "8") == 0
    assert (read_mask_probs(tmp_path / "q.npz")[0]["label"] == "/m/rect").sum() == 6
    # a classes parquet works alike
    write_table(tmp_path / "classes.parquet", pd.DataFrame({"label": ["/m/rect"], "name": ["Rect"]}), "classes")
    assert _infer(model, data, tmp_path / "r.npz", "--dets", str(tmp_path / "dets.parquet"), "--classes",
                  str(tmp_path / "classes.parquet"), "--map-size", "8") == 0
    assert read_mask_probs(tmp_path / "r.npz")[0]["label"].tolist() == ["/m/rect"] * 6


def test_infer_masks_shards_partition_the_images(model, data, tmp_path, capsys):
    from stages.infer import shard

    write_table(tmp_path / "dets.parquet", _dets_on_every_image(), "detections")
    common = ["--dets", str(tmp_path / "dets.parquet"), "--map-size", "8", "--flip", "true"]
    assert _infer(model, data, tmp_path / "all.npz", *common) == 0
    whole, whole_p, views = read_mask_probs(tmp_path / "all.npz")
    images = pd.read_parquet(data["images"])
    parts, maps = [], []
    for k in range(3):
        assert _infer(model, data, tmp_path / f"s{k}.npz", *common, "--shard", str(k), "--shards", "3") == 0
        d, p, v = read_mask_probs(tmp_path / f"s{k}.npz")
        assert v == views
        assert sorted(d["image_id"].unique()) == sorted(shard(images, k, 3)["image_id"])
        parts.append(d)
        maps.append(p)
    union = pd.concat(parts, ignore_index=True)
    key = ["image_id", "score", "label", "x_min"]
    order_u = union.sort_values(key, kind="stable").index.to_numpy()
    order_w = whole.sort_values(key, kind="stable").index.to_numpy()
    pd.testing.assert_frame_equal(union.loc[order_u].reset_index(drop=True),
                                  whole.loc[order_w].reset_index(drop=True))
    both = np.concatenate(maps, axis=1)
    np.testing.assert_allclose(both[:, order_u].astype(np.float32), whole_p[:, order_w].astype(np.float32),
                               atol=2e-3)
    # with a split: the split's images are sharded (val_a is im4, im5)
    assert _infer(model, data, tmp_path / "v1.npz", *common, "--splits", str(data["splits"]), "--split", "val_a",
                  "--shard", "1", "--shards", "2") == 0
    assert read_mask_probs(tmp_path / "v1.npz")[0]["image_id"].unique().tolist() == ["im5"]
    # a shard without boxes writes a file of no boxes (the vote stage makes an empty masks table of it)
    write_table(tmp_path / "im0.parquet", _dets_on_every_image(1), "detections")
    assert _infer(model, data, tmp_path / "e.npz", "--dets", str(tmp_path / "im0.parquet"), "--shard", "1",
                  "--shards", "3") == 0
    d, p, v = read_mask_probs(tmp_path / "e.npz")
    assert len(d) == 0 and p.shape[:2] == (1, 0)
    capsys.readouterr()
    assert _infer(model, data, tmp_path / "bad.npz", *common, "--shard", "3", "--shards", "3") == 2
    assert "--shard 3 is not in [0, --shards 3)" in capsys.readouterr().err
    assert not (tmp_path / "bad.npz").exists()


def test_infer_masks_predicts_a_repeated_box_once(model, data, tmp_path, monkeypatch):
    calls = []
    real = infer_masks.infer_masks

    def counting(**kw):
        calls.append(len(kw["boxes"]))
        return real(**kw)

    monkeypatch.setattr(infer_masks, "infer_masks", counting)
    dets = _dets_on_every_image(2)
    # im0: the disc box also under a third label, scored between the others: its rows are not adjacent
    dets = pd.concat([dets, pd.DataFrame([("im0", "/m/thing", 0.5, 0.1, 0.2, 0.5, 0.8)], columns=dets.columns)],
                     ignore_index=True)
    write_table(tmp_path / "dets.parquet", dets, "detections")
    assert _infer(model, data, tmp_path / "p.npz", "--dets", str(tmp_path / "dets.parquet"), "--map-size", "8",
                  "--flip", "true") == 0
    got, probs, _ = read_mask_probs(tmp_path / "p.npz")
    assert len(got) == 9 and calls == [6]   # 9 rows, 3 distinct boxes on each of 2 images
    assert got.loc[got["image_id"] == "im0", "label"].tolist() == ["/m/rect", "/m/disc", "/m/shape", "/m/thing",
                                                                   "/m/disc"]
    same = got.groupby(["image_id", "x_min", "y_min", "x_max", "y_max"]).indices
    for rows in same.values():
        for r in rows[1:]:
            assert np.array_equal(probs[:, r], probs[:, rows[0]])   # every view
    assert sorted(len(r) for r in same.values()) == [1, 1, 1, 1, 2, 3]
    # the maps are those of the box predicted alone
    alone = dets.drop_duplicates(["image_id", "x_min", "y_min", "x_max", "y_max"])
    write_table(tmp_path / "alone.parquet", alone, "detections")
    assert _infer(model, data, tmp_path / "a.npz", "--dets", str(tmp_path / "alone.parquet"), "--map-size", "8",
                  "--flip", "true") == 0
    a, pa_, _ = read_mask_probs(tmp_path / "a.npz")
    for i, r in a.iterrows():
        rows = same[(r["image_id"], r["x_min"], r["y_min"], r["x_max"], r["y_max"])]
        np.testing.assert_allclose(probs[:, rows[0]].astype(np.float32), pa_[:, i].astype(np.float32), atol=2e-3)
