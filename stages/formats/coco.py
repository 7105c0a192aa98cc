"""COCO-format instance annotations <-> canonical tables. The only module that knows COCO's JSON keys.

External datasets (COCO, Objects365, the generator's ``external/`` set) come as one COCO *instances* JSON::

    {"images":      [{"id": int, "file_name": str, "width": int, "height": int, ...}, ...],
     "annotations": [{"id": int, "image_id": int, "category_id": int, "bbox": [x, y, w, h],
                      "iscrowd": 0 | 1 (optional, default 0), ...}, ...],
     "categories":  [{"id": int, "name": str, ...}, ...]}

``bbox`` is ``xywh_abs`` (pixels, top-left corner and size). The file is read through pycocotools (``COCO``)
and then checked: a check names the file, the record (``annotation id 7``, ``image id 3``, ``category id 5``, or
``annotations[12]`` when the record has no id) and the key. Keys other than those above are ignored
(``segmentation``, ``area`` ...).

Canonical tables made from it:

- ``images``: ``image_id`` is the stem of ``file_name`` (as for OpenImages, where an image file is named by its
  id; stems must be unique), ``path`` is ``images_dir / file_name``, width and height from the JSON;
- ``boxes``: ``xyxy_norm``; ``is_group_of`` from ``iscrowd``; ``label`` the OpenImages MID the category maps to.
  A box may stick out of its image by up to ``box_tolerance`` pixels (rounding in real files) and is then
  clipped; further out is an error. Boxes of categories without a MID are dropped and counted;
- ``classes``: the MIDs the label map uses for the file's categories, with their OpenImages display names.

The **label map** is a CSV with a header: one row per mapped external category::

    category_name,mid,oid_name,match,note
    motorcycle,/m/04_sv,Motorcycle,exact,
    tv,/m/07c52,Television,approximate,COCO's tv also holds computer monitors

- ``category_name`` (the category's ``name`` in the JSON, compared after stripping blanks) **or**
  ``category_id`` (its integer ``id``): exactly one of the two columns, which says how categories are named;
- ``mid``: an OpenImages MID of the classes CSV (``--classes-csv``);
- ``oid_name`` (optional): that MID's display name, checked against the classes CSV (catches a MID typed wrong);
- any other column (``match``, ``note``) is documentation and is not read.

Several categories may map to one MID; one category may not be listed twice (twice with different MIDs is
reported as ambiguous). A listed category that the JSON does not have is an error (a typo, or a label map of
another release of the dataset); categories the map does not list are dropped (counted per category).

:func:`to_coco` writes canonical tables back as a COCO instances dict (round trip, and the generator's external
dataset).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.errors import InputError
from stages.formats.io import read_json, write_text
from stages.formats.openimages import _read_csv
from stages.formats.tables import conform

log = logging.getLogger(__name__)

LABEL_MAP_KEYS = ("category_name", "category_id")
#: required keys of each record kind (the top-level key -> its records' keys)
REQUIRED = {
    "images": ("id", "file_name", "width", "height"),
    "categories": ("id", "name"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
}
_RECORD = {"images": "image", "categories": "category", "annotations": "annotation"}


# ----- label map ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelMap:
    """External category -> OpenImages MID. ``key`` is ``category_name`` or ``category_id``; ``categories``
    holds names (stripped) or integer ids, in file order, ``mids`` the MID of each, ``lines`` their CSV lines."""

    key: str
    categories: tuple[str | int, ...]
    mids: tuple[str, ...]
    lines: tuple[int, ...]
    source: str = ""

    def as_dict(self) -> dict[str | int, str]:
        return dict(zip(self.categories, self.mids))


def read_label_map(path: str | os.PathLike, *, classes: pd.DataFrame) -> LabelMap:
    """Read and check a label map against the OpenImages ``classes`` table (label, name)."""
    path = Path(path)
    df = _read_csv(path, ["mid"])
    keys = [k for k in LABEL_MAP_KEYS if k in df.columns]
    if len(keys) != 1:
        raise InputError(f"the header needs exactly one of the columns {list(LABEL_MAP_KEYS)}, has "
                         f"{list(df.columns)}", file=path, row=1, field=keys[1] if keys else LABEL_MAP_KEYS[0])
    key = keys[0]
    names = dict(zip(classes["label"], classes["name"]))
    cats: list[str | int] = []
    seen: dict[str | int, tuple[str, int]] = {}
    for i, (raw, mid) in enumerate(zip(df[key], df["mid"])):
        line = i + 2
        text = raw.strip()
        if not text:
            raise InputError("empty category", file=path, row=line, field=key)
        if key == "category_id":
            try:
                cat: str | int = int(text)
            except ValueError:
                raise InputError(f"not an integer category id: {raw!r}", file=path, row=line, field=key) from None
        else:
            cat = text
        mid = mid.strip()
        if not mid:
            raise InputError(f"empty MID for category {cat!r}", file=path, row=line, field="mid")
        if mid not in names:
            raise InputError(f"unknown MID {mid!r}: not in the OpenImages class list", file=path, row=line,
                             field="mid")
        if "oid_name" in df.columns and df["oid_name"].iloc[i].strip() != names[mid]:
            raise InputError(f"oid_name {df['oid_name'].iloc[i]!r} is not the name of {mid} ({names[mid]!r})",
                             file=path, row=line, field="oid_name")
        if cat in seen:
            first_mid, first_line = seen[cat]
            what = "listed twice" if first_mid == mid else \
                f"ambiguous: mapped to {first_mid} on line {first_line} and to {mid}"
            raise InputError(f"category {cat!r} {what}", file=path, row=line, field=key)
        seen[cat] = (mid, line)
        cats.append(cat)
    return LabelMap(key=key, categories=tuple(cats), mids=tuple(seen[c][0] for c in cats),
                    lines=tuple(seen[c][1] for c in cats), source=str(path))


# ----- reading -----------------------------------------------------------------------------------------------
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _where(kind: str, rec: object, i: int) -> str:
    """How an error names a record: by its id when it has an integer one, else by its position."""
    if isinstance(rec, dict) and _is_int(rec.get("id")):
        return f"{_RECORD[kind]} id {rec['id']}"
    return f"{kind}[{i}]"


def _check_structure(data: object, path: Path) -> None:
    """Top-level object with the three lists, each record an object with its required keys and integer ids,
    no id twice within a list. Python per record (the JSON is Python objects already)."""
    if not isinstance(data, dict):
        raise InputError("not a COCO instances file: the top level is a JSON "
                         f"{type(data).__name__}, not an object", file=path)
    for kind, required in REQUIRED.items():
        if kind not in data:
            raise InputError(f"missing key {kind!r} (a COCO instances file has images, annotations and "
                             "categories)", file=path, field=kind)
        recs = data[kind]
        if not isinstance(recs, list):
            raise InputError(f"{kind!r} must be a list, is a JSON {type(recs).__name__}", file=path, field=kind)
        for i, rec in enumerate(recs):
            if not isinstance(rec, dict):
                raise InputError(f"a record of {kind!r} is not an object", file=path, row=f"{kind}[{i}]")
            for k in required:
                if k not in rec:
                    raise InputError(f"missing key {k!r}", file=path, row=_where(kind, rec, i), field=k)
            if not _is_int(rec["id"]):
                raise InputError(f"id must be an integer, got {rec['id']!r}", file=path, row=f"{kind}[{i}]",
                                 field="id")
        ids = pd.Series([r["id"] for r in recs], dtype=np.int64)
        dup = ids.duplicated().to_numpy()
        if dup.any():
            i = int(np.flatnonzero(dup)[0])
            raise InputError(f"duplicate {_RECORD[kind]} id {ids.iloc[i]} ({kind}[{i}])", file=path,
                             row=_where(kind, recs[i], i), field="id")


def load(path: str | os.PathLike) -> object:
    """A COCO instances file through pycocotools' ``COCO`` (its index), checked for structure
    (:func:`_check_structure`). pycocotools' progress lines go to the debug log, not stdout."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=path)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            coco = COCO(str(path))
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON: {exc.msg} (column {exc.colno})", file=path, row=exc.lineno) from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text: {exc}", file=path) from exc
    except (AssertionError, KeyError, TypeError, AttributeError, IndexError) as exc:
        # pycocotools could not index it (a record without its id, a list where an object belongs ...):
        # find the first offending record ourselves, by the same checks as below
        _check_structure(read_json(path), path)
        raise InputError(f"not a COCO instances file ({type(exc).__name__}: {exc})", file=path) from exc
    log.debug("pycocotools: %s", out.getvalue().strip().replace("\n", "; "))
    _check_structure(coco.dataset, path)
    return coco


def _positive_int(values: list, what: str, recs: list, path: Path) -> np.ndarray:
    for i, v in enumerate(values):
        if not ((_is_int(v) or (isinstance(v, float) and v.is_integer())) and v > 0):
            raise InputError(f"{what} must be a positive integer, got {v!r}", file=path,
                             row=_where("images", recs[i], i), field=what)
    return np.asarray(values, dtype=np.int64)


def _bbox_array(anns: list, path: Path) -> np.ndarray:
    """(n, 4) float64 ``[x, y, w, h]``; the first bbox that is not 4 finite numbers with w, h >= 0 is an
    error."""
    raw = [a["bbox"] for a in anns]
    try:
        b = np.asarray(raw, dtype=np.float64).reshape(len(raw), 4) if raw else np.zeros((0, 4))
    except (TypeError, ValueError):
        b = None
    if b is None or not np.isfinite(b).all():
        for i, v in enumerate(raw):
            ok = isinstance(v, list) and len(v) == 4 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            if not ok:
                raise InputError(f"bbox must be [x, y, width, height] (4 finite numbers), got {v!r}", file=path,
                                 row=_where("annotations", anns[i], i), field="bbox")
        raise InputError("bbox must be [x, y, width, height] (4 finite numbers)", file=path, field="bbox")
    neg = (b[:, 2:] < 0).any(axis=1)
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise InputError(f"bbox {raw[i]!r} has a negative width or height", file=path,
                         row=_where("annotations", anns[i], i), field="bbox")
    return b


@dataclass(frozen=True)
class CocoTables:
    """What :func:`read_instances` makes of a COCO instances file and a label map."""

    boxes: pd.DataFrame
    images: pd.DataFrame
    classes: pd.DataFrame
    #: external category name -> boxes dropped because the label map does not map it (every unmapped category
    #: of the file, 0 where it has no box)
    unmapped: dict[str, int] = field(default_factory=dict)
    #: external category name -> boxes kept, for the mapped categories
    mapped: dict[str, int] = field(default_factory=dict)
    categories: int = 0
    #: boxes that stuck out of their image by at most the tolerance and were clipped
    clipped: int = 0
    #: the COCO image id of each ``images`` row (for messages)
    coco_image_ids: tuple[int, ...] = ()


def read_instances(path: str | os.PathLike, *, images_dir: str | os.PathLike, label_map: LabelMap,
                   classes: pd.DataFrame, box_tolerance: float = 1.0) -> CocoTables:
    """A COCO instances file -> canonical ``boxes``, ``images`` and ``classes`` of the mapped categories.

    ``classes`` is the OpenImages classes table (label, name) the label map was checked against;
    ``box_tolerance`` the pixels a box may stick out of its image (then clipped).
    """
    path = Path(path)
    coco = load(path)
    data = coco.dataset
    imgs, anns, cats = data["images"], data["annotations"], data["categories"]

    # images: ids, stems, sizes (os.path, not pathlib: a million file names)
    root = str(images_dir)
    img_ids = pd.Index([r["id"] for r in imgs], dtype=np.int64)
    files = []
    for i, r in enumerate(imgs):
        f = r["file_name"]
        if not isinstance(f, str) or not f.strip() or not _stem(f):
            raise InputError(f"file_name must be a non-empty path, got {f!r}", file=path,
                             row=_where("images", r, i), field="file_name")
        files.append(f)
    widths = _positive_int([r["width"] for r in imgs], "width", imgs, path)
    heights = _positive_int([r["height"] for r in imgs], "height", imgs, path)
    stems = pd.Series([_stem(f) for f in files], dtype=object)
    dup = stems.duplicated(keep=False).to_numpy()
    if dup.any():
        first, second = np.flatnonzero(dup)[:2]
        raise InputError(f"image ids {imgs[first]['id']} and {imgs[second]['id']} share the file name stem "
                         f"{stems.iloc[second]!r} (the canonical image id)", file=path,
                         row=_where("images", imgs[second], int(second)), field="file_name")

    # categories: id -> name, and the label map's MID of each
    cat_ids = pd.Index([c["id"] for c in cats], dtype=np.int64)
    cat_names = []
    for i, c in enumerate(cats):
        if not isinstance(c["name"], str):
            raise InputError(f"name must be a string, got {c['name']!r}", file=path,
                             row=_where("categories", c, i), field="name")
        cat_names.append(c["name"].strip())
    lm_path = label_map.source or "label map"
    keys = list(cat_names) if label_map.key == "category_name" else list(cat_ids)
    key_pos: dict[str | int, int] = {}
    for i, k in enumerate(keys):
        key_pos.setdefault(k, i)
    wanted = label_map.as_dict()
    for cat, line in zip(label_map.categories, label_map.lines):
        if cat not in key_pos:
            raise InputError(f"category {cat!r} is not in {path.name} (its categories: "
                             f"{_preview(cat_names if label_map.key == 'category_name' else list(cat_ids))})",
                             file=lm_path, row=line, field=label_map.key)
        if label_map.key == "category_name" and keys.count(cat) > 1:
            twice = [int(cat_ids[i]) for i, k in enumerate(keys) if k == cat]
            raise InputError(f"ambiguous: {path.name} has {len(twice)} categories named {cat!r} (ids {twice}); "
                             "map them by category_id", file=lm_path, row=line, field=label_map.key)
    cat_mid = np.array([wanted.get(k) for k in keys], dtype=object)        # None: unmapped

    # annotations
    n = len(anns)
    ann_img = pd.Index([a["image_id"] for a in anns], dtype=object)
    ann_cat = pd.Index([a["category_id"] for a in anns], dtype=object)
    img_pos = img_ids.get_indexer(ann_img) if n else np.zeros(0, np.int64)
    cat_pos = cat_ids.get_indexer(ann_cat) if n else np.zeros(0, np.int64)
    for pos, what, values in ((img_pos, "image_id", ann_img), (cat_pos, "category_id", ann_cat)):
        bad = pos < 0
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            noun, nouns = ("image", "images") if what == "image_id" else ("category", "categories")
            raise InputError(f"unknown {noun} id {values[i]!r}: not among {path.name}'s {nouns}",
                             file=path, row=_where("annotations", anns[i], i), field=what)
    b = _bbox_array(anns, path)
    crowd_raw = [a.get("iscrowd", 0) for a in anns]
    crowd_ok = np.asarray([isinstance(v, bool) or (_is_int(v) and v in (0, 1)) for v in crowd_raw], dtype=bool)
    if not crowd_ok.all():
        i = int(np.flatnonzero(~crowd_ok)[0])
        raise InputError(f"iscrowd must be 0 or 1, got {crowd_raw[i]!r}", file=path,
                         row=_where("annotations", anns[i], i), field="iscrowd")
    w = widths[img_pos].astype(np.float64)
    h = heights[img_pos].astype(np.float64)
    x0, y0 = b[:, 0], b[:, 1]
    x1, y1 = x0 + b[:, 2], y0 + b[:, 3]
    out = np.maximum.reduce([-x0, -y0, x1 - w, y1 - h]) if n else np.zeros(0)
    bad = out > box_tolerance
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"box {list(map(float, b[i]))} (x, y, width, height) lies outside its image "
                         f"({int(w[i])} x {int(h[i])} px, image id {ann_img[i]}) by {out[i]:.3g} px "
                         f"(tolerance {box_tolerance:g})", file=path, row=_where("annotations", anns[i], i),
                         field="bbox")
    clipped = int((out > 0).sum())
    xyxy = np.stack([np.clip(x0 / w, 0, 1), np.clip(y0 / h, 0, 1), np.clip(x1 / w, 0, 1), np.clip(y1 / h, 0, 1)],
                    axis=1) if n else np.zeros((0, 4))

    mids = cat_mid[cat_pos] if n else np.zeros(0, dtype=object)
    keep = np.array([m is not None for m in mids], dtype=bool)
    per_cat = np.bincount(cat_pos, minlength=len(cats)) if n else np.zeros(len(cats), np.int64)
    unmapped = {cat_names[i]: int(per_cat[i]) for i in range(len(cats)) if cat_mid[i] is None}
    mapped = {cat_names[i]: int(per_cat[i]) for i in range(len(cats)) if cat_mid[i] is not None}
    if unmapped:
        log.info("%d of %d categories unmapped: %d boxes dropped (%s)", len(unmapped), len(cats),
                 sum(unmapped.values()), _preview(sorted(unmapped, key=lambda c: -unmapped[c])))

    boxes = pd.DataFrame({"image_id": stems.to_numpy()[img_pos[keep]], "label": mids[keep],
                          "x_min": xyxy[keep, 0], "y_min": xyxy[keep, 1], "x_max": xyxy[keep, 2],
                          "y_max": xyxy[keep, 3], "is_group_of": np.asarray(crowd_raw, dtype=bool)[keep]
                          if n else np.zeros(0, bool)})
    images = pd.DataFrame({"image_id": stems.to_numpy(), "path": [os.path.join(root, f) for f in files],
                           "width": widths, "height": heights})
    used = list(dict.fromkeys(m for m in cat_mid if m is not None))
    names = dict(zip(classes["label"], classes["name"]))
    cls = pd.DataFrame({"label": used, "name": [names[m] for m in used]})
    return CocoTables(boxes=conform(boxes, "boxes", source=path), images=conform(images, "images", source=path),
                      classes=conform(cls, "classes", source=path), unmapped=unmapped, mapped=mapped,
                      categories=len(cats), clipped=clipped, coco_image_ids=tuple(int(i) for i in img_ids))


def _stem(file_name: str) -> str:
    """The image id a file name gives: its base name without the extension (as ``Path.stem``)."""
    return os.path.splitext(os.path.basename(file_name))[0]


def _preview(items: Sequence[object], k: int = 8) -> str:
    items = list(items)
    return ", ".join(repr(x) for x in items[:k]) + (f", ... ({len(items)} in all)" if len(items) > k else "")


# ----- writing -----------------------------------------------------------------------------------------------
def to_coco(*, boxes: pd.DataFrame, images: pd.DataFrame, classes: pd.DataFrame,
            images_dir: str | os.PathLike | None = None, category_ids: Mapping[str, int] | None = None,
            description: str = "written by orchard", decimals: int = 3) -> dict:
    """Canonical tables -> a COCO instances dict (bbox-only: no ``segmentation``).

    Images get ids 1..M in ``images`` order, annotations 1..N in ``boxes`` order, categories the ids of
    ``category_ids`` (label -> id) or 1..K in ``classes`` order, named by ``classes.name``. ``file_name`` is each
    image's path relative to ``images_dir`` (default: its base name); its stem must be the image id (so that
    :func:`read_instances` reads the same ids back). Box corners are written in pixels rounded to ``decimals``.
    A box whose image or label is not in ``images`` / ``classes`` is a ``ValueError``.
    """
    images = images.reset_index(drop=True)
    paths = [Path(p) for p in images["path"]]
    wrong = [i for i, (p, iid) in enumerate(zip(paths, images["image_id"])) if p.stem != iid]
    if wrong:
        i = wrong[0]
        raise ValueError(f"image {images['image_id'].iloc[i]!r}: its file {paths[i]} is not named by its id")
    files = [p.name if images_dir is None else Path(os.path.relpath(p, images_dir)).as_posix() for p in paths]
    labels = list(classes["label"])
    ids = [int(category_ids[lab]) for lab in labels] if category_ids is not None else \
        list(range(1, len(labels) + 1))
    if len(set(ids)) != len(ids):
        raise ValueError(f"category ids are not distinct: {ids}")
    img_pos = pd.Index(images["image_id"], dtype=object).get_indexer(pd.Index(boxes["image_id"], dtype=object))
    lab_pos = pd.Index(labels, dtype=object).get_indexer(pd.Index(boxes["label"], dtype=object))
    for pos, col in ((img_pos, "image_id"), (lab_pos, "label")):
        if (pos < 0).any():
            raise ValueError(f"box {col} {boxes[col].iloc[int(np.flatnonzero(pos < 0)[0])]!r} is not in the "
                             f"{'images' if col == 'image_id' else 'classes'} table")
    w = images["width"].to_numpy(np.float64)[img_pos]
    h = images["height"].to_numpy(np.float64)[img_pos]
    x0 = np.round(boxes["x_min"].to_numpy(np.float64) * w, decimals)
    y0 = np.round(boxes["y_min"].to_numpy(np.float64) * h, decimals)
    bw = np.round(boxes["x_max"].to_numpy(np.float64) * w - x0, decimals)
    bh = np.round(boxes["y_max"].to_numpy(np.float64) * h - y0, decimals)
    crowd = boxes["is_group_of"].to_numpy(bool).astype(int)
    cat = np.asarray(ids, dtype=np.int64)[lab_pos] if len(labels) else np.zeros(0, np.int64)
    return {
        "info": {"description": description},
        "licenses": [],
        "images": [{"id": i + 1, "file_name": f, "width": int(wd), "height": int(ht)}
                   for i, (f, wd, ht) in enumerate(zip(files, images["width"], images["height"]))],
        "annotations": [{"id": k + 1, "image_id": int(ip) + 1, "category_id": int(c),
                         "bbox": [float(a), float(b_), float(c_), float(d)],
                         "area": float(round(c_ * d, decimals)), "iscrowd": int(g)}
                        for k, (ip, c, a, b_, c_, d, g) in enumerate(zip(img_pos, cat, x0, y0, bw, bh, crowd))],
        "categories": [{"id": i, "name": str(n), "supercategory": ""} for i, n in zip(ids, classes["name"])],
    }


def write_instances(path: str | os.PathLike, coco: Mapping) -> None:
    """Write a COCO instances dict as compact JSON, atomically."""
    write_text(path, json.dumps(coco, separators=(",", ":")) + "\n")


__all__ = ["LABEL_MAP_KEYS", "CocoTables", "LabelMap", "load", "read_instances", "read_label_map", "to_coco",
           "write_instances"]
