"""Generate the built-in dataset ``orchard-mini``: a small, deterministic, offline OpenImages-Challenge-format
dataset whose content has every phenomenon the MMfruit tricks exist for.

Content: real handwritten digits (scikit-learn's 8x8 digits, upscaled) and simple shapes pasted in colour onto
crops of the photos bundled with scikit-learn and scikit-image (:mod:`stages.data.draw`); the 14 leaf classes and
their 3-level hierarchy are in :mod:`stages.data.taxonomy`. Phenomena:

- long tail: the primary class of each placement is drawn from a Zipf law over the leaves (most/rarest >= 20
  at the default size), so class-aware sampling has something to fix;
- hierarchy: >= 3 levels below the root, "Digit six" under two parents; only leaves carry boxes;
- group-of: some placements are tight clusters of 4-8 small same-class objects with one ``IsGroupOf=1`` box
  around them (the members are not boxed);
- verified-absent image labels (``Confidence=0``), preferring the confusable partner of a present class;
- confusable pairs (3/8 and 1/7, same colour);
- co-occurrence ("Disc" almost always sits on a "Pole") and surround ("Frame" holds 1-2 digits; "Digit nine"
  mostly sits inside a frame);
- extreme aspect ratio ("Pole", about 1:8);
- difficulty (:class:`Difficulty`, ``--difficulty``; default 1, calibrated so that the default small detector
  reaches mAP@0.5 of about 0.5-0.6 on val_a instead of ~0.95 at level 0): small objects (mostly 16-40 px),
  3-7 placements per image with partial occlusion (``IsOccluded=1``), per-instance colour and opacity jitter
  (colour alone no longer names a class; the confusable pairs differ by shape), unlabelled clutter (strokes,
  blobs, bars, arcs, photo patches), per-image blur, noise and JPEG quality. Level 0 reproduces the original
  easy dataset byte for byte.

Layout: :func:`plan_dataset` decides every image, box and label (cheap, no pixels) by the recipe of each split
(:func:`plan_split`): the long tail of classes (:class:`LongTail`), the units that show them (:class:`Units`, of
:class:`Objects`), their placement and occlusion (:func:`place`, :func:`mark_occluded`) and the labels of each
image (:func:`plan_image`, :func:`verified_absent`); :func:`render_image` draws one planned image and its
instance masks; :func:`generate` writes the files atomically (the whole directory is built next to ``out_dir``
and renamed into place).

Files written (OpenImages Challenge 2019 names and columns)::

    images/<ImageID>.jpg                                 labelled images
    test/<ImageID>.jpg                                   unlabelled test images; test-images.csv lists them
    challenge-2019-train-detection-bbox.csv
    challenge-2019-train-detection-human-imagelabels.csv
    challenge-2019-classes-description-500.csv           MID,name (no header), parents included
    challenge-2019-label500-hierarchy.json
    challenge-2019-train-segmentation.csv + masks/<ImageID>_<MID without '/'>_<BoxID>.png (0/255, image size),
                                                         one per drawn non-group-of box of a segmentable class
    challenge-2019-classes-description-segmentable.csv   MID,name (no header): the segmentable classes (every
                                                         class but "Frame"), parents included
    challenge-2019-label-segmentable-hierarchy.json      the hierarchy pruned to the segmentable classes
    summary.json                                         class counts and the phenomena, measured

With ``--external N`` (``n_external_images``; off by default) it also writes a small *external* dataset in COCO
format, drawn by the same code from its own random streams (the files above do not change)::

    external/instances.json                              COCO instances (bbox-only; iscrowd = group-of)
    external/images/<ImageID>.jpg                        ImageIDs "ext" + 13 hex digits
    external/label_map.csv                               category_name,mid,oid_name,match,note

Its categories (:data:`stages.data.taxonomy.EXTERNAL_CATEGORIES`) have their own names ("digit-six", "ball"):
six show orchard-mini leaf classes (mapped to their MIDs by ``label_map.csv``), two ("square", "plus-sign")
show shapes orchard-mini does not have (unmapped). ``python -m stages.ingest coco`` reads it back.

Weak labels (issue 15; each off by default, and off the files are byte-identical to a run without the option):

- ``--image-level-images N``: N images with image-level labels only (positives + verified-absent labels appended
  to the image-labels CSV, JPEGs in ``images/``, no box or mask rows: how OpenImages ships its image-level-only
  images), laid out like the labelled ones, their primary classes skewed to the tail (:func:`tail_skewed`);
- ``--plain-images N``: N image-level-only images of one large object on a flat background, listed in
  ``plain-background-images.csv`` (ImageID; OpenImages has no such file);
  both from their own random streams (:func:`plan_weak`): the other images and boxes do not change;
- ``--confusing-pair``: the planted confusing pair :data:`CONFUSING_PAIR` ("Digit seven" drawn from the glyphs
  of sevens and ones), named in ``summary.json`` (``confusing_pair``);
- ``--group-of-masks``: :data:`GROUP_OF_HEAVY` ("Triangle") mostly group-of, and instance masks for the members
  of group-of clusters (what :mod:`stages.mask_boxes` turns into instance boxes), in ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages.core.cli import stage_main
from stages.core.config import schema_default
from stages.data import draw
from stages.data import taxonomy as tx
from stages.formats.openimages import BBOX_COLUMNS, LABEL_COLUMNS, MASK_COLUMNS
from stages.ops.boxes import box_ioa, paired_ioa

log = logging.getLogger(__name__)

_SEGMENTABLE = frozenset(tx.SEGMENTABLE)

BBOX_CSV = "challenge-2019-train-detection-bbox.csv"
LABELS_CSV = "challenge-2019-train-detection-human-imagelabels.csv"
CLASSES_CSV = "challenge-2019-classes-description-500.csv"
HIERARCHY_JSON = "challenge-2019-label500-hierarchy.json"
SEGMENTATION_CSV = "challenge-2019-train-segmentation.csv"
SEG_CLASSES_CSV = "challenge-2019-classes-description-segmentable.csv"
SEG_HIERARCHY_JSON = "challenge-2019-label-segmentable-hierarchy.json"
TEST_CSV = "test-images.csv"
#: ImageID of each plain-background image (written only when there are some; OpenImages has no such file)
PLAIN_CSV = "plain-background-images.csv"
SUMMARY_JSON = "summary.json"
IMAGES_DIR, TEST_DIR, MASKS_DIR = "images", "test", "masks"
EXTERNAL_DIR, EXTERNAL_INSTANCES, EXTERNAL_LABEL_MAP = "external", "instances.json", "label_map.csv"


# ----- the plan ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedObject:
    """One drawn object or one group-of box. Coordinates are ``xyxy_abs`` pixels, ``[x0, x1) x [y0, y1)``.

    ``kind`` is a :class:`~stages.data.taxonomy.ClassSpec` kind, or 'group' for a group-of box (not drawn).
    ``boxed`` is False for the members of a group-of cluster (drawn, not annotated)."""

    label: str
    kind: str
    x0: int
    y0: int
    x1: int
    y1: int
    boxed: bool = True
    is_group_of: bool = False
    is_occluded: int = 0
    glyph: int = -1
    color: tuple[int, int, int] = (0, 0, 0)
    shade: float = 1.0
    thickness: int = 0
    box_id: str = ""
    opacity: float = 1.0
    member_mask: bool = False  # a group-of member with its own instance mask (``group_of_masks``)

    def moved(self, dx: int, dy: int, box_id: str = "") -> PlannedObject:
        return replace(self, x0=self.x0 + dx, y0=self.y0 + dy, x1=self.x1 + dx, y1=self.y1 + dy,
                       box_id=box_id or self.box_id)

    @property
    def masked(self) -> bool:
        """Has an instance mask drawn (a boxed, drawn, non-group-of object, or a group-of member with
        ``member_mask``)."""
        return (self.boxed and not self.is_group_of) or self.member_mask

    @property
    def segmented(self) -> bool:
        """Its mask is written: a masked object of a segmentable class (``taxonomy.SEGMENTABLE``)."""
        return self.masked and self.label in _SEGMENTABLE


@dataclass(frozen=True)
class PlannedImage:
    image_id: str
    split: str  # "train" (labelled) or "test" (unlabelled)
    width: int
    height: int
    render_seed: int
    objects: tuple[PlannedObject, ...]  # in drawing order
    negatives: tuple[str, ...] = ()  # verified-absent leaf classes
    difficulty: float = 0.0  # drives the render-time clutter and degradations (see :class:`Difficulty`)
    box_annotated: bool = True  # False: image-level labels only (its objects are drawn, no box is written)
    plain: bool = False  # a single object on a plain background (rendered without the photo and clutter)

    @property
    def boxes(self) -> tuple[PlannedObject, ...]:
        return tuple(o for o in self.objects if o.boxed)


@dataclass(frozen=True)
class DatasetPlan:
    images: tuple[PlannedImage, ...]
    seed: int
    #: image-level-only images (:func:`plan_weak`): labelled, no boxes; not in ``images`` (nor ``train``)
    weak: tuple[PlannedImage, ...] = ()
    #: the planted confusing pair (:data:`CONFUSING_PAIR`), when on
    confusing_pair: bool = False
    #: :data:`GROUP_OF_HEAVY` mostly group-of, group-of members with masks, when on
    group_of_masks: bool = False

    @property
    def train(self) -> tuple[PlannedImage, ...]:
        return tuple(im for im in self.images if im.split == "train")

    @property
    def test(self) -> tuple[PlannedImage, ...]:
        return tuple(im for im in self.images if im.split == "test")

    def bbox_frame(self) -> pd.DataFrame:
        """The challenge bbox CSV rows of the labelled images (sorted by ImageID, then drawing order)."""
        rows = []
        for im in sorted(self.train, key=lambda i: i.image_id):
            for o in im.boxes:
                rows.append((im.image_id, "xclick", o.label, 1, o.x0 / im.width, o.x1 / im.width,
                             o.y0 / im.height, o.y1 / im.height, o.is_occluded, 0, int(o.is_group_of), 0, 0))
        df = pd.DataFrame(rows, columns=BBOX_COLUMNS)
        for c in ("XMin", "XMax", "YMin", "YMax"):
            df[c] = df[c].map(lambda v: f"{v:.6f}")
        return df

    def image_labels_frame(self) -> pd.DataFrame:
        """The human-verified image labels of the labelled images (sorted by ImageID), then those of the
        image-level-only images (sorted by ImageID; appended, so the rows of the box-annotated images are the
        same with and without them)."""
        rows = []
        for group in (self.train, self.weak):
            for im in sorted(group, key=lambda i: i.image_id):
                present = sorted({o.label for o in im.boxes})
                rows += [(im.image_id, "verification", lab, 1) for lab in present]
                rows += [(im.image_id, "verification", lab, 0) for lab in sorted(im.negatives)]
        return pd.DataFrame(rows, columns=LABEL_COLUMNS)

    def weak_class_counts(self) -> pd.DataFrame:
        """Per leaf class: image-level-only images with the class positive (all / plain-background ones) and
        verified absent."""
        rows = {lab: {"label": lab, "name": tx.BY_LABEL[lab].name, "images": 0, "plain": 0, "negatives": 0}
                for lab in tx.LEAVES}
        for im in self.weak:
            for lab in {o.label for o in im.boxes}:
                rows[lab]["images"] += 1
                rows[lab]["plain"] += int(im.plain)
            for lab in im.negatives:
                rows[lab]["negatives"] += 1
        return pd.DataFrame(list(rows.values()))

    def segmentation_frame(self) -> pd.DataFrame:
        rows = []
        for im in sorted(self.train, key=lambda i: i.image_id):
            for o in im.objects:
                if o.segmented:
                    rows.append((mask_path(im.image_id, o), im.image_id, o.label, o.box_id,
                                 f"{o.x0 / im.width:.6f}", f"{o.x1 / im.width:.6f}", f"{o.y0 / im.height:.6f}",
                                 f"{o.y1 / im.height:.6f}", "1.00", ""))
        return pd.DataFrame(rows, columns=MASK_COLUMNS)

    def class_counts(self) -> pd.DataFrame:
        """Per leaf class: boxes (group-of included), group-of boxes, images with the class, verified-absent
        labels — over the labelled images."""
        rows = []
        for lab in tx.LEAVES:
            rows.append({"label": lab, "name": tx.BY_LABEL[lab].name, "boxes": 0, "group_of": 0, "images": 0,
                         "negatives": 0})
        idx = {lab: i for i, lab in enumerate(tx.LEAVES)}
        for im in self.train:
            seen = set()
            for o in im.boxes:
                r = rows[idx[o.label]]
                r["boxes"] += 1
                r["group_of"] += int(o.is_group_of)
                seen.add(o.label)
            for lab in seen:
                rows[idx[lab]]["images"] += 1
            for lab in im.negatives:
                rows[idx[lab]]["negatives"] += 1
        return pd.DataFrame(rows)


DEFAULT_DIFFICULTY = 1.0
MAX_DIFFICULTY = 2.0


@dataclass(frozen=True)
class Difficulty:
    """How hard the dataset is, from one number ``level`` >= 0: 0 is the original easy look (big, saturated,
    class-coloured objects, sparse and never occluding, on a dimmed photo); 1 (the default) is calibrated so
    that the default small detector reaches mAP@0.5 of about 0.5-0.6 on val_a. Every parameter moves linearly
    from its level-0 to its level-1 value (and on past 1, clamped to sane bounds):

    - smaller objects (digits 16-60 px tall instead of 28-90) and smaller group-of members;
    - more placements per image (3-7 instead of 2-4), allowed to overlap: a later unit may cover up to
      ``max_cover`` of an earlier object's box, which is then marked ``IsOccluded=1``;
    - rarer rare classes (steeper Zipf law);
    - per-instance colour jitter (a share of the objects is recoloured at random, the rest drift towards a
      random colour) and opacity, so colour alone no longer names the class: the confusable pairs (same base
      colour) must be told apart by shape; weaker rim and drop shadow, a less dimmed background;
    - unlabelled clutter: pen strokes, blobs, bars, arcs and photo patches, often in the class colours;
    - per-image blur, sensor noise and JPEG quality.
    """

    level: float = DEFAULT_DIFFICULTY

    def __post_init__(self):
        if not 0.0 <= self.level <= MAX_DIFFICULTY:
            raise ValueError(f"difficulty must be in [0, {MAX_DIFFICULTY}], got {self.level}")

    def _at(self, easy: float, hard: float, lo: float = -math.inf, hi: float = math.inf) -> float:
        return float(min(hi, max(lo, easy + (hard - easy) * self.level)))

    @property
    def hard(self) -> bool:
        """Any hardening at all (level 0 reproduces the original dataset exactly, random streams included)."""
        return self.level > 0

    # plan
    @property
    def glyph_height(self) -> tuple[float, float]:
        return self._at(28, 16, lo=12), self._at(90, 60, lo=30)

    @property
    def disc_size(self) -> tuple[float, float]:
        return self._at(26, 16, lo=12), self._at(60, 44, lo=24)

    @property
    def triangle_width(self) -> tuple[float, float]:
        return self._at(30, 18, lo=14), self._at(80, 56, lo=28)

    @property
    def pole_width(self) -> tuple[float, float]:
        return self._at(9, 6, lo=5), self._at(15, 11, lo=7)

    @property
    def frame_inner(self) -> tuple[float, float]:
        return self._at(26, 18, lo=14), self._at(50, 38, lo=24)

    @property
    def group_member(self) -> tuple[float, float]:
        return self._at(18, 13, lo=11), self._at(26, 19, lo=14)

    @property
    def units_per_image(self) -> tuple[int, int]:
        return round(self._at(2, 3, hi=5)), round(self._at(4, 7, hi=10))

    @property
    def zipf_exponent(self) -> float:
        return self._at(1.3, 1.5, hi=1.6)

    @property
    def max_cover(self) -> float:
        """The largest share of an earlier object's box that a later placement may cover."""
        return self._at(0.08, 0.3, hi=0.4)

    @property
    def recolour_rate(self) -> float:
        return self._at(0.0, 0.25, hi=0.5)

    @property
    def colour_drift(self) -> float:
        return self._at(0.0, 0.45, hi=0.7)

    @property
    def shade(self) -> tuple[float, float]:
        return self._at(0.8, 0.65, lo=0.5), self._at(1.1, 1.15, hi=1.2)

    @property
    def min_opacity(self) -> float:
        return self._at(1.0, 0.65, lo=0.45)

    # render
    @property
    def background_contrast(self) -> tuple[float, float]:
        return self._at(0.45, 0.75, hi=0.95), self._at(0.75, 1.0, hi=1.15)

    @property
    def rim_darkness(self) -> float:
        return self._at(0.35, 0.75, hi=0.9)

    @property
    def shadow_strength(self) -> float:
        return self._at(0.55, 0.25, lo=0.1)

    @property
    def distractors(self) -> float:
        """Mean number of clutter items per image (Poisson)."""
        return self._at(0.0, 6.0)

    @property
    def max_blur(self) -> float:
        return self._at(0.0, 1.2, hi=2.0)

    @property
    def noise(self) -> tuple[float, float]:
        return 3.0, self._at(3.0, 9.0, hi=14.0)

    @property
    def max_jpeg_drop(self) -> int:
        return round(self._at(0, 50, hi=60))


#: the planted confusing pair (``confusing_pair``): "Digit seven" is drawn from the handwritten sevens *and ones*
#: (its glyph pool holds both, about half each), so a seven often looks exactly like a "Digit one" (same colour
#: too) -- like OpenImages' "Torch" / "Flashlight": a class whose look overlaps another's.
CONFUSING_PAIR: tuple[str, str] = (tx.digit_label(7), tx.digit_label(1))
#: ``group_of_masks`` (paper 5.9, insufficient labels): "Triangle" (a tail class) comes as a group-of cluster in
#: this share of its placements (instead of ``group_of_rate``), so most of its boxes are group-of, and the members
#: of every group-of cluster get instance masks (rows in the segmentation CSV with their own BoxID and box, no box
#: rows)
GROUP_OF_HEAVY: str = tx.TRIANGLE
GROUP_OF_HEAVY_RATE: float = 0.95


def mask_path(image_id: str, o: PlannedObject) -> str:
    """OpenImages mask file name: ``<ImageID>_<LabelName without '/'>_<BoxID>.png``."""
    return f"{image_id}_{o.label.replace('/', '')}_{o.box_id}.png"


def _zipf(n: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return p / p.sum()


# The recipe of one split (one private Generator, drawn from in this order per image): the image size; per
# primary class a unit (:class:`Units`, whose objects come from :class:`Objects`) and its placement
# (:func:`place`); occlusion marks; box ids; verified-absent labels (:func:`verified_absent`); the render seed.
# How many units an image gets and their primary classes (:class:`LongTail`) are drawn for the whole split first.


class LongTail:
    """Which classes appear: the primary class of each unit from a Zipf law over the leaves (exact quotas), and
    the digits inside frames from a Zipf law over the digit classes, both in ``FREQUENCY_RANK`` order."""

    def __init__(self, zipf_exponent: float):
        self.p_leaf = _zipf(len(tx.FREQUENCY_RANK), zipf_exponent)
        self.digit_rank = [lab for lab in tx.FREQUENCY_RANK if tx.BY_LABEL[lab].kind == "glyph"]
        self.p_digit = _zipf(len(self.digit_rank), zipf_exponent)

    def primaries(self, rng: np.random.Generator, n: int) -> list[str]:
        """``n`` primary classes in random order with exact Zipf quotas (largest remainder), so that the long
        tail does not depend on sampling luck."""
        want = self.p_leaf * n
        q = np.floor(want).astype(int)
        q[np.argsort(-(want - q), kind="stable")[:n - q.sum()]] += 1
        labs = np.repeat(np.arange(len(q)), q)
        return [tx.FREQUENCY_RANK[i] for i in rng.permutation(labs)]

    def digit(self, rng: np.random.Generator) -> str:
        return self.digit_rank[int(rng.choice(len(self.digit_rank), p=self.p_digit))]


class Objects:
    """One object of a class at (0, 0): its shape and size by kind (smaller with the difficulty), then its look
    (colour and opacity jitter, none at level 0)."""

    def __init__(self, rng: np.random.Generator, difficulty: Difficulty, *, confusing_pair: bool = False):
        self.rng = rng
        self.k = difficulty
        _, targets = draw.digits()
        self.glyphs_of = [np.flatnonzero(targets == d) for d in range(10)]
        if confusing_pair:   # the pool of the pair's first class takes in the glyphs of the second (same draws)
            a, b = (tx.BY_LABEL[lab].digit for lab in CONFUSING_PAIR)
            self.glyphs_of[a] = np.sort(np.concatenate([self.glyphs_of[a], self.glyphs_of[b]]))
        self.aspects = draw.glyph_ink_aspects()

    def __call__(self, label: str, size: float | None = None, **kw) -> PlannedObject:
        return self.look(self.shape(label, size, **kw))

    def shape(self, label: str, size: float | None = None, **kw) -> PlannedObject:
        rng, spec, k = self.rng, tx.BY_LABEL[label], self.k
        shade = float(rng.uniform(*k.shade))
        if spec.kind == "glyph":
            g = int(rng.choice(self.glyphs_of[spec.digit]))
            lo, hi = k.glyph_height
            h = int(round(size if size is not None else math.exp(rng.uniform(math.log(lo), math.log(hi)))))
            w = int(np.clip(round(h * self.aspects[g] * rng.uniform(0.9, 1.15)), 8, 120))
            return PlannedObject(label, "glyph", 0, 0, w, h, glyph=g, color=spec.color, shade=shade, **kw)
        if spec.kind == "disc":
            d = size if size is not None else rng.uniform(*k.disc_size)
            w, h = int(round(d)), int(round(d * rng.uniform(0.92, 1.08)))
            return PlannedObject(label, "disc", 0, 0, w, h, color=spec.color, shade=shade, **kw)
        if spec.kind == "triangle":
            w = size if size is not None else rng.uniform(*k.triangle_width)
            h = w * rng.uniform(0.75, 1.0)
            return PlannedObject(label, "triangle", 0, 0, int(round(w)), int(round(h)), color=spec.color,
                                 shade=shade, **kw)
        if spec.kind == "pole":
            w = size if size is not None else rng.uniform(*k.pole_width)
            h = min(125.0, w * rng.uniform(7.0, 9.0))
            return PlannedObject(label, "pole", 0, 0, int(round(w)), int(round(h)), color=spec.color,
                                 shade=shade, **kw)
        raise ValueError(f"not a standalone kind: {spec.kind}")

    def look(self, o: PlannedObject) -> PlannedObject:
        """Per-instance colour and opacity jitter (none at level 0, where no random number is drawn)."""
        k, rng = self.k, self.rng
        if not k.hard:
            return o
        base = np.asarray(o.color, np.float64)
        if rng.random() < k.recolour_rate:
            c = rng.uniform(25, 255, 3)
        else:
            c = base + (rng.uniform(25, 255, 3) - base) * rng.uniform(0, k.colour_drift)
        color = tuple(int(v) for v in np.clip(np.round(c), 0, 255))
        return replace(o, color=color, opacity=float(rng.uniform(k.min_opacity, 1.0)))


class Units:
    """The unit of a primary class, coordinates relative to its top-left corner: one object, a disc on its pole
    (co-occurrence), a frame holding 1-2 digits (surround), or a group-of cluster (group-of)."""

    def __init__(self, rng: np.random.Generator, objects: Objects, tail: LongTail, group_of_rate: float, *,
                 group_of_masks: bool = False):
        self.rng = rng
        self.obj = objects
        self.tail = tail
        self.group_of_rate = group_of_rate
        self.group_of_masks = group_of_masks

    def __call__(self, lab: str) -> list[PlannedObject]:
        rng = self.rng
        if lab == tx.FRAME:
            return self.frame(None)
        if lab == tx.INSIDE_FRAME and rng.random() < 0.8:
            return self.frame(lab)
        if lab == tx.DISC and rng.random() < 0.95:
            return self.disc_on_pole()
        rate = GROUP_OF_HEAVY_RATE if self.group_of_masks and lab == GROUP_OF_HEAVY else self.group_of_rate
        if lab in tx.GROUPABLE and rng.random() < rate:
            return self.group(lab)
        return [self.obj(lab)]

    def frame(self, first_inner: str | None) -> list[PlannedObject]:
        rng, k = self.rng, self.obj.k
        n_in = 1 if rng.random() < 0.5 else 2
        inner_labels = [first_inner or (tx.INSIDE_FRAME if rng.random() < 0.5 else self.tail.digit(rng))]
        inner_labels += [self.tail.digit(rng) for _ in range(n_in - 1)]
        t = int(rng.integers(4, 8))
        pad = int(rng.integers(8, 16))
        inners, x = [], t + pad
        for lab in inner_labels:
            o = self.obj(lab, size=rng.uniform(*k.frame_inner))
            inners.append(o.moved(x, t + pad))
            x += (o.x1 - o.x0) + int(rng.integers(6, 14))
        inner_h = max(o.y1 for o in inners) - (t + pad)
        fw = max(o.x1 for o in inners) + pad + t
        fh = t + pad + inner_h + pad + t
        # centre the contents vertically
        inners = [o.moved(0, (inner_h - (o.y1 - o.y0)) // 2) for o in inners]
        spec = tx.BY_LABEL[tx.FRAME]
        fr = self.obj.look(PlannedObject(tx.FRAME, "frame", 0, 0, fw, fh, color=spec.color,
                                         shade=float(rng.uniform(*k.shade)), thickness=t))
        return [fr, *inners]

    def disc_on_pole(self) -> list[PlannedObject]:
        rng, k = self.rng, self.obj.k
        lo, hi = k.pole_width
        pole = self.obj(tx.POLE, size=rng.uniform(lo - 1, hi - 3))
        pw, ph = pole.x1, pole.y1
        d = max(k.disc_size[0] - 2, pw * rng.uniform(2.6, 3.6))
        disc = self.obj(tx.DISC, size=d)
        dw, dh = disc.x1, disc.y1
        top = int(round(dh * 0.65))
        pole = replace(pole, x0=(dw - pw) // 2, y0=top, x1=(dw - pw) // 2 + pw, y1=top + ph, is_occluded=1)
        return [pole, disc]

    def group(self, label: str) -> list[PlannedObject]:
        """4-8 unboxed members of ``label`` in a tight grid and one group-of box around them."""
        rng = self.rng
        k = int(rng.integers(4, 9))
        cols = int(rng.integers(2, min(k, 4) + 1))
        size = rng.uniform(*self.obj.k.group_member)
        members, x, y, row_h = [], 0, 0, 0
        for i in range(k):
            if i and i % cols == 0:
                x, y, row_h = 0, y + row_h + int(rng.integers(1, 4)), 0
            o = self.obj(label, size=size * rng.uniform(0.9, 1.1), boxed=False, member_mask=self.group_of_masks)
            dy = int(rng.integers(0, 3))
            members.append(o.moved(x, y + dy))
            x += (o.x1 - o.x0) + int(rng.integers(1, 4))
            row_h = max(row_h, (o.y1 - o.y0) + dy)
        gw, gh = max(o.x1 for o in members), max(o.y1 for o in members)
        box = PlannedObject(label, "group", 0, 0, gw, gh, is_group_of=True)
        return [*members, box]


def _xyxy(boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def _over_smaller(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the smaller area of paired boxes: the larger of the two IoAs."""
    return np.maximum(paired_ioa(a, b), paired_ioa(b, a))


def place(rng: np.random.Generator, unit: Sequence[PlannedObject], *, size: tuple[int, int],
          objects: Sequence[PlannedObject], placed: Sequence[tuple[int, int, int, int]], k: Difficulty
          ) -> tuple[int, int, int, int] | None:
    """Where a unit goes in an image of ``size`` (w, h) already holding ``objects`` in earlier units at
    ``placed``: the first of up to 40 random positions (2-px margin) that overlaps earlier units by at most 8 %
    of the smaller area at level 0; above it, one that covers at most ``max_cover`` of any earlier box (group-of
    boxes included, so nothing lands inside a group) and at most half of an earlier unit. None if none fits."""
    w, h = size
    uw, uh = max(o.x1 for o in unit), max(o.y1 for o in unit)
    if uw > w - 4 or uh > h - 4:
        return None
    earlier, earlier_units = _xyxy([(o.x0, o.y0, o.x1, o.y1) for o in objects]), _xyxy(placed)
    for _try in range(40):
        x = int(rng.integers(2, w - uw - 1))
        y = int(rng.integers(2, h - uh - 1))
        cand = (x, y, x + uw, y + uh)
        c = _xyxy([cand])
        if k.hard:
            ok = (paired_ioa(earlier, c) <= k.max_cover).all() and (_over_smaller(c, earlier_units) <= 0.5).all()
        else:
            ok = (_over_smaller(c, earlier_units) <= 0.08).all()
        if ok:
            return cand
    return None


def mark_occluded(objects: list[PlannedObject], unit_of: list[int]) -> list[PlannedObject]:
    """``IsOccluded=1`` on every boxed object whose box is covered (by more than 2 %) by a drawn object of a
    later placement (objects are drawn in list order)."""
    boxes = _xyxy([(o.x0, o.y0, o.x1, o.y1) for o in objects])
    ioa = box_ioa(boxes, boxes)  # [i, j]: the share of box i that box j covers
    unit = np.asarray(unit_of)
    drawn = np.asarray([o.kind != "group" for o in objects], bool)
    later = np.triu(np.ones((len(objects),) * 2, bool), 1) & (unit[:, None] != unit[None, :]) & drawn[None, :]
    covered = ((ioa > 0.02) & later).any(1)
    return [replace(o, is_occluded=1) if o.boxed and not o.is_occluded and hit else o
            for o, hit in zip(objects, covered)]


def lay_out(rng: np.random.Generator, units: Iterable[Sequence[PlannedObject]], *, size: tuple[int, int],
            k: Difficulty) -> list[PlannedObject]:
    """Place each unit (drawn lazily, so its random draws interleave with the placement's) where it fits in an
    image of ``size``, then mark occlusions (level > 0)."""
    placed: list[tuple[int, int, int, int]] = []
    objects: list[PlannedObject] = []
    unit_of: list[int] = []
    for unit in units:
        at = place(rng, unit, size=size, objects=objects, placed=placed, k=k)
        if at is not None:
            placed.append(at)
            unit_of += [len(placed)] * len(unit)
            objects += [o.moved(at[0], at[1]) for o in unit]
    return mark_occluded(objects, unit_of) if k.hard else objects


def verified_absent(rng: np.random.Generator, present: set[str]) -> tuple[str, ...]:
    """1-3 verified-absent leaf labels of a labelled image, preferring the confusable partner of a present
    class."""
    k = int(rng.integers(1, 4))
    neg: list[str] = []
    for a, b in tx.CONFUSED_PAIRS:
        for x, y in ((a, b), (b, a)):
            if x in present and y not in present and rng.random() < 0.6:
                neg.append(y)
    absent = [lab for lab in tx.LEAVES if lab not in present and lab not in neg]
    extra = max(0, k - len(neg))
    if extra and absent:
        neg += [absent[i] for i in rng.choice(len(absent), size=min(extra, len(absent)), replace=False)]
    return tuple(sorted(set(neg)))


def plan_image(rng: np.random.Generator, image_id: str, split: str, size: tuple[int, int],
               primaries: Sequence[str], *, units: Units, k: Difficulty) -> PlannedImage:
    """One image: its size, a unit per primary class where one fits, occlusion marks (level > 0), box ids,
    verified-absent labels (labelled images) and the seed of its rendering."""
    lo, hi = size
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    objects = lay_out(rng, (units(lab) for lab in primaries), size=(w, h), k=k)
    objects = [o.moved(0, 0, box_id=f"{int(rng.integers(0, 2**32)):08x}") if o.boxed or o.member_mask else o
               for o in objects]
    negatives = verified_absent(rng, {o.label for o in objects if o.boxed}) if split == "train" else ()
    return PlannedImage(image_id, split, w, h, int(rng.integers(0, 2**63)), tuple(objects), negatives, k.level)


def plan_split(rng: np.random.Generator, image_ids: Sequence[str], split: str, size: tuple[int, int], *,
               zipf_exponent: float, group_of_rate: float, k: Difficulty, confusing_pair: bool = False,
               group_of_masks: bool = False) -> list[PlannedImage]:
    """The images of one split from one Generator: the number of units of every image, their primary classes
    (exact long-tail quotas over the whole split), then each image in turn."""
    tail = LongTail(zipf_exponent)
    units = Units(rng, Objects(rng, k, confusing_pair=confusing_pair), tail, group_of_rate,
                  group_of_masks=group_of_masks)
    if k.hard:
        lo, hi = k.units_per_image
        n_units = rng.integers(lo, hi + 1, size=len(image_ids))
    else:
        n_units = rng.choice([2, 3, 4], p=[0.3, 0.4, 0.3], size=len(image_ids))
    prim = tail.primaries(rng, int(n_units.sum()))
    starts = np.concatenate([[0], np.cumsum(n_units)])
    return [plan_image(rng, image_id, split, size, prim[starts[i]:starts[i + 1]], units=units, k=k)
            for i, image_id in enumerate(image_ids)]


def _distinct_ids(seed: int, stream: int, n: int, *, prefix: str = "", digits: int = 16,
                  exclude: Iterable[str] = ()) -> list[str]:
    """``n`` distinct ids ``prefix`` + ``digits`` hex digits from the random stream ``(seed, stream)``, none of
    them in ``exclude``."""
    rng = np.random.default_rng([seed, stream])
    high = 2**63 if digits >= 16 else 16 ** digits
    ids: list[str] = []
    seen: set[str] = set(exclude)
    while len(ids) < n:
        i = f"{prefix}{int(rng.integers(0, high)):0{digits}x}"
        if i not in seen:
            seen.add(i)
            ids.append(i)
    return ids


def _image_ids(seed: int, n: int) -> list[str]:
    """``n`` distinct 16-hex-digit image ids from their own stream (labelled images first, then test images)."""
    return _distinct_ids(seed, 7, n)


def plan_dataset(*, n_train_images: int, n_test_images: int, image_size: tuple[int, int] = (256, 320),
                 seed: int = 0, zipf_exponent: float | None = None, group_of_rate: float = 0.08,
                 difficulty: float = DEFAULT_DIFFICULTY, image_level_images: int = 0, plain_images: int = 0,
                 confusing_pair: bool = False, group_of_masks: bool = False) -> DatasetPlan:
    """Decide every image, box and label of the dataset (no pixels). Deterministic for the arguments.

    ``image_size`` is (min, max) pixels of each side, drawn independently per image. The labelled and test
    images use separate random streams, so changing ``n_test_images`` leaves the labelled images unchanged.
    ``difficulty`` is a :class:`Difficulty` level; ``zipf_exponent`` (the long tail) defaults to its one.
    ``image_level_images`` / ``plain_images``: image-level-only images (:func:`plan_weak`, their own random
    streams: the other images do not change). ``confusing_pair``: plant :data:`CONFUSING_PAIR` (changes the
    glyphs drawn for its first class; off, the dataset is the same as without the option). ``group_of_masks``:
    :data:`GROUP_OF_HEAVY` mostly group-of, and masks for the group-of members (off: the same as without it).
    """
    k = Difficulty(float(difficulty))
    if n_train_images < 0 or n_test_images < 0 or image_level_images < 0 or plain_images < 0:
        raise ValueError("image counts must be >= 0")
    lo, hi = image_size
    if not 128 <= lo <= hi:
        raise ValueError(f"image_size must be (min, max) with 128 <= min <= max, got {image_size}")
    ids = _image_ids(seed, n_train_images + n_test_images)
    exponent = k.zipf_exponent if zipf_exponent is None else zipf_exponent
    images = []
    for split, stream, id_slice in (("train", 0, ids[:n_train_images]), ("test", 1, ids[n_train_images:])):
        images += plan_split(np.random.default_rng([seed, stream]), id_slice, split, (lo, hi),
                             zipf_exponent=exponent, group_of_rate=group_of_rate, k=k,
                             confusing_pair=confusing_pair, group_of_masks=group_of_masks)
    weak = plan_weak(n_image_level=image_level_images, n_plain=plain_images, image_size=(lo, hi), seed=seed,
                     k=k, zipf_exponent=exponent, group_of_rate=group_of_rate, exclude_ids=ids,
                     confusing_pair=confusing_pair) if image_level_images or plain_images else ()
    return DatasetPlan(tuple(images), seed, weak, confusing_pair, group_of_masks)


# ----- image-level-only images ---------------------------------------------------------------------------------
#: the random streams of the image-level-only images: their plan, and their ids
_WEAK_STREAM, _WEAK_ID_STREAM = 13, 14
#: the kinds a plain-background image shows (a pole, about 1:8, or a hollow frame cannot fill an image)
PLAIN_KINDS = ("glyph", "disc", "triangle")


def tail_skewed(zipf_exponent: float) -> np.ndarray:
    """The class distribution of the image-level-only images over ``FREQUENCY_RANK``: the box distribution's Zipf
    law reversed, at half its exponent (the rarest box class is the most frequent image-level one)."""
    return _zipf(len(tx.FREQUENCY_RANK), 0.5 * zipf_exponent)[::-1].copy()


def plan_weak(*, n_image_level: int, n_plain: int, image_size: tuple[int, int], seed: int, k: Difficulty,
              zipf_exponent: float, group_of_rate: float = 0.08, exclude_ids: Iterable[str] = (),
              confusing_pair: bool = False) -> tuple[PlannedImage, ...]:
    """The image-level-only images (no pixels), from their own random streams: ``n_image_level`` images laid out
    like the labelled ones (same units, placement, occlusion, verified-absent labels) whose primary classes
    follow :func:`tail_skewed` (exact quotas), then ``n_plain`` images of one large object (72-85 % of the
    shorter side, centred) of a class of :data:`PLAIN_KINDS`, drawn from the same skewed law, on a plain
    background. Both carry image-level labels only (``box_annotated`` False); ids avoid ``exclude_ids``."""
    rng = np.random.default_rng([seed, _WEAK_STREAM])
    ids = _distinct_ids(seed, _WEAK_ID_STREAM, n_image_level + n_plain, exclude=exclude_ids)
    tail = LongTail(zipf_exponent)
    skew = LongTail(zipf_exponent)
    skew.p_leaf = tail_skewed(zipf_exponent)
    objects = Objects(rng, k, confusing_pair=confusing_pair)
    units = Units(rng, objects, tail, group_of_rate)
    lo, hi = k.units_per_image if k.hard else (2, 4)
    n_units = rng.integers(lo, hi + 1, size=n_image_level)
    prim = skew.primaries(rng, int(n_units.sum()))
    starts = np.concatenate([[0], np.cumsum(n_units)])
    out = [replace(plan_image(rng, ids[i], "train", image_size, prim[starts[i]:starts[i + 1]], units=units, k=k),
                   box_annotated=False) for i in range(n_image_level)]
    plain_ranks = [i for i, lab in enumerate(tx.FREQUENCY_RANK) if tx.BY_LABEL[lab].kind in PLAIN_KINDS]
    p = skew.p_leaf[plain_ranks] / skew.p_leaf[plain_ranks].sum()
    want = p * n_plain
    q = np.floor(want).astype(int)
    q[np.argsort(-(want - q), kind="stable")[:n_plain - q.sum()]] += 1
    plain_labels = [tx.FREQUENCY_RANK[plain_ranks[j]] for j in rng.permutation(np.repeat(np.arange(len(q)), q))]
    for image_id, lab in zip(ids[n_image_level:], plain_labels):
        w, h = (int(rng.integers(image_size[0], image_size[1] + 1)) for _ in range(2))
        side = min(w, h) * rng.uniform(0.72, 0.85)
        o = objects(lab, size=side)
        ow, oh = min(o.x1, w - 4), min(o.y1, h - 4)
        x0 = (w - ow) // 2 + int(rng.integers(-(w - ow) // 4, (w - ow) // 4 + 1))
        y0 = (h - oh) // 2 + int(rng.integers(-(h - oh) // 4, (h - oh) // 4 + 1))
        o = replace(o, x0=x0, y0=y0, x1=x0 + ow, y1=y0 + oh, box_id=f"{int(rng.integers(0, 2**32)):08x}")
        out.append(PlannedImage(image_id, "train", w, h, int(rng.integers(0, 2**63)), (o,),
                                verified_absent(rng, {lab}), k.level, box_annotated=False, plain=True))
    return tuple(out)


# ----- the external dataset (COCO format) --------------------------------------------------------------------
def _external_ids(seed: int, n: int) -> list[str]:
    """``n`` distinct external image ids, ``ext`` + 13 hex digits (never an orchard-mini id), own stream."""
    return _distinct_ids(seed, 12, n, prefix="ext", digits=13)


def _external_unit(rng: np.random.Generator, cat: tx.ExternalCategory, objects: Objects, units: Units,
                   group_of_rate: float) -> list[PlannedObject]:
    """One placement of an external category: an object of the orchard-mini class it shows (sometimes a
    group-of cluster), or one square / plus sign; labelled with the category's name."""
    if cat.label is not None:
        unit = units.group(cat.label) if rng.random() < group_of_rate else [objects(cat.label)]
        return [replace(o, label=cat.name) for o in unit]
    k = objects.k
    size = rng.uniform(*k.disc_size)
    w, h = int(round(size)), int(round(size * rng.uniform(0.85, 1.15)))
    return [objects.look(PlannedObject(cat.name, cat.kind, 0, 0, w, h, color=cat.color,
                                       shade=float(rng.uniform(*k.shade))))]


def plan_external(*, n_images: int, image_size: tuple[int, int] = (256, 320), seed: int = 0,
                  difficulty: float = DEFAULT_DIFFICULTY, group_of_rate: float = 0.08) -> tuple[PlannedImage, ...]:
    """The external dataset's images (no pixels): 2-5 placements each, of categories drawn uniformly from
    :data:`~stages.data.taxonomy.EXTERNAL_CATEGORIES`, with orchard-mini's objects, placement and occlusion
    (:class:`Objects`, :func:`place`, :func:`mark_occluded`). Labels are the category names. Its own random
    streams: orchard-mini does not change with it. Deterministic for the arguments."""
    if n_images < 0:
        raise ValueError("n_images must be >= 0")
    k = Difficulty(float(difficulty))
    lo, hi = image_size
    rng = np.random.default_rng([seed, 11])
    objects = Objects(rng, k)
    units = Units(rng, objects, LongTail(k.zipf_exponent), group_of_rate)
    out = []
    for image_id in _external_ids(seed, n_images):
        w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        drawn = (_external_unit(rng, tx.EXTERNAL_CATEGORIES[int(rng.integers(len(tx.EXTERNAL_CATEGORIES)))],
                                objects, units, group_of_rate) for _ in range(int(rng.integers(2, 6))))
        objs = lay_out(rng, drawn, size=(w, h), k=k)
        out.append(PlannedImage(image_id, "train", w, h, int(rng.integers(0, 2**63)), tuple(objs), (), k.level))
    return tuple(out)


def external_label_map() -> pd.DataFrame:
    """The external dataset's label map: its categories that show an orchard-mini class -> that MID."""
    rows = []
    for c in tx.EXTERNAL_CATEGORIES:
        if c.label is not None:
            name = tx.BY_LABEL[c.label].name
            rows.append((c.name, c.label, name, "synonym", f"draws orchard-mini's {name}"))
    return pd.DataFrame(rows, columns=["category_name", "mid", "oid_name", "match", "note"])


def write_external(root: Path, images: Sequence[PlannedImage], *, seed: int, jpeg_quality: int = 90) -> dict:
    """Render ``images`` into ``root/images/`` and write ``root/instances.json`` (COCO) and
    ``root/label_map.csv``. Returns counts for the summary."""
    from stages.formats.coco import to_coco

    img_dir = root / IMAGES_DIR
    img_dir.mkdir(parents=True)
    rows = []
    for im in images:
        img, _ = render_image(im)
        Image.fromarray(img).save(img_dir / f"{im.image_id}.jpg", quality=jpeg_quality_of(im, jpeg_quality))
        rows += [(im.image_id, o.label, o.x0 / im.width, o.y0 / im.height, o.x1 / im.width, o.y1 / im.height,
                  o.is_group_of) for o in im.boxes]
    boxes = pd.DataFrame(rows, columns=["image_id", "label", "x_min", "y_min", "x_max", "y_max", "is_group_of"])
    table = pd.DataFrame({"image_id": [im.image_id for im in images],
                          "path": [str(img_dir / f"{im.image_id}.jpg") for im in images],
                          "width": [im.width for im in images], "height": [im.height for im in images]})
    names = [c.name for c in tx.EXTERNAL_CATEGORIES]
    coco = to_coco(boxes=boxes, images=table, classes=pd.DataFrame({"label": names, "name": names}),
                   images_dir=img_dir, category_ids={c.name: c.id for c in tx.EXTERNAL_CATEGORIES},
                   description=f"orchard-mini external dataset (seed {seed})")
    (root / EXTERNAL_INSTANCES).write_text(json.dumps(coco, separators=(",", ":")) + "\n")
    lm = external_label_map()
    lm.to_csv(root / EXTERNAL_LABEL_MAP, index=False)
    counts = boxes["label"].value_counts()
    return {"n_images": len(images), "n_boxes": len(boxes), "group_of_boxes": int(boxes["is_group_of"].sum()),
            "boxes_per_category": {n: int(counts.get(n, 0)) for n in names},
            "label_map": dict(zip(lm["category_name"], lm["mid"]))}


# ----- rendering --------------------------------------------------------------------------------------------
def render_image(im: PlannedImage) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Draw one planned image. Returns (RGB uint8 ``[H, W, 3]``, {object index: visible mask bool ``[H, W]``}
    for every object with a mask). Deterministic for the plan."""
    rng = np.random.default_rng(im.render_seed)
    k = Difficulty(im.difficulty)
    if im.plain:   # one flat light colour, no clutter (a product shot)
        canvas = np.empty((im.height, im.width, 3), np.float32)
        canvas[:] = rng.uniform(150, 245, 3).astype(np.float32)
    else:
        canvas = draw.background(rng, im.width, im.height, contrast=k.background_contrast)
    if k.hard and not im.plain:
        palette = np.array([c.color for c in tx.CLASSES if c.kind != "parent"], np.float32)
        side = min(im.width, im.height)
        for _ in range(int(rng.poisson(k.distractors))):
            draw.distractor(rng, canvas, palette=palette, size=(0.03 * side, 0.16 * side))
    glyphs, _ = draw.digits()
    owner = np.full((im.height, im.width), -1, np.int32)
    for i, o in enumerate(im.objects):
        if o.kind == "group":
            continue
        w, h = o.x1 - o.x0, o.y1 - o.y0
        alpha = draw.shape_alpha(o.kind, w, h, glyph_img=glyphs[o.glyph] if o.glyph >= 0 else None,
                                 thickness=o.thickness)
        rgb = draw.paint(o.kind, w, h, o.color, o.shade)
        if o.kind in ("glyph", "disc", "triangle"):
            rgb = draw.rim(alpha, rgb, darkness=k.rim_darkness)
        draw.composite(canvas, alpha * np.float32(o.opacity) if o.opacity < 1 else alpha, rgb, o.x0, o.y0,
                       shadow_strength=k.shadow_strength)
        region = owner[o.y0:o.y1, o.x0:o.x1]
        region[alpha >= 0.5] = i if o.masked else -2
    if k.hard and not im.plain:
        if rng.random() < 0.5:
            canvas = draw.blur(canvas, float(rng.uniform(0.3, max(0.3, k.max_blur))))
        canvas += rng.normal(0.0, rng.uniform(*k.noise), size=canvas.shape).astype(np.float32)
    else:
        canvas += rng.normal(0.0, 3.0, size=canvas.shape).astype(np.float32)
    img = np.clip(canvas, 0, 255).astype(np.uint8)
    masks = {i: owner == i for i, o in enumerate(im.objects) if o.masked}
    return img, masks


# ----- writing ----------------------------------------------------------------------------------------------
def summarize(plan: DatasetPlan, *, image_size: tuple[int, int]) -> dict:
    """Class counts and the measured phenomena (deterministic: no timings)."""
    from stages.formats.hierarchy import Hierarchy

    counts = plan.class_counts()
    h = Hierarchy.from_json_obj(tx.hierarchy_json())
    boxes = counts["boxes"].to_numpy()
    train = plan.train
    n_disc = n_disc_with_pole = n_inside = n_nine = n_nine_inside = 0
    pole_aspects = []
    for im in train:
        labs = [o.label for o in im.boxes]
        frames = [o for o in im.boxes if o.label == tx.FRAME]
        for o in im.boxes:
            inside = any(f is not o and f.x0 <= o.x0 and f.y0 <= o.y0 and o.x1 <= f.x1 and o.y1 <= f.y1
                         for f in frames)
            n_inside += inside
            if o.label == tx.INSIDE_FRAME:
                n_nine += 1
                n_nine_inside += inside
            if o.label == tx.POLE:
                pole_aspects.append((o.y1 - o.y0) / (o.x1 - o.x0))
        if tx.DISC in labs:
            n_disc += 1
            n_disc_with_pole += tx.POLE in labs
    n_boxes = [len(im.boxes) for im in train]
    return {
        "dataset": "orchard-mini",
        "seed": plan.seed,
        "difficulty": train[0].difficulty if train else None,
        "n_train_images": len(train),
        "n_test_images": len(plan.test),
        "image_size": list(image_size),
        "n_boxes": int(boxes.sum()),
        "boxes_per_image": {"min": min(n_boxes, default=0), "mean": float(np.mean(n_boxes)) if n_boxes else 0.0,
                            "max": max(n_boxes, default=0)},
        "n_masks": int(sum(o.segmented for im in train for o in im.objects)),
        "segmentable_classes": len(tx.SEGMENTABLE),
        "not_segmentable": sorted(tx.NOT_SEGMENTABLE),
        "classes": counts.to_dict(orient="records"),
        "phenomena": {
            "hierarchy_depth": h.depth(),
            "multi_parent_classes": sorted(c for c, ps in h.parents.items() if len(ps) > 1),
            "long_tail_ratio": float(boxes.max() / boxes.min()) if len(boxes) and boxes.min() > 0 else None,
            "most_frequent": tx.LEAVES[int(np.argmax(boxes))] if len(boxes) else None,
            "rarest": tx.LEAVES[int(np.argmin(boxes))] if len(boxes) else None,
            "group_of_boxes": int(counts["group_of"].sum()),
            "occluded_boxes": int(sum(o.is_occluded for im in train for o in im.boxes)),
            "negative_labels": int(counts["negatives"].sum()),
            "confused_pairs": [list(p) for p in tx.CONFUSED_PAIRS],
            "cooccurrence": {"pair": [tx.DISC, tx.POLE], "images_with_disc": n_disc,
                             "fraction_with_pole": n_disc_with_pole / n_disc if n_disc else None},
            "inside": {"container": tx.FRAME, "boxes_inside_a_frame": n_inside, "class": tx.INSIDE_FRAME,
                       "fraction_of_class_inside": n_nine_inside / n_nine if n_nine else None},
            "extreme_aspect": {"class": tx.POLE,
                               "median_height_over_width": float(np.median(pole_aspects)) if pole_aspects else None},
        },
    } | _weak_summary(plan)


def _weak_summary(plan: DatasetPlan) -> dict:
    """The summary's entries of the options (none when they are off, so the summary is then unchanged)."""
    out: dict = {}
    if plan.weak:
        wc = plan.weak_class_counts()
        out["image_level_only"] = {
            "n_image_level": sum(not im.plain for im in plan.weak),
            "n_plain_background": sum(im.plain for im in plan.weak),
            "plain_list": PLAIN_CSV if any(im.plain for im in plan.weak) else None,
            "positive_labels": int(wc["images"].sum()), "negative_labels": int(wc["negatives"].sum()),
            "classes": wc.to_dict(orient="records")}
    if plan.group_of_masks:
        cc = plan.class_counts().set_index("label")
        out["group_of_masks"] = {
            "class": GROUP_OF_HEAVY, "name": tx.BY_LABEL[GROUP_OF_HEAVY].name,
            "group_of_share": float(cc.loc[GROUP_OF_HEAVY, "group_of"] / max(cc.loc[GROUP_OF_HEAVY, "boxes"], 1)),
            "member_masks": int(sum(o.segmented and o.member_mask for im in plan.train for o in im.objects))}
    if plan.confusing_pair:
        a, b = CONFUSING_PAIR
        out["confusing_pair"] = {"classes": [a, b], "names": [tx.BY_LABEL[a].name, tx.BY_LABEL[b].name],
                                 "how": f"{tx.BY_LABEL[a].name} is drawn from the handwritten glyphs of both "
                                        f"digits (same colour): many look exactly like a {tx.BY_LABEL[b].name}"}
    return out


def _save_png(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, compress_level=1)


def jpeg_quality_of(im: PlannedImage, base: int) -> int:
    """The JPEG quality of one image: ``base`` lowered by a random amount that grows with the difficulty
    (drawn from the image's own seed, so the plan's random streams are untouched)."""
    drop = Difficulty(im.difficulty).max_jpeg_drop
    if drop <= 0:
        return base
    return max(20, base - int(np.random.default_rng([im.render_seed, 1]).integers(0, drop + 1)))


def generate(*, out_dir: Path, n_train_images: int, n_test_images: int, image_size: tuple[int, int] = (256, 320),
             seed: int = 0, jpeg_quality: int = 90, difficulty: float = DEFAULT_DIFFICULTY,
             n_external_images: int = 0, image_level_images: int = 0, plain_images: int = 0,
             confusing_pair: bool = False, group_of_masks: bool = False, log_every: int = 100) -> dict:
    """Plan, render and write the dataset into ``out_dir`` atomically: everything is built in
    ``.<name>.tmp`` next to it (a stale one from a killed run is removed first) and renamed into place, so a
    failure leaves no partial ``out_dir``. An existing ``out_dir`` is replaced. Returns the summary.
    ``difficulty``: see :class:`Difficulty` (0 = the original easy look). ``n_external_images`` > 0 also writes
    the external COCO-format dataset into ``out_dir/external/`` (:func:`plan_external`, :func:`write_external`).
    ``image_level_images`` / ``plain_images`` > 0 add image-level-only images (:func:`plan_weak`): their
    JPEGs in ``images/``, their labels appended to the image-labels CSV, no box or mask rows; the plain-background
    ones listed in ``plain-background-images.csv``. ``confusing_pair`` plants :data:`CONFUSING_PAIR`;
    ``group_of_masks`` makes :data:`GROUP_OF_HEAVY` mostly group-of and writes masks of group-of members."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    plan = plan_dataset(n_train_images=n_train_images, n_test_images=n_test_images, image_size=image_size,
                        seed=seed, difficulty=difficulty, image_level_images=image_level_images,
                        plain_images=plain_images, confusing_pair=confusing_pair, group_of_masks=group_of_masks)
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    if tmp.exists():
        log.warning("removing stale temporary directory %s", tmp)
        shutil.rmtree(tmp)
    try:
        for d in (IMAGES_DIR, TEST_DIR, MASKS_DIR):
            (tmp / d).mkdir(parents=True)
        classes = pd.DataFrame([(c.label, c.name) for c in tx.CLASSES])
        classes.to_csv(tmp / CLASSES_CSV, index=False, header=False)
        (tmp / HIERARCHY_JSON).write_text(json.dumps(tx.hierarchy_json(), indent=1) + "\n")
        classes[classes[0].isin(_SEGMENTABLE)].to_csv(tmp / SEG_CLASSES_CSV, index=False, header=False)
        (tmp / SEG_HIERARCHY_JSON).write_text(json.dumps(tx.hierarchy_json(tx.SEGMENTABLE), indent=1) + "\n")
        plan.bbox_frame().to_csv(tmp / BBOX_CSV, index=False)
        plan.image_labels_frame().to_csv(tmp / LABELS_CSV, index=False)
        plan.segmentation_frame().to_csv(tmp / SEGMENTATION_CSV, index=False)
        pd.DataFrame({"ImageID": sorted(im.image_id for im in plan.test)}).to_csv(tmp / TEST_CSV, index=False)
        if any(im.plain for im in plan.weak):
            pd.DataFrame({"ImageID": sorted(im.image_id for im in plan.weak if im.plain)}).to_csv(
                tmp / PLAIN_CSV, index=False)
        n = len(plan.images) + len(plan.weak)
        t_render = time.perf_counter()
        for k, im in enumerate(plan.images + plan.weak, start=1):
            img, masks = render_image(im)
            sub = IMAGES_DIR if im.split == "train" else TEST_DIR
            Image.fromarray(img).save(tmp / sub / f"{im.image_id}.jpg", quality=jpeg_quality_of(im, jpeg_quality))
            if im.split == "train" and im.box_annotated:
                for i, m in masks.items():
                    if im.objects[i].segmented:
                        _save_png(tmp / MASKS_DIR / mask_path(im.image_id, im.objects[i]), m)
            if k % log_every == 0 or k == n:
                el = time.perf_counter() - t_render
                log.info("rendered %d/%d images (%.1f images/s, ETA %.0f s)", k, n, k / el,
                         (n - k) * el / k)
        summary = summarize(plan, image_size=image_size)
        if n_external_images > 0:
            ext = plan_external(n_images=n_external_images, image_size=image_size, seed=seed,
                                difficulty=difficulty)
            summary["external"] = write_external(tmp / EXTERNAL_DIR, ext, seed=seed, jpeg_quality=jpeg_quality)
            log.info("external dataset: %d images, %d boxes", len(ext), summary["external"]["n_boxes"])
        (tmp / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    log.info("wrote %s: %d labelled + %d image-level-only + %d test images, %d boxes in %.1f s", out_dir,
             summary["n_train_images"], len(plan.weak), summary["n_test_images"], summary["n_boxes"], seconds)
    return {**summary, "seconds": seconds}


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output directory (replaced atomically)")
    ap.add_argument("--n-images", "--n-train-images", dest="n_train_images", type=int, default=400,
                    help="labelled images")
    ap.add_argument("--n-test", "--n-test-images", dest="n_test_images", type=int, default=40,
                    help="unlabelled test images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-size", type=int, default=256, help="smallest image side (px)")
    ap.add_argument("--max-size", type=int, default=320, help="largest image side (px)")
    ap.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (the easiest; lowered per image "
                    "with the difficulty)")
    ap.add_argument("--difficulty", type=float, default=DEFAULT_DIFFICULTY,
                    help=f"0 = the original easy look, 1 = calibrated default (small objects, clutter, occlusion, "
                         f"colour jitter, blur/noise/JPEG), up to {MAX_DIFFICULTY}")
    ap.add_argument("--external-images", "--external", dest="external_images", type=int, default=0,
                    help="also write this many images of the external COCO-format dataset into OUT/external/ "
                         "(default 0: none)")
    ap.add_argument("--image-level-images", type=int, default=schema_default("dataset", "image_level_images"),
                    help="also write this many image-level-only images (labels, no boxes; classes skewed to the "
                         "tail)")
    ap.add_argument("--plain-images", type=int, default=schema_default("dataset", "plain_images"),
                    help="also write this many image-level-only images of one large object on a plain background "
                         f"(listed in {PLAIN_CSV})")
    ap.add_argument("--confusing-pair", action=argparse.BooleanOptionalAction,
                    default=schema_default("dataset", "confusing_pair"),
                    help="plant the confusing pair: Digit seven drawn from the glyphs of sevens and ones")
    ap.add_argument("--group-of-masks", action=argparse.BooleanOptionalAction,
                    default=schema_default("dataset", "group_of_masks"),
                    help=f"{tx.BY_LABEL[GROUP_OF_HEAVY].name} mostly group-of, and instance masks for the members "
                         "of group-of clusters (for stages.mask_boxes)")
    args = ap.parse_args(argv)
    if args.image_level_images < 0 or args.plain_images < 0:
        ap.error("need --image-level-images >= 0 and --plain-images >= 0")
    if not 0 <= args.difficulty <= MAX_DIFFICULTY:
        ap.error(f"need 0 <= --difficulty <= {MAX_DIFFICULTY}")
    if not 128 <= args.min_size <= args.max_size:
        ap.error("need 128 <= --min-size <= --max-size")
    if args.n_train_images < 1 or args.n_test_images < 0:
        ap.error("need --n-images >= 1 and --n-test >= 0")
    if args.external_images < 0:
        ap.error("need --external-images >= 0")
    s = generate(out_dir=args.out, n_train_images=args.n_train_images, n_test_images=args.n_test_images,
                 image_size=(args.min_size, args.max_size), seed=args.seed, jpeg_quality=args.jpeg_quality,
                 difficulty=args.difficulty, n_external_images=args.external_images,
                 image_level_images=args.image_level_images, plain_images=args.plain_images,
                 confusing_pair=args.confusing_pair, group_of_masks=args.group_of_masks)
    ph = s["phenomena"]
    tail = "n/a (a class has no box)" if ph["long_tail_ratio"] is None else f"{ph['long_tail_ratio']:.1f}x"
    print(f"orchard-mini: {s['n_train_images']} labelled + {s['n_test_images']} test images, {s['n_boxes']} boxes,"
          f" long tail {tail}, {ph['group_of_boxes']} group-of"
          + (f"; external: {s['external']['n_images']} images, {s['external']['n_boxes']} boxes" if "external" in s
             else "") + f", {s['seconds']:.1f} s -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
