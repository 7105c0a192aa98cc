"""Model cards: a tiny detector trained for a few CPU iterations, its detections scored by the real evaluator, its
card (parameters, FLOPs, measured images/s, mAP) and the report's table of cards."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import DeformConv2d

from stages import card, evaluate, infer, ingest, report, train
from stages.formats.io import write_table
from stages.models.detector import build_detector
from tests.conftest import ingest_args, write_tiny_dataset

SPLITS = {"img0": "train", "img1": "train", "img2": "val_b", "img3": "val_a"}
TINY = {"backbone": "resnet_small", "width": 8, "fpn_channels": 16, "representation_size": 64, "epochs": 2,
        "batch_size": 2, "lr": 0.01, "lr_steps": [2], "warmup_iters": 1, "iters_per_epoch": 1, "min_size": 64,
        "max_size": 96, "average_epochs": [1, 2], "test_scales": [64, 80], "test_flip": True, "seed": 1,
        "rpn_post_nms_top_n_test": 50}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The tiny dataset ingested, a model trained on img0/img1 (2 epochs of one iteration, weights of both
    averaged), its detections on val_a and val_b scored by stages.evaluate."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("card")
    ing = tmp / "ingest"
    assert ingest.main(ingest_args(write_tiny_dataset(tmp / "oid"), ing)) == 0
    splits = tmp / "splits.parquet"
    write_table(splits, pd.DataFrame({"image_id": list(SPLITS), "split": list(SPLITS.values())}), "splits")
    model = tmp / "train" / "m" / "model.pt"
    assert train.main(["--config", json.dumps(TINY), "--images", str(ing / "images.parquet"),
                       "--boxes", str(ing / "boxes.parquet"), "--splits", str(splits), "--device", "cpu",
                       "--ckpt-dir", str(tmp / "train" / "m" / "ckpt"), "--out", str(model)]) == 0
    metrics = {}
    for split in ("val_a", "val_b"):
        dets = tmp / f"dets_{split}.parquet"
        assert infer.main(["--model", str(model), "--images", str(ing / "images.parquet"), "--splits", str(splits),
                           "--split", split, "--device", "cpu", "--scales", "64", "--score-thr", "0.0",
                           "--out", str(dets)]) == 0
        metrics[split] = tmp / "evaluate" / "postprocess" / "default" / "m" / f"{split}.json"
        assert evaluate.main(["--boxes", str(ing / "boxes.parquet"), "--image-labels",
                              str(ing / "image_labels.parquet"), "--hierarchy", str(ing / "hierarchy.parquet"),
                              "--classes", str(ing / "classes.parquet"), "--predictions", str(dets),
                              "--split-ids", str(splits), "--split", split, "--out", str(metrics[split])]) == 0
    out = tmp / "train" / "m" / "card.json"
    assert card.main(["--model", "m", "--config", json.dumps(TINY), "--ckpt", str(model),
                      "--eval-val-a", str(metrics["val_a"]), "--eval-val-b", str(metrics["val_b"]),
                      "--out", str(out)]) == 0
    return {"tmp": tmp, "model": model, "metrics": metrics, "card": out}


def test_card_of_a_trained_model(trained):
    c = json.loads(trained["card"].read_text())
    ckpt = torch.load(trained["model"], map_location="cpu", weights_only=False)
    model, labels, _ = infer.load_model(trained["model"], torch.device("cpu"))
    # parameters: those of the trained detector, all trainable (trainable_layers 5, BatchNorm)
    assert c["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert c["parameters"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert c["architecture"]["backbone"]["parameters"] == sum(p.numel() for p in model.backbone.parameters())
    # FLOPs at the training size, min_size x max_size
    assert c["flops"]["gflops"] > 0 and (c["flops"]["height"], c["flops"]["width"]) == (64, 96)
    assert 0 < c["flops"]["rois"] <= TINY["rpn_post_nms_top_n_test"]
    # images/s: what training measured and recorded per epoch, not a recomputation
    stats = ckpt["epoch_stats"]
    assert [s["epoch"] for s in stats] == [1, 2] and all(s["images"] == 2 and s["seconds"] > 0 for s in stats)
    assert c["throughput"]["img_per_s"] == pytest.approx(4 / sum(s["seconds"] for s in stats))
    assert c["throughput"]["per_epoch"] == stats and c["throughput"]["devices"] == [stats[0]["device"]]
    # mAP: the evaluate stage's JSONs
    for split in ("val_a", "val_b"):
        m = json.loads(trained["metrics"][split].read_text())
        assert c["evaluation"][split]["mAP"] == pytest.approx(m["mAP"])
        assert c["evaluation"][split]["n_images"] == 1 and c["evaluation"][split]["file"] == str(
            trained["metrics"][split])
    assert c["evaluation"]["mean_mAP"] == pytest.approx((c["evaluation"]["val_a"]["mAP"]
                                                         + c["evaluation"]["val_b"]["mAP"]) / 2)
    # what it is, how it trained, on what, how it runs at test time
    assert c["model"] == "m" and c["architecture"]["head"] == "sibling" and not c["architecture"]["cascade"]
    assert c["architecture"]["backbone"]["library"] == "orchard" and c["architecture"]["backbone"]["width"] == 8
    assert c["expert"] == {"expert_mode": False, "expert_of": None, "external": False}
    t = c["training"]
    assert t["epochs"] == 2 and t["average_epochs"] == [1, 2] and t["averaged_epochs"] == [1, 2]
    assert t["lr_schedule"]["lr_steps"] == [2] and t["augment"] == "basic"
    assert t["sampling"] == "uniform"   # no --sampling table was given to training
    assert c["data"] == {"train_data": "built-in", "split": "train", "images": 2, "boxes": 3, "classes": 3,
                         "labels": labels}
    assert c["test_time"]["scales"] == [64, 80] and c["test_time"]["flip"] is True
    assert c["config_hash"] == ckpt["config_hash"] and c["checkpoint"] == str(trained["model"])


def test_resumed_training_keeps_the_earlier_epochs_records(trained, tmp_path):
    """Stopped after epoch 1 and resumed: the output holds both epochs' measurements."""
    tmp = trained["tmp"]
    argv = ["--config", json.dumps(TINY), "--images", str(tmp / "ingest" / "images.parquet"),
            "--boxes", str(tmp / "ingest" / "boxes.parquet"), "--splits", str(tmp / "splits.parquet"),
            "--device", "cpu", "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "model.pt")]
    assert train.main([*argv, "--stop-after-epoch", "1"]) == 0
    first = torch.load(tmp_path / "model.pt", weights_only=False)["epoch_stats"]
    assert train.main(argv) == 0
    stats = torch.load(tmp_path / "model.pt", weights_only=False)["epoch_stats"]
    assert [s["epoch"] for s in stats] == [1, 2] and stats[0] == first[0]


def test_flops_grow_with_the_input_size_and_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = build_detector(train.model_config(TINY), num_classes=3)
    model.rpn._post_nms_top_n["testing"] = 20
    small = card.detector_flops(model, height=64, width=96)
    again = card.detector_flops(model, height=64, width=96)
    large = card.detector_flops(model, height=128, width=192)
    assert small == again and 0 < small["flops"] < large["flops"]
    assert (large["height"], large["width"]) == (128, 192)
    assert model.training and model.transform.min_size == (64,) and model.transform.max_size == 96


def test_a_deformable_conv_counts_as_the_dense_conv_it_replaces():
    x = torch.rand(1, 8, 12, 10)
    dense = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    deform = DeformConv2d(8, 16, 3, padding=1, bias=False)
    offset = torch.zeros(1, 18, 12, 10)
    counts = []
    for fn in (lambda: dense(x), lambda: deform(x, offset)):
        with FlopCounterMode(display=False, custom_mapping=card.FLOP_FORMULAS) as fc:
            fn()
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] == 2 * 16 * 12 * 10 * 8 * 9


@pytest.mark.parametrize("case", ["no_checkpoint", "no_map", "bad_map", "bad_config"])
def test_bad_input_exits_2_naming_file_and_field(trained, tmp_path, capsys, case):
    metrics = trained["metrics"]
    args = {"--ckpt": str(trained["model"]), "--eval-val-a": str(metrics["val_a"]),
            "--eval-val-b": str(metrics["val_b"]), "--config": json.dumps(TINY)}
    bad = tmp_path / "val_b.json"
    if case == "no_checkpoint":
        args["--ckpt"] = str(tmp_path / "missing.pt")
        expect = [str(tmp_path / "missing.pt")]
    elif case in ("no_map", "bad_map"):
        m = json.loads(metrics["val_b"].read_text())
        if case == "no_map":
            del m["mAP"]
        else:
            m["mAP"] = "high"
        bad.write_text(json.dumps(m))
        args["--eval-val-b"] = str(bad)
        expect = [str(bad), "'mAP'"]
    else:
        args["--config"] = json.dumps({**TINY, "head": "rpn"})
        expect = ["head"]
    out = tmp_path / "card.json"
    argv = ["--model", "m", *[x for kv in args.items() for x in kv], "--out", str(out)]
    assert card.main(argv) == 2
    err = capsys.readouterr().err
    assert all(s in err for s in expect), err
    assert not out.exists() and not list(tmp_path.glob(".card.json*"))


def _variant(c: dict, name: str, val_a: float | None, val_b: float | None, gflops: float) -> dict:
    ev = {**c["evaluation"], "val_a": {**c["evaluation"]["val_a"], "mAP": val_a},
          "val_b": {**c["evaluation"]["val_b"], "mAP": val_b}}
    return {**c, "model": name, "evaluation": ev, "flops": {**c["flops"], "gflops": gflops}}


def test_cards_frame_sorted_by_mean_validation_map(trained):
    c = json.loads(trained["card"].read_text())
    cards = [_variant(c, "low", 0.1, 0.2, 1.0), _variant(c, "none", None, None, 2.0),
             _variant(c, "high", 0.5, 0.3, 3.0), _variant(c, "one", 0.35, None, 4.0)]
    df = report.cards_frame(cards)
    assert df["model"].tolist() == ["high", "one", "low", "none"]
    assert df.loc[0, "mean_mAP"] == pytest.approx(0.4) and df.loc[1, "mean_mAP"] == pytest.approx(0.35)
    assert df.loc[0, "params_M"] == pytest.approx(c["parameters"]["total"] / 1e6)
    assert df.loc[0, "averaging"] == "1-2" and df.loc[0, "head"] == "sibling" and df.loc[0, "kind"] == "global"
    assert df.loc[0, "train_img_s"] == pytest.approx(c["throughput"]["img_per_s"])
    assert report.cards_chart(df)[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_renders_the_cards_section(trained, tmp_path):
    c = json.loads(trained["card"].read_text())
    second = tmp_path / "card2.json"
    second.write_text(json.dumps({**_variant(c, "better", 0.9, 0.9, 5.0),
                                  "architecture": {**c["architecture"], "head": "tsd", "cascade": True}}))
    metrics = [str(p) for p in trained["metrics"].values()]
    html, md = tmp_path / "r.html", tmp_path / "r.md"
    assert report.main(["--metrics", *metrics, "--cards", str(trained["card"]), str(second),
                        "--out-html", str(html), "--out-md", str(md)]) == 0
    page = html.read_text()
    assert "<h2 id='cards'>Model cards</h2>" in page and "card of better" in page and "tsd+cascade" in page
    table = page[page.index("<h2 id='cards'>"):]
    assert table.index("<td>better</td>") < table.index("<td>m</td>")   # sorted by mean validation mAP
    assert 'alt="mAP against GFLOPs"' in page
    assert "## Model cards" in md.read_text()
    # without cards, no such section
    assert report.main(["--metrics", *metrics, "--out-html", str(tmp_path / "plain.html")]) == 0
    assert "Model cards" not in (tmp_path / "plain.html").read_text()


def test_report_rejects_a_card_without_a_field(trained, tmp_path, capsys):
    c = json.loads(trained["card"].read_text())
    del c["flops"]["gflops"]
    bad = tmp_path / "card.json"
    bad.write_text(json.dumps(c))
    assert report.main(["--metrics", str(trained["metrics"]["val_a"]), "--cards", str(bad),
                        "--out-md", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "flops/gflops" in err
    assert re.search(r"field", err)
