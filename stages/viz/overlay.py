"""Boxes and masks drawn on images: detections solid with a ``name score`` tag, ground truth dashed, masks
filled; used by ``stages.inspect`` (one image) and ``stages.report`` (sample images)."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from stages.core.errors import InputError
from stages.formats.tables import BOX_COLUMNS

# 20 well separated colours (Tableau / matplotlib tab20 order: dark shades first)
_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
            (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210),
            (199, 199, 199), (219, 219, 141), (158, 218, 229))


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
