"""The training data path: the compact per-image box index against the per-image DataFrame lookup it replaced,
the epoch plan as a batch sampler, DataLoader workers that change nothing, and checkpoint retention."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from stages import train
from stages.formats.io import read_table
from stages.formats.openimages import read_boxes
from stages.generate import plan_dataset
from stages.models.averaging import average_state_dicts
from stages.models.data import DetectionDataset

torch.set_num_threads(1)

TINY = {"backbone": "resnet_small", "width": 8, "fpn_channels": 16, "representation_size": 32, "epochs": 1,
        "batch_size": 2, "lr": 0.01, "lr_steps": [1], "warmup_iters": 1, "iters_per_epoch": 2, "min_size": 64,
        "max_size": 96, "seed": 5}


def reference_targets(images: pd.DataFrame, boxes: pd.DataFrame, label_index: dict[str, int]) -> list[dict]:
    """The targets as the dataset computed them before the index: a DataFrame per image, looked up by id."""
    images = images.reset_index(drop=True)
    b = boxes[boxes["label"].isin(label_index)]
    by_image = {k: g for k, g in b.groupby("image_id", sort=False, observed=True)}
    out = []
    for i in range(len(images)):
        row = images.iloc[i]
        g = by_image.get(row["image_id"])
        w, h = float(row["width"]), float(row["height"])
        if g is None or len(g) == 0:
            out.append({"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)})
            continue
        xyxy = g[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float32) * np.array([w, h, w, h], np.float32)
        xyxy[:, 2] = np.maximum(xyxy[:, 2], xyxy[:, 0] + 1)
        xyxy[:, 3] = np.maximum(xyxy[:, 3], xyxy[:, 1] + 1)
        labels = np.array([label_index[lab] for lab in g["label"]], np.int64)
        out.append({"boxes": torch.from_numpy(xyxy), "labels": torch.from_numpy(labels)})
    return out


def assert_index_matches_reference(images: pd.DataFrame, boxes: pd.DataFrame, label_index: dict[str, int]):
    ds = DetectionDataset(images, boxes, label_index)
    ref = reference_targets(images, boxes, label_index)
    assert len(ds) == len(ref) == len(images)
    for i, r in enumerate(ref):
        t = ds.target(i)
        assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
        assert torch.equal(t["boxes"], r["boxes"]) and torch.equal(t["labels"], r["labels"]), i
        assert ds.path(i) == images["path"].iloc[i]
    # box_sizes: every box of every image, as the per-image targets give them
    bw, iw, lab = ds.box_sizes()
    ref_b = torch.cat([r["boxes"] for r in ref]).numpy()
    assert np.array_equal(bw, np.stack([ref_b[:, 2] - ref_b[:, 0], ref_b[:, 3] - ref_b[:, 1]], 1))
    sizes = [np.tile([float(images["width"].iloc[i]), float(images["height"].iloc[i])], (len(r["boxes"]), 1))
             for i, r in enumerate(ref)]
    assert np.array_equal(iw, np.concatenate(sizes)) and np.array_equal(lab, torch.cat([r["labels"] for r in ref]))
    return ds


def test_index_gives_the_dataframe_targets_on_the_hand_written_tables(tables):
    out, _ = tables
    images = read_table(out / "images.parquet", "images")
    boxes = read_table(out / "boxes.parquet", "boxes")
    labels = sorted(boxes["label"].unique())
    ds = assert_index_matches_reference(images, boxes, {lab: i + 1 for i, lab in enumerate(labels)})
    assert ds.offsets.tolist() == [0, 2, 3, 4, 5]     # img0 holds two boxes, the others one each
    # a label subset (an expert model): the other classes' boxes are dropped, img2 and img3 keep none or one
    sub = assert_index_matches_reference(images, boxes, {"/m/cat": 1, "/m/dog": 2})
    assert sub.offsets.tolist() == [0, 1, 2, 2, 3]
    # plain arrays, nothing per row: what forked DataLoader workers share
    for a in (ds.paths, ds.widths, ds.heights, ds.xyxy_norm, ds.cls, ds.offsets):
        assert isinstance(a, np.ndarray) and a.dtype != object


def test_index_gives_the_dataframe_targets_on_generated_data(tmp_path):
    plan = plan_dataset(n_train_images=60, n_test_images=0, image_size=(128, 320), seed=4)
    csv = tmp_path / "bbox.csv"
    plan.bbox_frame().to_csv(csv, index=False)
    boxes = read_boxes(csv, categorical=True)           # categorical ids and labels, as ingest reads them
    rng = np.random.default_rng(0)
    boxes = boxes.iloc[rng.permutation(len(boxes))].reset_index(drop=True)   # images' boxes interleaved
    images = pd.DataFrame({"image_id": [im.image_id for im in plan.train] + ["no_boxes"],
                           "path": [f"/data/é/{im.image_id}.jpg" for im in plan.train] + ["/x.jpg"],
                           "width": [im.width for im in plan.train] + [100],
                           "height": [im.height for im in plan.train] + [50]})
    images = images.iloc[rng.permutation(len(images))].reset_index(drop=True)
    # a few degenerate boxes (zero width or height) get their pixel; boxes of unknown images are dropped
    boxes.loc[:4, "x_max"] = boxes.loc[:4, "x_min"]
    boxes["image_id"] = boxes["image_id"].cat.add_categories(["elsewhere"])
    extra = boxes.iloc[:3].copy()
    extra.loc[:, "image_id"] = "elsewhere"
    boxes = pd.concat([boxes, extra], ignore_index=True)
    assert isinstance(boxes["image_id"].dtype, pd.CategoricalDtype)
    labels = sorted(boxes["label"].astype(str).unique())
    assert len(labels) > 3
    assert_index_matches_reference(images, boxes, {lab: i + 1 for i, lab in enumerate(labels)})
    assert_index_matches_reference(images, boxes, {lab: i + 1 for i, lab in enumerate(labels[::2])})


def test_duplicate_image_ids_are_rejected():
    images = pd.DataFrame({"image_id": ["a", "a"], "path": ["p", "q"], "width": [1, 1], "height": [1, 1]})
    boxes = pd.DataFrame({"image_id": ["a"], "label": ["x"], "x_min": [0.1], "y_min": [0.1], "x_max": [0.5],
                          "y_max": [0.5]})
    with pytest.raises(train.InputError, match="'a' appears twice"):
        DetectionDataset(images, boxes, {"x": 1})


def _train_tables(tables):
    """The train split's images and all boxes of the tiny dataset."""
    out, splits = tables
    images = read_table(out / "images.parquet", "images")
    boxes = read_table(out / "boxes.parquet", "boxes")
    sp = read_table(splits, "splits")
    images = images[images["image_id"].isin(sp.loc[sp["split"] == "train", "image_id"])]
    return images, boxes


def _data(tables, cfg, *, iters=2, rank=0, world=1, weights="pairs"):
    images, boxes = _train_tables(tables)
    pairs = boxes[boxes["image_id"].isin(images["image_id"])][["image_id", "label"]].drop_duplicates()
    w = pairs.assign(weight=1.0) if weights == "pairs" else None
    labels = sorted(pairs["label"].unique())
    return train.training_data(cfg=train.model_part(train.model_config(cfg), "train"), images=images,
                               boxes=boxes, weights=w, labels=labels, iters=iters, rank=rank, world=world)


def test_plan_sampler_splits_each_global_batch_between_ranks(tables):
    cfg = {**TINY, "full_class_batch": True}
    ranks = [_data(tables, cfg, iters=3, rank=r, world=2) for r in range(2)]
    for epoch in (0, 1):
        order, classes, flips = ranks[0].sampler.plan(epoch)
        assert all(np.array_equal(a, b) for a, b in zip((order, classes, flips), ranks[1].sampler.plan(epoch)))
        got = []
        for d in ranks:
            d.sampler.set_epoch(epoch)
            got.append(list(d.sampler))
        assert len(got[0]) == len(got[1]) == 3 == len(ranks[0].sampler)
        for k in range(3):   # global batch k: rank 0 the first two positions, rank 1 the next two
            items = got[0][k] + got[1][k]
            assert [it.j for it in items] == list(range(4 * k, 4 * k + 4))
            assert all(it.epoch == epoch and it.image == order[it.j] and it.cls == classes[it.j]
                       and it.flip == flips[it.j] for it in items)
    assert any(not np.array_equal(x, y) for x, y in zip(ranks[0].sampler.plan(0), ranks[0].sampler.plan(1)))


def _batches(data, workers, epochs=(0, 1)):
    loader = data.loader(workers=workers)
    out = []
    for epoch in epochs:
        data.sampler.set_epoch(epoch)
        out += list(loader)
    return out


@pytest.mark.parametrize("augment", ["basic", "elaborate"])
def test_batches_do_not_depend_on_the_worker_count(tables, augment):
    data = _data(tables, {**TINY, "augment": augment, "aug_rotate_std": [10.0, 20.0]}, iters=3)
    torch.manual_seed(0)
    a = _batches(data, 0)
    state = torch.get_rng_state()
    b = _batches(data, 2)
    assert torch.equal(state, torch.get_rng_state())   # the loader leaves torch's global generator alone
    assert len(a) == len(b) == 6
    for (ia, ta), (ib, tb) in zip(a, b):
        assert len(ia) == len(ib) == 2
        for x, y in zip(ia, ib):
            assert torch.equal(x, y)
        for x, y in zip(ta, tb):
            assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["labels"], y["labels"])
    # what the batches hold: each planned image, flipped as planned and (elaborate) rotated and cropped
    data.sampler.set_epoch(0)
    items = [it for batch in data.sampler for it in batch]
    plain = []
    for it in items:
        img, tgt = data.dataset.ds[it.image]
        plain.append(img.flip(-1) if it.flip else img)
    got = [img for imgs, _ in a[:3] for img in imgs]
    same = [x.shape == y.shape and torch.equal(x, y) for x, y in zip(got, plain)]
    assert all(same) if augment == "basic" else not any(same)
    assert any(it.flip for it in items)


def test_training_with_two_workers_is_reproducible_and_matches_no_workers(tables, tmp_path):
    images, boxes = _train_tables(tables)
    cfg = {**TINY, "augment": "elaborate", "full_class_batch": True}
    runs = []
    for name, workers in (("w2a", 2), ("w2b", 2), ("w0", 0)):
        runs.append(train.train(cfg=cfg, images=images, boxes=boxes, weights=None, ckpt_dir=tmp_path / name,
                                device=torch.device("cpu"), workers=workers)["model"])
    for k, v in runs[0].items():
        assert torch.equal(v, runs[1][k]) and torch.equal(v, runs[2][k]), k
    init = train.build(train.model_config(cfg), num_classes=3, anchors=None, device=torch.device("cpu"))
    assert any(not torch.equal(v, runs[0][k]) for k, v in init.core.state_dict().items()
               if v.is_floating_point())   # it trained


def _fake_checkpoint(path, epoch, chash="h", optimizer=True):
    torch.save({"model": {"w": torch.full((2,), float(epoch))}, "epoch": epoch, "config_hash": chash,
                "optimizer": {"state": {}, "param_groups": []} if optimizer else None, "scaler": None}, path)


def test_prune_keeps_the_latest_complete_and_the_window_as_weights(tmp_path):
    for e in range(6):
        _fake_checkpoint(tmp_path / f"epoch_{e:03d}.pt", e)
    _fake_checkpoint(tmp_path / "epoch_009.pt", 9, chash="other")   # a later epoch of another config
    (tmp_path / "notes.txt").write_text("x")
    train.prune_checkpoints(tmp_path, latest=4, keep={1, 2, 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_001.pt", "epoch_002.pt", "epoch_004.pt",
                                                          "epoch_005.pt", "epoch_009.pt", "notes.txt"]
    for e in (1, 2):
        s = torch.load(tmp_path / f"epoch_{e:03d}.pt", weights_only=False)
        assert s["optimizer"] is None and s["epoch"] == e
        assert torch.equal(s["model"]["w"], torch.full((2,), e * 1.0))
    assert torch.load(tmp_path / "epoch_004.pt", weights_only=False)["optimizer"] is not None
    # resume: the newest checkpoint of the hash with optimiser state, never a weights-only one
    assert train.find_resume(tmp_path, "h").name == "epoch_005.pt"
    (tmp_path / "epoch_005.pt").unlink()
    (tmp_path / "epoch_004.pt").unlink()
    assert train.find_resume(tmp_path, "h") is None
    assert train.find_resume(tmp_path, "other").name == "epoch_009.pt"
    assert train.average_window({"average_epochs": [2, 3]}) == {1, 2}
    assert train.average_window({"average_epochs": None}) == set()


def test_retention_and_resume_after_pruning(tables, tmp_path):
    images, boxes = _train_tables(tables)
    cfg = {**TINY, "epochs": 4, "lr_steps": [3], "iters_per_epoch": 1, "average_epochs": [3, 4]}
    kw = {"cfg": cfg, "images": images, "boxes": boxes, "weights": None, "device": torch.device("cpu")}
    full = train.train(ckpt_dir=tmp_path / "full", **kw)
    # epochs 1 and 2 deleted, epoch 3 (the window) weights only, epoch 4 complete
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["epoch_002.pt", "epoch_003.pt"]
    ck = [torch.load(tmp_path / "full" / f"epoch_{e:03d}.pt", weights_only=False) for e in (2, 3)]
    assert ck[0]["optimizer"] is None and ck[0]["scaler"] is None and ck[1]["optimizer"] is not None
    assert full["averaged_epochs"] == [3, 4]
    expected = average_state_dicts([c["model"] for c in ck])
    for k, v in expected.items():
        assert torch.equal(full["model"][k], v), k

    # stopped after epoch 2 (epoch 1 pruned, epoch 2 the complete resume point), resumed: the same weights
    train.train(ckpt_dir=tmp_path / "resumed", stop_after_epoch=2, **kw)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["epoch_001.pt"]
    resumed = train.train(ckpt_dir=tmp_path / "resumed", **kw)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["epoch_002.pt", "epoch_003.pt"]
    for k, v in full["model"].items():
        assert torch.allclose(v.float(), resumed["model"][k].float(), atol=1e-6), k
