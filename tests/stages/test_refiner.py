"""The box refiner: heads, frozen backbone, learning on one image, refine's contract, resume, bad input and
the matched-IoU figure. Real CPU computations on a tiny random detector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from stages import refine, train_refiner
from stages.formats.io import read_table, write_table
from stages.models.detector import build_detector
from stages.models.refiner import BoxRefiner, backbone_config, jitter_boxes, load_refiner, refiner_checkpoint
from stages.train import find_resume, model_config

TINY_DET = {"backbone": "resnet_small", "width": 8, "fpn_channels": 16, "representation_size": 32,
            "min_size": 64, "max_size": 96, "seed": 0}
TINY_REF = {"representation_size": 32, "epochs": 2, "batch_size": 2, "warmup_iters": 2, "lr": 0.01,
            "det_score_thr": 0.0, "proposals_per_image": 8, "det_rpn_top_n": 20, "jitter_copies": 2}
LABELS = ["/m/a", "/m/car", "/m/cat", "/m/dog"]


def _detector(labels=LABELS):
    torch.manual_seed(0)
    cfg = model_config(TINY_DET)
    return build_detector(cfg, num_classes=len(labels)).eval(), cfg


def _refiner(**over) -> BoxRefiner:
    det, cfg = _detector()
    ref = train_refiner.refiner_config({**TINY_REF, **over})
    torch.manual_seed(1)
    return BoxRefiner.from_detector(det, cfg, ref)


def _save_detector(path: Path) -> Path:
    det, cfg = _detector()
    torch.save({"model": det.state_dict(), "labels": LABELS, "config": cfg, "anchors": None}, path)
    return path


def _square_image(path: Path, box=(20, 14, 44, 38), size=(48, 64)) -> tuple[torch.Tensor, torch.Tensor]:
    """A white square on a dark image: (image [3, H, W], its box (1, 4) in pixels); also saved as a JPEG."""
    arr = np.full((*size, 3), 30, np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 230
    Image.fromarray(arr).save(path)
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255, torch.tensor([box], dtype=torch.float32)


def test_stage_heads_and_features_have_the_documented_shapes():
    r = _refiner(iou_thrs=[0.5, 0.6, 0.7], stage_weights=[1, 0.5, 0.25])
    assert len(r.stages) == 3
    assert [c.weights for c in r.coders] == [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0),
                                             (30.0, 30.0, 15.0, 15.0)]
    assert r.stages[0](torch.randn(5, 16, 7, 7)).shape == (5, 4)
    imgs = [torch.rand(3, 48, 64), torch.rand(3, 40, 40)]
    feats, sizes = r.features(imgs)
    assert len(feats) == 2 and set(feats[0]) == {"0", "1", "2", "3"} and feats[0]["0"].shape[:2] == (1, 16)
    assert sizes[0] == (64, 85) and sizes[1] == (64, 64)
    boxes = [torch.tensor([[1.0, 2, 30, 40], [10, 10, 20, 20]]), torch.zeros((0, 4))]
    assert r.stage_deltas(0, feats, sizes, boxes).shape == (2, 4)
    out = r.refine(imgs, [torch.tensor([[1.0, 2, 30, 40]]), torch.tensor([[0.0, 0, 40, 40], [5, 5, 9, 9]])])
    assert [o.shape for o in out] == [(1, 4), (2, 4)]
    assert (out[0][:, 2] <= 64).all() and (out[1][:, 2] > out[1][:, 0]).all()


def test_gradients_reach_the_stage_heads_but_not_the_frozen_backbone(tmp_path):
    r = _refiner()
    r.train()
    assert not r.backbone.training and all(not p.requires_grad for p in r.backbone.parameters())
    img, gt = _square_image(tmp_path / "a.jpg")
    feats, sizes = r.features([img])
    s = sizes[0][0] / 48
    gt = gt * s
    props = torch.as_tensor(jitter_boxes(gt.numpy(), copies=8, scale=0.05, rng=np.random.default_rng(0)),
                            dtype=torch.float32)
    losses = r(feats, sizes, [props], [torch.zeros(8, dtype=torch.long)], [gt], [torch.zeros(1, dtype=torch.long)])
    assert set(losses) == {"loss_box_reg_s0", "loss_box_reg_s1", "loss_box_reg_s2"}
    sum(losses.values()).backward()
    for stage in r.stages:
        assert stage.bbox_pred.weight.grad is not None and stage.bbox_pred.weight.grad.abs().sum() > 0
        assert stage.head.fc6.weight.grad is not None
    assert all(p.grad is None for p in r.backbone.parameters())


def _fit_one_image(r: BoxRefiner, img: torch.Tensor, gt: torch.Tensor, steps: int, *, fixed: bool) -> list[float]:
    """SGD steps on one image whose proposals are 16 jittered copies of its box (the same ones each step when
    ``fixed``, else drawn anew); the losses."""
    feats, sizes = r.features([img])
    s = sizes[0][0] / img.shape[1]
    gt = gt * s
    params = [p for p in r.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.005, momentum=0.9)
    r.train()
    out = []
    for k in range(steps):
        rng = np.random.default_rng(0 if fixed else k)
        props = torch.as_tensor(jitter_boxes(gt.numpy(), copies=16, scale=0.1, rng=rng), dtype=torch.float32)
        losses = r(feats, sizes, [props], [torch.zeros(16, dtype=torch.long)], [gt],
                   [torch.zeros(1, dtype=torch.long)])
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        out.append(loss.item())
    return out


def test_a_few_steps_on_one_image_reduce_the_loss(tmp_path):
    img, gt = _square_image(tmp_path / "a.jpg")
    losses = _fit_one_image(_refiner(iou_thrs=[0.5], stage_weights=[1.0]), img, gt, 20, fixed=True)
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])


def test_a_briefly_trained_refiner_moves_jittered_boxes_towards_their_ground_truth(tmp_path):
    img, gt = _square_image(tmp_path / "a.jpg")
    r = _refiner()
    _fit_one_image(r, img, gt, 100, fixed=False)
    test = torch.as_tensor(jitter_boxes(gt.numpy(), copies=40, scale=0.1, rng=np.random.default_rng(999)),
                           dtype=torch.float32)
    test = test.clamp(min=0)
    before = box_iou(test, gt)[:, 0]
    after = box_iou(r.refine([img], [test])[0], gt)[:, 0]
    assert after.mean() > before.mean() + 0.05
    assert (after > before).float().mean() > 0.8


def _dets(n=12, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 0.6, (n, 2))
    wh = rng.uniform(0.05, 0.4, (n, 2))
    df = pd.DataFrame({"image_id": rng.choice(["img0", "img1", "img3"], n), "label": rng.choice(LABELS, n),
                       "score": rng.uniform(0, 1, n), "x_min": xy[:, 0], "y_min": xy[:, 1],
                       "x_max": xy[:, 0] + wh[:, 0], "y_max": xy[:, 1] + wh[:, 1], "model": "m"})
    df.loc[1, ["x_min", "y_min", "x_max", "y_max"]] = [0.0, 0.0, 1.0, 1.0]     # the whole image
    df.loc[2, ["image_id", "x_min", "y_min", "x_max", "y_max"]] = df.loc[3, ["image_id", "x_min", "y_min",
                                                                                "x_max", "y_max"]].to_numpy()
    return df


def test_refine_keeps_rows_scores_labels_and_moves_only_coordinates_within_the_image(tables, tmp_path):
    out, _ = tables
    r = _refiner()
    torch.nn.init.normal_(r.stages[0].bbox_pred.weight, std=0.05)   # boxes do move
    dets = _dets()
    images = read_table(out / "images.parquet", "images")
    got = refine.refine_detections(refiner=r, detections=dets, images=images, device=torch.device("cpu"))
    cols = ["image_id", "label", "score", "model"]
    pd.testing.assert_frame_equal(got[cols], dets[cols])
    b = got[["x_min", "y_min", "x_max", "y_max"]].to_numpy()
    assert ((b >= 0) & (b <= 1)).all() and (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert not np.allclose(b, dets[["x_min", "y_min", "x_max", "y_max"]].to_numpy())
    # two rows with one box (and image) get one refinement
    assert np.allclose(b[2], b[3])


def test_refine_cli_round_trip_and_bad_input(tables, tmp_path, capsys):
    out, splits = tables
    r = _refiner()
    det, cfg = _detector()
    ckpt = tmp_path / "refiner.pt"
    torch.save(refiner_checkpoint(r, backbone_cfg=backbone_config(cfg), cfg=r_cfg(), config_hash="x"), ckpt)
    loaded, meta = load_refiner(ckpt, torch.device("cpu"))
    assert meta["config_hash"] == "x"
    for k, v in r.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    dets = _dets()
    write_table(tmp_path / "d.parquet", dets, "detections")
    args = ["--refiner", str(ckpt), "--images", str(out / "images.parquet"), "--device", "cpu"]
    rc = refine.main([*args, "--detections", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "o.parquet")])
    assert rc == 0
    assert "images/s" in capsys.readouterr().out
    o = read_table(tmp_path / "o.parquet", "detections")
    assert len(o) == len(dets) and (o["score"] == dets["score"]).all() and (o["model"] == "m").all()

    def bad(df, *extra):
        p = tmp_path / "bad.parquet"
        pd.DataFrame(df).to_parquet(p)
        rc = refine.main([*args, *extra, "--detections", str(p), "--out", str(tmp_path / "bad_out.parquet")])
        assert rc == 2 and not (tmp_path / "bad_out.parquet").exists()
        return capsys.readouterr().err

    outside = dets.copy()
    outside.loc[4, "x_max"] = 1.2
    err = bad(outside)
    assert "row 4" in err and "'x_max'" in err and "bad.parquet" in err
    unknown = dets.copy()
    unknown.loc[5, "image_id"] = "nope"
    err = bad(unknown)
    assert "nope" in err and "row 5" in err and "image_id" in err
    # img0 is a train image: with --split val_a it is not looked up
    err = bad(dets, "--splits", str(splits), "--split", "val_a")
    assert "is not in the images table" in err
    missing = read_table(out / "images.parquet", "images")
    missing.loc[missing["image_id"] == "img1", "path"] = str(tmp_path / "gone.jpg")
    write_table(tmp_path / "images_missing.parquet", missing, "images")
    p = tmp_path / "d.parquet"
    rc = refine.main(["--refiner", str(ckpt), "--images", str(tmp_path / "images_missing.parquet"),
                      "--device", "cpu", "--detections", str(p), "--out", str(tmp_path / "bad_out.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and "gone.jpg" in err and "'img1'" in err and not (tmp_path / "bad_out.parquet").exists()
    (tmp_path / "corrupt.jpg").write_bytes(b"not a jpeg")
    missing.loc[missing["image_id"] == "img1", "path"] = str(tmp_path / "corrupt.jpg")
    write_table(tmp_path / "images_missing.parquet", missing, "images")
    rc = refine.main(["--refiner", str(ckpt), "--images", str(tmp_path / "images_missing.parquet"),
                      "--device", "cpu", "--detections", str(p), "--out", str(tmp_path / "bad_out.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and "corrupt.jpg" in err and "field 'image_id'" in err
    assert not (tmp_path / "bad_out.parquet").exists()


def r_cfg():
    return train_refiner.refiner_config(TINY_REF)


def test_refine_shards_together_equal_the_unsharded_output(tables, tmp_path, capsys):
    from stages.infer import shard

    out, splits = tables
    r = _refiner()
    torch.nn.init.normal_(r.stages[0].bbox_pred.weight, std=0.05)   # boxes do move
    det, cfg = _detector()
    ckpt = tmp_path / "refiner.pt"
    torch.save(refiner_checkpoint(r, backbone_cfg=backbone_config(cfg), cfg=r_cfg(), config_hash="x"), ckpt)
    dets = _dets(n=24, seed=1)
    assert set(dets["image_id"]) == {"img0", "img1", "img3"}
    write_table(tmp_path / "d.parquet", dets, "detections")
    args = ["--refiner", str(ckpt), "--images", str(out / "images.parquet"), "--device", "cpu",
            "--detections", str(tmp_path / "d.parquet")]
    assert refine.main([*args, "--out", str(tmp_path / "all.parquet")]) == 0
    whole = read_table(tmp_path / "all.parquet", "detections")
    assert not np.allclose(whole[["x_min", "x_max"]].to_numpy(), dets[["x_min", "x_max"]].to_numpy())
    images = read_table(out / "images.parquet", "images")
    parts = []
    for k in range(3):
        assert refine.main([*args, "--shard", str(k), "--shards", "3",
                            "--out", str(tmp_path / f"s{k}.parquet")]) == 0
        part = read_table(tmp_path / f"s{k}.parquet", "detections")
        mine = set(shard(images, k, 3)["image_id"])
        assert set(part["image_id"]) <= mine
        # a shard keeps its images' rows in their input order
        pd.testing.assert_frame_equal(part.drop(columns=["x_min", "y_min", "x_max", "y_max"]),
                                      dets[dets["image_id"].isin(mine)].drop(columns=["x_min", "y_min", "x_max",
                                                                                      "y_max"])
                                      .reset_index(drop=True), check_dtype=False)
        parts.append(part)
    key = ["image_id", "label", "score"]
    union = pd.concat(parts, ignore_index=True).sort_values(key, kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(union, whole.sort_values(key, kind="stable").reset_index(drop=True))
    # with a split, the split's images are sharded: val_a is img3 alone, in shard 0 of 2; shard 1 is empty
    val = dets[dets["image_id"] == "img3"]
    write_table(tmp_path / "v.parquet", val, "detections")
    vargs = [*args[:-1], str(tmp_path / "v.parquet"), "--splits", str(splits), "--split", "val_a", "--shards", "2"]
    assert refine.main([*vargs, "--shard", "0", "--out", str(tmp_path / "v0.parquet")]) == 0
    assert refine.main([*vargs, "--shard", "1", "--out", str(tmp_path / "v1.parquet")]) == 0
    pd.testing.assert_frame_equal(read_table(tmp_path / "v0.parquet", "detections"),
                                  whole[whole["image_id"] == "img3"].reset_index(drop=True))
    assert len(read_table(tmp_path / "v1.parquet", "detections")) == 0
    # an image unknown to the images table is still an error in a shard; a shard out of range too
    bad = dets.copy()
    bad.loc[5, "image_id"] = "nope"
    write_table(tmp_path / "bad.parquet", bad, "detections")
    capsys.readouterr()
    for k in range(2):
        assert refine.main([*args[:-1], str(tmp_path / "bad.parquet"), "--shard", str(k), "--shards", "2",
                            "--out", str(tmp_path / "b.parquet")]) == 2
        err = capsys.readouterr().err
        assert "'nope'" in err and "field 'image_id'" in err and not (tmp_path / "b.parquet").exists()
    assert refine.main([*args, "--shard", "2", "--shards", "2", "--out", str(tmp_path / "b.parquet")]) == 2
    assert "--shard 2 is not in [0, --shards 2)" in capsys.readouterr().err


def test_outside_coordinate_error_names_row_and_field(tables, tmp_path):
    out, _ = tables
    dets = _dets()
    dets.loc[4, "x_max"] = 1.2
    with pytest.raises(Exception) as exc:
        refine.refine_detections(refiner=_refiner(), detections=dets, images=read_table(out / "images.parquet",
                                 "images"), device=torch.device("cpu"), source="d.parquet")
    assert "d.parquet" in str(exc.value) and "row 4" in str(exc.value) and "x_max" in str(exc.value)


def _train(out, splits, tmp_path, name, *extra, cfg=None):
    return train_refiner.main([
        "--detector", str(tmp_path / "det.pt"), "--config", json.dumps(cfg or TINY_REF),
        "--images", str(out / "images.parquet"), "--boxes", str(out / "boxes.parquet"), "--splits", str(splits),
        "--device", "cpu", "--ckpt-dir", str(tmp_path / name / "ckpt"),
        "--metrics", str(tmp_path / name / "m.jsonl"),
        "--log-every", "1", "--out", str(tmp_path / name / "refiner.pt"), *extra])


@pytest.mark.parametrize("feature_cache", [True, False])
def test_train_refiner_checkpoints_resume_and_cached_detections(tables, tmp_path, feature_cache):
    out, splits = tables
    _save_detector(tmp_path / "det.pt")
    cfg = {**TINY_REF, "feature_cache": feature_cache}
    assert _train(out, splits, tmp_path, "full", cfg=cfg) == 0
    ckpt = tmp_path / "full" / "ckpt"
    assert sorted(p.name for p in ckpt.glob("epoch_*.pt")) == ["epoch_001.pt"]
    cache = list(ckpt.glob("detections_*.parquet"))
    assert len(cache) == 1 and len(read_table(cache[0], "detections")) > 0
    lines = [json.loads(x) for x in (tmp_path / "full" / "m.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines] == [1, 2, 3, 4] and all(x["loss"] >= 0 for x in lines)
    assert {"loss_box_reg_s0", "loss_box_reg_s2"} <= set(lines[0])

    # killed after epoch 1, then resumed (the cached detections read, not recomputed): same weights
    assert _train(out, splits, tmp_path, "resumed", "--stop-after-epoch", "1", cfg=cfg) == 0
    cache2 = next((tmp_path / "resumed" / "ckpt").glob("detections_*.parquet"))
    assert cache2.name == cache[0].name
    stamp = cache2.stat().st_mtime_ns
    assert _train(out, splits, tmp_path, "resumed", cfg=cfg) == 0
    assert cache2.stat().st_mtime_ns == stamp
    resumed = [json.loads(x)["iter"] for x in (tmp_path / "resumed" / "m.jsonl").read_text().splitlines()]
    assert resumed == [1, 2, 3, 4]   # epoch 2 continued from epoch 1's checkpoint, not from scratch
    a = torch.load(tmp_path / "full" / "refiner.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "refiner.pt", weights_only=False)
    assert a["epochs"] == b["epochs"] == 2 and a["config_hash"] == b["config_hash"]
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k
    # self-contained: the detector file is not needed to refine
    (tmp_path / "det.pt").unlink()
    r, meta = load_refiner(tmp_path / "full" / "refiner.pt", torch.device("cpu"))
    assert meta["labels"][:4] == LABELS and len(r.stages) == 3
    det = torch.load(tmp_path / "full" / "refiner.pt", weights_only=False)
    assert any(k.startswith("backbone.") for k in det["model"])


def test_a_stale_config_does_not_resume(tables, tmp_path):
    out, splits = tables
    _save_detector(tmp_path / "det.pt")
    assert _train(out, splits, tmp_path, "run", "--stop-after-epoch", "1") == 0
    ckpt = tmp_path / "run" / "ckpt"
    assert find_resume(ckpt, "not-this-hash") is None and len(list(ckpt.glob("epoch_*.pt"))) == 1
    assert _train(out, splits, tmp_path, "run", cfg={**TINY_REF, "lr": 0.005}) == 0
    iters = [json.loads(x)["iter"] for x in (tmp_path / "run" / "m.jsonl").read_text().splitlines()]
    assert iters == [1, 2, 1, 2, 3, 4]   # the changed config started again from epoch 1
    res = torch.load(tmp_path / "run" / "refiner.pt", weights_only=False)
    assert res["config"]["lr"] == 0.005 and res["epochs"] == 2


def test_bad_config_and_lr_schedules():
    with pytest.raises(Exception, match="stage_weights"):
        train_refiner.refiner_config({"iou_thrs": [0.5, 0.6], "stage_weights": [1.0]})
    with pytest.raises(Exception, match="refiner"):
        train_refiner.refiner_config({"nope": 1})
    cfg = train_refiner.refiner_config({"lr": 0.1, "warmup_iters": 10, "lr_schedule": "cosine"})
    assert train_refiner.lr_at(0, 0, 100, cfg) == pytest.approx(0.1 * 0.001)
    assert train_refiner.lr_at(50, 2, 100, cfg) == pytest.approx(0.05)
    assert train_refiner.lr_at(100, 7, 100, cfg) == pytest.approx(0.0)
    step = {**cfg, "lr_schedule": "step", "lr_steps": [2], "lr_gamma": 0.1}
    assert train_refiner.lr_at(20, 1, 100, step) == pytest.approx(0.1)
    assert train_refiner.lr_at(20, 2, 100, step) == pytest.approx(0.01)
    assert set(train_refiner.refiner_part(cfg, "resources")) == {"threads", "gpus", "mem_mb", "runtime_min"}
    assert "detector" not in train_refiner.refiner_part(cfg, "train")


def test_matched_iou_on_hand_made_boxes():
    gt = pd.DataFrame({"image_id": ["i", "i", "i", "j"], "label": ["/m/cat", "/m/cat", "/m/dog", "/m/cat"],
                       "x_min": [0.0, 0.5, 0.0, 0.0], "y_min": [0.0, 0.5, 0.0, 0.0],
                       "x_max": [0.4, 1.0, 0.4, 1.0], "y_max": [0.4, 1.0, 0.4, 1.0],
                       "is_group_of": [False, False, False, True]})
    dets = pd.DataFrame({
        "image_id": ["i", "i", "i", "i", "i", "j"],
        "label": ["/m/cat", "/m/cat", "/m/cat", "/m/dog", "/m/car", "/m/cat"],
        "score": [0.9, 0.8, 0.7, 0.6, 0.5, 0.9],
        # cat: exact (IoU 1) on the first box; a duplicate of it (its box taken: no match); 0.5 x 0.5 shifted on
        # the second box by 0.1 in x: IoU 0.4*0.5/(0.25+0.25-0.2) = 2/3; dog at IoU 0.5 exactly (matched);
        # car: no ground truth; j: only a group-of box (left out)
        "x_min": [0.0, 0.0, 0.6, 0.0, 0.0, 0.0], "y_min": [0.0, 0.0, 0.5, 0.0, 0.0, 0.0],
        "x_max": [0.4, 0.4, 1.1, 0.4, 0.4, 1.0], "y_max": [0.4, 0.4, 1.0, 0.2, 0.4, 1.0]})
    dets.loc[2, "x_max"] = 1.0  # keep the box in [0, 1]: 0.6..1.0 -> IoU 0.4*0.5/0.25 = 0.8
    m = refine.matched_iou(dets, gt)
    assert m.n_matched == 3 and m.n_gt == 3
    assert m.mean_iou == pytest.approx((1.0 + 0.8 + 0.5) / 3)
    # hierarchy expansion: a box of /m/cat is also one of /m/a
    from stages.formats.hierarchy import Hierarchy
    h = Hierarchy.from_edges(pd.DataFrame({"child": ["/m/cat", "/m/dog"], "parent": ["/m/a", "/m/a"]}),
                             labels=["/m/a", "/m/cat", "/m/dog", "/m/car"])
    parent = dets.iloc[[0]].assign(label="/m/a")
    assert refine.matched_iou(parent, gt).n_matched == 0
    assert refine.matched_iou(parent, gt, hierarchy=h).n_matched == 1
    assert refine.matched_iou(dets, gt, iou_thr=0.9).n_matched == 1


@pytest.mark.slow
def test_distributed_two_cpu_processes(tables, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    out, splits = tables
    _save_detector(tmp_path / "det.pt")
    run = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "stages.train_refiner", "--detector", str(tmp_path / "det.pt"), "--config", json.dumps(TINY_REF),
           "--images", str(out / "images.parquet"), "--boxes", str(out / "boxes.parquet"), "--splits", str(splits),
           "--device", "cpu", "--ckpt-dir", str(run / "ckpt"), "--metrics", str(run / "m.jsonl"),
           "--log-every", "1", "--out", str(run / "refiner.pt")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=110, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and r.stdout.count("train_refiner: ") == 1  # rank 0 alone writes
    assert sorted(p.name.rsplit("_", 1)[1] for p in (run / "ckpt").glob("detections_*.parquet")) == \
        ["rank0of2.parquet", "rank1of2.parquet"]
    lines = [json.loads(x) for x in (run / "m.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines] == [1, 2]   # 3 images, 2 per process and iteration: one per epoch
    assert torch.load(run / "refiner.pt", weights_only=False)["epochs"] == 2
