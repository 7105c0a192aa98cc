"""Expert models: class mining (lowest val AP + FC-weight cosine negatives), the classifier weight of each head,
the experts CLI, training on a class subset, and the config checks of ``expert_of``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from stages import experts, ingest, train
from stages.core.config import validate_config
from stages.core.errors import InputError
from stages.formats.experts import read_experts, restrict_to_classes
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import write_json, write_table
from stages.models.detector import build_detector
from tests.conftest import ingest_args

LABELS = ["/m/a", "/m/b", "/m/c", "/m/d", "/m/e"]


def weights(*rows):
    """FC weight [C+1, D]: a background row (pointing along every class at once) then the given rows."""
    rows = np.asarray(rows, dtype=np.float64)
    return np.vstack([np.ones((1, rows.shape[1])) * 10, rows])


# /m/a and /m/b nearly parallel (cos 0.995), /m/c at 45 degrees to /m/a (cos 0.707), /m/d orthogonal,
# /m/e opposite to /m/a
W = weights([1, 0, 0], [1, 0.1, 0], [1, 1, 0], [0, 0, 1], [-1, 0, 0])


def test_lowest_ap_targets_and_cosine_negatives():
    ap = {"/m/a": 0.1, "/m/b": 0.9, "/m/c": 0.5, "/m/d": 0.05, "/m/e": 0.8}
    out = experts.mine_experts(ap=ap, fc_weight=W, labels=LABELS, n_lowest=2, sim_thr=0.7)
    assert out["targets"] == ["/m/d", "/m/a"]                     # lowest AP first
    assert out["negatives"] == ["/m/b", "/m/c"]
    assert out["similarity"]["/m/a"] == pytest.approx({"/m/b": 1 / np.sqrt(1.01), "/m/c": 1 / np.sqrt(2)})
    assert out["similarity"]["/m/d"] == {}
    # the threshold is inclusive and tight: just above cos(45 deg) drops /m/c
    above = experts.mine_experts(ap=ap, fc_weight=W, labels=LABELS, n_lowest=2, sim_thr=0.7072)
    assert above["negatives"] == ["/m/b"]
    at = experts.mine_experts(ap=ap, fc_weight=W, labels=LABELS, n_lowest=2, sim_thr=float(1 / np.sqrt(2)))
    assert "/m/c" in at["negatives"]
    # a negative threshold takes every class but the opposite one (/m/e, cos -1) of the single target /m/a
    ap["/m/d"] = 0.6
    low = experts.mine_experts(ap=ap, fc_weight=W, labels=LABELS, n_lowest=1, sim_thr=-0.5)
    assert low["targets"] == ["/m/a"] and low["negatives"] == ["/m/b", "/m/c", "/m/d"]
    assert low["similarity"]["/m/a"]["/m/d"] == pytest.approx(0.0)


def test_classes_without_ground_truth_or_untrained_are_not_targets():
    # /m/d has no GT (None), /m/e NaN, /m/z is not a trained class: the lowest among the rest is /m/a
    ap = {"/m/a": 0.3, "/m/b": 0.9, "/m/c": 0.5, "/m/d": None, "/m/e": float("nan"), "/m/z": 0.0}
    out = experts.mine_experts(ap=ap, fc_weight=W, labels=LABELS, n_lowest=2, sim_thr=0.99)
    assert out["targets"] == ["/m/a", "/m/c"]
    assert out["negatives"] == ["/m/b"]
    # more targets asked for than classes with AP: all of them
    assert experts.mine_experts(ap=ap, fc_weight=W, labels=LABELS, n_lowest=10, sim_thr=0.99)["targets"] == [
        "/m/a", "/m/c", "/m/b"]
    with pytest.raises(InputError, match="no trained class"):
        experts.mine_experts(ap={"/m/z": 0.1}, fc_weight=W, labels=LABELS, n_lowest=1, sim_thr=0.5)


def test_background_row_is_ignored():
    # the background row equals /m/d's direction: it must neither be a negative nor shift the class rows
    w = W.copy()
    w[0] = [0, 0, 5]
    ap = {c: 0.5 for c in LABELS} | {"/m/d": 0.0}
    out = experts.mine_experts(ap=ap, fc_weight=w, labels=LABELS, n_lowest=1, sim_thr=0.5)
    assert out == {"confusion": "cosine", "targets": ["/m/d"], "negatives": [], "similarity": {"/m/d": {}},
                   "nearest_cosine": {}, "nearest_target": {}}
    with pytest.raises(ValueError, match="C\\+1"):
        experts.mine_experts(ap=ap, fc_weight=W[1:], labels=LABELS, n_lowest=1, sim_thr=0.5)


def test_only_leaves_with_a_hierarchy():
    h = Hierarchy.from_edges(pd.DataFrame({"child": ["/m/b", "/m/c"], "parent": ["/m/a", "/m/a"]}))
    ap = {"/m/a": 0.0, "/m/b": 0.9, "/m/c": 0.5, "/m/d": 0.6, "/m/e": 0.8}
    assert experts.mine_experts(ap=ap, fc_weight=W, labels=LABELS, n_lowest=1, sim_thr=0.9,
                                hierarchy=h)["targets"] == ["/m/c"]
    assert experts.mine_experts(ap=ap, fc_weight=W, labels=LABELS, n_lowest=1, sim_thr=0.9, hierarchy=h,
                                only_leaves=False)["targets"] == ["/m/a"]


@pytest.mark.parametrize("cfg,key", [
    ({}, "roi_heads.box_predictor.cls_score.weight"),
    ({"head": "tsd"}, "roi_heads.decoupled.cls_score.weight"),
    ({"cascade": True, "cascade_iou": [0.5, 0.6], "cascade_weights": [1.0, 0.5]},
     "roi_heads.box_predictor.1.cls_score.weight"),
    ({"cascade": True, "head": "tsd", "cascade_iou": [0.5, 0.6], "cascade_weights": [1.0, 0.5]},
     "roi_heads.decoupled.1.cls_score.weight"),
])
def test_classifier_weight_of_each_head(cfg, key):
    torch.manual_seed(0)
    model = build_detector({"backbone": "resnet_tiny", "fpn_channels": 8, "representation_size": 16, **cfg},
                           num_classes=4)
    state = model.state_dict()
    w = experts.classifier_weight(state)
    assert w.shape == (5, state[key].shape[1])
    np.testing.assert_allclose(w, state[key].numpy(), rtol=1e-6)
    with pytest.raises(InputError, match="no classifier weight"):
        experts.classifier_weight({k: v for k, v in state.items() if "cls_score" not in k}, source="m.pt")


def test_experts_cli(tmp_path, capsys):
    state = {"roi_heads.box_predictor.cls_score.weight": torch.tensor(W, dtype=torch.float32),
             "roi_heads.box_predictor.cls_score.bias": torch.zeros(6)}
    torch.save({"model": state, "labels": LABELS}, tmp_path / "model.pt")
    per_class = {c: {"name": c, "ap": a, "n_gt": int(a is not None)}
                 for c, a in zip(LABELS, [0.2, 0.9, 0.5, None, 0.8])}
    write_json(tmp_path / "val_a.json", {"mAP": 0.6, "per_class": per_class})
    out = tmp_path / "experts" / "e.json"
    assert experts.main(["--model", str(tmp_path / "model.pt"), "--metrics", str(tmp_path / "val_a.json"),
                         "--n-lowest", "1", "--sim-thr", "0.7", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["targets"] == ["/m/a"] and got["negatives"] == ["/m/b", "/m/c"] and got["ap"] == {"/m/a": 0.2}
    assert read_experts(out) == ["/m/a", "/m/b", "/m/c"]
    assert "1 targets, 2 negatives" in capsys.readouterr().out
    write_json(tmp_path / "bad.json", {"mAP": 0.6})
    assert experts.main(["--model", str(tmp_path / "model.pt"), "--metrics", str(tmp_path / "bad.json"),
                         "--out", str(out)]) == 2


def test_restrict_to_classes_keeps_images_with_a_chosen_box():
    images = pd.DataFrame({"image_id": ["i0", "i1", "i2"]})
    boxes = pd.DataFrame({"image_id": ["i0", "i0", "i1", "i2"], "label": ["/m/a", "/m/x", "/m/x", "/m/b"]})
    im, bx = restrict_to_classes(images=images, boxes=boxes, classes=["/m/a", "/m/b"])
    assert list(im["image_id"]) == ["i0", "i2"]
    assert sorted(zip(bx["image_id"], bx["label"])) == [("i0", "/m/a"), ("i2", "/m/b")]


TINY_MODEL = {"backbone": "resnet_tiny", "fpn_channels": 8, "representation_size": 16, "epochs": 1,
              "batch_size": 1, "lr": 0.01, "lr_steps": [1], "warmup_iters": 1, "iters_per_epoch": 2,
              "min_size": 48, "max_size": 64, "test_scales": [48], "expert": True}


def test_train_on_expert_classes(tiny, tmp_path):
    out = tmp_path / "ingest"
    assert ingest.main(ingest_args(tiny, out)) == 0
    splits = pd.DataFrame({"image_id": ["img0", "img1", "img2", "img3"], "split": ["train"] * 4})
    write_table(tmp_path / "splits.parquet", splits, "splits")
    write_json(tmp_path / "experts.json", {"targets": ["/m/dog"], "negatives": ["/m/car"], "similarity": {}})
    rc = train.main(["--config", json.dumps(TINY_MODEL), "--images", str(out / "images.parquet"),
                     "--boxes", str(out / "boxes.parquet"), "--splits", str(tmp_path / "splits.parquet"),
                     "--classes", str(tmp_path / "experts.json"), "--device", "cpu",
                     "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "model.pt")])
    assert rc == 0
    ckpt = torch.load(tmp_path / "model.pt", weights_only=False)
    assert ckpt["labels"] == ["/m/car", "/m/dog"]
    # the checkpoint records what training read; the expert gate is an inference switch (the infer rule's)
    assert ckpt["config"]["backbone"] == "resnet_tiny" and "expert" not in ckpt["config"]
    assert ckpt["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3   # 2 classes + background
    # img3 (only a cat) is not a training image of this expert
    write_json(tmp_path / "none.json", {"targets": ["/m/zebra"], "negatives": []})
    rc = train.main(["--config", json.dumps(TINY_MODEL), "--images", str(out / "images.parquet"),
                     "--boxes", str(out / "boxes.parquet"), "--splits", str(tmp_path / "splits.parquet"),
                     "--classes", str(tmp_path / "none.json"), "--device", "cpu",
                     "--ckpt-dir", str(tmp_path / "ckpt2"), "--out", str(tmp_path / "model2.pt")])
    assert rc == 2


def _models(**experts_cfg):
    return {"models": {"base": {}, **experts_cfg}}


def test_config_accepts_an_expert_and_fills_defaults():
    cfg = validate_config(_models(e={"expert": True, "expert_of": "base"}))
    assert cfg["models"]["e"]["expert_n_lowest"] == 3 and cfg["models"]["e"]["expert_sim_thr"] == 0.3
    assert cfg["models"]["base"]["expert_of"] is None
    assert cfg["ablation"]["models"] == ["base"]          # the model ladder leaves expert models out
    assert cfg["ensemble"]["groups"]["all"] == ["base", "e"]


@pytest.mark.parametrize("models,field,match", [
    ({"e": {"expert_of": "base"}}, "models/e/expert", "needs expert: true"),
    ({"e": {"expert": True, "expert_of": "nope"}}, "models/e/expert_of", "another model"),
    ({"e": {"expert": True, "expert_of": "e"}}, "models/e/expert_of", "another model"),
    ({"e": {"expert": True, "expert_of": "base"}, "f": {"expert": True, "expert_of": "e"}}, "models/f/expert_of",
     "itself an expert"),
    ({"e": {"expert": True, "expert_of": "base", "expert_n_lowest": 0}}, "models/e/expert_n_lowest", "minimum"),
])
def test_config_rejects_bad_expert_of(models, field, match):
    with pytest.raises(InputError, match=match) as exc:
        validate_config(_models(**models))
    assert exc.value.field == field
