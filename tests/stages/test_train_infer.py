"""Train and infer on the tiny hand-written dataset: real CPU iterations, checkpoints, resume, parquet output."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torchvision.ops import box_iou

from stages import infer, train
from stages.core.provenance import code_version
from stages.formats.io import read_provenance, read_table
from stages.models.detector import build_detector

TINY_MODEL = {"backbone": "resnet_small", "width": 8, "fpn_channels": 16, "epochs": 2, "batch_size": 2,
              "lr": 0.01, "lr_steps": [2], "warmup_iters": 2, "iters_per_epoch": 2, "min_size": 64,
              "max_size": 96, "test_scales": [64, 80], "seed": 3}



def _train(out, splits, tmp_path, name, *extra):
    return train.main(["--config", json.dumps(TINY_MODEL), "--images", str(out / "images.parquet"),
                       "--boxes", str(out / "boxes.parquet"), "--splits", str(splits), "--device", "cpu",
                       "--ckpt-dir", str(tmp_path / name / "ckpt"), "--metrics", str(tmp_path / name / "m.jsonl"),
                       "--log-every", "1", "--out", str(tmp_path / name / "model.pt"), *extra])


def test_lr_schedule_warmup_then_steps():
    cfg = train.model_config({"lr": 0.1, "warmup_iters": 10, "lr_steps": [2, 3], "epochs": 4})
    assert train.lr_at(0, 0, cfg) == pytest.approx(0.1 * 0.001)
    assert train.lr_at(5, 0, cfg) == pytest.approx(0.1 * (0.001 + 0.999 * 0.5))
    assert train.lr_at(0, 0, {**cfg, "warmup_factor": 0.1}) == pytest.approx(0.01)
    assert train.lr_at(10, 1, cfg) == pytest.approx(0.1)
    assert train.lr_at(100, 2, cfg) == pytest.approx(0.01)
    assert train.lr_at(200, 3, cfg) == pytest.approx(0.001)


@pytest.mark.slow
def test_train_checkpoints_resume_and_infer(tables, tmp_path):
    out, splits = tables
    assert _train(out, splits, tmp_path, "full") == 0
    # retention: the latest checkpoint alone (no average_epochs window), complete for a resume
    assert sorted(p.name for p in (tmp_path / "full" / "ckpt").iterdir()) == ["epoch_001.pt"]
    lines = [json.loads(x) for x in (tmp_path / "full" / "m.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines] == [1, 2, 3, 4] and all(x["loss"] > 0 for x in lines)

    # killed after epoch 1, then resumed: same weights as the uninterrupted run
    assert _train(out, splits, tmp_path, "resumed", "--stop-after-epoch", "1") == 0
    assert not (tmp_path / "resumed" / "ckpt" / "epoch_001.pt").exists()
    assert _train(out, splits, tmp_path, "resumed") == 0
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k

    dets_path = tmp_path / "dets.parquet"
    rc = infer.main(["--model", str(tmp_path / "full" / "model.pt"), "--images", str(out / "images.parquet"),
                     "--splits", str(splits), "--split", "val_a", "--device", "cpu", "--flip",
                     "--scales", *map(str, TINY_MODEL["test_scales"]), "--score-thr", "0.0", "--out", str(dets_path)])
    assert rc == 0
    dets = read_table(dets_path, "detections")
    raw = pd.read_parquet(dets_path)
    assert set(dets["image_id"]) <= {"img3"}
    assert set(raw["scale"]) <= {64, 80} and set(raw["flip"]) <= {False, True}
    assert dets[["x_min", "y_min", "x_max", "y_max"]].stack().between(0, 1).all()
    assert (dets["x_min"] <= dets["x_max"]).all()
    assert read_provenance(dets_path)["stage"] == "infer"
    # both name the code that made them (the git commit here, the version outside a checkout)
    code = code_version()
    assert read_provenance(dets_path)["code"] == code
    assert torch.load(tmp_path / "full" / "model.pt", weights_only=False)["code"] == code


def test_shards_partition_images():
    imgs = pd.DataFrame({"image_id": [f"i{k}" for k in range(10)]})
    parts = [infer.shard(imgs, i, 3)["image_id"].tolist() for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(imgs["image_id"]) and len(set(sum(parts, []))) == 10
    with pytest.raises(ValueError):
        infer.shard(imgs, 3, 3)


def _same_label_max_iou(dets: pd.DataFrame) -> float:
    """The largest IoU between two detections of one label in one image."""
    worst = 0.0
    for _, g in dets.groupby(["image_id", "label", "scale", "flip"]):
        if len(g) > 1:
            iou = box_iou(*[torch.tensor(g[["x_min", "y_min", "x_max", "y_max"]].to_numpy())] * 2)
            worst = max(worst, float(iou.fill_diagonal_(0).max()))
    return worst


def test_box_nms_threshold_reaches_the_box_head_and_changes_the_detections(tables, tmp_path):
    """The infer stage sets box_nms_thresh on the loaded model: at 1.0 (the default) the raw candidates come out,
    overlapping duplicates included; at 0.3 the box head's NMS keeps a subset without same-label overlaps."""
    out, splits = tables
    torch.manual_seed(0)
    cfg = train.model_config(TINY_MODEL)
    model = build_detector(cfg, num_classes=3)
    torch.save({"model": model.state_dict(), "labels": ["/m/a", "/m/b", "/m/c"], "config": cfg, "anchors": None},
               tmp_path / "model.pt")
    runs = {}
    for thr in (1.0, 0.3):
        path = tmp_path / f"nms{thr}.parquet"
        assert infer.main(["--model", str(tmp_path / "model.pt"), "--images", str(out / "images.parquet"),
                           "--device", "cpu", "--scales", "64", "--score-thr", "0.0", "--max-per-image", "5000",
                           "--box-nms-thresh", str(thr), "--out", str(path)]) == 0
        runs[thr] = pd.read_parquet(path)
        assert read_provenance(path)["inference"]["box_nms_thresh"] == thr
    raw, kept = runs[1.0], runs[0.3]
    assert _same_label_max_iou(raw) > 0.3 >= _same_label_max_iou(kept) - 1e-6
    assert 0 < len(kept) < len(raw)
    key = ["image_id", "label", "score"]
    assert kept[key].merge(raw[key], how="left", indicator=True)["_merge"].eq("both").all()   # a subset

    loaded, labels, _ = infer.load_model(tmp_path / "model.pt", torch.device("cpu"))
    images = read_table(out / "images.parquet", "images").head(1)
    infer.infer(model=loaded, labels=labels, images=images, scales=[64], flip=False, device=torch.device("cpu"),
                box_nms_thresh=0.45, rpn_post_nms_top_n_test=17, max_per_image=7)
    assert loaded.roi_heads.nms_thresh == 0.45 and loaded.roi_heads.detections_per_img == 7
    assert loaded.rpn.post_nms_top_n() == 17
