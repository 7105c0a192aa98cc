"""Ingest: the valid tiny dataset round-trips; every bad-input case ends in exit 2, a message naming file,
line and field, and no output."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from stages import ingest
from stages.formats.io import read_table
from tests.conftest import BOX_HEADER, BOX_ROWS, ingest_args


def run(files, out, capsys):
    rc = ingest.main(ingest_args(files, out))
    err = capsys.readouterr().err
    return rc, err


def test_valid_dataset_round_trips(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _ = run(tiny, out, capsys)
    assert rc == 0
    boxes = read_table(out / "boxes.parquet", "boxes")
    assert len(boxes) == len(BOX_ROWS)
    # OpenImages orders XMin, XMax, YMin, YMax; canonical is xyxy
    first = boxes.iloc[0]
    assert (first.x_min, first.y_min, first.x_max, first.y_max) == (0.1, 0.1, 0.5, 0.6)
    assert boxes["is_group_of"].sum() == 1
    images = read_table(out / "images.parquet", "images")
    assert set(images["image_id"]) == {"img0", "img1", "img2", "img3"}
    assert (images["width"] == 64).all() and (images["height"] == 48).all()
    assert len(read_table(out / "test_images.parquet", "images")) == 2
    labels = read_table(out / "image_labels.parquet", "image_labels")
    assert (labels["confidence"] == 0).sum() == 1
    h = read_table(out / "hierarchy.parquet", "hierarchy")
    assert set(zip(h["child"], h["parent"])) == {("/m/cat", "/m/a"), ("/m/dog", "/m/a")}
    assert json.loads((out / "summary.json").read_text())["boxes"] == 5


def _replace_box_row(files, i, row):
    rows = list(BOX_ROWS)
    rows[i] = row
    files["boxes"].write_text("\n".join([BOX_HEADER, *rows]) + "\n")


def _assert_bad(rc, err, out, *needles):
    assert rc == 2, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert not out.exists() or not any(out.iterdir()), "no output may be written on bad input"


def test_malformed_csv(tiny, tmp_path, capsys):
    _replace_box_row(tiny, 2, "img1,x,/m/dog,1,0.2,0.7,0.2,0.8,0,0,0,0,0,EXTRA,FIELDS")
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "boxes.csv", "malformed CSV", "line 4")


def test_missing_column(tiny, tmp_path, capsys):
    text = tiny["boxes"].read_text().replace("IsGroupOf", "IsGroup")
    tiny["boxes"].write_text(text)
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "boxes.csv", "line 1", "'IsGroupOf'", "missing column")


def test_unknown_mid(tiny, tmp_path, capsys):
    _replace_box_row(tiny, 3, "img2,x,/m/zebra,1,0.0,1.0,0.3,0.7,0,0,1,0,0")
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "boxes.csv", "line 5", "'LabelName'", "/m/zebra")


def test_unknown_mid_in_image_labels(tiny, tmp_path, capsys):
    tiny["labels"].write_text(tiny["labels"].read_text() + "img3,x,/m/zebra,0\n")
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "labels.csv", "line 7", "'LabelName'", "/m/zebra")


def test_coordinate_outside_unit_interval(tiny, tmp_path, capsys):
    _replace_box_row(tiny, 0, "img0,x,/m/cat,1,0.1,1.5,0.1,0.6,0,0,0,0,0")
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "boxes.csv", "line 2", "'XMax'", "outside [0, 1]")


def test_min_greater_than_max(tiny, tmp_path, capsys):
    _replace_box_row(tiny, 1, "img0,x,/m/car,1,0.5,0.9,0.95,0.9,0,0,0,0,0")
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "boxes.csv", "line 3", "'YMin'", "YMin 0.95 > YMax 0.9")


def test_not_a_number(tiny, tmp_path, capsys):
    _replace_box_row(tiny, 1, "img0,x,/m/car,1,0.5,0.9,abc,0.9,0,0,0,0,0")
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "boxes.csv", "line 3", "'YMin'", "not a number")


def test_duplicate_image_ids_in_test_list(tiny, tmp_path, capsys):
    tiny["test_list"].write_text("ImageID\nt0\nt1\nt0\n")
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "test-images.csv", "line 4", "'ImageID'", "duplicate image id 't0'")


def test_test_image_that_is_also_labelled(tiny, tmp_path, capsys):
    tiny["test_list"].write_text("ImageID\nt0\nimg2\n")
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "test-images.csv", "line 3", "'ImageID'", "img2")


def test_missing_image(tiny, tmp_path, capsys):
    (tiny["images"] / "img1.jpg").unlink()
    rc, err = run(tiny, tmp_path / "out", capsys)
    # the boxes CSV refers to img1 on line 4
    _assert_bad(rc, err, tmp_path / "out", "boxes.csv", "line 4", "'ImageID'", "img1", "not found")


def test_corrupt_image(tiny, tmp_path, capsys):
    p = tiny["images"] / "img3.jpg"
    p.write_bytes(p.read_bytes()[:200])  # truncated JPEG
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "'ImageID'", "corrupt image", "img3.jpg")


def test_hierarchy_cycle(tiny, tmp_path, capsys):
    h = json.loads(tiny["hierarchy"].read_text())
    h["Subcategory"][0]["Subcategory"][0]["Subcategory"] = [{"LabelName": "/m/a"}]
    tiny["hierarchy"].write_text(json.dumps(h))
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "hierarchy.json", "cycle", "/m/a -> /m/cat -> /m/a", "'LabelName'")


def test_hierarchy_unknown_label(tiny, tmp_path, capsys):
    h = json.loads(tiny["hierarchy"].read_text())
    h["Subcategory"].append({"LabelName": "/m/ghost"})
    tiny["hierarchy"].write_text(json.dumps(h))
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "hierarchy.json", "/m/ghost", "'LabelName'")


def test_hierarchy_malformed_json(tiny, tmp_path, capsys):
    tiny["hierarchy"].write_text('{"LabelName": "/m/0bl9f", "Subcategory": [\n{"LabelName": }]}')
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "hierarchy.json", "malformed JSON", "line 2")


def test_image_label_confidence_not_binary(tiny, tmp_path, capsys):
    tiny["labels"].write_text(tiny["labels"].read_text() + "img3,x,/m/dog,0.5\n")
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "labels.csv", "line 7", "'Confidence'")


@pytest.mark.parametrize("field,value,needle", [
    ("models/frcnn_small/epochs", "x", "'x' is not of type 'integer'"),
    ("device", "tpu", "'tpu' is not one of"),
    ("split/fractions", [0.5, 0.3, 0.1], "must sum to 1"),
])
def test_config_fails_schema(field, value, needle, tmp_path):
    import yaml

    from stages.core.config import load_config
    from stages.core.errors import InputError

    cfg = yaml.safe_load((Path(__file__).parents[2] / "configs" / "default.yaml").read_text())
    node = cfg
    keys = field.split("/")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(InputError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and f"field {field!r}" in msg and needle in msg


# ----- at scale: nested folders, header checks, test lists, known images, typed reads -----------------------
def _tables(out):
    return read_table(out / "images.parquet", "images"), read_table(out / "test_images.parquet", "images")


def test_images_in_nested_folders(tiny, tmp_path, capsys):
    # the official download's layout: train_0 ... train_f by the id's first character (here: any subfolder)
    for i in range(4):
        sub = tiny["images"] / f"train_{i % 2}"
        sub.mkdir(exist_ok=True)
        (tiny["images"] / f"img{i}.jpg").rename(sub / f"img{i}.jpg")
    (tiny["test"] / "part").mkdir()
    (tiny["test"] / "t1.jpg").rename(tiny["test"] / "part" / "t1.jpg")
    out = tmp_path / "out"
    rc, err = run(tiny, out, capsys)
    assert rc == 0, err
    images, test = _tables(out)
    assert [Path(p).relative_to(tiny["images"]).as_posix() for p in images["path"]] == \
        ["train_0/img0.jpg", "train_1/img1.jpg", "train_0/img2.jpg", "train_1/img3.jpg"]
    assert (images["width"] == 64).all() and (images["height"] == 48).all()
    assert sorted(Path(p).name for p in test["path"]) == ["t0.jpg", "t1.jpg"]


def test_same_image_in_two_folders(tiny, tmp_path, capsys):
    (tiny["images"] / "train_1").mkdir()
    (tiny["images"] / "train_1" / "img2.jpg").write_bytes((tiny["images"] / "img2.jpg").read_bytes())
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "images", "'img2' found twice", "train_1")


def test_header_check_catches_a_corrupt_header_and_decode_a_corrupt_body(tiny, tmp_path, capsys):
    p = tiny["images"] / "img1.jpg"
    good = p.read_bytes()
    p.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG header" + good[40:])
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "boxes.csv", "line 4", "'ImageID'", "corrupt image", "img1.jpg")
    # a JPEG cut inside its pixel data: the header is whole (the default check passes), decoding fails
    p.write_bytes(good[: len(good) // 2])
    assert run(tiny, tmp_path / "ok", capsys)[0] == 0
    rc = ingest.main(ingest_args(tiny, tmp_path / "out2") + ["--image-check", "decode"])
    _assert_bad(rc, capsys.readouterr().err, tmp_path / "out2", "boxes.csv", "line 4", "corrupt image", "img1.jpg")


def test_parallel_image_check_equals_serial(tiny):
    paths = [str(p) for folder in ("images", "test") for p in sorted(tiny[folder].glob("*.jpg"))]
    serial = ingest.image_sizes(paths, workers=1)
    parallel = ingest.image_sizes(paths, workers=2, chunk=2)
    assert serial[1] == parallel[1] == -1 and (serial[0] == parallel[0]).all() and serial[0].shape == (6, 2)
    Path(paths[4]).write_bytes(b"garbage")              # in the third chunk: found at its position
    wh, bad, reason = ingest.image_sizes(paths, workers=2, chunk=2)
    assert bad == 4 and reason


def _without_test_list(args):
    i = args.index("--test-list")
    return args[:i] + args[i + 2:]


def test_test_images_from_the_folder_or_the_sample_submission(tiny, tmp_path, capsys):
    assert ingest.main(_without_test_list(ingest_args(tiny, tmp_path / "a"))) == 0
    assert list(_tables(tmp_path / "a")[1]["image_id"]) == ["t0", "t1"]          # every image in --test-dir
    sample = tiny["test_list"].parent / "sample_submission.csv"
    sample.write_text("ImageId,PredictionString\nt1,/m/cat 0.5 0.1 0.1 0.2 0.2\n")
    args = _without_test_list(ingest_args(tiny, tmp_path / "b")) + ["--sample-submission", str(sample)]
    assert ingest.main(args) == 0
    test = _tables(tmp_path / "b")[1]
    assert list(test["image_id"]) == ["t1"] and Path(test["path"].iloc[0]).name == "t1.jpg"
    sample.write_text("ImageId,PredictionString\nt1,\nt0,\nt1,\n")
    rc = ingest.main(_without_test_list(ingest_args(tiny, tmp_path / "c")) + ["--sample-submission", str(sample)])
    _assert_bad(rc, capsys.readouterr().err, tmp_path / "c", "sample_submission.csv", "line 4", "'ImageId'",
                "duplicate image id 't1'")


def test_known_images_are_taken_as_they_are(tiny, tmp_path, capsys):
    from stages.formats.io import write_table

    known = tmp_path / "known.parquet"
    write_table(known, pd.DataFrame({"image_id": ["img1", "t0"], "path": ["/elsewhere/img1.jpg", "/x/t0.jpg"],
                                     "width": [1024, 800], "height": [768, 600]}), "images")
    (tiny["images"] / "img1.jpg").unlink()                  # neither looked for nor opened
    out = tmp_path / "out"
    assert ingest.main(ingest_args(tiny, out) + ["--known-images", str(known)]) == 0, capsys.readouterr().err
    images, test = _tables(out)
    row = images.set_index("image_id").loc["img1"]
    assert (row["path"], row["width"], row["height"]) == ("/elsewhere/img1.jpg", 1024, 768)
    assert images.set_index("image_id").loc["img0", "width"] == 64        # the others are checked as usual
    assert test.set_index("image_id").loc["t0", "width"] == 800


@pytest.mark.parametrize("row,needle", [
    ("img1,x,/m/dog,1,0.2,0.7,,0.8,0,0,0,0,0", ["line 4", "'YMin'", "not a number: ''"]),
    ("img1,x,/m/dog,1,0.2,0.7,0.2,0.8,0,0,0.5,0,0", ["line 4", "'IsGroupOf'", "not an integer: '0.5'"]),
    ("img1,x,/m/dog,1,0.2,0.7,0.2,0.8,0,0,2,0,0", ["line 4", "'IsGroupOf'", "must be 0 or 1, got '2'"]),
    ("img1,x,/m/dog,1,0.2,0.7", ["line 4", "malformed CSV", "expected 13 fields, saw 6"]),
    (",x,/m/dog,1,0.2,0.7,0.2,0.8,0,0,0,0,0", ["line 4", "'ImageID'", "empty image id"]),
])
def test_typed_read_errors(tiny, tmp_path, capsys, row, needle):
    _replace_box_row(tiny, 2, row)
    rc, err = run(tiny, tmp_path / "out", capsys)
    _assert_bad(rc, err, tmp_path / "out", "boxes.csv", *needle)


def test_typed_read_accepts_what_the_string_read_did(tiny, tmp_path, capsys):
    # padded numbers, integers written as floats, blank optional flags (-1: unknown)
    _replace_box_row(tiny, 2, "img1,x,/m/dog,1, 0.2 ,0.7,0.2,0.8,,0,1.0,0,0")
    out = tmp_path / "out"
    rc, err = run(tiny, out, capsys)
    assert rc == 0, err
    b = read_table(out / "boxes.parquet", "boxes").iloc[2]
    assert (b.x_min, b.is_group_of, b.is_occluded) == (0.2, True, -1)
