"""Train and infer on the tiny hand-written dataset: real CPU iterations, checkpoints, resume, parquet output."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from stages import infer, train
from stages.core.provenance import code_version
from stages.formats.io import read_provenance, read_table

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
    assert train.lr_at(10, 1, cfg) == pytest.approx(0.1)
    assert train.lr_at(100, 2, cfg) == pytest.approx(0.01)
    assert train.lr_at(200, 3, cfg) == pytest.approx(0.001)


@pytest.mark.slow
def test_train_checkpoints_resume_and_infer(tables, tmp_path):
    out, splits = tables
    assert _train(out, splits, tmp_path, "full") == 0
    assert sorted(p.name for p in (tmp_path / "full" / "ckpt").iterdir()) == ["epoch_000.pt", "epoch_001.pt"]
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
                     "--score-thr", "0.0", "--out", str(dets_path)])
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
