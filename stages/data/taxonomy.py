"""The classes of ``orchard-mini``: MIDs, display names, the hierarchy, colours and the long-tail ranking.

MIDs are fake but shaped like OpenImages ones: ``/m/orchard_<slug>`` (e.g. ``/m/orchard_d6`` is "Digit six",
``/m/orchard_round_digit`` the parent "Round digit"). They can never collide with a real MID (real ones are
``/m/0`` + base-32 characters, no underscore). The hierarchy root is the challenge's ``/m/0bl9f``.

Hierarchy (only the leaves are annotated with boxes; parents come from expansion, as in OpenImages)::

    /m/0bl9f (root)
    ├── Digit
    │   ├── Round digit ── 0, 6, 8, 9
    │   ├── Straight digit ── 1, 7
    │   ├── Curvy digit ── 3, 5
    │   └── Even digit ── 2, 4, 6          ("Digit six" has two parents)
    └── Shape
        ├── Pole                          (extreme aspect ratio, about 1:8)
        ├── Frame                         (surrounds other objects, mostly digits; "Digit nine" likes to sit inside)
        └── Solid shape ── Disc, Triangle ("Disc" almost always comes on top of a "Pole")

Confusable pairs share a colour: 3/8 and 1/7.

Segmentation: like OpenImages (300 of the 500 challenge classes have instance masks), not every class is
segmentable: :data:`NOT_SEGMENTABLE` ("Frame", a hollow outline drawn around other objects) has boxes but no
masks. :data:`SEGMENTABLE` are the other leaves and every parent above one of them (here: all parents);
``hierarchy_json(SEGMENTABLE)`` is the hierarchy pruned to them.

The generator's small **external** dataset (COCO format, :data:`EXTERNAL_CATEGORIES`) names its categories its
own way ("digit-six", "ball"); six of them show orchard-mini leaf classes (the rarer ones, where extra data is
meant to help: paper 7.3), two show shapes orchard-mini does not have ("square", "plus-sign").
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

ROOT = "/m/0bl9f"


@dataclass(frozen=True)
class ClassSpec:
    """One class. ``kind`` says how it is drawn: 'glyph' (a handwritten digit), 'pole', 'disc', 'triangle',
    'frame', or 'parent' (no boxes of its own). ``digit`` is the glyph's digit for 'glyph' classes."""

    label: str
    name: str
    kind: str
    parents: tuple[str, ...] = ()
    color: tuple[int, int, int] = (0, 0, 0)
    digit: int = -1


def _mid(slug: str) -> str:
    return f"/m/orchard_{slug}"


DIGIT = _mid("digit")
ROUND = _mid("round_digit")
STRAIGHT = _mid("straight_digit")
CURVY = _mid("curvy_digit")
EVEN = _mid("even_digit")
SHAPE = _mid("shape")
SOLID = _mid("solid_shape")
POLE = _mid("pole")
FRAME = _mid("frame")
DISC = _mid("disc")
TRIANGLE = _mid("triangle")

_DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT_PARENTS = {0: (ROUND,), 1: (STRAIGHT,), 2: (EVEN,), 3: (CURVY,), 4: (EVEN,), 5: (CURVY,),
                  6: (ROUND, EVEN), 7: (STRAIGHT,), 8: (ROUND,), 9: (ROUND,)}
# 3/8 and 1/7 share a colour on purpose (the confusable pairs)
_DIGIT_COLORS = {0: (230, 40, 40), 1: (250, 250, 250), 2: (40, 200, 60), 3: (255, 210, 0), 4: (40, 90, 250),
                 5: (250, 120, 0), 6: (200, 40, 220), 7: (250, 250, 250), 8: (255, 210, 0), 9: (0, 220, 230)}


def digit_label(d: int) -> str:
    return _mid(f"d{d}")


CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec(DIGIT, "Digit", "parent"),
    ClassSpec(ROUND, "Round digit", "parent", (DIGIT,)),
    ClassSpec(STRAIGHT, "Straight digit", "parent", (DIGIT,)),
    ClassSpec(CURVY, "Curvy digit", "parent", (DIGIT,)),
    ClassSpec(EVEN, "Even digit", "parent", (DIGIT,)),
    *(ClassSpec(digit_label(d), f"Digit {_DIGIT_NAMES[d]}", "glyph", _DIGIT_PARENTS[d], _DIGIT_COLORS[d], d)
      for d in range(10)),
    ClassSpec(SHAPE, "Shape", "parent"),
    ClassSpec(SOLID, "Solid shape", "parent", (SHAPE,)),
    ClassSpec(POLE, "Pole", "pole", (SHAPE,), (225, 30, 30)),
    ClassSpec(FRAME, "Frame", "frame", (SHAPE,), (200, 150, 60)),
    ClassSpec(DISC, "Disc", "disc", (SOLID,), (30, 140, 255)),
    ClassSpec(TRIANGLE, "Triangle", "triangle", (SOLID,), (120, 255, 60)),
)
BY_LABEL: dict[str, ClassSpec] = {c.label: c for c in CLASSES}
LEAVES: tuple[str, ...] = tuple(c.label for c in CLASSES if c.kind != "parent")

#: leaf classes from most to least frequent (as the primary object of a placement; see stages.generate)
FREQUENCY_RANK: tuple[str, ...] = (
    digit_label(1), digit_label(0), digit_label(4), POLE, digit_label(3), digit_label(7), FRAME, digit_label(2),
    digit_label(5), digit_label(8), DISC, TRIANGLE, digit_label(9), digit_label(6),
)
#: pairs of easily confused classes (same colour, similar glyphs)
CONFUSED_PAIRS: tuple[tuple[str, str], ...] = ((digit_label(3), digit_label(8)), (digit_label(1), digit_label(7)))
#: classes that may appear as a group-of cluster
GROUPABLE: frozenset[str] = frozenset([*(digit_label(d) for d in range(10)), DISC, TRIANGLE])
#: the class that likes to sit inside a frame
INSIDE_FRAME: str = digit_label(9)

assert sorted(FREQUENCY_RANK) == sorted(LEAVES)

#: leaf classes with boxes but no instance masks ("Frame" is a hollow outline around other objects)
NOT_SEGMENTABLE: frozenset[str] = frozenset([FRAME])


def _with_ancestors(labels: Collection[str]) -> frozenset[str]:
    out: set[str] = set()
    todo = list(labels)
    while todo:
        lab = todo.pop()
        if lab not in out:
            out.add(lab)
            todo += BY_LABEL[lab].parents
    return frozenset(out)


#: the segmentable classes, in ``CLASSES`` order: the leaves with masks and every ancestor of one of them
SEGMENTABLE: tuple[str, ...] = tuple(
    c.label for c in CLASSES if c.label in _with_ancestors([lab for lab in LEAVES if lab not in NOT_SEGMENTABLE]))


def hierarchy_json(labels: Collection[str] | None = None) -> dict:
    """The hierarchy in the challenge's JSON form (LabelName / Subcategory), root ``/m/0bl9f``. ``labels``: only
    these classes (e.g. :data:`SEGMENTABLE`; every ancestor of a kept class must be kept), in the same order."""
    keep = None if labels is None else frozenset(labels)
    if keep is not None and _with_ancestors(keep) != keep:
        raise ValueError(f"labels must include their ancestors: missing {sorted(_with_ancestors(keep) - keep)}")
    children: dict[str, list[str]] = {}
    for c in CLASSES:
        if keep is not None and c.label not in keep:
            continue
        for p in c.parents or (ROOT,):
            children.setdefault(p, []).append(c.label)

    def node(label: str) -> dict:
        d: dict = {"LabelName": label}
        if label in children:
            d["Subcategory"] = [node(c) for c in children[label]]
        return d

    return node(ROOT)


@dataclass(frozen=True)
class ExternalCategory:
    """A category of the external dataset: its COCO ``id`` and ``name``, how it is drawn (``kind``, a drawing
    kind of :mod:`stages.data.draw`), and the orchard-mini leaf class it shows (``label``; None for a shape
    orchard-mini does not have, drawn in ``color``)."""

    id: int
    name: str
    kind: str
    label: str | None = None
    color: tuple[int, int, int] = (0, 0, 0)


#: the external dataset's categories (ids not contiguous, as in COCO)
EXTERNAL_CATEGORIES: tuple[ExternalCategory, ...] = (
    ExternalCategory(3, "digit-five", "glyph", digit_label(5)),
    ExternalCategory(5, "digit-six", "glyph", digit_label(6)),
    ExternalCategory(8, "digit-eight", "glyph", digit_label(8)),
    ExternalCategory(13, "digit-nine", "glyph", digit_label(9)),
    ExternalCategory(21, "ball", "disc", DISC),
    ExternalCategory(34, "wedge", "triangle", TRIANGLE),
    ExternalCategory(55, "square", "square", None, (235, 120, 190)),
    ExternalCategory(89, "plus-sign", "cross", None, (150, 90, 255)),
)
