"""benchmarks/compare_submissions.py: identical files agree, a shifted box or a changed score is found, a bad file
is a clear error, the mAP difference comes from the stages.evaluate metric."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, write_tiny_dataset

sys.path.insert(0, str(ROOT / "benchmarks"))
import compare_submissions as cs  # noqa: E402

HEADER = "ImageId,PredictionString\n"
ROWS = {
    "img0": "/m/cat 0.9 0.1 0.1 0.5 0.6 /m/car 0.8 0.5 0.5 0.9 0.9 /m/cat 0.3 0.6 0.6 0.9 0.9",
    "img1": "/m/dog 0.7 0.2 0.2 0.7 0.8",
    "img2": "",
}


def write(path, rows):
    path.write_text(HEADER + "".join(f"{k},{v}\n" for k, v in rows.items()))
    return path


def test_identical_files_agree(tmp_path):
    a = write(tmp_path / "a.csv", ROWS)
    b = write(tmp_path / "b.csv", dict(reversed(list(ROWS.items()))))      # order does not matter
    rc = cs.main([str(a), str(b), "--out", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and r["failures"] == []
    assert r["n_boxes_a"] == r["n_boxes_b"] == r["n_matched"] == 4 and r["n_images"] == 3
    assert r["box_agreement"] == r["image_agreement"] == r["label_agreement"] == 1.0
    assert r["max_score_diff"] == r["max_coord_diff"] == 0.0 and r["min_matched_iou"] == 1.0


def test_a_shifted_box_and_a_changed_score_are_found(tmp_path):
    a = write(tmp_path / "a.csv", ROWS)
    rows = dict(ROWS)
    # the dog box shifted by 0.05 in x (IoU 0.45/0.55 = 0.818: still matched at 0.5), the car's score 0.8 -> 0.75
    rows["img1"] = "/m/dog 0.7 0.25 0.2 0.75 0.8"
    rows["img0"] = ROWS["img0"].replace("/m/car 0.8", "/m/car 0.75")
    b = write(tmp_path / "b.csv", rows)
    d_a, i_a = cs.read_submission(a)
    d_b, i_b = cs.read_submission(b)
    c = cs.compare(d_a, i_a, d_b, i_b, iou_thr=0.5)
    assert c.n_matched == 4 and c.max_score_diff == pytest.approx(0.05)
    assert c.max_coord_diff == pytest.approx(0.05) and c.min_matched_iou == pytest.approx(0.45 * 0.6 / (0.55 * 0.6))
    assert cs.main([str(a), str(b)]) == 1                                       # default: identical up to 1e-6
    assert cs.main([str(a), str(b), "--tol-score", "0.06", "--tol-coord", "0.06"]) == 0
    # at IoU 0.9 the shifted box no longer matches: 3 of 4 boxes agree
    c = cs.compare(d_a, i_a, d_b, i_b, iou_thr=0.9)
    assert c.n_matched == 3 and c.box_agreement == 0.75


def test_labels_images_and_the_greedy_match(tmp_path):
    a = write(tmp_path / "a.csv", ROWS)
    rows = dict(ROWS)
    # img1's dog becomes a cat (the label sets of img1 differ); img0's two cat boxes: B keeps only the low one
    rows["img1"] = "/m/cat 0.7 0.2 0.2 0.7 0.8"
    rows["img0"] = "/m/car 0.8 0.5 0.5 0.9 0.9 /m/cat 0.3 0.6 0.6 0.9 0.9"
    b = write(tmp_path / "b.csv", rows)
    c = cs.compare(*cs.read_submission(a), *cs.read_submission(b))
    assert c.n_boxes_a == 4 and c.n_boxes_b == 3 and c.n_matched == 2 and c.box_agreement == 0.5
    assert c.image_agreement == pytest.approx(2 / 3)                  # img0 and the empty img2 agree
    assert c.label_agreement == pytest.approx(2 / 4)                  # (img0,cat) (img0,car) | (img1,dog) (img1,cat)


@pytest.mark.parametrize("text, what", [
    ("ImageId,PredictionString\nimg0,/m/cat 0.9 0.1 0.1 0.5\n", "not a multiple of 6"),
    ("ImageId,PredictionString\nimg0,/m/cat 0.9 0.1 0.1 0.5 abc\n", "line 2"),
    ("Image,Predictions\nimg0,\n", "ImageId"),
])
def test_a_malformed_file_is_a_clear_error(tmp_path, capsys, text, what):
    a = write(tmp_path / "a.csv", ROWS)
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    assert cs.main([str(a), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and what in err


def test_map_difference_against_a_ground_truth(tmp_path):
    f = write_tiny_dataset(tmp_path / "data")
    # img0: cat + car exact, img1: dog exact -> every box found; B misses img1's dog
    good = {"img0": "/m/cat 0.9 0.1 0.1 0.5 0.6 /m/car 0.8 0.5 0.5 0.9 0.9 /m/a 0.9 0.1 0.1 0.5 0.6",
            "img1": "/m/dog 0.7 0.2 0.2 0.7 0.8 /m/a 0.7 0.2 0.2 0.7 0.8"}
    a = write(tmp_path / "a.csv", good)
    b = write(tmp_path / "b.csv", {**good, "img1": ""})
    gt = ["--boxes", str(f["boxes"]), "--image-labels", str(f["labels"]), "--classes", str(f["classes"]),
          "--hierarchy", str(f["hierarchy"])]
    from stages.evaluate import main as evaluate

    maps = []
    for p in (a, b):
        assert evaluate([*gt, "--predictions", str(p), "--out", str(tmp_path / "m.json")]) == 0
        maps.append(json.loads((tmp_path / "m.json").read_text())["mAP"])
    assert maps[0] != maps[1]
    rc = cs.main([str(a), str(b), *gt, "--min-agreement", "0", "--tol-map", "1", "--out", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and r["map_a"] == maps[0] and r["map_b"] == maps[1]
    assert r["map_diff"] == pytest.approx(abs(maps[0] - maps[1]))
    assert cs.main([str(a), str(b), *gt, "--min-agreement", "0", "--tol-map", "0.01"]) == 1


def test_metrics_tables(tmp_path):
    rows = [{"stage": "postprocess", "variant": "default", "name": "m", "val_a": 0.5, "val_b": 0.4},
            {"stage": "ensemble", "variant": "default", "name": "all", "val_a": 0.6, "val_b": 0.55}]
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(rows))
    pb.write_text(json.dumps([{**rows[0], "val_b": 0.43}, rows[1]]))
    assert cs.compare_metrics(str(pa), str(pb)) == (pytest.approx(0.03), 2)
    pb.write_text(json.dumps(rows[:1]))
    with pytest.raises(cs.InputError, match="different rows"):
        cs.compare_metrics(str(pa), str(pb))


def test_cli_runs_as_a_script(tmp_path):
    a = write(tmp_path / "a.csv", ROWS)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/compare_submissions.py"), str(a), str(a)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and "box agreement: 100.0%" in p.stdout and p.stdout.rstrip().endswith("PASS")
