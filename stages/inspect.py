"""Inspect a canonical parquet file: what it holds, and its boxes (and masks) drawn on an image.

``python -m stages.inspect results/merge/val_a.parquet [--classes results/ingest/classes.parquet] [--top 15]``
prints the table name and provenance from the file metadata, rows, images, classes, a score histogram,
per-model/scale/flip counts (when those columns exist), the most frequent classes and boxes per image.

``... --image <ImageID> --images results/ingest/images.parquet --out x.png [--score-thr 0.3]
[--boxes results/ingest/boxes.parquet]`` draws that image's detections (and masks for a ``masks`` table) with
labels and scores, and the ground-truth boxes dashed when ``--boxes`` is given.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats import openimages as oi
from stages.formats.io import PROVENANCE_KEY, atomic_path, read_table
from stages.formats.tables import BOX_COLUMNS, SCHEMAS, conform

log = logging.getLogger(__name__)

#: columns counted separately when a file has them (the detections table's provenance columns)
GROUP_COLUMNS = ("model", "scale", "flip")
#: tables tried, in this order, when the file's metadata does not name its table (most specific first)
_GUESS_ORDER = ("masks", "detections", "boxes", "image_labels", "images", "sampling", "splits", "hierarchy",
                "classes")
# 20 well separated colours (Tableau / matplotlib tab20 order: dark shades first)
_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
            (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210),
            (199, 199, 199), (219, 219, 141), (158, 218, 229))


# ----- reading ----------------------------------------------------------------------------------------------
def read_canonical(path: str | Path) -> tuple[str, pd.DataFrame, dict]:
    """Read any canonical parquet file: (table name, conformed frame, provenance dict).

    The table is the one the file's ``orchard`` metadata names, else the first schema whose required columns
    the file has. A missing file, a file that is not parquet, or one that matches no table is an
    :class:`InputError`.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable parquet file: {exc}", file=path) from exc
    raw = (table.schema.metadata or {}).get(PROVENANCE_KEY)
    try:
        prov = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        log.warning("%s: unreadable provenance metadata ignored", path)
        prov = {}
    df = table.to_pandas()
    name = prov.get("table")
    if name not in SCHEMAS:
        name = next((n for n in _GUESS_ORDER if set(SCHEMAS[n][0]) <= set(df.columns)), None)
    if name is None:
        raise InputError(f"not a canonical table: columns {list(df.columns)} match none of {sorted(SCHEMAS)}",
                         file=path)
    return name, conform(df, name, source=path), prov


def read_class_names(path: str | Path) -> dict[str, str]:
    """MID -> display name from a ``classes`` parquet table or an OpenImages class-description CSV."""
    path = Path(path)
    df = oi.read_classes(path) if path.suffix.lower() == ".csv" else read_table(path, "classes")
    return dict(zip(df["label"], df["name"]))


# ----- summary ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    """What a canonical table holds. Fields that do not apply to the table (no score column...) are empty."""

    table: str
    provenance: dict
    rows: int
    images: int | None = None
    classes: int | None = None
    score_min: float | None = None
    score_max: float | None = None
    score_bins: list[float] = field(default_factory=list)     # bin edges, len(score_counts) + 1
    score_counts: list[int] = field(default_factory=list)
    groups: dict[str, dict[str, int]] = field(default_factory=dict)   # column -> value -> rows
    top_classes: list[tuple[str, str, int]] = field(default_factory=list)  # (label, name, rows)
    per_image: dict[str, float] = field(default_factory=dict)  # min / median / mean / max rows per image

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def summarize(df: pd.DataFrame, *, table: str, provenance: Mapping[str, object] | None = None,
              names: Mapping[str, str] | None = None, top: int = 15, bins: int = 10) -> Summary:
    """Summarize a conformed canonical table ``df`` (see :class:`Summary`).

    The score histogram has ``bins`` equal bins over [0, 1], widened to the scores' range when some fall
    outside. ``names`` maps MIDs to display names for ``top_classes`` (the MID itself otherwise).
    """
    names = names or {}
    out: dict = {"table": table, "provenance": dict(provenance or {}), "rows": len(df)}
    if "image_id" in df:
        out["images"] = int(df["image_id"].nunique())
        counts = df.groupby("image_id").size()
        if len(counts):
            out["per_image"] = {"min": float(counts.min()), "median": float(counts.median()),
                                "mean": float(counts.mean()), "max": float(counts.max())}
    if "label" in df:
        out["classes"] = int(df["label"].nunique())
        vc = df["label"].value_counts(sort=False).reset_index()
        vc.columns = ["label", "n"]
        vc = vc.sort_values(["n", "label"], ascending=[False, True]).head(top)
        out["top_classes"] = [(lab, names.get(lab, lab), int(n)) for lab, n in zip(vc["label"], vc["n"])]
    if "score" in df and len(df):
        s = df["score"].to_numpy(np.float64)
        lo, hi = min(0.0, float(s.min())), max(1.0, float(s.max()))
        counts, edges = np.histogram(s, bins=bins, range=(lo, hi))
        out.update(score_min=float(s.min()), score_max=float(s.max()), score_bins=[float(e) for e in edges],
                   score_counts=[int(c) for c in counts])
    for col in GROUP_COLUMNS:
        if col in df:
            vc = df[col].value_counts(sort=False)
            out.setdefault("groups", {})[col] = {str(k): int(v) for k, v in sorted(vc.items())}
    return Summary(**out)


def format_summary(s: Summary, *, width: int = 40) -> str:
    """The summary as text, with the score histogram drawn in ``#`` bars of at most ``width`` characters."""
    lines = [f"table: {s.table}"]
    for k, v in s.provenance.items():
        if k != "table":
            lines.append(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    lines.append(f"rows: {s.rows}")
    if s.images is not None:
        lines.append(f"images: {s.images}")
    if s.classes is not None:
        lines.append(f"classes: {s.classes}")
    if s.per_image:
        p = s.per_image
        lines.append(f"rows per image: min {p['min']:g}, median {p['median']:g}, mean {p['mean']:.2f}, "
                     f"max {p['max']:g}")
    if s.score_counts:
        lines.append(f"scores: min {s.score_min:.4f}, max {s.score_max:.4f}")
        peak = max(s.score_counts) or 1
        n = len(s.score_counts)
        for i, (lo, hi, c) in enumerate(zip(s.score_bins[:-1], s.score_bins[1:], s.score_counts)):
            bar = "#" * int(round(width * c / peak))
            lines.append(f"  [{lo:5.2f}, {hi:5.2f}{']' if i == n - 1 else ')'} {c:>9d} {bar}")
    for col, counts in s.groups.items():
        lines.append(f"by {col}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    if s.top_classes:
        lines.append(f"top {len(s.top_classes)} classes:")
        for lab, name, n in s.top_classes:
            shown = f"{name} ({lab})" if name != lab else lab
            lines.append(f"  {n:>9d}  {shown}")
    return "\n".join(lines) + "\n"


# ----- drawing ----------------------------------------------------------------------------------------------
def class_colours(labels: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """A distinct RGB colour per label: the palette for the first 20 (in sorted order), then golden-ratio hues."""
    out = {}
    for i, lab in enumerate(sorted(set(labels))):
        if i < len(_PALETTE):
            out[lab] = _PALETTE[i]
        else:
            r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 0.95)
            out[lab] = (int(r * 255), int(g * 255), int(b * 255))
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType support for the default font
        return ImageFont.load_default()


def _dashed_rectangle(d: ImageDraw.ImageDraw, xy: tuple[int, int, int, int], colour: tuple[int, int, int],
                      width: int, dash: int) -> None:
    x0, y0, x1, y1 = xy
    for a, b, fixed, horizontal in ((x0, x1, y0, True), (x0, x1, y1, True), (y0, y1, x0, False),
                                    (y0, y1, x1, False)):
        for s in range(a, b + 1, 2 * dash):
            e = min(s + dash - 1, b)
            if horizontal:
                d.rectangle((s, fixed - width // 2, e, fixed + (width - 1) // 2), fill=colour)
            else:
                d.rectangle((fixed - width // 2, s, fixed + (width - 1) // 2, e), fill=colour)


def box_pixels(df: pd.DataFrame, width: int, height: int) -> np.ndarray:
    """Normalized xyxy boxes -> integer pixel corners ``[n, 4]`` (x0, y0, x1, y1), inclusive, clipped."""
    b = df[list(BOX_COLUMNS)].to_numpy(np.float64).reshape(-1, 4) * [width, height, width, height]
    px = np.floor(b).astype(np.int64)
    px[:, 2:] = np.ceil(b[:, 2:]).astype(np.int64) - 1
    px[:, [0, 2]] = np.clip(px[:, [0, 2]], 0, width - 1)
    px[:, [1, 3]] = np.clip(px[:, [1, 3]], 0, height - 1)
    px[:, 2:] = np.maximum(px[:, 2:], px[:, :2])
    return px


def decode_masks(df: pd.DataFrame, width: int, height: int) -> list[np.ndarray]:
    """The ``masks`` table's RLEs -> boolean ``[height, width]`` arrays (resized nearest when sizes differ)."""
    from pycocotools import mask as mask_utils

    from stages.metrics.segmentation import rle_from_row

    out = []
    for counts, h, w in zip(df["rle"], df["mask_height"], df["mask_width"]):
        m = mask_utils.decode(rle_from_row(counts, h, w)).astype(bool)
        if m.shape != (height, width):
            m = np.asarray(Image.fromarray(m).resize((width, height), Image.NEAREST), dtype=bool)
        out.append(m)
    return out


def draw_detections(image: Image.Image, dets: pd.DataFrame, *, names: Mapping[str, str] | None = None,
                    score_thr: float = 0.0, gt: pd.DataFrame | None = None, labels: bool = True,
                    mask_alpha: float = 0.45, line_width: int | None = None) -> Image.Image:
    """Draw one image's detections (and ground truth) on a copy of ``image``; returns the new RGB image.

    ``dets`` holds normalized xyxy boxes with ``label`` and ``score`` (rows below ``score_thr`` are skipped),
    plus ``rle``/``mask_height``/``mask_width`` when masks are to be filled in. Detections are solid boxes with a
    ``name score`` tag; ``gt`` boxes (a ``boxes`` table slice) are dashed in their class colour with a ``GT``
    tag. ``labels=False`` draws the outlines only.
    """
    names = names or {}
    img = image.convert("RGB")
    W, H = img.size
    if "score" in dets:
        dets = dets[dets["score"] >= score_thr].sort_values("score", kind="stable")  # best drawn last (on top)
    gt = gt if gt is not None else dets.iloc[:0]
    colours = class_colours(list(dets["label"]) + list(gt["label"]))
    lw = line_width or max(1, round(min(W, H) / 200))
    font = _font(max(10, round(min(W, H) / 40)))

    if "rle" in dets and len(dets):
        arr = np.asarray(img, dtype=np.float32)
        for m, lab in zip(decode_masks(dets, W, H), dets["label"]):
            arr[m] = (1 - mask_alpha) * arr[m] + mask_alpha * np.asarray(colours[lab], np.float32)
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))

    d = ImageDraw.Draw(img)
    tags = []
    for (x0, y0, x1, y1), lab in zip(box_pixels(gt, W, H), gt["label"]):
        _dashed_rectangle(d, (int(x0), int(y0), int(x1), int(y1)), colours[lab], lw, dash=max(3, 3 * lw))
        tags.append(((int(x0), int(y1)), f"GT {names.get(lab, lab)}", colours[lab], "below"))
    scores = dets["score"] if "score" in dets else [None] * len(dets)
    for (x0, y0, x1, y1), lab, sc in zip(box_pixels(dets, W, H), dets["label"], scores):
        d.rectangle((int(x0), int(y0), int(x1), int(y1)), outline=colours[lab], width=lw)
        text = names.get(lab, lab) + (f" {sc:.2f}" if sc is not None else "")
        tags.append(((int(x0), int(y0)), text, colours[lab], "above"))
    if labels:
        for (x, y), text, colour, where in tags:
            l, t, r, b = d.textbbox((0, 0), text, font=font)
            tw, th = r - l + 2, b - t + 2
            if where == "above":  # over the box's top edge, or just inside it at the image border
                ty = y - th if y - th >= 0 else y
            else:  # under the box's bottom edge, or just inside it at the image border
                ty = y + 1 if y + 1 + th <= H else y - th
            ty = max(0, min(ty, H - th))
            tx = max(0, min(x, W - tw))
            d.rectangle((tx, ty, tx + tw - 1, ty + th - 1), fill=colour)
            lum = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
            d.text((tx + 1 - l, ty + 1 - t), text, fill=(0, 0, 0) if lum > 150 else (255, 255, 255), font=font)
    return img


def render_image(*, image_id: str, images: pd.DataFrame, dets: pd.DataFrame, names: Mapping[str, str] | None,
                 score_thr: float, gt: pd.DataFrame | None = None, min_side: int = 0,
                 source: object = None) -> Image.Image:
    """Open ``image_id`` (path from the ``images`` table) and draw its rows of ``dets`` (and ``gt``) on it.

    Images whose shorter side is below ``min_side`` pixels are upscaled first so that the tags stay legible."""
    row = images[images["image_id"] == image_id]
    if row.empty:
        raise InputError(f"unknown image id {image_id!r}: not in the images table", file=source,
                         field="image_id")
    path = Path(row["path"].iloc[0])
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB")
        if 0 < min(image.size) < min_side:
            f = min_side / min(image.size)
            image = image.resize((round(image.size[0] * f), round(image.size[1] * f)), Image.BILINEAR)
    except (FileNotFoundError, OSError) as exc:
        raise InputError(f"cannot open image {image_id!r} at {path}: {exc}", file=source, field="path") from exc
    mine = dets[dets["image_id"] == image_id]
    gt_mine = gt[gt["image_id"] == image_id] if gt is not None else None
    return draw_detections(image, mine, names=names, score_thr=score_thr, gt=gt_mine)


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help="a canonical parquet file (detections, masks, boxes, ...)")
    p.add_argument("--classes", type=Path, help="classes.parquet or the OpenImages class-description CSV")
    p.add_argument("--top", type=int, default=15, help="how many of the most frequent classes to list")
    p.add_argument("--bins", type=int, default=10, help="score histogram bins")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    p.add_argument("--image", help="an ImageID whose rows to draw (needs --images and --out)")
    p.add_argument("--images", type=Path, nargs="+", help="images table(s) with the image paths")
    p.add_argument("--boxes", type=Path, help="ground-truth boxes table: draw them dashed")
    p.add_argument("--score-thr", type=float, default=0.3, help="draw only rows scoring at least this")
    p.add_argument("--out", type=Path, help="PNG to write the drawing to")
    p.add_argument("--min-side", type=int, default=480, help="upscale smaller images to this (0: never)")
    a = p.parse_args(argv)
    if a.file.suffix.lower() != ".parquet":
        raise InputError("not a parquet file (expected a .parquet canonical table)", file=a.file)
    table, df, prov = read_canonical(a.file)
    names = read_class_names(a.classes) if a.classes else {}
    if a.image is None:
        s = summarize(df, table=table, provenance=prov, names=names, top=a.top, bins=a.bins)
        print(json.dumps(s.to_json(), indent=2) if a.json else format_summary(s), end="" if not a.json else "\n")
        return
    if not a.images or a.out is None:
        raise InputError("--image needs --images <images.parquet> and --out <file.png>", field="--image")
    if not {"image_id", "label", *BOX_COLUMNS} <= set(df.columns):
        raise InputError(f"a {table!r} table has no boxes to draw", file=a.file)
    images = pd.concat([read_table(x, "images") for x in a.images], ignore_index=True)
    gt = read_table(a.boxes, "boxes") if a.boxes else None
    img = render_image(image_id=a.image, images=images, dets=df, names=names, score_thr=a.score_thr, gt=gt,
                       min_side=a.min_side, source=", ".join(map(str, a.images)))
    with atomic_path(a.out) as tmp:
        img.save(tmp, format="PNG")
    n = int(((df["image_id"] == a.image) & (df["score"] >= a.score_thr if "score" in df else True)).sum())
    print(f"inspect: drew {n} {table} rows of {a.image} -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
