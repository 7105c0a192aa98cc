"""Ingest: OpenImages Challenge files -> validated canonical parquet tables.

Writes ``boxes``, ``image_labels``, ``images`` (labelled), ``test_images``, ``classes`` and ``hierarchy``.
Every check names the file, line and field of the first offending value; nothing is written unless all pass.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats import openimages as oi
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import write_json, write_table
from stages.formats.tables import check_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tables:
    boxes: pd.DataFrame
    image_labels: pd.DataFrame
    images: pd.DataFrame
    test_images: pd.DataFrame
    classes: pd.DataFrame
    hierarchy: pd.DataFrame


def check_hierarchy(h: Hierarchy, classes: pd.DataFrame, *, source: object) -> None:
    labels = sorted(h.labels)
    check_labels(labels, set(classes["label"]), source=source, rows=[None] * len(labels), field="LabelName")


def image_table(ids: Sequence[str], image_dir: Path, *, first_seen: dict[str, tuple[str, int]] | None = None,
                decode: bool = True, log_every: int = 200) -> pd.DataFrame:
    """Open every image (fully decoding it when ``decode``), returning image_id, path, width, height.

    A missing or corrupt image is an error naming the file and, when known, the CSV line that refers to it.
    """
    rows = []
    t0 = time.time()
    for i, img_id in enumerate(ids):
        path = image_dir / f"{img_id}.jpg"
        src, line = (first_seen or {}).get(img_id, (None, None))
        try:
            with Image.open(path) as im:
                if decode:
                    im.load()
                w, h = im.size
        except FileNotFoundError as exc:
            raise InputError(f"image {img_id!r} not found at {path}", file=src or path, row=line,
                             field="ImageID") from exc
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise InputError(f"corrupt image {path}: {exc}", file=src or path, row=line, field="ImageID") from exc
        rows.append((img_id, str(path), w, h))
        if log_every and (i + 1) % log_every == 0:
            rate = (i + 1) / max(time.time() - t0, 1e-9)
            log.info("checked %d/%d images (%.0f img/s, ETA %.0fs)", i + 1, len(ids), rate,
                     (len(ids) - i - 1) / rate)
    return pd.DataFrame(rows, columns=["image_id", "path", "width", "height"])


def _first_lines(df: pd.DataFrame, source: str) -> dict[str, tuple[str, int]]:
    first = df.drop_duplicates("ImageID")
    return {k: (source, int(i) + 2) for k, i in zip(first["ImageID"], first.index)}


def ingest(*, boxes_csv: Path, labels_csv: Path, classes_csv: Path, hierarchy_json: Path, images_dir: Path,
           test_dir: Path | None = None, test_list: Path | None = None, decode: bool = True) -> Tables:
    classes = oi.read_classes(classes_csv)
    h = Hierarchy.from_json(hierarchy_json)
    check_hierarchy(h, classes, source=hierarchy_json)
    known = set(classes["label"])
    boxes = oi.read_boxes(boxes_csv, known_labels=known)
    labels = oi.read_image_labels(labels_csv, known_labels=known)
    dup = labels.duplicated(["image_id", "label"]).to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise InputError(f"duplicate image label ({labels['image_id'].iloc[i]}, {labels['label'].iloc[i]})",
                         file=labels_csv, row=i + 2, field="LabelName")
    # where each image id is first referred to, for error messages
    seen = {}
    for df, src in ((pd.read_csv(labels_csv, dtype=str, usecols=["ImageID"]), str(labels_csv)),
                    (pd.read_csv(boxes_csv, dtype=str, usecols=["ImageID"]), str(boxes_csv))):
        seen.update(_first_lines(df, src))
    ids = sorted(set(boxes["image_id"]) | set(labels["image_id"]))
    log.info("%d classes, %d boxes, %d image labels, %d labelled images", len(classes), len(boxes), len(labels),
             len(ids))
    images = image_table(ids, images_dir, first_seen=seen, decode=decode)

    test = pd.DataFrame(columns=["image_id", "path", "width", "height"])
    if test_list is not None:
        tl = oi._read_csv(test_list, ["ImageID"])
        dup = tl["ImageID"].duplicated().to_numpy()
        if dup.any():
            i = int(np.flatnonzero(dup)[0])
            raise InputError(f"duplicate image id {tl['ImageID'].iloc[i]!r}", file=test_list, row=i + 2,
                             field="ImageID")
        overlap = sorted(set(tl["ImageID"]) & set(ids))
        if overlap:
            i = int(np.flatnonzero(tl["ImageID"].to_numpy() == overlap[0])[0])
            raise InputError(f"test image {overlap[0]!r} also has training labels (duplicate image id)",
                             file=test_list, row=i + 2, field="ImageID")
        test = image_table(list(tl["ImageID"]), test_dir or images_dir, first_seen=_first_lines(tl, str(test_list)),
                           decode=decode)
    elif test_dir is not None and test_dir.exists():
        test = image_table(sorted(p.stem for p in test_dir.glob("*.jpg")), test_dir, decode=decode)
    return Tables(boxes=boxes, image_labels=labels, images=images, test_images=test, classes=classes,
                  hierarchy=h.to_edges())


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.ingest", description=__doc__)
    p.add_argument("--boxes-csv", type=Path, required=True)
    p.add_argument("--labels-csv", type=Path, required=True)
    p.add_argument("--classes-csv", type=Path, required=True)
    p.add_argument("--hierarchy-json", type=Path, required=True)
    p.add_argument("--images-dir", type=Path, required=True)
    p.add_argument("--test-dir", type=Path)
    p.add_argument("--test-list", type=Path, help="CSV with an ImageID column listing the test images")
    p.add_argument("--no-decode", action="store_true", help="read image headers only (faster, weaker check)")
    p.add_argument("--out-dir", type=Path, required=True)
    a = p.parse_args(argv)
    t = ingest(boxes_csv=a.boxes_csv, labels_csv=a.labels_csv, classes_csv=a.classes_csv,
               hierarchy_json=a.hierarchy_json, images_dir=a.images_dir, test_dir=a.test_dir,
               test_list=a.test_list, decode=not a.no_decode)
    prov = {"stage": "ingest", "source": str(a.boxes_csv)}
    for name, table in [("boxes", "boxes"), ("image_labels", "image_labels"), ("images", "images"),
                        ("test_images", "images"), ("classes", "classes"), ("hierarchy", "hierarchy")]:
        write_table(a.out_dir / f"{name}.parquet", getattr(t, name), table, provenance=prov)
    summary = {"classes": len(t.classes), "boxes": len(t.boxes), "group_of": int(t.boxes["is_group_of"].sum()),
               "image_labels": len(t.image_labels), "negative_labels": int((t.image_labels["confidence"] == 0).sum()),
               "images": len(t.images), "test_images": len(t.test_images)}
    write_json(a.out_dir / "summary.json", summary)
    print("ingest: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    raise SystemExit(main())
