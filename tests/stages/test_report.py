"""Report: metric JSONs computed by the real evaluator on the tiny dataset -> the metrics table (old CLI kept)
and a self-contained HTML page with the tables, charts and sample drawings embedded as base64 PNG."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from stages import autoensemble, evaluate, experts, ingest, report
from stages.formats.io import read_table, write_table
from tests.conftest import ingest_args, write_tiny_dataset

SPLITS = {"img0": "val_a", "img1": "val_a", "img2": "val_b", "img3": "val_b"}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Ingested tiny dataset; detections of two models (a: the ground truth, b: a worse copy) and an ensemble;
    their metric JSONs under results/evaluate/<stage>/<variant>/<name>/<split>.json, as the DAG lays them out."""
    tmp_path = tmp_path_factory.mktemp("report")
    ing = tmp_path / "ingest"
    assert ingest.main(ingest_args(write_tiny_dataset(tmp_path / "oid"), ing)) == 0
    boxes = read_table(ing / "boxes.parquet", "boxes")
    splits = pd.DataFrame({"image_id": list(SPLITS), "split": list(SPLITS.values())})
    write_table(tmp_path / "splits.parquet", splits, "splits")
    good = boxes.drop(columns=["is_group_of"]).assign(score=[0.9, 0.8, 0.7, 0.6, 0.5])
    # b misses img0's cat and boxes img1's dog in the wrong place
    bad = good.iloc[1:].reset_index(drop=True)
    bad.loc[0 if bad.loc[0, "image_id"] == "img1" else 1, ["x_min", "x_max"]] = [0.0, 0.05]
    runs = {"postprocess/default/a": good, "postprocess/default/b": bad, "postprocess/nms/a": bad,
            "ensemble/default/all": good}
    metrics = []
    for run, dets in runs.items():
        for split in ("val_a", "val_b"):
            det_path = tmp_path / "results" / run / f"{split}.parquet"
            write_table(det_path, dets, "detections", provenance={"stage": run.split("/")[0]})
            out = tmp_path / "results" / "evaluate" / run / f"{split}.json"
            assert evaluate.main(["--boxes", str(ing / "boxes.parquet"),
                                  "--image-labels", str(ing / "image_labels.parquet"),
                                  "--hierarchy", str(ing / "hierarchy.parquet"),
                                  "--classes", str(ing / "classes.parquet"), "--predictions", str(det_path),
                                  "--split-ids", str(tmp_path / "splits.parquet"), "--split", split,
                                  "--out", str(out)]) == 0
            metrics.append(out)
    # an auto-ensemble search over the leaves a and b (each split's own images): search on val_a, check val_b
    leaves = {split: [] for split in ("val_a", "val_b")}
    for name, dets in (("a", good), ("b", bad)):
        for split in leaves:
            path = tmp_path / "leaves" / name / f"{split}.parquet"
            write_table(path, dets[dets["image_id"].map(SPLITS) == split], "detections",
                        provenance={"split": split})
            leaves[split].append(f"{name}={path}")
    search = tmp_path / "results" / "autoensemble" / "search_val_a"
    assert autoensemble.main(["search", "--search-leaves", *leaves["val_a"], "--check-leaves", *leaves["val_b"],
                              "--boxes", str(ing / "boxes.parquet"),
                              "--image-labels", str(ing / "image_labels.parquet"),
                              "--hierarchy", str(ing / "hierarchy.parquet"),
                              "--classes", str(ing / "classes.parquet"),
                              "--split-ids", str(tmp_path / "splits.parquet"), "--search-split", "val_a",
                              "--check-split", "val_b", "--max-candidates", "12", "--node-trials", "4",
                              "--out-tree", str(search / "tree.json"), "--log", str(search / "search.jsonl"),
                              "--scores", str(search / "scores.json")]) == 0
    return {"ingest": ing, "metrics": metrics, "scores": search / "scores.json",
            "ensemble_val": tmp_path / "results/ensemble/default/all/val_a.parquet"}


def test_metrics_and_per_class_frames(results):
    df = report.metrics_frame(results["metrics"])
    mAP = {p: json.loads(p.read_text())["mAP"] for p in results["metrics"]}
    row = df.set_index(["stage", "variant", "name"])
    for p, v in mAP.items():
        stage, variant, name, split = report._metric_key(p)
        assert row.loc[(stage, variant, name), split] == pytest.approx(v)
    # a finds every box; the parent class Animal (from the hierarchy) has ground truth but no detection
    assert row.loc[("postprocess", "default", "a"), "val_a"] == pytest.approx(0.75)
    assert row.loc[("postprocess", "default", "b"), "val_a"] == pytest.approx(0.25)  # b: only img0's car is right
    assert row.loc[("postprocess", "nms", "a"), "val_a"] == pytest.approx(0.25)
    assert report.best_run(df, "postprocess") == "postprocess/a"
    assert report.best_run(df, "ensemble") == "ensemble/all"

    pc = report.per_class_frame(results["metrics"])
    assert set(pc["name"]) == {"a", "b", "all"} and set(pc["variant"]) == {"default", "nms"}
    assert len(pc) == 8 * 4  # 8 files x 4 classes
    table = report.class_ap_table(pc)
    assert set(table.columns) == {"label", "class_name", "n_gt", "postprocess/a", "postprocess/b",
                                  "postprocess/nms/a", "ensemble/all"}
    cat = table.set_index("label").loc["/m/cat"]
    assert cat["class_name"] == "Cat" and cat["postprocess/a"] == 1.0 and cat["postprocess/b"] < 1.0


def test_old_cli_unchanged(results, tmp_path, capsys):
    out_json, out_md = tmp_path / "m.json", tmp_path / "m.md"
    assert report.main(["--metrics", *map(str, results["metrics"]), "--out-json", str(out_json),
                        "--out-md", str(out_md)]) == 0
    recs = json.loads(out_json.read_text())
    assert {(r["stage"], r["variant"], r["name"]) for r in recs} == {
        ("postprocess", "default", "a"), ("postprocess", "default", "b"), ("postprocess", "nms", "a"),
        ("ensemble", "default", "all")}
    assert "| postprocess | default | b | 0.2500 | 0.6667 |" in out_md.read_text()


def _imgs(page: str) -> list[tuple[str, bytes]]:
    found = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    return [(alt, base64.b64decode(b)) for alt, b in found]


def test_html_report(results, tmp_path):
    ing = results["ingest"]
    (tmp_path / "nms.tsv").write_text("variant\tval_a\tval_b\nnms\t0.51\t0.50\nsoft_nms\t0.53\t0.52\n")
    (tmp_path / "heads.json").write_text(json.dumps({"tsd": {"val_a": 0.55}, "plain": {"val_a": 0.25}}))
    out = tmp_path / "report.html"
    rc = report.main(["--metrics", *map(str, results["metrics"]), "--out-html", str(out),
                      "--ablation", str(tmp_path / "nms.tsv"), str(tmp_path / "heads.json"),
                      "--detections", str(results["ensemble_val"]), "--images", str(ing / "images.parquet"),
                      str(ing / "test_images.parquet"), "--boxes", str(ing / "boxes.parquet"),
                      "--classes", str(ing / "classes.parquet"), "--samples", "3", "--score-thr", "0.3"])
    assert rc == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "src=\"http" not in page and "<script" not in page  # self-contained
    imgs = _imgs(page)
    assert [alt for alt, _ in imgs[:2]] == ["mAP per model and stage", "per-class AP"]
    assert all(data.startswith(b"\x89PNG\r\n\x1a\n") for _, data in imgs)
    # samples: evenly spread over the 4 labelled images with a detection >= 0.3
    assert [alt for alt, _ in imgs[2:]] == ["img0", "img2", "img3"]
    assert "<td>postprocess/a</td>" in page and "<td>ensemble/all</td>" in page
    assert "<td>postprocess/nms/a</td>" in page
    assert "<h3>nms</h3>" in page and "<td>soft_nms</td>" in page and "<td>0.5300</td>" in page
    assert "<h3>heads</h3>" in page and "<td>tsd</td>" in page
    assert "<td>Cat</td>" in page  # the per-class table
    assert "img0: 2 of 2 detections" in page and "ground-truth boxes (dashed)" in page
    assert "sorted by postprocess/a AP" in page


def test_autoensemble_in_the_tables_and_the_html(results, tmp_path):
    """The search's summary in the Markdown and HTML, with the leaf-depth rank correlation; its tree drawn."""
    scores = json.loads(results["scores"].read_text())
    out_md, out_html = tmp_path / "e.md", tmp_path / "e.html"
    assert report.main(["--metrics", *map(str, results["metrics"]), "--autoensemble", str(results["scores"]),
                        "--out-md", str(out_md), "--out-html", str(out_html)]) == 0
    row = report.auto_frame([report.read_auto_search(results["scores"])]).iloc[0]
    assert (row["search"], row["searched"], row["checked"], row["leaves"]) == ("search_val_a", "val_a", "val_b", 2)
    assert row["chosen_checked"] == scores["chosen"]["check_map"] and row["candidates"] == scores["candidates"]
    # two leaves under one root: both at depth 1, so no rank correlation
    assert row["depth"] == 1 and np.isnan(row["leaf_mAP_depth_spearman"])
    md = out_md.read_text()
    assert "## Auto ensemble" in md and "| search_val_a | val_a | val_b | 2 | 1 |" in md
    assert "leaf_mAP_depth_spearman" in md
    page = out_html.read_text()
    tree_png = dict(_imgs(page))["search_val_a tree"]
    assert tree_png.startswith(b"\x89PNG\r\n\x1a\n") and "<td>search_val_a</td>" in page


def test_rank_correlation_and_tree_layout():
    assert report.rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)   # 1 - 6 * 2 / (4 * 15)
    assert report.rank_correlation([0.1, 0.5, 0.3, 0.3], [3, 1, 2, 2]) == pytest.approx(-1.0)   # ties: mean rank
    assert np.isnan(report.rank_correlation([0.1, 0.5, 0.3], [2, 2, 2]))
    from stages.ops.ensemble_tree import parse_tree
    from stages.viz.tree import layout

    tree = parse_tree({"root": "n2", "nodes": {"n1": {"children": ["a", "b"]}, "n2": {"children": ["n1", "c"]}}})
    assert layout(tree) == {"a": (0.0, -2.0), "b": (1.0, -2.0), "n1": (0.5, -1.0), "c": (2.0, -1.0),
                            "n2": (1.25, 0.0)}


def test_sample_ids_even_and_deterministic():
    dets = pd.DataFrame({"image_id": [f"i{k:02d}" for k in range(10)] + ["low"], "score": [0.9] * 10 + [0.1]})
    images = pd.DataFrame({"image_id": [f"i{k:02d}" for k in range(9)] + ["low"]})  # i09 has no image
    assert report.sample_ids(dets, images, n=3, score_thr=0.3) == ["i00", "i04", "i08"]
    assert report.sample_ids(dets, images, n=20, score_thr=0.3) == [f"i{k:02d}" for k in range(9)]


def test_the_report_reads_only_the_drawn_images_rows(tmp_path):
    from stages.formats.io import write_table

    n = 50
    dets = pd.DataFrame({"image_id": np.repeat([f"i{k:02d}" for k in range(n)], 3), "label": "/m/a",
                         "score": np.tile([0.9, 0.5, 0.1], n), "x_min": 0.1, "y_min": 0.1, "x_max": 0.5,
                         "y_max": 0.5})
    write_table(tmp_path / "d.parquet", dets, "detections")
    images = pd.DataFrame({"image_id": [f"i{k:02d}" for k in range(n)]})
    rows, _, ids = report.read_sample_detections(tmp_path / "d.parquet", images, n=4, score_thr=0.3)
    assert ids == ["i00", "i16", "i33", "i49"]
    assert sorted(set(rows["image_id"])) == ids and len(rows) == 12   # all rows of those images, none other


def test_read_ablation_forms(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"x": 1, "y": 2}, {"x": 3, "y": 4}]))
    (tmp_path / "b.json").write_text(json.dumps({"x": [1, 3], "y": [2, 4]}))
    assert report.read_ablation(tmp_path / "a.json").equals(report.read_ablation(tmp_path / "b.json"))
    (tmp_path / "c.csv").write_text("x,y\n1,2\n")
    assert report.read_ablation(tmp_path / "c.csv").to_dict("records") == [{"x": 1, "y": 2}]


@pytest.mark.parametrize("case", ["bad_json", "no_map", "no_ap", "not_a_metric_path", "dets_without_images",
                                  "bad_ablation", "not_detections", "bad_search", "search_vertex"])
def test_bad_input_exits_2(results, tmp_path, capsys, case):
    argv = ["--metrics", *map(str, results["metrics"]), "--out-html", str(tmp_path / "r.html")]
    bad = tmp_path / "evaluate" / "postprocess" / "default" / "x" / "val_a.json"
    bad.parent.mkdir(parents=True)
    if case == "bad_json":
        bad.write_text("{")
        argv[1:1] = [str(bad)]
        msg = "malformed JSON"
    elif case == "no_map":
        bad.write_text("{}")
        argv[1:1] = [str(bad)]
        msg = "no 'mAP' key"
    elif case == "no_ap":
        bad.write_text('{"mAP": 0.5, "per_class": {"/m/cat": {"name": "Cat", "ap": "high"}}}')
        argv[1:1] = [str(bad)]
        msg = "val_a.json: per_class./m/cat: field 'ap': ap is not a number: 'high'"
    elif case == "not_a_metric_path":
        (tmp_path / "x.json").write_text(results["metrics"][0].read_text())
        argv[1:1] = [str(tmp_path / "x.json")]
        msg = "must end in evaluate/<stage>/<variant>/<name>/<split>.json"
    elif case == "dets_without_images":
        argv += ["--detections", str(results["ensemble_val"])]
        msg = "--detections needs --images"
    elif case == "bad_ablation":
        (tmp_path / "abl.json").write_text("[1,")
        argv += ["--ablation", str(tmp_path / "abl.json")]
        msg = "unreadable ablation table"
    elif case == "not_detections":
        argv += ["--detections", str(results["ingest"] / "boxes.parquet"),
                 "--images", str(results["ingest"] / "images.parquet")]
        msg = "has no scores"
    else:
        obj = json.loads(results["scores"].read_text())
        if case == "bad_search":
            del obj["chosen"]["tree"]
            msg = "scores.json: field 'chosen/tree': not an auto-ensemble scores file"
        else:
            del obj["vertices"]["a"]
            msg = "scores.json: field 'vertices': no scores of vertex 'a'"
        (tmp_path / "scores.json").write_text(json.dumps(obj))
        argv += ["--autoensemble", str(tmp_path / "scores.json")]
    assert report.main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_needs_an_output(results):
    with pytest.raises(SystemExit) as e:
        report.main(["--metrics", str(results["metrics"][0])])
    assert e.value.code == 2


# ----- expert models ------------------------------------------------------------------------------------------
#: a base model's classifier over car, cat, dog (the checkpoint's sorted labels): cat and dog nearly parallel,
#: car opposite to both
FC = np.array([[0.0, 0.0, 1.0], [-1.0, 0.1, 0.0], [1.0, 0.0, 0.0], [0.95, 0.2, 0.0]])


@pytest.fixture
def mined(results, tmp_path) -> dict:
    """A base-model checkpoint and the expert set mined from it by stages.experts (its val_a AP: model b's)."""
    state = {"roi_heads.box_predictor.cls_score.weight": torch.tensor(FC, dtype=torch.float32)}
    torch.save({"model": state, "labels": ["/m/car", "/m/cat", "/m/dog"]}, tmp_path / "base.pt")
    metrics = next(p for p in results["metrics"] if p.parts[-4:] == ("postprocess", "default", "b", "val_a.json"))
    out = tmp_path / "experts" / "b_expert.json"
    assert experts.main(["--model", str(tmp_path / "base.pt"), "--metrics", str(metrics), "--n-lowest", "1",
                         "--sim-thr", "0.5", "--classes", str(results["ingest"] / "classes.parquet"),
                         "--out", str(out)]) == 0
    return {"model": tmp_path / "base.pt", "experts": out, "set": json.loads(out.read_text())}


def test_expert_heatmap_in_the_html(results, mined, tmp_path):
    # model b misses img0's cat: Cat is the target, Dog (cosine 0.98) its negative, Car (cosine -1) is not
    assert mined["set"]["targets"] == ["/m/cat"] and mined["set"]["negatives"] == ["/m/dog"]
    out = tmp_path / "r.html"
    assert report.main(["--metrics", *map(str, results["metrics"]), "--out-html", str(out),
                        "--classes", str(results["ingest"] / "classes.parquet"),
                        "--experts", str(mined["experts"]), "--expert-models", str(mined["model"])]) == 0
    page = out.read_text()
    assert "<h2 id='experts'>Expert models</h2>" in page
    assert "<td>b_expert</td>" in page and "<td>cosine</td>" in page and "<td>Cat</td>" in page
    assert "<td>Dog</td>" in page
    imgs = dict(_imgs(page))
    png = imgs[f"{mined['model']} FC cosine"]
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    # a real heatmap: red cells (cat/dog, the diagonal) and blue ones (car against cat and dog)
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red = (rgb[..., 0] > 150) & (rgb[..., 2] < 90)
    blue = (rgb[..., 2] > 150) & (rgb[..., 0] < 90)
    assert red.sum() > 500 and blue.sum() > 500
    # without --expert-models the file's base_model is read: the same page
    out2 = tmp_path / "r2.html"
    assert report.main(["--metrics", *map(str, results["metrics"]), "--out-html", str(out2),
                        "--classes", str(results["ingest"] / "classes.parquet"),
                        "--experts", str(mined["experts"])]) == 0
    assert dict(_imgs(out2.read_text()))[f"{mined['model']} FC cosine"] == png


def test_expert_sets_over_one_base_and_the_classes_shown(mined):
    s = report.read_expert_set(mined["experts"])
    assert (s.name, s.base_model, s.targets, s.negatives, s.pairs) == (
        "b_expert", str(mined["model"]), ("/m/cat",), ("/m/dog",), (("/m/cat", "/m/dog"),))
    assert s.names == {"/m/cat": "Cat", "/m/dog": "Dog"}
    other = report.ExpertSet("e2", s.base_model, "siblings", ("/m/car",), (), ())
    views = report.expert_views([s, other], max_classes=50)
    assert len(views) == 1 and [x.name for x in views[0].sets] == ["b_expert", "e2"]   # one heatmap per base
    assert views[0].caption.startswith("3 classes")
    labels = [f"/m/c{i}" for i in range(10)]
    big = report.ExpertSet("e", "m.pt", "cosine", ("/m/c7",), ("/m/c2",), (("/m/c7", "/m/c2"),))
    assert report.heatmap_classes(labels, [big], max_classes=10) == labels
    assert report.heatmap_classes(labels, [big], max_classes=9) == ["/m/c2", "/m/c7"]
    cos = experts.cosine_matrix(np.vstack([np.zeros(10), np.eye(10)]))
    png, caption = report.expert_heatmap(cosine=cos, labels=labels, sets=[big], max_classes=9)
    assert caption.startswith("the 2 mined classes of 10") and png.startswith(b"\x89PNG")


@pytest.mark.parametrize("case,msg", [
    ("no_base", "field 'base_model': no 'base_model' in the experts file"),
    ("empty", "field 'targets': an experts file needs a non-empty 'targets' list"),
    ("unknown_class", "field 'labels': class '/m/zebra' of expert 'x' is not a class of its base model"),
    ("not_a_model", "not a stages.train checkpoint"),
])
def test_bad_expert_input_exits_2(results, mined, tmp_path, capsys, case, msg):
    obj = dict(mined["set"])
    model = mined["model"]
    if case == "no_base":
        del obj["base_model"]
    elif case == "empty":
        obj["targets"] = []
    elif case == "unknown_class":
        obj["negatives"] = ["/m/zebra"]
    else:
        torch.save({"weights": 1}, tmp_path / "bad.pt")
        obj["base_model"] = str(tmp_path / "bad.pt")
    (tmp_path / "x.json").write_text(json.dumps(obj))
    assert report.main(["--metrics", *map(str, results["metrics"]), "--out-html", str(tmp_path / "r.html"),
                        "--experts", str(tmp_path / "x.json")]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(SystemExit) as e:    # one checkpoint per experts file, or none
        report.main(["--metrics", *map(str, results["metrics"]), "--out-html", str(tmp_path / "r.html"),
                     "--experts", str(mined["experts"]), str(mined["experts"]), "--expert-models", str(model)])
    assert e.value.code == 2


def test_tail_classes_and_their_mean_ap(results, tmp_path):
    """The tail: the share of classes with the fewest training boxes (ties by MID); its mean AP per split comes
    from each metric file's per-class APs, and the CLI adds it beside the mAP."""
    boxes = pd.DataFrame({"image_id": ["i0", "i0", "i1", "i1", "i2", "i3", "i3"],
                          "label": ["/m/a", "/m/b", "/m/a", "/m/c", "/m/b", "/m/a", "/m/d"]})
    splits = pd.DataFrame({"image_id": ["i0", "i1", "i2", "i3"], "split": ["train", "train", "train", "val_a"]})
    # training boxes: a 2, b 2, c 1 (d only in val_a: not a training class)
    assert report.tail_classes(boxes, splits, share=1 / 3) == ["/m/c"]
    assert report.tail_classes(boxes, splits, share=2 / 3) == ["/m/c", "/m/a"]
    with pytest.raises(Exception, match="tail share"):
        report.tail_classes(boxes, splits, share=0)

    ing = results["ingest"]
    train_ids = [i for i in read_table(ing / "images.parquet", "images")["image_id"] if i not in SPLITS]
    gt = read_table(ing / "boxes.parquet", "boxes")
    tail = ["/m/cat"]
    df = report.add_tail_columns(report.metrics_frame(results["metrics"]), results["metrics"], tail)
    for p in results["metrics"]:
        stage, variant, name, split = report._metric_key(p)
        per = json.loads(p.read_text())["per_class"]
        want = per["/m/cat"]["ap"]
        got = df.set_index(["stage", "variant", "name"]).loc[(stage, variant, name), f"tail_{split}"]
        assert (np.isnan(got) and want is None) or got == pytest.approx(want)

    # through the CLI: every image of the tiny set is a training image here, cat has the fewest boxes
    all_train = pd.DataFrame({"image_id": sorted(set(gt["image_id"]) | set(train_ids)), "split": "train"})
    write_table(tmp_path / "train_splits.parquet", all_train, "splits")
    counts = gt["label"].value_counts()
    fewest = sorted(counts.index, key=lambda c: (counts[c], c))[0]
    out_json = tmp_path / "m.json"
    assert report.main(["--metrics", *map(str, results["metrics"]), "--tail-boxes", str(ing / "boxes.parquet"),
                        "--tail-splits", str(tmp_path / "train_splits.parquet"), "--tail-share", "0.01",
                        "--out-json", str(out_json)]) == 0
    recs = {(r["stage"], r["variant"], r["name"]): r for r in json.loads(out_json.read_text())}
    a = json.loads(next(p for p in results["metrics"] if "postprocess/default/a/val_a" in str(p)).read_text())
    want = a["per_class"][fewest]["ap"]
    got = recs[("postprocess", "default", "a")]["tail_val_a"]
    assert (want is None and (got is None or np.isnan(got))) or got == pytest.approx(want)
