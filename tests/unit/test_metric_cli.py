"""``python -m stages.evaluate``: raw OpenImages files, canonical parquet, splits, and bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages import evaluate
from stages.core.errors import InputError
from stages.evaluate import main
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import write_table

ROOT = Path(__file__).resolve().parents[2]
HIER = {"LabelName": "/m/root", "Subcategory": [
    {"LabelName": "/m/a", "Subcategory": [{"LabelName": "/m/b"}, {"LabelName": "/m/c"}]},
    {"LabelName": "/m/e"}]}
BBOX_HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf," \
              "IsDepiction,IsInside\n"


@pytest.fixture
def raw(tmp_path: Path) -> dict[str, Path]:
    p = {k: tmp_path / n for k, n in [("boxes", "bbox.csv"), ("labels", "labels.csv"), ("hier", "h.json"),
                                       ("classes", "classes.csv"), ("sub", "sub.csv")]}
    p["boxes"].write_text(BBOX_HEADER + "img1,x,/m/b,1,0.1,0.5,0.1,0.5,0,0,0,0,0\n"
                                        "img1,x,/m/e,1,0.0,1.0,0.0,1.0,0,0,1,0,0\n"
                                        "img2,x,/m/c,1,0.2,0.6,0.2,0.6,0,0,0,0,0\n")
    p["labels"].write_text("ImageID,Source,LabelName,Confidence\nimg1,v,/m/b,1\nimg2,v,/m/c,1\nimg2,v,/m/e,0\n")
    p["hier"].write_text(json.dumps(HIER))
    p["classes"].write_text("/m/a,A\n/m/b,B\n/m/c,C\n/m/e,E\n")
    p["sub"].write_text("ImageId,PredictionString\n"
                        "img1,/m/b 0.9 0.1 0.1 0.5 0.5 /m/a 0.8 0.1 0.1 0.5 0.5 /m/e 0.7 0.2 0.2 0.3 0.3\n"
                        "img2,/m/c 0.6 0.2 0.2 0.6 0.6 /m/e 0.5 0.1 0.1 0.2 0.2\n"
                        "img3,/m/b 0.9 0.1 0.1 0.5 0.5\n")
    return p


def args(p: dict[str, Path], out: Path, **over) -> list[str]:
    a = {"--boxes": p["boxes"], "--image-labels": p["labels"], "--hierarchy": p["hier"],
         "--classes": p["classes"], "--predictions": p["sub"], "--out": out}
    a.update(over)
    return [x for k, v in a.items() if v is not None for x in (k, str(v))]


def test_raw_files_round_trip(raw, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(args(raw, out)) == 0
    m = json.loads(out.read_text())
    assert set(m) == {"mAP", "per_class", "counts"}
    pc = m["per_class"]
    # b: TP; a: 2 gt (from b on img1, c on img2) detected once on img1 -> AP .5; c: TP; e: group-of TP on img1,
    # FP on img2 (verified absent) ranked after it -> AP 1
    assert pc["/m/b"]["ap"] == 1.0 and pc["/m/c"]["ap"] == 1.0 and pc["/m/a"]["ap"] == 0.5
    assert pc["/m/e"] == {"name": "E", "ap": 1.0, "n_gt": 1, "n_det": 2, "n_tp": 1}
    assert m["mAP"] == pytest.approx(3.5 / 4)
    assert m["counts"]["n_images"] == 2 and m["counts"]["n_det_input"] == 6
    line = capsys.readouterr().out.strip()
    assert line.startswith("mAP 0.875000") and "\n" not in line


def test_parquet_inputs_and_split_restriction_give_the_same_numbers(raw, tmp_path):
    from stages.formats import openimages as oi

    classes = oi.read_classes(raw["classes"])
    known = set(classes["label"])
    pq = {"boxes": tmp_path / "boxes.parquet", "labels": tmp_path / "il.parquet", "hier": tmp_path / "h.parquet",
          "classes": tmp_path / "classes.parquet", "sub": tmp_path / "dets.parquet"}
    write_table(pq["boxes"], oi.read_boxes(raw["boxes"], known_labels=known), "boxes")
    write_table(pq["labels"], oi.read_image_labels(raw["labels"], known_labels=known), "image_labels")
    write_table(pq["hier"], Hierarchy.from_json(raw["hier"]).to_edges(), "hierarchy")
    write_table(pq["classes"], classes, "classes")
    write_table(pq["sub"], oi.read_detection_submission(raw["sub"], known_labels=known), "detections")
    o1, o2 = tmp_path / "raw.json", tmp_path / "pq.json"
    assert main(args(raw, o1)) == 0
    assert main(args(pq, o2)) == 0
    assert json.loads(o1.read_text()) == json.loads(o2.read_text())
    splits = tmp_path / "splits.parquet"
    write_table(splits, pd.DataFrame({"image_id": ["img1", "img2"], "split": ["val_a", "val_b"]}), "splits")
    o3 = tmp_path / "val_b.json"
    assert main(args(pq, o3, **{"--split-ids": splits, "--split": "val_b"})) == 0
    m = json.loads(o3.read_text())
    assert m["counts"]["n_images"] == 1
    assert m["per_class"]["/m/b"]["ap"] is None and m["per_class"]["/m/c"]["ap"] == 1.0


def test_runs_as_a_module(raw, tmp_path):
    out = tmp_path / "m.json"
    r = subprocess.run([sys.executable, "-m", "stages.evaluate", *args(raw, out)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("mAP ") and out.exists()


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("case, expect", [
    ("sub:img1,/m/zz 0.9 0.1 0.1 0.5 0.5", ["sub.csv", "line 2", "PredictionString", "/m/zz"]),
    ("sub:img1,/m/b 0.9 0.1 0.1 1.5 0.5", ["sub.csv", "line 2", "PredictionString:x_max", "outside [0, 1]"]),
    ("sub:img1,/m/b 0.9 0.6 0.1 0.5 0.5", ["sub.csv", "line 2", "PredictionString:x_min", ">"]),
    ("sub:img1,/m/b 0.9 0.1 0.1 0.5", ["sub.csv", "line 2", "PredictionString", "multiple of 6"]),
    ("sub:img1,/m/b 0.9 0.1 0.1 abc 0.5", ["sub.csv", "line 2", "PredictionString", "not a number"]),
    ("boxes:img1,x,/m/b,1,0.6,0.5,0.1,0.5,0,0,0,0,0", ["bbox.csv", "line 2", "'XMin'"]),
    ("boxes:img1,x,/m/b,1,0.1,0.5,0.1,1.2,0,0,0,0,0", ["bbox.csv", "line 2", "'YMax'", "outside"]),
    ("boxes:img1,x,/m/q,1,0.1,0.5,0.1,0.5,0,0,0,0,0", ["bbox.csv", "line 2", "'LabelName'", "/m/q"]),
])
def test_bad_input_names_file_line_and_field(raw, tmp_path, capsys, case, expect):
    which, row = case.split(":", 1)
    header = "ImageId,PredictionString\n" if which == "sub" else BBOX_HEADER
    raw[which].write_text(header + row + "\n")
    err = _fails(args(raw, tmp_path / "m.json"), capsys)
    for e in expect:
        assert e in err, err
    assert not (tmp_path / "m.json").exists()


def test_missing_column_is_reported(raw, tmp_path, capsys):
    raw["sub"].write_text("ImageId,Predictions\nimg1,\n")
    err = _fails(args(raw, tmp_path / "m.json"), capsys)
    assert "sub.csv" in err and "line 1" in err and "'PredictionString'" in err
    raw["sub"].write_text("ImageId,PredictionString\n")
    raw["boxes"].write_text("ImageID,LabelName,XMin,XMax,YMin,YMax\nimg1,/m/b,0.1,0.5,0.1,0.5\n")
    err = _fails(args(raw, tmp_path / "m.json"), capsys)
    assert "bbox.csv" in err and "'IsGroupOf'" in err


def test_bad_parquet_predictions_name_row_and_field(raw, tmp_path, capsys):
    p = tmp_path / "dets.parquet"
    d = pd.DataFrame({"image_id": ["img1", "img1"], "label": ["/m/b", "/m/zz"], "score": [0.9, 0.8],
                      "x_min": [0.1, 0.1], "y_min": [0.1, 0.1], "x_max": [0.5, 0.5], "y_max": [0.5, 0.5]})
    write_table(p, d, "detections")
    err = _fails(args(raw, tmp_path / "m.json", **{"--predictions": p}), capsys)
    assert "dets.parquet" in err and "row 1" in err and "'label'" in err
    write_table(p, d.assign(label="/m/b", x_max=[0.5, np.float64(0.05)]), "detections")
    err = _fails(args(raw, tmp_path / "m.json", **{"--predictions": p}), capsys)
    assert "dets.parquet" in err and "row 1" in err and "'x_min'" in err
    d.drop(columns="score").to_parquet(p)  # a parquet that is not a detections table
    err = _fails(args(raw, tmp_path / "m.json", **{"--predictions": p}), capsys)
    assert "dets.parquet" in err and "'score'" in err


def test_unknown_split_is_an_error(raw, tmp_path, capsys):
    splits = tmp_path / "splits.parquet"
    write_table(splits, pd.DataFrame({"image_id": ["img1"], "split": ["val_a"]}), "splits")
    err = _fails(args(raw, tmp_path / "m.json", **{"--split-ids": splits, "--split": "val_z"}), capsys)
    assert "splits.parquet" in err and "val_z" in err


def test_one_label_check_names_file_row_and_field(tmp_path):
    from stages.formats.seg_submission import encode_mask, read_segmentation_submission
    from stages.formats.tables import check_labels
    from stages.ingest import check_hierarchy

    known = {"/m/a", "/m/b"}
    check_labels(pd.Series(["/m/a", "/m/b", "/m/a"]), known)  # all known: no error
    cases = [(pd.Series(["/m/a", "/m/x"]), {}, "row 1: field 'label': unknown label (MID) '/m/x'"),
             (pd.Series(["/m/a", "", "/m/x"]), {}, "row 1: field 'label': empty label"),
             (pd.Series(["/m/b", "/m/x"], dtype="category"), {"rows": [7, 9], "field": "LabelName"},
              "line 9: field 'LabelName': unknown label (MID) '/m/x'")]
    for labels, kw, msg in cases:
        with pytest.raises(InputError) as e:
            check_labels(labels, known, source="f.csv", **kw)
        assert str(e.value).startswith("f.csv: " + msg), str(e.value)
    check_labels(pd.Series(["/m/x"]), None)  # no class list: only empty labels are errors
    # the same check behind every reader: a parquet table, a segmentation submission, the hierarchy
    write_table(tmp_path / "b.parquet", pd.DataFrame(
        {"image_id": ["i", "i"], "label": ["/m/a", "/m/q"], "x_min": 0.1, "y_min": 0.1, "x_max": 0.5,
         "y_max": 0.5, "is_group_of": False}), "boxes")
    with pytest.raises(InputError, match=r"b.parquet: row 1: field 'label': unknown label \(MID\) '/m/q'"):
        evaluate.read_boxes(tmp_path / "b.parquet", known)
    enc = encode_mask(np.ones((4, 4), bool))
    (tmp_path / "s.csv").write_text(f"ImageID,ImageWidth,ImageHeight,PredictionString\ni,4,4,/m/a 0.9 {enc}\n"
                                    f"j,4,4,/m/b 0.9 {enc} /m/q 0.5 {enc}\n")
    with pytest.raises(InputError, match=r"s.csv: line 3: field 'PredictionString': unknown label \(MID\) '/m/q'"):
        read_segmentation_submission(tmp_path / "s.csv", known_labels=known)
    with pytest.raises(InputError, match=r"h.json: field 'LabelName': unknown label \(MID\) '/m/q'"):
        h = Hierarchy.from_json_obj({"LabelName": "/m/root",
                                     "Subcategory": [{"LabelName": "/m/a"}, {"LabelName": "/m/q"}]})
        check_hierarchy(h, pd.DataFrame({"label": sorted(known)}), source="h.json")


def test_an_expert_is_scored_on_its_classes_only(raw, tmp_path, capsys):
    full, only = tmp_path / "full.json", tmp_path / "only.json"
    assert main(args(raw, full)) == 0
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps({"targets": ["/m/a"], "negatives": ["/m/c"]}))
    assert main(args(raw, only, **{"--only-classes": experts})) == 0
    f, o = json.loads(full.read_text()), json.loads(only.read_text())
    assert set(o["per_class"]) == {"/m/a", "/m/c"}                  # the others are left out, not AP 0
    assert o["per_class"]["/m/a"] == f["per_class"]["/m/a"] and o["per_class"]["/m/c"] == f["per_class"]["/m/c"]
    assert o["mAP"] == pytest.approx((0.5 + 1.0) / 2) and o["counts"]["n_classes_with_gt"] == 2
    experts.write_text(json.dumps({"targets": ["/m/zzz"]}))
    bad = tmp_path / "bad.json"
    assert main(args(raw, bad, **{"--only-classes": experts})) == 2
    assert "'/m/zzz' is not in the class list" in capsys.readouterr().err and not bad.exists()
