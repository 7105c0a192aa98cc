"""Ingest: OpenImages Challenge files -> validated canonical parquet tables.

Writes ``boxes``, ``image_labels``, ``images`` (labelled), ``test_images``, ``classes`` and ``hierarchy``.
Every check names the file, line and field of the first offending value; nothing is written unless all pass.

Image-level-only images (paper 5.7): an image without any box row but with a positive image-level label has
image-level labels only (its absence of boxes means nothing). With ``--image-level-only keep`` (default) it stays,
and the ``images`` table gets the column ``box_annotated`` (False for these; written only when there is one, so a
box-only dataset gives the same tables as before); with ``drop`` it and its labels are left out. A class both
positive and verified absent in one image is an error. ``--plain-list`` (a CSV with an ImageID column; the
generator's ``plain-background-images.csv``; OpenImages has no such file, a missing one means none) flags
``plain_background`` images. ``summary.json`` counts them, per class too.

The CSVs are read typed and columnar (ids and MIDs dictionary-encoded), so 12M boxes take seconds and a few
GB. Images are found through an index of the images folder and its subfolders (the official download's
``train_0`` … ``train_f`` as well as one flat folder); each is checked by reading its header (format and size),
in parallel, or by decoding it fully (``--image-check decode``). The test images are those of
``--test-list`` (``test-images.csv``), else of ``--sample-submission`` (the Kaggle sample's ImageId column), else
every image in ``--test-dir``. ``--known-images`` takes images tables of an earlier run (or of a dataset's
metadata) as they are: the images they list are neither looked for nor opened again.

``python -m stages.ingest coco ...`` ingests an external dataset in COCO format instead (COCO, Objects365, the
generator's ``external/`` set; paper 7.3): a COCO instances JSON, its images folder and a label map (external
category -> OpenImages MID, see :mod:`stages.formats.coco`) give ``boxes``, ``images`` and ``classes`` of the
mapped categories, and ``summary.json`` with what was dropped::

    python -m stages.ingest coco --instances instances.json --images-dir images/ --label-map label_map.csv \
        --classes-csv challenge-2019-classes-description-500.csv --out-dir results/ingest_external/<name>
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from stages.core.cli import stage_main
from stages.core.config import schema_default
from stages.core.errors import InputError
from stages.formats import coco
from stages.formats import openimages as oi
from stages.formats.columns import codes
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import read_table, write_json, write_table
from stages.formats.tables import check_labels, empty

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_CHECKS = ("header", "decode")
_CHUNK = 2048   # images per task of the parallel check


IMAGE_LEVEL_ONLY = ("keep", "drop")
BASE_IMAGE_COLUMNS = ("image_id", "path", "width", "height")


@dataclass(frozen=True)
class Tables:
    boxes: pd.DataFrame
    image_labels: pd.DataFrame
    images: pd.DataFrame
    test_images: pd.DataFrame
    classes: pd.DataFrame
    hierarchy: pd.DataFrame
    #: image-level-only and plain-background counts for the summary (:func:`weak_summary`)
    weak: dict | None = None


def check_hierarchy(h: Hierarchy, classes: pd.DataFrame, *, source: object) -> None:
    labels = sorted(h.labels)
    check_labels(labels, set(classes["label"]), source=source, rows=[None] * len(labels), field="LabelName")


def image_index(root: Path) -> pd.Series:
    """Every image file under ``root`` (any depth), as a Series image id (the file name's stem) -> path.
    The same id in two places is an error; hidden folders are skipped."""
    if not root.is_dir():
        raise InputError("images folder not found", file=root)
    names, dirs, folders = [], [], [str(root)]
    while folders:
        folder = folders.pop()
        with os.scandir(folder) as it:
            entries = list(it)
        folders += sorted(e.path for e in entries if e.is_dir() and not e.name.startswith("."))
        files = [e.name for e in entries if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file()]
        names += files
        dirs += [folder] * len(files)
    index = pd.Series(dirs, dtype=object)
    index = (index + os.sep + pd.Series(names, dtype=object)) if len(names) else index
    index.index = pd.Index([os.path.splitext(n)[0] for n in names], dtype=object)
    dup = index.index.duplicated(keep=False)
    if dup.any():
        twice = index[dup].sort_index()
        raise InputError(f"image id {twice.index[0]!r} found twice: {twice.iloc[0]} and {twice.iloc[1]}",
                         file=root)
    return index.sort_index()


def _check_images(paths: list[str], decode: bool) -> tuple[np.ndarray, tuple[int, str] | None]:
    """(n, 2) widths and heights of ``paths``, and the first unreadable one (position, reason) or None."""
    wh = np.zeros((len(paths), 2), np.int32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                if decode:
                    im.load()
                wh[i] = im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            return wh, (i, str(exc))
    return wh, None


def image_sizes(paths: Sequence[str], *, decode: bool = False, workers: int = 1, chunk: int = _CHUNK
                ) -> tuple[np.ndarray, int, str]:
    """Width and height of every image, from its header (``decode``: after decoding it fully), in ``workers``
    processes taking ``chunk`` images at a time. Returns ``(wh (n, 2), position of the first unreadable image
    or -1, its reason)``."""
    chunks = [list(paths[i:i + chunk]) for i in range(0, len(paths), chunk)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(min(workers, len(chunks))) as pool:
            results = list(pool.map(_check_images, chunks, [decode] * len(chunks)))
    else:
        results = [_check_images(c, decode) for c in chunks]
    for k, (_, err) in enumerate(results):
        if err is not None:
            return np.zeros((0, 2), np.int32), k * chunk + err[0], err[1]
    return (np.concatenate([wh for wh, _ in results]) if results else np.zeros((0, 2), np.int32)), -1, ""


def image_table(ids: Sequence[str], *, index: Callable[[], pd.Series], folder: Path,
                known: pd.DataFrame | None = None, where: Callable[[str], tuple[object, int | None]],
                decode: bool = False, workers: int = 1) -> pd.DataFrame:
    """The ``images`` table of ``ids``: rows of ``known`` as they are, the others located through ``index()``
    (id -> path, built only when needed) and checked. A missing or unreadable image is an error naming the
    file and line that refer to it (``where(id)``)."""
    ids = pd.Index(ids, dtype=object)
    known_pos = pd.Index(known["image_id"], dtype=object).get_indexer(ids) if known is not None else \
        np.full(len(ids), -1)
    todo = ids[known_pos < 0]
    parts = [known.iloc[known_pos[known_pos >= 0]]] if known is not None else []
    if len(todo):
        paths = index().reindex(todo)
        if paths.isna().any():
            img = str(paths.index[np.flatnonzero(paths.isna().to_numpy())[0]])
            src, line = where(img)
            raise InputError(f"image {img!r} not found in {folder} or its subfolders", file=src or folder,
                             row=line, field="ImageID")
        log.info("checking %d images (%s, %d workers)", len(todo), "decode" if decode else "header", workers)
        wh, bad, reason = image_sizes(list(paths), decode=decode, workers=workers)
        if bad >= 0:
            src, line = where(str(todo[bad]))
            raise InputError(f"corrupt image {paths.iloc[bad]}: {reason}", file=src or paths.iloc[bad], row=line,
                             field="ImageID")
        parts.append(pd.DataFrame({"image_id": todo, "path": paths.to_numpy(), "width": wh[:, 0],
                                   "height": wh[:, 1]}))
    if not parts:
        return empty("images")
    return pd.concat(parts, ignore_index=True).sort_values("image_id", ignore_index=True)


def _first_reference(tables: Sequence[tuple[pd.DataFrame, Path]]) -> Callable[[str], tuple[object, int | None]]:
    """``id -> (file, line)`` of the first row referring to an image id, searching ``tables`` in order (each read
    from its file in file order, with a categorical ``image_id``)."""
    def where(img: str) -> tuple[object, int | None]:
        for df, src in tables:
            cats = df["image_id"].cat.categories
            if img in cats:
                row = np.flatnonzero(df["image_id"].cat.codes.to_numpy() == cats.get_loc(img))
                if len(row):
                    return src, int(row[0]) + 2
        return None, None
    return where


def _test_ids(*, test_list: Path | None, sample_submission: Path | None, test_index: Callable[[], pd.Series],
              labelled: pd.Index) -> tuple[pd.Index, Callable[[str], tuple[object, int | None]]]:
    """The test image ids and, for error messages, where each is listed."""
    for path, column in ((test_list, "ImageID"), (sample_submission, "ImageId")):
        if path is None:
            continue
        ids = oi.read_image_ids(path, column)
        clash = ids.isin(labelled).to_numpy()
        if clash.any():
            i = int(np.flatnonzero(clash)[0])
            raise InputError(f"test image {ids.iloc[i]!r} also has training labels (duplicate image id)",
                             file=path, row=i + 2, field=column)
        line = pd.Series(np.arange(len(ids)) + 2, index=pd.Index(ids, dtype=object))
        return pd.Index(ids, dtype=object), lambda img, p=path: (p, int(line[img]))
    return test_index().index, _first_reference([])


def image_level_only(boxes: pd.DataFrame, labels: pd.DataFrame) -> pd.Index:
    """The image-level-only images: no box row, at least one positive (confidence 1) image label."""
    boxed = pd.Index(boxes["image_id"].astype(object).unique(), dtype=object)
    positive = pd.Index(labels["image_id"][labels["confidence"].to_numpy() == 1].astype(object).unique(),
                        dtype=object)
    return positive.difference(boxed)


def plain_ids(path: Path | None, labelled: pd.Index) -> pd.Index:
    """The image ids of a plain-background list (ImageID column); a missing file is an empty list (OpenImages
    has none), an id that is not a labelled image an error naming its line."""
    if path is None or not Path(path).exists():
        if path is not None:
            log.info("no plain-background list %s: no image is flagged plain_background", path)
        return pd.Index([], dtype=object)
    ids = oi.read_image_ids(path, "ImageID")
    bad = ~ids.isin(labelled).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"plain-background image {ids.iloc[i]!r} has no labels (not a labelled image)",
                         file=path, row=i + 2, field="ImageID")
    return pd.Index(ids, dtype=object)


def weak_summary(images: pd.DataFrame, labels: pd.DataFrame, *, dropped: int = 0) -> dict:
    """Counts for the ingest summary: image-level-only images (kept, dropped), plain-background images, and per
    class the image-level-only images where it is positive / verified absent."""
    weak = images["image_id"][~images["box_annotated"].to_numpy()] if "box_annotated" in images else \
        pd.Series([], dtype=object)
    plain = int(images["plain_background"].sum()) if "plain_background" in images else 0
    wl = labels[labels["image_id"].astype(object).isin(set(weak)).to_numpy()]
    per = {}
    for conf, key in ((1, "positive"), (0, "negative")):
        vc = wl["label"][wl["confidence"].to_numpy() == conf].astype(object).value_counts()
        for lab, n in vc.items():
            per.setdefault(str(lab), {"positive": 0, "negative": 0})[key] = int(n)
    return {"image_level_only_images": int(len(weak)), "image_level_only_dropped": int(dropped),
            "plain_background_images": plain,
            "image_level_only_per_class": dict(sorted(per.items()))}


def check_contradictions(labels: pd.DataFrame, *, source: object) -> None:
    """A class both verified present and verified absent in one image is an error (naming the second row); any
    other repeated (image, class) pair is a duplicate."""
    img, _ = codes(labels["image_id"])
    lab, n_lab = codes(labels["label"])
    key = pd.Series(img * max(n_lab, 1) + lab)
    dup = key.duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero(key.to_numpy() == key.iloc[i])[0])
        a, b = int(labels["confidence"].iloc[first]), int(labels["confidence"].iloc[i])
        what = (f"contradicting image labels: {labels['label'].iloc[i]} is verified present and verified absent "
                f"in image {labels['image_id'].iloc[i]} (lines {first + 2} and {i + 2})" if a != b else
                f"duplicate image label ({labels['image_id'].iloc[i]}, {labels['label'].iloc[i]})")
        raise InputError(what, file=source, row=i + 2, field="Confidence" if a != b else "LabelName")


def ingest(*, boxes_csv: Path, labels_csv: Path, classes_csv: Path, hierarchy_json: Path, images_dir: Path,
           test_dir: Path | None = None, test_list: Path | None = None, sample_submission: Path | None = None,
           known_images: pd.DataFrame | None = None, image_check: str = "header", workers: int = 1,
           image_level: str = "keep", plain_list: Path | None = None) -> Tables:
    """``image_level``: what to do with image-level-only images (:data:`IMAGE_LEVEL_ONLY`, see the module
    docstring); ``plain_list``: the plain-background list (None or a missing file: none)."""
    if image_check not in IMAGE_CHECKS:
        raise ValueError(f"unknown image check {image_check!r}; choose from {IMAGE_CHECKS}")
    if image_level not in IMAGE_LEVEL_ONLY:
        raise ValueError(f"unknown image_level {image_level!r}; choose from {IMAGE_LEVEL_ONLY}")
    classes = oi.read_classes(classes_csv)
    h = Hierarchy.from_json(hierarchy_json)
    check_hierarchy(h, classes, source=hierarchy_json)
    known = set(classes["label"])
    boxes = oi.read_boxes(boxes_csv, known_labels=known, categorical=True)
    labels = oi.read_image_labels(labels_csv, known_labels=known, categorical=True)
    check_contradictions(labels, source=labels_csv)
    ids = pd.Index(np.union1d(boxes["image_id"].cat.categories.to_numpy(object),
                              labels["image_id"].cat.categories.to_numpy(object)), dtype=object)
    plain = plain_ids(plain_list, ids)
    weak = image_level_only(boxes, labels)
    dropped = 0
    if image_level == "drop" and len(weak):
        dropped = len(weak)
        ids = ids.difference(weak)
        labels = labels[~labels["image_id"].astype(object).isin(set(weak)).to_numpy()].reset_index(drop=True)
        labels["image_id"] = labels["image_id"].cat.remove_unused_categories()
        weak = weak[:0]
        log.info("dropped %d image-level-only images and their labels", dropped)
    log.info("%d classes, %d boxes, %d image labels, %d labelled images", len(classes), len(boxes), len(labels),
             len(ids))
    cache: dict[Path, pd.Series] = {}

    def index_of(folder: Path) -> Callable[[], pd.Series]:
        return lambda: cache[folder] if folder in cache else cache.setdefault(folder, image_index(folder))

    check = {"known": known_images, "decode": image_check == "decode", "workers": workers}
    images = image_table(ids, index=index_of(images_dir), folder=images_dir,
                         where=_first_reference([(boxes, boxes_csv), (labels, labels_csv)]), **check)
    images = images[list(BASE_IMAGE_COLUMNS)].copy()   # flags of --known-images tables are derived afresh
    if len(weak):   # the optional columns only when they say something (a box-only dataset: tables as before)
        images["box_annotated"] = ~images["image_id"].isin(set(weak)).to_numpy()
    if len(plain):
        images["plain_background"] = images["image_id"].isin(set(plain)).to_numpy()
    test_folder = test_dir if test_dir is not None else images_dir
    test_ids, where = pd.Index([], dtype=object), _first_reference([])
    if test_list is not None or sample_submission is not None or (test_dir is not None and test_dir.exists()):
        test_ids, where = _test_ids(test_list=test_list, sample_submission=sample_submission,
                                    test_index=index_of(test_folder), labelled=ids)
    test = image_table(test_ids, index=index_of(test_folder), folder=test_folder, where=where, **check)
    test = test[list(BASE_IMAGE_COLUMNS)]
    return Tables(boxes=boxes, image_labels=labels, images=images, test_images=test, classes=classes,
                  hierarchy=h.to_edges(), weak=weak_summary(images, labels, dropped=dropped))


# ----- external datasets in COCO format ---------------------------------------------------------------------
COCO_IMAGE_CHECKS = ("none", *IMAGE_CHECKS)
MISSING_IMAGES = ("error", "drop")


@dataclass(frozen=True)
class ExternalTables:
    boxes: pd.DataFrame
    images: pd.DataFrame
    classes: pd.DataFrame
    summary: dict


def ingest_coco(*, instances: Path, images_dir: Path, label_map: Path, classes_csv: Path,
                image_check: str = "header", missing_images: str = "error", box_tolerance: float = 1.0,
                workers: int = 1) -> ExternalTables:
    """An external dataset in COCO format -> canonical ``boxes``, ``images``, ``classes`` (OpenImages MIDs of
    the categories ``label_map`` maps; :func:`stages.formats.coco.read_instances`) and a summary.

    ``image_check``: ``header`` (default) opens each image's header and checks that it exists and has the
    JSON's width and height, ``decode`` decodes it fully, ``none`` trusts the JSON. A missing image file is an
    error, or with ``missing_images="drop"`` the image and its boxes are dropped and counted (Objects365 lists a
    few images its archives lack)."""
    if image_check not in COCO_IMAGE_CHECKS:
        raise ValueError(f"unknown image check {image_check!r}; choose from {COCO_IMAGE_CHECKS}")
    if missing_images not in MISSING_IMAGES:
        raise ValueError(f"unknown missing_images {missing_images!r}; choose from {MISSING_IMAGES}")
    classes = oi.read_classes(classes_csv)
    lm = coco.read_label_map(label_map, classes=classes)
    t = coco.read_instances(instances, images_dir=images_dir, label_map=lm, classes=classes,
                            box_tolerance=box_tolerance)
    images, boxes = t.images, t.boxes
    coco_ids = np.asarray(t.coco_image_ids, dtype=np.int64)
    n_missing = 0
    if image_check != "none":
        found = np.fromiter((os.path.isfile(p) for p in images["path"]), dtype=bool, count=len(images))
        if not found.all():
            i = int(np.flatnonzero(~found)[0])
            if missing_images == "error":
                raise InputError(f"image file {images['path'].iloc[i]} not found ({int((~found).sum())} of "
                                 f"{len(images)} missing; --missing-images drop drops them)", file=instances,
                                 row=f"image id {coco_ids[i]}", field="file_name")
            n_missing = int((~found).sum())
            log.warning("%d of %d images not found, dropped with their boxes (first: %s)", n_missing, len(images),
                        images["path"].iloc[i])
            gone = images["image_id"][~found]
            boxes = boxes[~boxes["image_id"].isin(gone).to_numpy()].reset_index(drop=True)
            images, coco_ids = images[found].reset_index(drop=True), coco_ids[found]
        log.info("checking %d images (%s, %d workers)", len(images), image_check, workers)
        wh, bad, reason = image_sizes(list(images["path"]), decode=image_check == "decode", workers=workers)
        if bad >= 0:
            raise InputError(f"corrupt image {images['path'].iloc[bad]}: {reason}", file=instances,
                             row=f"image id {coco_ids[bad]}", field="file_name")
        wrong = (wh[:, 0] != images["width"].to_numpy()) | (wh[:, 1] != images["height"].to_numpy())
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise InputError(f"image {images['path'].iloc[i]} is {wh[i, 0]} x {wh[i, 1]} px, the JSON says "
                             f"{images['width'].iloc[i]} x {images['height'].iloc[i]}", file=instances,
                             row=f"image id {coco_ids[i]}", field="width")
    per_class = boxes["label"].value_counts()
    summary = {
        "format": "coco", "instances": str(instances), "label_map": str(label_map),
        "categories": t.categories, "mapped_categories": len(t.mapped), "classes": len(t.classes),
        "images": len(images),
        "images_without_boxes": int((~images["image_id"].isin(boxes["image_id"])).sum()),
        "boxes": len(boxes), "group_of": int(boxes["is_group_of"].sum()), "clipped_boxes": t.clipped,
        "dropped_boxes": int(sum(t.unmapped.values())), "missing_images_dropped": n_missing,
        "boxes_per_class": {lab: int(per_class.get(lab, 0)) for lab in t.classes["label"]},
        "boxes_per_mapped_category": t.mapped,
        "unmapped_categories": t.unmapped,
    }
    return ExternalTables(boxes=boxes, images=images, classes=t.classes, summary=summary)


def main_coco(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.ingest coco",
                                description="Ingest an external dataset in COCO format (instances JSON + images "
                                            "+ label map) -> boxes, images, classes of the mapped categories.")
    p.add_argument("--instances", type=Path, required=True, help="COCO instances JSON")
    p.add_argument("--images-dir", type=Path, required=True, help="the folder the JSON's file_name values are in")
    p.add_argument("--label-map", type=Path, required=True,
                   help="CSV: category_name (or category_id), mid[, oid_name]; see stages.formats.coco")
    p.add_argument("--classes-csv", type=Path, required=True,
                   help="the OpenImages class descriptions CSV (MID,name, no header) the MIDs must be in")
    p.add_argument("--image-check", choices=COCO_IMAGE_CHECKS, default="header",
                   help="header: each image exists and has the JSON's size (default); decode: decode fully; "
                        "none: trust the JSON")
    p.add_argument("--missing-images", choices=MISSING_IMAGES, default="error",
                   help="an image file that is not there: an error (default), or drop it with its boxes")
    p.add_argument("--box-tolerance", type=float, default=1.0,
                   help="pixels a box may stick out of its image (it is clipped); further out is an error")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes checking images (default: the CPUs this process may use)")
    p.add_argument("--out-dir", type=Path, required=True)
    a = p.parse_args(argv)
    if a.box_tolerance < 0:
        p.error("need --box-tolerance >= 0")
    t = ingest_coco(instances=a.instances, images_dir=a.images_dir, label_map=a.label_map,
                    classes_csv=a.classes_csv, image_check=a.image_check, missing_images=a.missing_images,
                    box_tolerance=a.box_tolerance, workers=max(a.workers, 1))
    prov = {"stage": "ingest", "format": "coco", "source": str(a.instances), "label_map": str(a.label_map)}
    for name in ("boxes", "images", "classes"):
        write_table(a.out_dir / f"{name}.parquet", getattr(t, name), name, provenance=prov)
    # the classes an expert trained on this data contributes, in the mined-set format (stages.experts): the
    # ensembles and the metric read it as they read an expert's (targets only, no negatives)
    write_json(a.out_dir / "targets.json", {"targets": sorted(t.classes["label"]), "negatives": [],
                                            "source": str(a.instances)})
    write_json(a.out_dir / "summary.json", t.summary)
    s = t.summary
    print(f"ingest coco: {s['images']} images, {s['boxes']} boxes of {s['classes']} classes "
          f"({s['mapped_categories']} of {s['categories']} categories mapped; {s['dropped_boxes']} boxes of "
          f"{len(s['unmapped_categories'])} unmapped categories dropped) -> {a.out_dir}")


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["coco"]:
        return main_coco(args[1:])
    p = argparse.ArgumentParser(prog="python -m stages.ingest", description=__doc__.split("\n\n")[0],
                                epilog="python -m stages.ingest coco --help: an external dataset in COCO format")
    p.add_argument("--boxes-csv", type=Path, required=True)
    p.add_argument("--labels-csv", type=Path, required=True)
    p.add_argument("--classes-csv", type=Path, required=True)
    p.add_argument("--hierarchy-json", type=Path, required=True)
    p.add_argument("--images-dir", type=Path, required=True, help="labelled images, flat or in subfolders")
    p.add_argument("--test-dir", type=Path, help="test images (default: --images-dir), flat or in subfolders")
    p.add_argument("--test-list", type=Path, help="CSV with an ImageID column listing the test images")
    p.add_argument("--sample-submission", type=Path,
                   help="the Kaggle sample submission: its ImageId column lists the test images "
                        "(without --test-list)")
    p.add_argument("--known-images", type=Path, nargs="+",
                   help="images tables (parquet) whose rows are taken as they are, e.g. an earlier run's")
    p.add_argument("--image-check", choices=IMAGE_CHECKS, default="header",
                   help="read each image's header (format, size), or decode it fully (slower, stronger)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes checking images (default: the CPUs this process may use)")
    p.add_argument("--image-level-only", choices=IMAGE_LEVEL_ONLY,
                   default=schema_default("dataset", "image_level_only"),
                   help="images with image labels but no box: keep them (images.box_annotated false) or drop them")
    p.add_argument("--plain-list", type=Path,
                   help="CSV with an ImageID column: the plain-background images (flag images.plain_background); "
                        "a missing file means none")
    p.add_argument("--out-dir", type=Path, required=True)
    a = p.parse_args(args)
    known = pd.concat([read_table(k, "images") for k in a.known_images], ignore_index=True).drop_duplicates(
        "image_id") if a.known_images else None
    t = ingest(boxes_csv=a.boxes_csv, labels_csv=a.labels_csv, classes_csv=a.classes_csv,
               hierarchy_json=a.hierarchy_json, images_dir=a.images_dir, test_dir=a.test_dir,
               test_list=a.test_list, sample_submission=a.sample_submission, known_images=known,
               image_check=a.image_check, workers=max(a.workers, 1), image_level=a.image_level_only,
               plain_list=a.plain_list)
    prov = {"stage": "ingest", "source": str(a.boxes_csv)}
    for name, table in [("boxes", "boxes"), ("image_labels", "image_labels"), ("images", "images"),
                        ("test_images", "images"), ("classes", "classes"), ("hierarchy", "hierarchy")]:
        write_table(a.out_dir / f"{name}.parquet", getattr(t, name), table, provenance=prov)
    summary = {"classes": len(t.classes), "boxes": len(t.boxes), "group_of": int(t.boxes["is_group_of"].sum()),
               "image_labels": len(t.image_labels),
               "negative_labels": int((t.image_labels["confidence"] == 0).sum()),
               "images": len(t.images), "test_images": len(t.test_images), **(t.weak or {})}
    write_json(a.out_dir / "summary.json", summary)
    print("ingest: " + ", ".join(f"{k}={v}" for k, v in summary.items() if k != "image_level_only_per_class"))


if __name__ == "__main__":
    raise SystemExit(main())
