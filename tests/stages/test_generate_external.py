"""The generator's external dataset (COCO format): deterministic, leaves orchard-mini unchanged, reads back through
``stages.ingest coco`` and overlaps orchard-mini on the mapped classes only."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from stages import generate as gen
from stages import ingest
from stages.data import taxonomy as tx
from stages.formats.io import read_table

N_EXT = 14


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """The same seed with and without the external dataset."""
    root = tmp_path_factory.mktemp("ext")
    for name, n in (("plain", 0), ("with", N_EXT)):
        assert gen.main(["--n-images", "8", "--n-test", "1", "--seed", "5", "--external", str(n),
                         "--out", str(root / name)]) == 0
    return root / "plain", root / "with"


def test_orchard_mini_does_not_change_with_the_external_dataset(pair):
    plain, with_ext = pair
    assert not (plain / gen.EXTERNAL_DIR).exists()
    for name in (gen.BBOX_CSV, gen.LABELS_CSV, gen.CLASSES_CSV, gen.SEGMENTATION_CSV, gen.HIERARCHY_JSON):
        assert (plain / name).read_bytes() == (with_ext / name).read_bytes(), name
    for p in (plain / gen.IMAGES_DIR).iterdir():
        assert p.read_bytes() == (with_ext / gen.IMAGES_DIR / p.name).read_bytes()
    s = json.loads((with_ext / gen.SUMMARY_JSON).read_text())
    assert s["external"]["n_images"] == N_EXT
    assert "external" not in json.loads((plain / gen.SUMMARY_JSON).read_text())


def test_external_dataset_is_deterministic_for_the_seed(pair, tmp_path):
    _, with_ext = pair
    assert gen.main(["--n-images", "8", "--n-test", "1", "--seed", "5", "--external", str(N_EXT),
                     "--out", str(tmp_path / "again")]) == 0
    a, b = with_ext / gen.EXTERNAL_DIR, tmp_path / "again" / gen.EXTERNAL_DIR
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and len(files) == N_EXT + 2
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    other = gen.plan_external(n_images=N_EXT, seed=6)
    assert [im.image_id for im in other] != [im.image_id for im in gen.plan_external(n_images=N_EXT, seed=5)]


def test_external_categories_have_their_own_names_and_some_overlap(pair):
    names = {c.name.lower() for c in tx.EXTERNAL_CATEGORIES}
    assert names.isdisjoint(c.name.lower() for c in tx.CLASSES)            # not orchard-mini's display names
    mapped = [c for c in tx.EXTERNAL_CATEGORIES if c.label is not None]
    assert 0 < len(mapped) < len(tx.EXTERNAL_CATEGORIES)
    assert {c.label for c in mapped} <= set(tx.LEAVES)
    coco = json.loads((pair[1] / gen.EXTERNAL_DIR / gen.EXTERNAL_INSTANCES).read_text())
    assert {(c["id"], c["name"]) for c in coco["categories"]} == {(c.id, c.name) for c in tx.EXTERNAL_CATEGORIES}
    lm = pd.read_csv(pair[1] / gen.EXTERNAL_DIR / gen.EXTERNAL_LABEL_MAP)
    assert dict(zip(lm["category_name"], lm["mid"])) == {c.name: c.label for c in mapped}


def test_reads_back_and_overlaps_orchard_mini_on_the_mapped_classes_only(pair, tmp_path, capsys):
    root = pair[1]
    ext = root / gen.EXTERNAL_DIR
    out = tmp_path / "ingest_external"
    assert ingest.main(["coco", "--instances", str(ext / gen.EXTERNAL_INSTANCES),
                        "--images-dir", str(ext / gen.IMAGES_DIR),
                        "--label-map", str(ext / gen.EXTERNAL_LABEL_MAP),
                        "--classes-csv", str(root / gen.CLASSES_CSV), "--image-check", "decode", "--workers", "1",
                        "--out-dir", str(out)]) == 0
    boxes = read_table(out / "boxes.parquet", "boxes")
    images = read_table(out / "images.parquet", "images")
    classes = read_table(out / "classes.parquet", "classes")
    s = json.loads((out / "summary.json").read_text())
    mapped = {c.label for c in tx.EXTERNAL_CATEGORIES if c.label is not None}
    orchard = set(pd.read_csv(root / gen.CLASSES_CSV, header=None)[0])
    # every box is of a mapped orchard-mini class; the classes are exactly the mapped ones, named as orchard-mini
    assert set(boxes["label"]) <= mapped and set(classes["label"]) == mapped and mapped <= orchard
    assert set(classes["name"]) == {tx.BY_LABEL[m].name for m in mapped}
    # the unmapped shapes were there and were dropped, counted per category
    plan = gen.plan_external(n_images=N_EXT, seed=5)
    planned = pd.Series([o.label for im in plan for o in im.boxes]).value_counts()
    unmapped = {c.name for c in tx.EXTERNAL_CATEGORIES if c.label is None}
    assert s["unmapped_categories"] == {n: int(planned.get(n, 0)) for n in unmapped}
    assert s["dropped_boxes"] > 0 and s["boxes"] == len(boxes) == int(planned.sum()) - s["dropped_boxes"]
    assert s["group_of"] == sum(o.is_group_of for im in plan for o in im.boxes if o.label not in unmapped)
    # images: the planned ids and sizes; boxes equal the plan's, normalised
    assert list(images["image_id"]) == [im.image_id for im in plan]
    assert list(zip(images["width"], images["height"])) == [(im.width, im.height) for im in plan]
    first = next(im for im in plan if any(o.label not in unmapped for o in im.boxes))
    o = next(o for o in first.boxes if o.label not in unmapped)
    row = boxes[boxes["image_id"] == first.image_id].iloc[0]
    assert row[["x_min", "y_min", "x_max", "y_max"]].tolist() == pytest.approx(
        [o.x0 / first.width, o.y0 / first.height, o.x1 / first.width, o.y1 / first.height], abs=1e-5)


def test_plan_places_objects_inside_and_draws_the_new_shapes():
    plan = gen.plan_external(n_images=30, seed=1)
    kinds = {o.kind for im in plan for o in im.objects}
    assert {"square", "cross", "glyph", "disc", "triangle", "group"} <= kinds
    for im in plan:
        assert im.image_id.startswith("ext") and len(im.image_id) == 16
        for o in im.objects:
            assert 0 <= o.x0 < o.x1 <= im.width and 0 <= o.y0 < o.y1 <= im.height
    img, _ = gen.render_image(next(im for im in plan if any(o.kind == "cross" for o in im.objects)))
    assert img.std() > 10
    with pytest.raises(ValueError):
        gen.plan_external(n_images=-1)


def test_cli_rejects_a_negative_count(tmp_path):
    with pytest.raises(SystemExit) as e:
        gen.main(["--n-images", "3", "--external", "-1", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
