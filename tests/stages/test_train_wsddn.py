"""Weakly supervised training in stages.train: image-level labels as a matrix, the image-level-only pool in the
epoch plan, the plain-background boxes, wsddn off leaving those images out (same weights as without them), and
the training loop with every option on, on a generated dataset with image-level-only images."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from stages import train
from stages.core.errors import InputError
from stages.formats.io import read_table, write_table
from stages.models.data import image_level_matrix

torch.set_num_threads(1)

TINY = {"backbone": "resnet_small", "width": 8, "fpn_channels": 16, "representation_size": 32, "epochs": 1,
        "batch_size": 4, "lr": 0.01, "lr_steps": [1], "warmup_iters": 1, "iters_per_epoch": 3, "min_size": 64,
        "max_size": 64, "seed": 5, "rpn_post_nms_top_n_train": 64, "box_batch_size_per_image": 32}
WEAK = {"wsddn": True, "image_level_share": 0.5, "pseudo_thr": 0.0, "pseudo_weight": 0.5, "plain_box": True}


@pytest.fixture(scope="module")
def weak_data(tmp_path_factory):
    """16 generated images (128 px), ingested; 5 of them made image-level-only (their boxes dropped), one of
    those marked plain_background."""
    from stages import generate as gen
    from stages.ingest import ingest

    root = tmp_path_factory.mktemp("weak") / "data"
    gen.generate(out_dir=root, n_train_images=16, n_test_images=0, image_size=(128, 128), seed=0)
    t = ingest(boxes_csv=root / gen.BBOX_CSV, labels_csv=root / gen.LABELS_CSV, classes_csv=root / gen.CLASSES_CSV,
               hierarchy_json=root / gen.HIERARCHY_JSON, images_dir=root / gen.IMAGES_DIR)
    images = t.images.sort_values("image_id").reset_index(drop=True)
    weak_ids = list(images["image_id"].iloc[[1, 4, 7, 10, 13]])
    images["box_annotated"] = ~images["image_id"].isin(weak_ids)
    images["plain_background"] = images["image_id"] == weak_ids[0]
    boxes = t.boxes[~t.boxes["image_id"].isin(weak_ids)].reset_index(drop=True)
    # the image-level labels of the weak images: their (dropped) box classes as verified present
    dropped = t.boxes[t.boxes["image_id"].isin(weak_ids)][["image_id", "label"]].drop_duplicates()
    il = t.image_labels
    on_weak = il["image_id"].isin(weak_ids)
    boxed = il.set_index(["image_id", "label"]).index.isin(dropped.set_index(["image_id", "label"]).index)
    labels = pd.concat([il[~on_weak], dropped.assign(confidence=np.int8(1)),
                        il[on_weak & (il["confidence"] == 0) & ~boxed]], ignore_index=True)
    return images, boxes, labels, weak_ids


def test_image_level_matrix_by_hand_and_its_errors():
    table = pd.DataFrame({"image_id": ["a", "a", "b", "c", "a"], "label": ["x", "y", "x", "x", "z"],
                          "confidence": np.array([1, 0, 0, 1, 1], np.int8)})
    m = image_level_matrix(table, image_ids=["b", "a"], label_index={"y": 1, "x": 2})
    assert m.tolist() == [[-1, 0], [0, 1]]          # c is not a training image, z not a class
    bad = pd.concat([table, pd.DataFrame({"image_id": ["a"], "label": ["x"], "confidence": np.int8(0)})],
                    ignore_index=True)
    with pytest.raises(InputError, match="'a' has label 'x' both") as e:
        image_level_matrix(bad, image_ids=["a"], label_index={"x": 1}, source="labels.parquet")
    assert e.value.field == "confidence" and e.value.file == "labels.parquet"
    with pytest.raises(InputError, match="0 or 1"):
        image_level_matrix(table.assign(confidence=np.int8(2)), image_ids=["a"], label_index={"x": 1})


def test_plain_box_and_wsddn_off_tables(weak_data):
    images, boxes, labels, weak_ids = weak_data
    out_images, out_boxes = train.weak_supervision_tables(cfg={"wsddn": False, "plain_box": True}, images=images,
                                                          boxes=boxes, image_labels=labels)
    plain = weak_ids[0]
    assert set(out_images["image_id"]) == set(images["image_id"]) - set(weak_ids[1:])
    whole = out_boxes[out_boxes["image_id"] == plain]
    positives = set(labels.loc[(labels["image_id"] == plain) & (labels["confidence"] == 1), "label"])
    assert set(whole["label"]) == positives and len(whole) == len(positives)
    assert (whole[["x_min", "y_min", "x_max", "y_max"]].to_numpy() == [0, 0, 1, 1]).all()
    # wsddn on: every image stays, the plain one box-annotated now
    on_images, _ = train.weak_supervision_tables(cfg={"wsddn": True, "plain_box": True}, images=images,
                                                 boxes=boxes, image_labels=labels)
    assert len(on_images) == len(images)
    assert set(on_images.loc[~on_images["box_annotated"], "image_id"]) == set(weak_ids[1:])
    # no box_annotated column: nothing changes
    bare = images.drop(columns=["box_annotated", "plain_background"])
    assert train.weak_supervision_tables(cfg={"wsddn": False}, images=bare, boxes=boxes,
                                         image_labels=None)[0] is bare


def _data(images, boxes, labels, cfg, *, rank=0, world=1):
    cfg = train.model_part(train.model_config(cfg), "train")
    images, boxes = train.weak_supervision_tables(cfg=cfg, images=images, boxes=boxes, image_labels=labels)
    classes = sorted(boxes["label"].unique())
    return train.training_data(cfg=cfg, images=images, boxes=boxes, weights=None, labels=classes, iters=5,
                               rank=rank, world=world, image_labels=labels), images


def test_each_batch_takes_its_share_from_the_image_level_pool(weak_data):
    images, boxes, labels, weak_ids = weak_data
    data, imgs = _data(images, boxes, labels, {**TINY, **WEAK, "plain_box": False})
    ids = imgs.sort_values("image_id")["image_id"].to_numpy()
    data.sampler.set_epoch(2)
    batches = list(data.sampler)
    assert len(batches) == 5
    for b in batches:
        kinds = [ids[item.image] in weak_ids for item in b]
        assert kinds == [False, False, True, True]            # round(0.5 x 4) = 2 image-level-only, last
        for item in b[2:]:                                     # class-aware: images with a positive label
            assert (data.dataset.ds.image_labels[item.image] == 1).any()
    again, _ = _data(images, boxes, labels, {**TINY, **WEAK, "plain_box": False})
    again.sampler.set_epoch(2)
    assert [[it.image for it in b] for b in again.sampler] == [[it.image for it in b] for b in batches]
    # class-first (elaborate): the pool's pairs carry a class the image is positive for
    first, _ = _data(images, boxes, labels, {**TINY, **WEAK, "plain_box": False, "augment": "elaborate"})
    first.sampler.set_epoch(0)
    for b in first.sampler:
        for item in b[2:]:
            assert item.cls > 0 and first.dataset.ds.image_labels[item.image, item.cls - 1] == 1
    # two ranks: each takes its half of every global batch, its own share of image-level-only images
    ranks = []
    for r in range(2):
        d, _ = _data(images, boxes, labels, {**TINY, **WEAK, "plain_box": False, "batch_size": 2}, rank=r, world=2)
        d.sampler.set_epoch(2)
        ranks.append(list(d.sampler))
    for b0, b1 in zip(*ranks):
        assert [ids[it.image] in weak_ids for it in b0 + b1] == [False, True, False, True]
    # the target of an image-level-only image: no boxes, its image-level labels, box_annotated False
    img, tgt = data.dataset[batches[0][3]]
    assert tgt["boxes"].shape == (0, 4) and not bool(tgt["box_annotated"]) and (tgt["image_labels"] == 1).any()


def test_share_must_leave_a_box_annotated_image(weak_data):
    images, boxes, labels, _ = weak_data
    with pytest.raises(InputError, match="image_level_share"):
        _data(images, boxes, labels, {**TINY, **WEAK, "image_level_share": 0.9})
    with pytest.raises(InputError, match="image-level labels"):
        train.train(cfg={**TINY, **WEAK}, images=images, boxes=boxes, weights=None, ckpt_dir=None,
                    device=torch.device("cpu"), image_labels=None)


def test_wsddn_off_trains_as_if_the_image_level_only_images_were_not_there(weak_data, tmp_path):
    images, boxes, labels, weak_ids = weak_data
    cfg = {**TINY, "iters_per_epoch": None, "batch_size": 2, "plain_box": False}
    with_weak = train.train(cfg=cfg, images=images, boxes=boxes, weights=None, ckpt_dir=tmp_path / "a",
                            device=torch.device("cpu"), image_labels=labels)
    only_box = images[~images["image_id"].isin(weak_ids)].drop(columns=["box_annotated", "plain_background"])
    without = train.train(cfg=cfg, images=only_box, boxes=boxes, weights=None, ckpt_dir=tmp_path / "b",
                          device=torch.device("cpu"))
    assert with_weak["epochs"] == without["epochs"] == 1
    for k, v in without["model"].items():
        assert torch.equal(v, with_weak["model"][k]), k


@pytest.mark.parametrize("extra", [{"head": "sibling", "augment": "elaborate"}, {"head": "tsd"},
                                   {"cascade": True, "head": "tsd"}], ids=["sibling", "tsd", "cascade_tsd"])
def test_training_loop_with_every_option_on(weak_data, tmp_path, extra):
    images, boxes, labels, weak_ids = weak_data
    split = tmp_path / "in"
    split.mkdir()
    write_table(split / "images.parquet", images, "images")
    write_table(split / "boxes.parquet", boxes, "boxes")
    write_table(split / "labels.parquet", labels, "image_labels")
    assert "box_annotated" in read_table(split / "images.parquet", "images").columns
    cfg = {**TINY, **WEAK, **extra}
    out = tmp_path / "model.pt"
    metrics = tmp_path / "metrics.jsonl"
    rc = train.main(["--config", json.dumps(cfg), "--images", str(split / "images.parquet"),
                     "--boxes", str(split / "boxes.parquet"), "--image-labels", str(split / "labels.parquet"),
                     "--ckpt-dir", str(tmp_path / "ckpt"), "--metrics", str(metrics), "--log-every", "1",
                     "--out", str(out)])
    assert rc == 0 and out.exists()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    assert all("loss_wsddn" in r and "loss_wsddn_box" in r for r in rows)
    # mining starts at iteration warmup_iters (1): the pseudo boxes train the box head from then on
    assert not any(k.endswith("_pseudo") for k in rows[0])
    assert all(any(k.endswith("_pseudo") for k in r) for r in rows[1:])
    state = torch.load(out, weights_only=False)
    assert any(k.startswith("wsddn.") for k in state["model"]) and state["config"]["wsddn"] is True
