"""The detector zoo through build_detector, train and infer on the tiny hand-written dataset: TSD, cascade,
expert mode, k-means anchors from the anchors stage, parameter averaging, elaborate augmentation, full-class
batches, NaN detection and 2-process distributed training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

from stages import anchors as anchors_stage
from stages import infer, sample, train
from stages.core.config import validate_config
from stages.core.errors import InputError
from stages.formats.io import read_table
from stages.models.averaging import average_state_dicts
from stages.models.cascade import CascadeRoIHeads
from stages.models.data import SamplingDraw
from stages.models.detector import SiblingRoIHeads, build_detector
from stages.models.heads import foreground_wins
from stages.models.tsd import TSDRoIHeads
from tests.conftest import ROOT

torch.set_num_threads(1)

TINY = {"backbone": "resnet_small", "width": 8, "fpn_channels": 16, "representation_size": 32, "epochs": 1,
        "batch_size": 2, "lr": 0.01, "lr_steps": [1], "warmup_iters": 1, "iters_per_epoch": 1, "min_size": 64,
        "max_size": 96, "test_scales": [64], "seed": 1}

ALL_NEW_KEYS = {"head": "tsd", "tsd_gamma": 0.2, "margin_cls": 0.3, "margin_reg": 0.1, "cascade": True,
                "cascade_iou": [0.5, 0.6], "cascade_weights": [1.0, 0.5], "dcn": True, "anchors": "kmeans",
                "anchor_k": 4, "anchor_scales": [4, 6], "average_epochs": [1, 2], "epochs": 2, "lr_steps": [2],
                "amp": True, "channels_last": True, "augment": "elaborate", "aug_max_pixels": 50000,
                "aug_rotate_std": [2, 8], "full_class_batch": True, "expert": True, "test_flip": True,
                "representation_size": 256, "norm": "frozen_bn", "trainable_layers": 3,
                "backbone_weights": None, "weights": None, "gpus": 2}



def _train_args(out, splits, run, cfg, *extra):
    return ["--config", json.dumps(cfg), "--images", str(out / "images.parquet"),
            "--boxes", str(out / "boxes.parquet"), "--splits", str(splits), "--device", "cpu",
            "--ckpt-dir", str(run / "ckpt"), "--metrics", str(run / "m.jsonl"), "--log-every", "1",
            "--out", str(run / "model.pt"), *extra]


def test_config_with_every_new_key_validates():
    cfg = validate_config({"models": {"m": dict(ALL_NEW_KEYS)}})["models"]["m"]
    assert cfg["head"] == "tsd" and cfg["cascade_iou"] == [0.5, 0.6] and cfg["average_epochs"] == [1, 2]
    defaults = validate_config({"models": {"m": {}}})["models"]["m"]
    assert defaults["head"] == "sibling" and defaults["cascade"] is False and defaults["norm"] == "bn"
    assert defaults["cascade_iou"] == [0.5, 0.5, 0.6, 0.7] and defaults["cascade_weights"] == [0.75, 1, 0.25, 0.25]
    assert defaults["anchors"] == "default" and defaults["augment"] == "basic"
    assert defaults["average_epochs"] is None
    for bad, field in (({"cascade_iou": [0.5], "cascade_weights": [1, 1]}, "cascade_weights"),
                       ({"average_epochs": [2, 9], "epochs": 3, "lr_steps": [2]}, "average_epochs"),
                       ({"head": "tsdx"}, "head"), ({"augment": "fancy"}, "augment")):
        with pytest.raises(InputError, match=field):
            validate_config({"models": {"m": bad}})


@pytest.mark.parametrize("extra, heads", [({}, SiblingRoIHeads), ({"head": "tsd"}, TSDRoIHeads),
                                          ({"cascade": True}, CascadeRoIHeads),
                                          ({"cascade": True, "head": "tsd", "cascade_iou": [0.5, 0.6],
                                            "cascade_weights": [1.0, 0.5]}, CascadeRoIHeads)])
def test_build_detector_heads_train_and_detect(extra, heads):
    torch.manual_seed(0)
    model = build_detector({**TINY, **extra, "expert": True}, num_classes=3)
    assert type(model.roi_heads) is heads and model.roi_heads.expert_mode
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)  # trainable BN from scratch
    if extra.get("head") == "tsd" and not extra.get("cascade"):
        assert model.roi_heads.decoupled.cls_head.fc7.out_features == 32
    if extra.get("cascade"):
        assert model.roi_heads.stage_iou_thresholds == extra.get("cascade_iou", [0.5, 0.5, 0.6, 0.7])
        assert (model.roi_heads.decoupled is not None) == (extra.get("head") == "tsd")
    imgs = [torch.rand(3, 64, 64)]
    tgts = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]), "labels": torch.tensor([2])}]
    model.train()
    losses = model(imgs, tgts)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(imgs)
    assert out[0]["boxes"].shape[1] == 4 and len(out[0]["boxes"]) == len(out[0]["scores"])


def test_expert_mode_drops_background_rois():
    torch.manual_seed(0)
    model = build_detector({**TINY}, num_classes=3).eval()
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert foreground_wins(logits).tolist() == [False, True, True]
    heads: RoIHeads = model.roi_heads
    heads.score_thresh = 0.0
    props = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [1.0, 1.0, 30.0, 30.0]])]
    regs = torch.zeros(3, 16)
    plain = heads.postprocess_detections(logits, regs, props, [(64, 64)])
    heads.expert_mode = True
    expert = heads.postprocess_detections(logits, regs, props, [(64, 64)])
    # the background-won RoI (row 0) is gone; the others give the same detections
    assert len(expert[0][0]) < len(plain[0][0])
    kept = {tuple(b.tolist()) for b in expert[0][0]}
    assert (0.0, 0.0, 10.0, 10.0) not in kept and (5.0, 5.0, 20.0, 20.0) in kept


def test_detector_weights_file_is_honoured(tmp_path):
    torch.manual_seed(0)
    a = build_detector(TINY, num_classes=3)
    torch.save({"model": a.state_dict()}, tmp_path / "det.pt")
    torch.manual_seed(1)
    b = build_detector({**TINY, "weights": str(tmp_path / "det.pt")}, num_classes=3)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    trunk = {k[len("body."):]: v for k, v in a.backbone.state_dict().items() if k.startswith("body.")}
    torch.save(trunk, tmp_path / "trunk.pt")
    torch.manual_seed(2)
    c = build_detector({**TINY, "backbone_weights": str(tmp_path / "trunk.pt")}, num_classes=3)
    assert torch.equal(c.backbone.body.layer2[0].conv1.weight, a.backbone.body.layer2[0].conv1.weight)
    assert not torch.equal(c.backbone.fpn.inner_blocks[0][0].weight, a.backbone.fpn.inner_blocks[0][0].weight)


def test_kmeans_anchors_file_feeds_build_detector(tables, tmp_path):
    out, splits = tables
    path = tmp_path / "anchors.json"
    assert anchors_stage.main(["--boxes", str(out / "boxes.parquet"), "--images", str(out / "images.parquet"),
                               "--splits", str(splits), "--k", "2", "--scales", "4", "6", "--min-size", "64",
                               "--max-size", "96", "--out", str(path)]) == 0
    anchors = json.loads(path.read_text())
    model = build_detector({**TINY, "anchors": "kmeans"}, num_classes=3, anchors=anchors)
    gen = model.rpn.anchor_generator
    assert [list(s) for s in gen.sizes] == [[4 * s, 6 * s] for s in (4, 8, 16, 32, 64)]
    assert [round(r, 4) for r in gen.aspect_ratios[0]] == anchors["aspect_ratios"][0]
    assert model.rpn.head.cls_logits.out_channels == 2 * 2  # scales x ratios anchors per location
    # the sizes fit the small training images (the longest box side at 64 px is at most 64)
    assert min(gen.sizes[0]) <= 32 and max(gen.sizes[-1]) <= 64 * 6


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"head": "tsd", "expert": True},
                                   {"cascade": True, "cascade_iou": [0.5, 0.6], "cascade_weights": [1.0, 0.5]},
                                   {"cascade": True, "head": "tsd", "cascade_iou": [0.5, 0.6],
                                    "cascade_weights": [1.0, 0.5], "expert": True}])
def test_train_and_infer_zoo_models(tables, tmp_path, extra):
    out, splits = tables
    run = tmp_path / "run"
    assert train.main(_train_args(out, splits, run, {**TINY, **extra})) == 0
    keys = json.loads((run / "m.jsonl").read_text().splitlines()[0])
    assert ("loss_margin_cls" in keys or "loss_margin_cls_s0" in keys) == (extra.get("head") == "tsd")
    dets = tmp_path / "dets.parquet"
    assert infer.main(["--model", str(run / "model.pt"), "--images", str(out / "images.parquet"), "--splits",
                       str(splits), "--split", "val_a", "--device", "cpu", "--flip", "--score-thr", "0.0",
                       *(["--expert"] if extra.get("expert") else []), "--out", str(dets)]) == 0
    d = read_table(dets, "detections")
    assert set(d["image_id"]) <= {"img3"}
    assert d[["x_min", "y_min", "x_max", "y_max"]].stack().between(0, 1).all()


@pytest.mark.slow
def test_train_with_kmeans_anchors_elaborate_augment_and_averaging(tables, tmp_path):
    out, splits = tables
    anchors = tmp_path / "anchors.json"
    assert anchors_stage.main(["--boxes", str(out / "boxes.parquet"), "--images", str(out / "images.parquet"),
                               "--splits", str(splits), "--k", "3", "--scales", "4", "--min-size", "64",
                               "--max-size", "96", "--out", str(anchors)]) == 0
    cfg = {**TINY, "anchors": "kmeans", "augment": "elaborate", "full_class_batch": True, "epochs": 3,
           "lr_steps": [3], "average_epochs": [2, 3], "aug_rotate_std": [5.0, 20.0]}
    sampling = tmp_path / "class_aware.parquet"  # class-first training draws from the sample stage's table
    assert sample.main(["--boxes", str(out / "boxes.parquet"), "--splits", str(splits), "--out", str(sampling)]) == 0
    run = tmp_path / "run"
    assert train.main(_train_args(out, splits, run, cfg, "--anchors", str(anchors), "--sampling", str(sampling))) == 0
    result = torch.load(run / "model.pt", weights_only=False)
    assert result["averaged_epochs"] == [2, 3] and result["anchors"] == json.loads(anchors.read_text())
    # retention: epoch 1 deleted, the window's epoch 2 weights only, epoch 3 complete
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["epoch_001.pt", "epoch_002.pt"]
    ck = [torch.load(run / "ckpt" / f"epoch_{e:03d}.pt", weights_only=False) for e in (1, 2)]
    assert ck[0]["optimizer"] is None and ck[1]["optimizer"] is not None
    ck = [c["model"] for c in ck]
    expected = average_state_dicts(ck)
    assert any(not torch.equal(ck[0][k], ck[1][k]) for k in ck[0] if ck[0][k].is_floating_point())
    for k, v in expected.items():
        assert torch.allclose(result["model"][k].float(), v.float(), atol=1e-6), k
    # the averaged model loads and infers
    dets = tmp_path / "dets.parquet"
    assert infer.main(["--model", str(run / "model.pt"), "--images", str(out / "images.parquet"), "--splits",
                       str(splits), "--split", "val_a", "--device", "cpu", "--out", str(dets)]) == 0
    # kmeans without an anchors file is a clear error
    assert train.main(_train_args(out, splits, tmp_path / "noanchors", cfg)) == 2


def test_plan_epoch_full_class_batch_and_class_first():
    # pairs (image, class): class 1 in images 0 and 1, class 2 in image 2, class 4 in images 1 and 3 (class 3 none)
    draw = SamplingDraw(image=np.array([0, 1, 2, 1, 3]), cls=np.array([1, 1, 2, 4, 4]), p=np.full(5, 0.2),
                        n_images=4)
    order, classes, flips = train.plan_epoch(rng=np.random.default_rng(0), n=30, batch_size=3, draw=draw,
                                             class_first=True, full_class_batch=True)
    assert len(order) == len(classes) == len(flips) == 30
    for b in range(10):
        assert len(set(classes[3 * b:3 * b + 3])) == 3  # distinct classes in every batch
    assert 3 not in set(classes)  # class 3 has no image
    pairs = set(zip(draw.image.tolist(), draw.cls.tolist()))
    assert all((img, c) in pairs for img, c in zip(order.tolist(), classes.tolist()))
    again = train.plan_epoch(rng=np.random.default_rng(0), n=30, batch_size=3, draw=draw, class_first=True,
                             full_class_batch=True)
    assert all(np.array_equal(x, y) for x, y in zip((order, classes, flips), again))


def test_non_finite_loss_is_a_clear_error(tables, tmp_path):
    out, splits = tables
    images = read_table(out / "images.parquet", "images")
    boxes = read_table(out / "boxes.parquet", "boxes")
    msg = r"non-finite loss nan at epoch 1 iteration \d \(rank 0\): loss_classifier=nan"
    with pytest.raises(train.NonFiniteLoss, match=msg):
        train.train(cfg={**TINY, "lr": 1e30, "warmup_iters": 0, "iters_per_epoch": 3}, images=images,
                    boxes=boxes, weights=None, ckpt_dir=tmp_path / "ck", device=torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_distributed_two_cpu_processes(tables, tmp_path):
    out, splits = tables
    run = tmp_path / "ddp"
    cfg = {**TINY, "epochs": 2, "lr_steps": [2], "iters_per_epoch": 2, "batch_size": 1}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "stages.train", *_train_args(out, splits, run, cfg)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=110, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and r.stdout.count("train: ") == 1  # rank 0 alone writes
    result = torch.load(run / "model.pt", weights_only=False)
    assert result["epochs"] == 2
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["epoch_001.pt"]   # the latest alone
    lines = [json.loads(x) for x in (run / "m.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines] == [1, 2, 3, 4]
