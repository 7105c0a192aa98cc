"""``python -m stages.ingest coco``: an external COCO-format dataset -> boxes / images / classes parquet and a
summary of what was dropped; every bad input ends in exit 2, a message naming file, record and key, and no
output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import ingest
from stages.formats.io import read_provenance, read_table

ROOT = Path(__file__).resolve().parents[2]
CLASSES = "/m/a,Animal\n/m/cat,Cat\n/m/dog,Dog\n/m/car,Car\n"
MAP = "category_name,mid,oid_name,match\ncat,/m/cat,Cat,exact\ndog,/m/dog,Dog,exact\n"


def instances() -> dict:
    return {
        "images": [{"id": 1, "file_name": "e0.jpg", "width": 64, "height": 48},
                   {"id": 2, "file_name": "e1.jpg", "width": 40, "height": 40},
                   {"id": 3, "file_name": "e2.jpg", "width": 64, "height": 48}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [16, 24, 32, 24], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 0},
            {"id": 4, "image_id": 3, "category_id": 2, "bbox": [1, 1, 63, 47], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "unicorn"}],
    }


@pytest.fixture
def ext(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "ext"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for im in instances()["images"]:
        Image.fromarray(rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)).save(
            root / "images" / im["file_name"])
    files = {"instances": root / "instances.json", "images": root / "images", "label_map": root / "map.csv",
             "classes": root / "classes.csv"}
    files["instances"].write_text(json.dumps(instances()))
    files["label_map"].write_text(MAP)
    files["classes"].write_text(CLASSES)
    return files


def args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["coco", "--instances", str(files["instances"]), "--images-dir", str(files["images"]),
            "--label-map", str(files["label_map"]), "--classes-csv", str(files["classes"]), "--out-dir", str(out),
            "--workers", "1", *extra]


def test_valid_dataset(ext, tmp_path, capsys):
    out = tmp_path / "out"
    assert ingest.main(args(ext, out)) == 0
    assert "2 of 3 categories mapped" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["boxes.parquet", "classes.parquet", "images.parquet",
                                                     "summary.json", "targets.json"]
    from stages.formats.experts import read_expert_targets

    assert read_expert_targets(out / "targets.json") == ["/m/cat", "/m/dog"]   # what an expert of it contributes
    boxes = read_table(out / "boxes.parquet", "boxes")
    assert list(boxes["label"]) == ["/m/cat", "/m/dog", "/m/dog"] and list(boxes["image_id"]) == ["e0", "e0", "e2"]
    assert boxes.iloc[0][["x_min", "y_min", "x_max", "y_max"]].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert list(boxes["is_group_of"]) == [False, True, False]
    images = read_table(out / "images.parquet", "images")
    assert list(images["image_id"]) == ["e0", "e1", "e2"] and list(images["width"]) == [64, 40, 64]
    assert Path(images["path"].iloc[1]) == ext["images"] / "e1.jpg"
    classes = read_table(out / "classes.parquet", "classes")
    assert classes.to_dict("list") == {"label": ["/m/cat", "/m/dog"], "name": ["Cat", "Dog"]}
    s = json.loads((out / "summary.json").read_text())
    assert s["format"] == "coco" and s["categories"] == 3 and s["mapped_categories"] == 2 and s["classes"] == 2
    assert s["boxes"] == 3 and s["group_of"] == 1 and s["dropped_boxes"] == 1 and s["images"] == 3
    assert s["unmapped_categories"] == {"unicorn": 1} and s["images_without_boxes"] == 1     # e1 held only it
    assert s["boxes_per_class"] == {"/m/cat": 1, "/m/dog": 2}
    assert read_provenance(out / "boxes.parquet")["format"] == "coco"


def test_runs_as_a_module_and_the_openimages_form_still_parses(ext, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "stages.ingest", *args(ext, out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "summary.json").exists()
    r = subprocess.run([sys.executable, "-m", "stages.ingest", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0 and "--boxes-csv" in r.stdout and "stages.ingest coco" in r.stdout


def _edit(files, fn):
    d = instances()
    fn(d)
    files["instances"].write_text(json.dumps(d))


BAD = {
    "malformed JSON": (lambda f: f["instances"].write_text('{"images": [}'), ["instances.json", "malformed JSON",
                                                                             "line 1"]),
    "missing annotations": (lambda f: _edit(f, lambda d: d.pop("annotations")),
                            ["instances.json", "missing key 'annotations'"]),
    "missing bbox": (lambda f: _edit(f, lambda d: d["annotations"][2].pop("bbox")),
                     ["instances.json", "annotation id 3", "field 'bbox'"]),
    "box outside": (lambda f: _edit(f, lambda d: d["annotations"][3].update(bbox=[10, 1, 63, 47])),
                    ["instances.json", "annotation id 4", "outside its image"]),
    "unknown category": (lambda f: _edit(f, lambda d: d["annotations"][0].update(category_id=9)),
                         ["instances.json", "annotation id 1", "field 'category_id'"]),
    "duplicate annotation id": (lambda f: _edit(f, lambda d: d["annotations"][1].update(id=1)),
                                ["instances.json", "duplicate annotation id 1"]),
    "unknown MID": (lambda f: f["label_map"].write_text(MAP + "unicorn,/m/unicorn,Unicorn,exact\n"),
                    ["map.csv", "line 4", "field 'mid'", "unknown MID"]),
    "ambiguous map": (lambda f: f["label_map"].write_text(MAP + "cat,/m/a,Animal,subset\n"),
                      ["map.csv", "line 4", "ambiguous"]),
    "listed twice": (lambda f: f["label_map"].write_text(MAP + "dog,/m/dog,Dog,exact\n"),
                     ["map.csv", "line 4", "listed twice"]),
    "category not in the file": (lambda f: f["label_map"].write_text(MAP + "horse,/m/a,Animal,subset\n"),
                                 ["map.csv", "line 4", "'horse' is not in instances.json"]),
    "missing image": (lambda f: (f["images"] / "e1.jpg").unlink(),
                      ["instances.json", "image id 2", "field 'file_name'", "e1.jpg not found"]),
    "wrong image size": (lambda f: Image.new("RGB", (41, 40)).save(f["images"] / "e1.jpg"),
                         ["instances.json", "image id 2", "41 x 40 px, the JSON says 40 x 40"]),
    "corrupt image": (lambda f: (f["images"] / "e2.jpg").write_bytes(b"not a jpeg"),
                      ["instances.json", "image id 3", "corrupt image"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_names_the_place_and_writes_nothing(case, ext, tmp_path, capsys):
    spoil, needles = BAD[case]
    spoil(ext)
    out = tmp_path / "out"
    rc = ingest.main(args(ext, out))
    err = capsys.readouterr().err
    assert rc == 2, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert not out.exists() or not any(out.iterdir()), "no output may be written on bad input"


def test_missing_images_dropped_on_request_or_not_looked_for(ext, tmp_path, capsys):
    (ext["images"] / "e0.jpg").unlink()
    out = tmp_path / "drop"
    assert ingest.main(args(ext, out, "--missing-images", "drop")) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["missing_images_dropped"] == 1 and s["images"] == 2 and s["boxes"] == 1     # e0's two boxes went
    assert set(read_table(out / "boxes.parquet", "boxes")["image_id"]) == {"e2"}
    out = tmp_path / "none"
    assert ingest.main(args(ext, out, "--image-check", "none")) == 0
    assert json.loads((out / "summary.json").read_text())["images"] == 3


def test_box_tolerance_option(ext, tmp_path, capsys):
    _edit(ext, lambda d: d["annotations"][3].update(bbox=[1, 1, 63.5, 47]))            # 0.5 px out
    assert ingest.main(args(ext, tmp_path / "a")) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["clipped_boxes"] == 1
    assert ingest.main(args(ext, tmp_path / "b", "--box-tolerance", "0.25")) == 2
    assert "annotation id 4" in capsys.readouterr().err and not (tmp_path / "b").exists()
