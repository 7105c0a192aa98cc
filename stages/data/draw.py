"""Drawing primitives for ``orchard-mini``: real photo backgrounds and real handwritten glyphs, no downloads.

Backgrounds are crops of the photos that ship inside scikit-learn (``load_sample_images``: china, flower) and
scikit-image (``skimage.data``: astronaut, chelsea, coffee, rocket, hubble_deep_field, immunohistochemistry,
and the grey brick, grass, gravel, moon, camera, tinted). Digits are the 8x8 handwritten digits of
``sklearn.datasets.load_digits``, upscaled with smoothing.

Every shape function returns an ``alpha`` array ``[h, w]`` in [0, 1] that fills its ``w x h`` box (the ink
touches all four sides, so the box is tight); ``paint`` turns it into an RGB patch. Arrays are float32, images
are ``[H, W, 3]`` in 0..255. No global random state: callers pass a ``numpy.random.Generator``.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

#: skimage.data functions whose files ship with the wheel (no pooch download)
_SKIMAGE_COLOR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
_SKIMAGE_GREY = ("brick", "grass", "gravel", "moon", "camera")


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 handwritten digits: (images ``[N, 8, 8]`` float32 in [0, 1], targets ``[N]`` int)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def glyph_ink_aspects() -> np.ndarray:
    """Width / height of each glyph's ink bounding box (pixels >= 0.25), ``[N]``."""
    imgs, _ = digits()
    ink = imgs >= 0.25
    cols, rows = ink.any(axis=1), ink.any(axis=2)
    w = cols.shape[1] - np.argmax(cols[:, ::-1], axis=1) - np.argmax(cols, axis=1)
    h = rows.shape[1] - np.argmax(rows[:, ::-1], axis=1) - np.argmax(rows, axis=1)
    return (w / np.maximum(h, 1)).astype(np.float64)


@functools.lru_cache(maxsize=1)
def background_sources() -> tuple[np.ndarray, ...]:
    """The bundled photos as uint8 RGB arrays (grey ones stay 2-D and are tinted when used)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = [np.ascontiguousarray(im) for im in load_sample_images().images]
    out += [np.ascontiguousarray(getattr(skimage.data, n)()[..., :3]) for n in _SKIMAGE_COLOR]
    out += [np.ascontiguousarray(getattr(skimage.data, n)()) for n in _SKIMAGE_GREY]
    return tuple(out)


def background(rng: np.random.Generator, width: int, height: int,
               contrast: tuple[float, float] = (0.45, 0.75)) -> np.ndarray:
    """A random crop of a bundled photo, rescaled to ``width x height``, flipped, colour- and
    contrast-jittered (``contrast`` range, below 1 lowers it so that the pasted objects stand out).
    ``[H, W, 3]`` float32."""
    srcs = background_sources()
    src = srcs[int(rng.integers(len(srcs)))]
    sh, sw = src.shape[:2]
    aspect = width / height
    scale = rng.uniform(0.35, 1.0)
    ch = int(min(sh, sw / aspect) * scale)
    cw = max(8, int(ch * aspect))
    ch = max(8, ch)
    y0 = int(rng.integers(0, sh - ch + 1))
    x0 = int(rng.integers(0, sw - cw + 1))
    crop = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw])
    arr = np.asarray(crop.resize((width, height), Image.BILINEAR), dtype=np.float32)
    if arr.ndim == 2:
        tint = rng.uniform(0.55, 1.0, size=3).astype(np.float32)
        arr = arr[..., None] * tint
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    mean = arr.mean(axis=(0, 1), keepdims=True)
    c = rng.uniform(*contrast)
    brightness = rng.uniform(-25, 15)
    return (mean + (arr - mean) * c + brightness).astype(np.float32)


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((w, h), Image.BICUBIC))


def _ink_crop(a: np.ndarray, thr: float) -> np.ndarray:
    ys, xs = np.nonzero(a >= thr)
    if len(ys) == 0:
        return a
    return a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def glyph(img8: np.ndarray, w: int, h: int) -> np.ndarray:
    """An 8x8 digit (values in [0, 1]) upscaled with bicubic smoothing to a ``w x h`` stroke mask whose ink
    touches all four sides."""
    g = _ink_crop(img8, 0.25)
    g = np.pad(g, 1)  # a zero border lets the bicubic kernel fade out at the edges
    a = _resize(g, w + 2 * max(1, w // 8), h + 2 * max(1, h // 8))
    a = np.clip((a - 0.45) / 0.15, 0.0, 1.0)
    a = _ink_crop(a, 0.5)
    a = np.clip(_resize(a, w, h), 0.0, 1.0)
    return a


def disc(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    d = np.sqrt(((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2) * (min(w, h) / 2)
    return np.clip(min(w, h) / 2 - d + 0.5, 0.0, 1.0)


def triangle(w: int, h: int) -> np.ndarray:
    s = 3
    im = Image.new("L", (w * s, h * s), 0)
    ImageDraw.Draw(im).polygon([(w * s / 2, 0), (w * s - 1, h * s - 1), (0, h * s - 1)], fill=255)
    return np.asarray(im.resize((w, h), Image.BOX), dtype=np.float32) / 255.0


def frame(w: int, h: int, thickness: int) -> np.ndarray:
    a = np.ones((h, w), np.float32)
    a[thickness:h - thickness, thickness:w - thickness] = 0.0
    return a


def pole(w: int, h: int) -> np.ndarray:
    return np.ones((h, w), np.float32)


def square(w: int, h: int) -> np.ndarray:
    """A solid block (the external dataset's "square"; painted plain, not striped like a pole)."""
    return np.ones((h, w), np.float32)


def cross(w: int, h: int) -> np.ndarray:
    """A plus sign: two bars, each a third of the box across, through the centre."""
    a = np.zeros((h, w), np.float32)
    tw, th = max(2, round(w / 3)), max(2, round(h / 3))
    a[:, (w - tw) // 2:(w - tw) // 2 + tw] = 1.0
    a[(h - th) // 2:(h - th) // 2 + th, :] = 1.0
    return a


def shape_alpha(kind: str, w: int, h: int, *, glyph_img: np.ndarray | None = None, thickness: int = 5) -> np.ndarray:
    if kind == "glyph":
        assert glyph_img is not None
        return glyph(glyph_img, w, h)
    if kind == "disc":
        return disc(w, h)
    if kind == "triangle":
        return triangle(w, h)
    if kind == "frame":
        return frame(w, h, thickness)
    if kind == "pole":
        return pole(w, h)
    if kind == "square":
        return square(w, h)
    if kind == "cross":
        return cross(w, h)
    raise ValueError(f"unknown shape kind {kind!r}")


def paint(kind: str, w: int, h: int, color: tuple[int, int, int], shade: float) -> np.ndarray:
    """The RGB patch ``[h, w, 3]`` of one object: its colour with a vertical light gradient; poles are striped
    (colour / white bands), discs get a highlight, frames a bevel. ``shade`` in [0.75, 1.1] varies brightness."""
    c = np.asarray(color, np.float32) * shade
    grad = np.linspace(1.08, 0.88, h, dtype=np.float32)[:, None, None]
    rgb = np.broadcast_to(c, (h, w, 3)) * grad
    if kind == "pole":
        band = max(3, w)
        white = ((np.arange(h) // band) % 2 == 1)[:, None, None]
        rgb = np.where(white, np.float32(235.0), rgb)
    elif kind == "disc":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r = np.sqrt((xx - w * 0.35) ** 2 + (yy - h * 0.35) ** 2) / max(w, h)
        rgb = rgb * (1.15 - 0.6 * r)[..., None]
    elif kind == "frame":
        xx = np.linspace(0.85, 1.15, w, dtype=np.float32)[None, :, None]
        rgb = rgb * xx
    return np.clip(rgb, 0, 255).astype(np.float32)


def rim(alpha: np.ndarray, rgb: np.ndarray, *, darkness: float = 0.35) -> np.ndarray:
    """Darken a 1-px rim just inside the shape's edge (keeps light objects visible on light backgrounds
    without growing the object beyond its box)."""
    from scipy.ndimage import grey_erosion

    inner = grey_erosion(alpha, size=(3, 3))
    edge = np.clip(alpha - inner, 0.0, 1.0)[..., None]
    return rgb * (1.0 - (1.0 - darkness) * edge)


def composite(canvas: np.ndarray, alpha: np.ndarray, rgb: np.ndarray, x0: int, y0: int,
              *, shadow: int = 2, shadow_strength: float = 0.55) -> None:
    """Paste ``rgb`` with ``alpha`` at (x0, y0) in place, with a soft dark drop shadow ``shadow`` px down-right
    (``shadow_strength`` of darkening). The object must lie inside the canvas; the shadow is clipped."""
    h, w = alpha.shape
    H, W = canvas.shape[:2]
    if shadow:
        sx0, sy0 = x0 + shadow, y0 + shadow
        sx1, sy1 = min(W, sx0 + w), min(H, sy0 + h)
        sa = alpha[:sy1 - sy0, :sx1 - sx0, None] * shadow_strength
        region = canvas[sy0:sy1, sx0:sx1]
        region *= 1.0 - sa
    a = alpha[..., None]
    region = canvas[y0:y0 + h, x0:x0 + w]
    region *= 1.0 - a
    region += rgb * a


# ----- clutter (unlabelled distractors) and image degradations ------------------------------------------------
DISTRACTOR_KINDS = ("stroke", "blob", "line", "patch", "ring_arc")


def distractor(rng: np.random.Generator, canvas: np.ndarray, *, palette: np.ndarray, size: tuple[float, float]
               ) -> None:
    """Paint one unlabelled distractor in place: a curved pen stroke (digit-like, but no digit), an irregular
    blob, a straight bar, a textured patch cut from another photo, or an open arc. Colours come from
    ``palette`` (``[K, 3]``, e.g. the class colours, so that colour alone cannot tell an object from clutter)
    or are random; ``size`` is the (min, max) extent in pixels. None of them is a class: a stroke is an open
    curve, a bar is solid (no stripes) and shorter than a pole, an arc is open (not a disc), a blob is not
    convex-regular."""
    H, W = canvas.shape[:2]
    kind = DISTRACTOR_KINDS[int(rng.integers(len(DISTRACTOR_KINDS)))]
    ext = float(rng.uniform(*size))
    cx, cy = float(rng.uniform(0, W)), float(rng.uniform(0, H))
    s = 2  # supersampling for smooth edges
    im = Image.new("L", (W * s, H * s), 0)
    d = ImageDraw.Draw(im)
    if kind == "stroke":
        n = int(rng.integers(3, 6))
        pts = np.cumsum(rng.normal(0, ext / 3, size=(n, 2)), axis=0) + [cx, cy]
        # a smooth curve near the control points (corner cutting)
        curve = pts
        for _ in range(3):
            curve = np.concatenate([curve[:1], (curve[:-1] + curve[1:]) / 2, curve[-1:]])
        width = int(rng.integers(2, 6)) * s
        d.line([tuple(p * s) for p in curve], fill=255, width=width, joint="curve")
    elif kind == "blob":
        n = int(rng.integers(5, 9))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = ext / 2 * rng.uniform(0.4, 1.0, n)
        pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)
        d.polygon([tuple(p * s) for p in pts], fill=255)
    elif kind == "line":
        a = rng.uniform(0, np.pi)
        L = ext * rng.uniform(0.6, 1.2)
        dx, dy = np.cos(a) * L / 2, np.sin(a) * L / 2
        d.line([((cx - dx) * s, (cy - dy) * s), ((cx + dx) * s, (cy + dy) * s)], fill=255,
               width=int(rng.integers(2, 7)) * s)
    elif kind == "ring_arc":
        r = ext / 2
        start = float(rng.uniform(0, 360))
        d.arc([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], start, start + float(rng.uniform(90, 250)),
              fill=255, width=int(rng.integers(2, 6)) * s)
    else:  # patch
        w, h = ext, ext * rng.uniform(0.5, 1.5)
        d.ellipse([(cx - w / 2) * s, (cy - h / 2) * s, (cx + w / 2) * s, (cy + h / 2) * s], fill=255)
    alpha = np.asarray(im.resize((W, H), Image.BOX), dtype=np.float32) / 255.0
    ys, xs = np.nonzero(alpha)
    if len(ys) == 0:
        return
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    a = alpha[y0:y1, x0:x1, None] * np.float32(rng.uniform(0.6, 1.0))
    if kind == "patch":
        rgb = background(rng, int(x1 - x0), int(y1 - y0), contrast=(1.0, 1.6))
    else:
        c = palette[int(rng.integers(len(palette)))] if rng.random() < 0.6 else rng.uniform(20, 250, 3)
        c = np.clip(np.asarray(c, np.float32) * np.float32(rng.uniform(0.7, 1.15)), 0, 255)
        rgb = np.broadcast_to(c.astype(np.float32), (int(y1 - y0), int(x1 - x0), 3))
    region = canvas[y0:y1, x0:x1]
    region *= 1.0 - a
    region += rgb * a


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an ``[H, W, 3]`` float image over the two spatial axes."""
    from scipy.ndimage import gaussian_filter

    if sigma <= 0:
        return img
    return gaussian_filter(img, sigma=(sigma, sigma, 0)).astype(np.float32)
