"""Shared fixtures: a tiny, valid OpenImages-format dataset written by hand (independent of the generator)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

CLASSES = [("/m/a", "Animal"), ("/m/cat", "Cat"), ("/m/dog", "Dog"), ("/m/car", "Car")]
HIERARCHY = {"LabelName": "/m/0bl9f", "Subcategory": [
    {"LabelName": "/m/a", "Subcategory": [{"LabelName": "/m/cat"}, {"LabelName": "/m/dog"}]},
    {"LabelName": "/m/car"}]}
BOX_HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"
BOX_ROWS = [
    "img0,x,/m/cat,1,0.1,0.5,0.1,0.6,0,0,0,0,0",
    "img0,x,/m/car,1,0.5,0.9,0.5,0.9,0,0,0,0,0",
    "img1,x,/m/dog,1,0.2,0.7,0.2,0.8,0,0,0,0,0",
    "img2,x,/m/car,1,0.0,1.0,0.3,0.7,0,0,1,0,0",
    "img3,x,/m/cat,1,0.3,0.6,0.3,0.6,0,0,0,0,0",
]
LABEL_ROWS = ["img0,x,/m/cat,1", "img0,x,/m/dog,0", "img1,x,/m/dog,1", "img2,x,/m/car,1", "img3,x,/m/cat,1"]


def write_tiny_dataset(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    (root / "test").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "images" / f"img{i}.jpg")
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "test" / f"t{i}.jpg")
    files = {
        "boxes": root / "boxes.csv", "labels": root / "labels.csv", "classes": root / "classes.csv",
        "hierarchy": root / "hierarchy.json", "test_list": root / "test-images.csv",
        "images": root / "images", "test": root / "test",
    }
    files["boxes"].write_text("\n".join([BOX_HEADER, *BOX_ROWS]) + "\n")
    files["labels"].write_text("\n".join(["ImageID,Source,LabelName,Confidence", *LABEL_ROWS]) + "\n")
    files["classes"].write_text("\n".join(f"{m},{n}" for m, n in CLASSES) + "\n")
    files["hierarchy"].write_text(json.dumps(HIERARCHY))
    files["test_list"].write_text("ImageID\nt0\nt1\n")
    return files


def ingest_args(files: dict[str, Path], out: Path) -> list[str]:
    return ["--boxes-csv", str(files["boxes"]), "--labels-csv", str(files["labels"]),
            "--classes-csv", str(files["classes"]), "--hierarchy-json", str(files["hierarchy"]),
            "--images-dir", str(files["images"]), "--test-dir", str(files["test"]),
            "--test-list", str(files["test_list"]), "--out-dir", str(out)]


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    return write_tiny_dataset(tmp_path / "oid")


@pytest.fixture
def tables(tiny: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """The tiny dataset ingested to canonical tables, and a splits table (img0-2 train, img3 val_a)."""
    import pandas as pd

    from stages import ingest
    from stages.formats.io import write_table

    out = tmp_path / "ingest"
    assert ingest.main(ingest_args(tiny, out)) == 0
    splits = pd.DataFrame({"image_id": ["img0", "img1", "img2", "img3"], "split": ["train"] * 3 + ["val_a"]})
    write_table(tmp_path / "splits.parquet", splits, "splits")
    return out, tmp_path / "splits.parquet"
