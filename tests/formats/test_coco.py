"""COCO instances <-> canonical tables: the round trip, the label map (dropping and counting), every bad input
named by file, record and key, and the shipped label maps against the real 2019 class list."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.core.errors import InputError
from stages.formats import coco
from stages.formats.openimages import read_classes
from stages.formats.tables import conform

ROOT = Path(__file__).resolve().parents[2]
OID = ROOT / "tests" / "fixtures" / "oid2019"
CLASSES = pd.DataFrame({"label": ["/m/a", "/m/cat", "/m/dog", "/m/car"], "name": ["Animal", "Cat", "Dog", "Car"]})


def instances(**change) -> dict:
    """A small valid COCO instances dict: 2 images, 4 annotations, 3 categories (ids not contiguous)."""
    d = {
        "images": [{"id": 10, "file_name": "im0.jpg", "width": 64, "height": 48},
                   {"id": 11, "file_name": "sub/im1.jpg", "width": 80, "height": 60}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [16, 24, 32, 24], "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 5, "bbox": [0, 0, 80, 60], "iscrowd": 1},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [5, 5, 10, 10]},
            {"id": 4, "image_id": 10, "category_id": 5, "bbox": [1.5, 2.5, 10.25, 4.75], "iscrowd": 0}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 7, "name": "zebra"}],
    }
    d.update(change)
    return d


def write(tmp_path: Path, obj, name: str = "inst.json") -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def label_map(tmp_path: Path, text: str, name: str = "map.csv") -> coco.LabelMap:
    p = tmp_path / name
    p.write_text(text)
    return coco.read_label_map(p, classes=CLASSES)


MAP = "category_name,mid,oid_name\ncat,/m/cat,Cat\ndog,/m/dog,Dog\n"


def read(tmp_path: Path, obj=None, lm: str = MAP, **kw) -> coco.CocoTables:
    return coco.read_instances(write(tmp_path, instances() if obj is None else obj), images_dir=tmp_path / "img",
                               label_map=label_map(tmp_path, lm), classes=CLASSES, **kw)


# ----- reading ---------------------------------------------------------------------------------------------------
def test_reads_boxes_images_classes_with_hand_computed_values(tmp_path):
    t = read(tmp_path)
    b = t.boxes
    assert list(b["image_id"]) == ["im0", "im1", "im0"] and list(b["label"]) == ["/m/cat", "/m/dog", "/m/dog"]
    # xywh_abs [16, 24, 32, 24] on 64 x 48 -> xyxy_norm (0.25, 0.5, 0.75, 1.0)
    assert b.iloc[0][["x_min", "y_min", "x_max", "y_max"]].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert b.iloc[1][["x_min", "y_min", "x_max", "y_max"]].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert b.iloc[2][["x_min", "x_max"]].tolist() == pytest.approx([1.5 / 64, 11.75 / 64])
    assert list(b["is_group_of"]) == [False, True, False]          # from iscrowd (absent = 0)
    im = t.images
    assert list(im["image_id"]) == ["im0", "im1"]                  # the file name's stem
    assert list(im["path"]) == [str(tmp_path / "img" / "im0.jpg"), str(tmp_path / "img" / "sub" / "im1.jpg")]
    assert list(im["width"]) == [64, 80] and list(im["height"]) == [48, 60]
    assert t.classes.to_dict("list") == {"label": ["/m/cat", "/m/dog"], "name": ["Cat", "Dog"]}
    assert t.coco_image_ids == (10, 11) and t.categories == 3 and t.clipped == 0


def test_unmapped_categories_are_dropped_and_counted(tmp_path):
    t = read(tmp_path, lm="category_name,mid\ndog,/m/dog\n")
    assert set(t.boxes["label"]) == {"/m/dog"} and len(t.boxes) == 2
    assert t.unmapped == {"cat": 1, "zebra": 1} and t.mapped == {"dog": 2}
    assert list(t.classes["label"]) == ["/m/dog"]
    # a category without boxes is counted with 0; two categories may share one MID
    d = instances(categories=instances()["categories"] + [{"id": 9, "name": "unicorn"}])
    t = read(tmp_path, d, lm="category_id,mid\n3,/m/a\n5,/m/a\n")
    assert list(t.boxes["label"]) == ["/m/a"] * 3 and list(t.classes["label"]) == ["/m/a"]
    assert t.unmapped == {"zebra": 1, "unicorn": 0} and t.mapped == {"cat": 1, "dog": 2}


def test_map_by_id_equals_map_by_name(tmp_path):
    by_name = read(tmp_path)
    by_id = read(tmp_path, lm="category_id,mid\n3,/m/cat\n5,/m/dog\n")
    pd.testing.assert_frame_equal(by_name.boxes, by_id.boxes)
    pd.testing.assert_frame_equal(by_name.classes, by_id.classes)


def test_box_within_tolerance_is_clipped_beyond_it_an_error(tmp_path):
    d = instances()
    d["annotations"][0]["bbox"] = [-0.4, 24, 64.6, 24.5]           # 0.4 px left, 0.2 px right, 0.5 px below
    t = read(tmp_path, d)
    assert t.clipped == 1 and t.boxes.iloc[0][["x_min", "y_min", "x_max", "y_max"]].tolist() == [0, 0.5, 1, 1]
    with pytest.raises(InputError) as e:
        read(tmp_path, d, box_tolerance=0.3)
    msg = str(e.value)
    assert "inst.json" in msg and "annotation id 1" in msg and "'bbox'" in msg and "outside its image" in msg


# ----- round trip ------------------------------------------------------------------------------------------------
def canonical(tmp_path: Path, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    sizes = [(64, 48), (333, 500), (1024, 683)]
    images = pd.DataFrame({"image_id": ["a0", "b1", "c2"],
                           "path": [str(tmp_path / "imgs" / d / f"{i}.jpg") for i, d in zip(["a0", "b1", "c2"],
                                                                                            ["", "x", "x/y"])],
                           "width": [w for w, _ in sizes], "height": [h for _, h in sizes]})
    n = 40
    corners = np.sort(rng.random((n, 2, 2)), axis=1)               # [box, min/max, x/y]
    lo, hi = corners[:, 0], corners[:, 1]
    boxes = pd.DataFrame({"image_id": rng.choice(images["image_id"], n), "label": rng.choice(CLASSES["label"], n),
                          "x_min": lo[:, 0], "y_min": lo[:, 1], "x_max": hi[:, 0], "y_max": hi[:, 1],
                          "is_group_of": rng.random(n) < 0.2})
    boxes.loc[0, ["x_min", "y_min", "x_max", "y_max"]] = [0.0, 0.0, 1.0, 1.0]
    return conform(boxes, "boxes"), conform(images, "images"), conform(CLASSES, "classes")


def test_round_trip_tables_to_coco_to_tables(tmp_path):
    boxes, images, classes = canonical(tmp_path, np.random.default_rng(0))
    obj = coco.to_coco(boxes=boxes, images=images, classes=classes, images_dir=tmp_path / "imgs")
    assert [im["file_name"] for im in obj["images"]] == ["a0.jpg", "x/b1.jpg", "x/y/c2.jpg"]
    coco.write_instances(tmp_path / "rt.json", obj)
    from pycocotools.coco import COCO

    api = COCO(str(tmp_path / "rt.json"))                          # pycocotools reads what we write
    assert len(api.getAnnIds()) == len(boxes) and sorted(api.getCatIds()) == [1, 2, 3, 4]
    assert len(api.getAnnIds(iscrowd=True)) == int(boxes["is_group_of"].sum())
    lm = "category_id,mid\n" + "".join(f"{i + 1},{lab}\n" for i, lab in enumerate(classes["label"]))
    t = coco.read_instances(tmp_path / "rt.json", images_dir=tmp_path / "imgs", label_map=label_map(tmp_path, lm),
                            classes=CLASSES)
    pd.testing.assert_frame_equal(t.images, images)
    pd.testing.assert_frame_equal(t.classes, classes)
    pd.testing.assert_frame_equal(t.boxes, boxes, check_exact=False, atol=2e-5, rtol=0)
    assert t.unmapped == {} and t.clipped == 0


def test_to_coco_writes_pixels_and_given_category_ids(tmp_path):
    images = pd.DataFrame({"image_id": ["im0"], "path": [str(tmp_path / "im0.jpg")], "width": [64],
                           "height": [48]})
    boxes = pd.DataFrame({"image_id": ["im0"], "label": ["/m/dog"], "x_min": [0.25], "y_min": [0.5],
                          "x_max": [0.75], "y_max": [1.0], "is_group_of": [True]})
    obj = coco.to_coco(boxes=boxes, images=images, classes=CLASSES, category_ids={"/m/a": 7, "/m/cat": 3,
                                                                                "/m/dog": 11, "/m/car": 2})
    assert obj["annotations"] == [{"id": 1, "image_id": 1, "category_id": 11, "bbox": [16.0, 24.0, 32.0, 24.0],
                                   "area": 768.0, "iscrowd": 1}]
    assert [(c["id"], c["name"]) for c in obj["categories"]] == [(7, "Animal"), (3, "Cat"), (11, "Dog"),
                                                                 (2, "Car")]
    with pytest.raises(ValueError, match="not named by its id"):
        coco.to_coco(boxes=boxes, images=images.assign(image_id="other"), classes=CLASSES)
    with pytest.raises(ValueError, match="not in the classes"):
        coco.to_coco(boxes=boxes.assign(label="/m/zebra"), images=images, classes=CLASSES)


# ----- bad input: the instances file -----------------------------------------------------------------------------
def _drop(d: dict, kind: str, i: int, key: str) -> dict:
    del d[kind][i][key]
    return d


def _set(d: dict, kind: str, i: int, key: str, value) -> dict:
    d[kind][i][key] = value
    return d


BAD_INSTANCES = {
    "malformed JSON": ('{"images": [\n  {"id": 1,,}\n]}', ["malformed JSON", "line 2"]),
    "top level list": ("[1, 2]", ["top level is a JSON list"]),
    "no annotations": (lambda d: {k: v for k, v in d.items() if k != "annotations"},
                       ["missing key 'annotations'"]),
    "no images": (lambda d: {k: v for k, v in d.items() if k != "images"}, ["missing key 'images'", "'images'"]),
    "no categories": (lambda d: {k: v for k, v in d.items() if k != "categories"}, ["'categories'"]),
    "annotations not a list": (lambda d: d | {"annotations": {"1": {}}}, ["'annotations' must be a list"]),
    "annotation without bbox": (lambda d: _drop(d, "annotations", 1, "bbox"), ["annotation id 2", "field 'bbox'",
                                                                               "missing key"]),
    "annotation without id": (lambda d: _drop(d, "annotations", 1, "id"), ["annotations[1]", "field 'id'"]),
    "annotation without image_id": (lambda d: _drop(d, "annotations", 2, "image_id"),
                                    ["annotation id 3", "field 'image_id'"]),
    "image without width": (lambda d: _drop(d, "images", 1, "width"), ["image id 11", "field 'width'"]),
    "category without name": (lambda d: _drop(d, "categories", 0, "name"), ["category id 3", "field 'name'"]),
    "string id": (lambda d: _set(d, "annotations", 0, "id", "1"), ["annotations[0]", "must be an integer"]),
    "duplicate annotation id": (lambda d: _set(d, "annotations", 3, "id", 2), ["duplicate annotation id 2",
                                                                               "annotation id 2", "field 'id'"]),
    "duplicate image id": (lambda d: _set(d, "images", 1, "id", 10), ["duplicate image id 10"]),
    "duplicate category id": (lambda d: _set(d, "categories", 2, "id", 3), ["duplicate category id 3"]),
    "unknown category": (lambda d: _set(d, "annotations", 2, "category_id", 99),
                         ["annotation id 3", "field 'category_id'", "unknown category id 99"]),
    "unknown image": (lambda d: _set(d, "annotations", 0, "image_id", 12),
                      ["annotation id 1", "field 'image_id'", "unknown image id 12"]),
    "box outside": (lambda d: _set(d, "annotations", 0, "bbox", [40, 24, 32, 24]),
                    ["annotation id 1", "field 'bbox'", "outside its image", "64 x 48", "by 8 px"]),
    "negative x": (lambda d: _set(d, "annotations", 3, "bbox", [-5, 0, 3, 3]), ["annotation id 4", "outside"]),
    "negative width": (lambda d: _set(d, "annotations", 0, "bbox", [10, 10, -2, 3]),
                       ["annotation id 1", "negative width or height"]),
    "bbox of 3": (lambda d: _set(d, "annotations", 1, "bbox", [1, 2, 3]), ["annotation id 2", "4 finite numbers"]),
    "bbox with null": (lambda d: _set(d, "annotations", 1, "bbox", [1, None, 3, 4]),
                       ["annotation id 2", "'bbox'"]),
    "iscrowd 2": (lambda d: _set(d, "annotations", 0, "iscrowd", 2), ["annotation id 1", "field 'iscrowd'"]),
    "zero width image": (lambda d: _set(d, "images", 0, "width", 0), ["image id 10", "positive integer"]),
    "same stem twice": (lambda d: _set(d, "images", 1, "file_name", "other/im0.png"),
                        ["image id 11", "field 'file_name'", "share the file name stem 'im0'"]),
}


@pytest.mark.parametrize("case", list(BAD_INSTANCES))
def test_bad_instances_are_named(case, tmp_path):
    change, needles = BAD_INSTANCES[case]
    obj = change if isinstance(change, str) else change(instances())
    with pytest.raises(InputError) as e:
        read(tmp_path, obj)
    msg = str(e.value)
    assert "inst.json" in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        coco.load(tmp_path / "nope.json")


# ----- bad input: the label map ----------------------------------------------------------------------------------
BAD_MAPS = {
    "unknown MID": ("category_name,mid\ncat,/m/cat\ndog,/m/zebra\n",
                    ["line 3", "field 'mid'", "unknown MID '/m/zebra'"]),
    "ambiguous": ("category_name,mid\ncat,/m/cat\ndog,/m/dog\ncat,/m/a\n",
                  ["line 4", "ambiguous", "/m/cat on line 2 and to /m/a"]),
    "listed twice": ("category_name,mid\ncat,/m/cat\ncat ,/m/cat\n", ["line 3", "listed twice"]),
    "both key columns": ("category_name,category_id,mid\ncat,3,/m/cat\n", ["line 1", "exactly one of"]),
    "no key column": ("name,mid\ncat,/m/cat\n", ["line 1", "exactly one of"]),
    "no mid column": ("category_name,label\ncat,/m/cat\n", ["line 1", "missing column(s) ['mid']"]),
    "wrong oid_name": ("category_name,mid,oid_name\ncat,/m/cat,Dog\n", ["line 2", "field 'oid_name'", "'Cat'"]),
    "empty MID": ("category_name,mid\ncat,\n", ["line 2", "empty MID"]),
    "id not an integer": ("category_id,mid\n3,/m/cat\nfive,/m/dog\n", ["line 3", "not an integer"]),
    "id listed twice": ("category_id,mid\n3,/m/cat\n03,/m/dog\n", ["line 3", "ambiguous"]),
}


@pytest.mark.parametrize("case", list(BAD_MAPS))
def test_bad_label_maps_are_named(case, tmp_path):
    text, needles = BAD_MAPS[case]
    with pytest.raises(InputError) as e:
        label_map(tmp_path, text)
    msg = str(e.value)
    assert "map.csv" in msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def test_label_map_naming_a_category_the_file_lacks(tmp_path):
    with pytest.raises(InputError) as e:
        read(tmp_path, lm="category_name,mid\ncat,/m/cat\nunicorn,/m/a\n")
    msg = str(e.value)
    assert "map.csv: line 3" in msg and "'unicorn' is not in inst.json" in msg and "'zebra'" in msg
    with pytest.raises(InputError, match="line 2.*category 42 is not in"):
        read(tmp_path, lm="category_id,mid\n42,/m/cat\n")


def test_two_categories_of_one_name_are_ambiguous_by_name_fine_by_id(tmp_path):
    d = instances()
    d["categories"][2]["name"] = "cat "                             # same name once stripped
    with pytest.raises(InputError, match="ambiguous: inst.json has 2 categories named 'cat' \\(ids \\[3, 7\\]\\)"):
        read(tmp_path, d)
    t = read(tmp_path, d, lm="category_id,mid\n3,/m/cat\n7,/m/a\n")
    assert sorted(t.boxes["label"]) == ["/m/a", "/m/cat"]


# ----- the shipped label maps ------------------------------------------------------------------------------------
COCO_2017 = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush"]


def test_shipped_label_maps_read_against_the_real_2019_classes():
    classes = read_classes(OID / "challenge-2019-classes-description-500.csv")
    lm = coco.read_label_map(ROOT / "configs/labelmaps/coco_to_oid2019.csv", classes=classes)
    assert set(lm.categories) <= set(COCO_2017) and len(lm.categories) == 74 and len(set(lm.mids)) == 74
    table = pd.read_csv(ROOT / "configs/labelmaps/coco_to_oid2019.csv")
    assert (table["match"] == "exact").sum() == 64                  # the paper's COCO/OpenImages overlap
    assert lm.as_dict()["bench"] == "/m/0cvnqh" and lm.as_dict()["mouse"] == "/m/020lf"
    # exact rows really are the same name
    exact = table[table["match"] == "exact"]
    assert (exact["category_name"].str.lower() == exact["oid_name"].str.lower()).all()
    o365 = coco.read_label_map(ROOT / "configs/labelmaps/objects365_to_oid2019.csv", classes=classes)
    assert len(o365.categories) == 227
    t = pd.read_csv(ROOT / "configs/labelmaps/objects365_to_oid2019.csv")
    assert set(t["match"]) == {"exact", "synonym", "subset", "approximate"}
    assert (t.loc[t["match"] == "exact", "category_name"].str.lower()
            == t.loc[t["match"] == "exact", "oid_name"].str.lower()).all()


def test_coco_names_above_are_torchvisions():
    meta = pytest.importorskip("torchvision.models._meta")
    assert [c for c in meta._COCO_CATEGORIES if c not in ("N/A", "__background__")] == COCO_2017
