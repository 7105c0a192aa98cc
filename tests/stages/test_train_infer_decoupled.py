"""The train and infer stages with the decoupled backbone (TSD head): a CPU epoch, a checkpoint, detections."""

from __future__ import annotations

import json

import pytest
import torch

from stages import infer, train
from stages.formats.io import read_table
from tests.stages.test_train_infer import TINY_MODEL


@pytest.mark.slow
def test_train_and_infer_with_the_decoupled_backbone(tables, tmp_path):
    out, splits = tables
    cfg = {**TINY_MODEL, "epochs": 1, "lr_steps": [1], "head": "tsd", "decoupled_backbone": True}
    rc = train.main(["--config", json.dumps(cfg), "--images", str(out / "images.parquet"),
                     "--boxes", str(out / "boxes.parquet"), "--splits", str(splits), "--device", "cpu",
                     "--ckpt-dir", str(tmp_path / "ckpt"), "--metrics", str(tmp_path / "m.jsonl"),
                     "--out", str(tmp_path / "model.pt")])
    assert rc == 0
    state = torch.load(tmp_path / "model.pt", weights_only=False)["model"]
    assert any(k.startswith("backbone.cls_layers.layer4.") for k in state)
    assert any(k.startswith("backbone.cls_fpn.") for k in state)
    dets_path = tmp_path / "dets.parquet"
    rc = infer.main(["--model", str(tmp_path / "model.pt"), "--images", str(out / "images.parquet"),
                     "--splits", str(splits), "--split", "val_a", "--device", "cpu", "--flip",
                     "--score-thr", "0.0", "--out", str(dets_path)])
    assert rc == 0
    dets = read_table(dets_path, "detections")
    assert len(dets) > 0 and dets[["x_min", "y_min", "x_max", "y_max"]].stack().between(0, 1).all()
