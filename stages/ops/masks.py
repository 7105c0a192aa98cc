"""Instance masks: paste per-box probability maps into their images, vote across models, encode as COCO RLE.

Nothing here allocates an image-sized array: the RLE of a full image is built from the runs of the box's
columns (COCO RLE is column-major), and inside a box only the pixels near the mask's boundary are evaluated.

**Paste** (the definition; :func:`resize_bilinear` + ``tests/ops_reference.py:paste_mask`` spell it out on a
full image). A box ``(x_min, y_min, x_max, y_max)`` normalized to [0, 1] covers the pixels whose centre lies
in ``[x_min * W, x_max * W) x [y_min * H, y_max * H)``, i.e. columns ``ceil(x_min * W - 0.5) ..
ceil(x_max * W - 0.5) - 1`` (rows alike), so a box narrower than a pixel covers one column or none (an empty
mask). The ``[h, w]`` probability map is resized to exactly that region, bilinearly with half-pixel centres
and clamped edges (``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``,
``cv2.INTER_LINEAR``; no antialiasing when shrinking), in float64, rows of the map first; a pixel is
foreground when its value is ``> thr`` (0.5). Pixels outside the box are background.

**Vote** (paper §8.4), ``M`` models' maps for the same boxes:

- ``mean`` (the default): foreground where the mean of the models' probabilities ``> thr``. The maps are
  averaged (float64) and then pasted; bilinear resizing is linear, so this is the per-pixel mean of the pasted
  maps (up to float rounding), at the cost of one model. Ties need no rule.
- ``majority``: each model's pasted map is thresholded at ``thr`` and a pixel is foreground when *more than
  half* of the models say so. A tie (``M`` even, exactly ``M / 2`` votes) is background, so two models give
  their intersection.

With one model both are :func:`paste_masks`.

**How** (exact, not approximate: every pixel equals the full-image definition above). The box is cut into
cells: the rows that interpolate between the same two map rows form a row band (plus the clamped bands at
either end), columns likewise. A cell whose four corner values all lie more than ``1e-9`` above (below)
``thr`` is foreground (background) at every pixel, because a bilinear value is a convex combination of its
corners and float64 rounding is below ``1e-15`` on [0, 1]. In the other cells each column's profile is linear
along the band, so its crossing row is solved for; only where a row lies within ``1e-3`` rows of the crossing
(float rounding could decide it) are the rows beside it evaluated with the definition's arithmetic, and a cell
with a column flat within ``1e-7`` of ``thr`` is evaluated pixel by pixel. Each column becomes a few (start
row, label) pieces, the pieces the run boundaries in COCO's column-major order (a run may continue into the
next column), the boundaries the counts and pycocotools' compressed string, for all boxes of a chunk at once.
"""

from __future__ import annotations

import numpy as np

THR = 0.5
VOTES = ("mean", "majority")
DEFAULT_VOTE = "mean"
CHUNK_BOXES = 128
_DELTA = 1e-9  # corners this far from thr decide a whole cell (rounding error of a value: < 1e-15)
_GAMMA = 1e-7  # a column's slope along a band below this: evaluate every row of the band
_ROW_TOL = 1e-3  # a crossing this close to a row (in rows): evaluate the rows beside it (float error < 1e-5)


# ---------------------------------------------------------------- the definition: box pixels and bilinear resize
def box_pixels(boxes_xyxy_norm: np.ndarray, height, width) -> tuple[np.ndarray, ...]:
    """Pixel region ``(r0, r1, c0, c1)`` (half-open) of each normalized box: the pixels whose centre is inside.

    ``boxes_xyxy_norm``: [N, 4]; ``height``, ``width``: ints or [N] (each box's image).
    """
    b = np.asarray(boxes_xyxy_norm, dtype=np.float64)
    h = np.asarray(height, dtype=np.float64)
    w = np.asarray(width, dtype=np.float64)
    c0 = np.ceil(b[:, 0] * w - 0.5).astype(np.int64)
    c1 = np.ceil(b[:, 2] * w - 0.5).astype(np.int64)
    r0 = np.ceil(b[:, 1] * h - 0.5).astype(np.int64)
    r1 = np.ceil(b[:, 3] * h - 0.5).astype(np.int64)
    return r0, r1, c0, c1


def _axis(i: np.ndarray, scale, n_src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source samples of destination indices ``i`` (float64): ``(i0, i1, w, raw)`` with value
    ``src[i0] * (1 - w) + src[i1] * w``; ``raw`` is the unclamped source coordinate."""
    raw = (i + 0.5) * scale - 0.5
    s = np.maximum(raw, 0.0)
    i0 = np.minimum(s.astype(np.int64), n_src - 1)
    i1 = np.minimum(i0 + 1, n_src - 1)
    return i0, i1, s - i0, raw


def resize_bilinear(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w] map -> [height, width] float64: bilinear, half-pixel centres, edges clamped (the paste's resize)."""
    p = np.asarray(prob, dtype=np.float64)
    y0, y1, wy, _ = _axis(np.arange(height, dtype=np.float64), p.shape[0] / height, p.shape[0])
    x0, x1, wx, _ = _axis(np.arange(width, dtype=np.float64), p.shape[1] / width, p.shape[1])
    x = p[:, x0] * (1.0 - wx) + p[:, x1] * wx
    return x[y0] * (1.0 - wy)[:, None] + x[y1] * wy[:, None]


# ---------------------------------------------------------------- the process's allocator
_RETAINED: list[bool] = []


def retain_freed_memory(trim_mb: int = 256, mmap_mb: int = 32) -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (``mallopt``: trim threshold ``trim_mb``, arrays up to
    ``mmap_mb`` from the heap) instead of handing it back to the kernel after every chunk. The ops allocate
    and free many temporaries of 0.1-10 MB per chunk; with glibc's defaults they come back as fresh pages,
    and on this VM the page faults (60-75 a box) cost as much as the work: 380 vs 200 us a box (``mean``),
    430 vs 310 (``majority``), ``benchmarks/masks.py``'s boxes. Once per process, process-wide (the process
    keeps up to ``trim_mb`` of freed memory); a no-op where malloc is not glibc's. A process setting, so the
    entry point calls it (``benchmarks/masks.py`` does; a mask stage's ``main`` should), not the ops. Returns whether the settings are in force."""
    if not _RETAINED:
        ok = False
        try:
            import ctypes

            mallopt = ctypes.CDLL(None).mallopt
            ok = mallopt(-1, trim_mb << 20) == 1 and mallopt(-3, mmap_mb << 20) == 1  # M_TRIM/M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass
        _RETAINED.append(ok)
    return _RETAINED[0]


# ---------------------------------------------------------------- public API
def paste_masks(probs: np.ndarray, boxes_xyxy_norm: np.ndarray, *, height, width, thr: float = THR) -> list[dict]:
    """One model: ``probs`` [N, h, w] (probabilities in [0, 1]) pasted at ``boxes_xyxy_norm`` [N, 4] into
    images of ``height`` x ``width`` (ints, or [N] per box), thresholded (``> thr``) -> N COCO RLEs
    ``{"size": [H, W], "counts": bytes}`` of the full images (pycocotools' compressed form)."""
    p = np.asarray(probs)
    if p.ndim != 3:
        raise ValueError(f"probs must be [N, h, w] (one 2-D map per box), not shape {p.shape}")
    return vote_masks(p[None], boxes_xyxy_norm, height=height, width=width, vote="mean", thr=thr)


def vote_masks(probs: np.ndarray, boxes_xyxy_norm: np.ndarray, *, height, width, vote: str = DEFAULT_VOTE,
               thr: float = THR, chunk_boxes: int = CHUNK_BOXES) -> list[dict]:
    """``M`` models' maps ``probs`` [M, N, h, w] for the same N boxes -> N full-image COCO RLEs of the vote
    (``mean`` or ``majority``, see the module docstring). Boxes may come from different images (``height``,
    ``width`` per box); they are processed ``chunk_boxes`` at a time, so the working memory does not grow
    with N (the output, ~1 kB a mask, does)."""
    p, boxes, hh, ww = _check(probs, boxes_xyxy_norm, height, width, vote, thr)
    n = boxes.shape[0]
    out: list[dict] = []
    for a in range(0, n, chunk_boxes):
        b = min(n, a + chunk_boxes)
        _check_probs(p[:, a:b], a)
        counts = _vote_chunk(p[:, a:b], boxes[a:b], hh[a:b], ww[a:b], vote=vote, thr=thr)
        out.extend({"size": [int(h), int(w)], "counts": c} for h, w, c in zip(hh[a:b], ww[a:b], counts))
    return out


def _check(probs, boxes, height, width, vote, thr):
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, not {vote!r}")
    if not np.isfinite(thr) or not 0.0 <= thr < 1.0:
        raise ValueError(f"thr must be in [0, 1), not {thr}")
    p = np.asarray(probs)
    if p.ndim != 4:
        raise ValueError(f"probs must be [models, boxes, h, w] (one 2-D map per model and box), "
                         f"not shape {p.shape}")
    if p.shape[0] < 1 or p.shape[2] < 1 or p.shape[3] < 1:
        raise ValueError(f"probs needs >= 1 model and maps of >= 1 x 1 pixels, not shape {p.shape}")
    if p.dtype not in (np.float32, np.float64):
        p = p.astype(np.float32)
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] (x_min, y_min, x_max, y_max normalized), not shape {b.shape}")
    if b.shape[0] != p.shape[1]:
        raise ValueError(f"{b.shape[0]} boxes but probability maps for {p.shape[1]} boxes")
    names = ("x_min", "y_min", "x_max", "y_max")
    bad = ~np.isfinite(b) | (b < 0.0) | (b > 1.0)
    if bad.any():
        i, k = np.argwhere(bad)[0]
        raise ValueError(f"box {i}: {names[k]} = {b[i, k]} is outside [0, 1] (boxes are normalized xyxy)")
    inv = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if inv.any():
        i = int(np.flatnonzero(inv)[0])
        raise ValueError(f"box {i}: x_max < x_min or y_max < y_min ({b[i].tolist()})")
    sizes = []
    for name, v in (("height", height), ("width", width)):
        a = np.asarray(v)
        if a.ndim == 0:
            a = np.full(b.shape[0], a)
        if a.shape != (b.shape[0],):
            raise ValueError(f"{name} must be one int or one per box ({b.shape[0]}), not shape {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            if not (np.isfinite(a).all() and (a == np.round(a)).all()):
                raise ValueError(f"image {name} must be whole pixels")
        a = a.astype(np.int64)
        if len(a) and a.min() < 1:
            raise ValueError(f"image {name} must be >= 1 pixel, not {a.min()}")
        sizes.append(a)
    return p, b, sizes[0], sizes[1]


def _check_probs(p: np.ndarray, first_box: int) -> None:
    """Probabilities in [0, 1] (the exactness argument and the vote assume it); NaN is rejected too."""
    if p.size and not (p.min() >= 0.0 and p.max() <= 1.0):
        bad = ~((p >= 0.0) & (p <= 1.0))
        m, i = np.argwhere(bad.reshape(bad.shape[0], bad.shape[1], -1).any(axis=2))[0]
        v = p[m, i][bad[m, i]][0]
        raise ValueError(f"model {m}, box {first_box + i}: probability {v} is not in [0, 1]")


# ---------------------------------------------------------------- the chunk kernel
def _flat_axis(sizes: np.ndarray, n_src: int):
    """All destination indices of all boxes along one axis, concatenated -> (each box's offset, then per index
    ``i0, i1, w, 1 - w`` with the arithmetic of :func:`resize_bilinear`, then [n, n_src + 2] the first index of
    each band relative to its box, the last column = the size). Band 0 = clamped start, band k + 1 = between
    source samples k and k + 1 (the last one, k = n_src - 1: clamped end)."""
    off = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=off[1:])
    box = np.repeat(np.arange(len(sizes)), sizes)
    i = (np.arange(off[-1]) - off[box]).astype(np.float64)
    scale = (n_src / np.maximum(sizes, 1))[box]
    i0, i1, w, raw = _axis(i, scale, n_src)
    band = np.where(raw < 0.0, 0, i0 + 1)
    # first index of each band (band n_src + 1 = end) per box, relative to the box
    key = box * (n_src + 2) + band
    q = np.arange(len(sizes))[:, None] * (n_src + 2) + np.arange(n_src + 2)[None, :]
    start = np.searchsorted(key, q.ravel(), "left").reshape(len(sizes), n_src + 2) - off[:-1, None]
    return off, i0, i1, w, 1.0 - w, start


def _pairs_and(x: np.ndarray, axis: int) -> np.ndarray:
    """AND of neighbours along ``axis`` (1 or 2) with the edges repeated: [.., s, ..] -> [.., s + 1, ..]."""
    shape = list(x.shape)
    shape[axis] += 1
    out = np.empty(shape, dtype=bool)
    lo, hi, mid = [slice(None)] * 3, [slice(None)] * 3, [slice(None)] * 3
    lo[axis], hi[axis], mid[axis] = slice(0, 1), slice(-1, None), slice(1, -1)
    a, b = [slice(None)] * 3, [slice(None)] * 3
    a[axis], b[axis] = slice(0, -1), slice(1, None)
    out[tuple(lo)] = x[tuple(lo)]
    out[tuple(hi)] = x[tuple(hi)]
    np.logical_and(x[tuple(a)], x[tuple(b)], out=out[tuple(mid)])
    return out


def _cells(m: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray]:
    """[n, h, w] maps -> (certainly above, certainly below) per cell, [n, h + 1, w + 1] (row band, column band):
    all four corners more than ``_DELTA`` above (below) ``thr``."""
    return tuple(_pairs_and(_pairs_and(x, 1), 2) for x in (m > thr + _DELTA, m < thr - _DELTA))


def mean_probs(probs: np.ndarray) -> np.ndarray:
    """[M, ...] -> the mean over models, float64 (``mean`` vote; one model: returned as is)."""
    if len(probs) == 1:
        return probs[0]
    m = probs[0].astype(np.float64)
    for x in probs[1:]:
        m += x
    m /= len(probs)
    return m


def _vote_chunk(p: np.ndarray, boxes: np.ndarray, hh: np.ndarray, ww: np.ndarray, *, vote: str, thr: float
                ) -> list[bytes]:
    """One chunk of boxes -> their compressed COCO counts strings."""
    maps = mean_probs(p)[None] if vote == "mean" else p
    r0, r1, c0, c1 = box_pixels(boxes, hh, ww)
    bh, bw = r1 - r0, c1 - c0
    hw = hh * ww
    live = np.flatnonzero((bh > 0) & (bw > 0))  # the others are empty masks
    ev_box, ev_pos = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if len(live) == len(hw):
        ev_box, ev_pos = _events(maps, r0, bh, c0, bw, hh, hw, thr)
    elif len(live):
        ev_box, ev_pos = _events(maps[:, live], r0[live], bh[live], c0[live], bw[live], hh[live], hw[live], thr)
        ev_box = live[ev_box]
    return _rle_strings(ev_box, ev_pos, hw)


def _events(maps, r0, bh, c0, bw, hh, hw, thr):
    """Sorted run boundaries (box, flat column-major position in its image) of the voted masks of live boxes."""
    mm, n, hm, wm = maps.shape
    row_off, Y0, Y1, WY, CY, rs = _flat_axis(bh, hm)  # rs [n, hm + 2]: first row of each row band
    col_off, X0, X1, WX, CX, cs = _flat_axis(bw, wm)  # cs [n, wm + 2]
    flat = [maps[k].reshape(-1) for k in range(mm)]
    # ---- cell labels of the vote, [n, column band, row band]: 0 background, 1 foreground, 2 mixed
    if mm == 1:
        hi, lo = _cells(maps[0], thr)
        label = 2 - hi.view(np.uint8) - 2 * lo.view(np.uint8)
    else:
        n_hi = np.zeros((n, hm + 1, wm + 1), dtype=np.uint8)
        n_lo = np.zeros_like(n_hi)
        for k in range(mm):
            hi, lo = _cells(maps[k], thr)
            n_hi += hi
            n_lo += lo
        label = 2 - (2 * n_hi > mm).view(np.uint8) - 2 * (2 * n_lo >= mm).view(np.uint8)
    label = np.ascontiguousarray(label.transpose(0, 2, 1))  # [n, column band, row band]
    # row bands without rows (a box shorter than the map) are skipped: keep the non-empty ones, in order
    row_live = rs[:, 1:] > rs[:, :-1]  # [n, hm + 1]
    band_of = np.broadcast_to(np.arange(hm + 1), row_live.shape)
    short = np.flatnonzero(~row_live.all(axis=1))
    if len(short):
        band_of = band_of.copy()
        band_of[short] = np.argsort(~row_live[short], axis=1, kind="stable")
        label[short] = np.take_along_axis(label[short], band_of[short][:, None, :], axis=2)
    # items: a run of uniform cells down a column band, or one mixed cell; ordered by (box, column band, row)
    item = np.empty(label.shape, dtype=bool)
    item[:, :, 0] = True
    np.not_equal(label[:, :, 1:], label[:, :, :-1], out=item[:, :, 1:])
    item |= label == 2
    item &= (cs[:, 1:] > cs[:, :-1])[:, :, None]
    if len(short):
        item[short] &= (np.arange(hm + 1)[None, :] < row_live[short].sum(axis=1)[:, None])[:, None, :]
    it_k = np.flatnonzero(item)
    it_n, it_k = np.divmod(it_k, (wm + 1) * (hm + 1))
    it_c, it_k = np.divmod(it_k, hm + 1)
    it_lab = label[it_n, it_c, it_k]
    it_b = band_of[it_n, it_k]
    it_rs = rs[it_n, it_b]
    it_re = rs[it_n, it_b + 1]
    it_ncol = cs[it_n, it_c + 1] - cs[it_n, it_c]
    it_col = col_off[it_n] + cs[it_n, it_c]  # global index of the band's first column
    # ---- mixed cells x their columns (pairs): each model's crossing along the band
    mixed = np.flatnonzero(it_lab == 2)
    pair_first = _starts(it_ncol[mixed])
    pair_item = np.repeat(mixed, it_ncol[mixed])
    gcol = it_col[pair_item] + (np.arange(pair_first[-1]) - np.repeat(pair_first[:-1], it_ncol[mixed]))
    pn, pb, prs, pre = it_n[pair_item], it_b[pair_item], it_rs[pair_item], it_re[pair_item]
    base0 = pn * (hm * wm) + np.clip(pb - 1, 0, hm - 1) * wm  # the band's two map rows
    base1 = pn * (hm * wm) + np.minimum(pb, hm - 1) * wm
    xa, xb, wx, cx = X0[gcol], X1[gcol], WX[gcol], CX[gcol]
    i00, i01, i10, i11 = base0 + xa, base0 + xb, base1 + xa, base1 + xb
    npair = len(pn)
    Q = np.empty((mm, npair), dtype=np.int64)  # the first row past the model's crossing (re: none)
    D = np.empty((mm, npair), dtype=np.int8)  # +1: the model turns foreground there, -1: background
    start_votes = np.zeros(npair, dtype=np.int8)
    flat_cell = np.zeros(npair, dtype=bool)
    bhp = bh[pn] / hm
    zlo, zhi = prs - 1.0, pre - 1.0
    shift = pb - 0.5
    for k in range(mm):
        f = flat[k]
        a = f[i00] * cx + f[i01] * wx
        b = f[i10] * cx + f[i11] * wx
        slope = b - a
        on = np.minimum(a, b) > thr + _DELTA
        cert = on | (np.maximum(a, b) < thr - _DELTA)
        mono = np.abs(slope) >= _GAMMA
        mono &= ~cert
        flat_cell |= ~(cert | mono)
        up = slope > 0  # foreground past the crossing
        # rows i > z are past the crossing w* = (thr - a) / slope (sy = band - 1 + w*); exact unless some row
        # is within _ROW_TOL of z, where float rounding decides: those pairs evaluate the two rows exactly
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (shift + (thr - a) / slope) * bhp - 0.5
        z = np.where(mono, z, zhi)
        np.clip(z, zlo, zhi, out=z)
        fz = np.floor(z)
        cand = fz.astype(np.int64) + 1
        amb = np.flatnonzero(mono & ((z - fz < _ROW_TOL) | (z - fz > 1.0 - _ROW_TOL)))
        if len(amb):
            cand[amb] = _exact_crossing(a[amb], b[amb], cand[amb], prs[amb], pre[amb], up[amb],
                                        row_off[pn[amb]], CY, WY, thr)
        Q[k] = np.where(mono, cand, pre)
        D[k] = mono * np.where(up, 1, -1)
        start_votes += np.where(mono, ~up, on)
    # vote pieces of each pair: starts [M + 1, P] = band start, then the models' crossings sorted; labels.
    # A piece of no length (the next starts on the same row) copies a neighbour's label, so it adds no boundary.
    if mm == 1:
        p_start = np.stack([prs, Q[0]])
        votes = np.stack([start_votes, start_votes + D[0]])
    else:
        key = Q * 4 + (D + 1)
        for s in range(mm):  # odd-even transposition sort of the models' (crossing, turn) down axis 0
            for i in range(s % 2, mm - 1, 2):
                lo = np.minimum(key[i], key[i + 1])
                np.maximum(key[i], key[i + 1], out=key[i + 1])
                key[i] = lo
        p_start = np.empty((mm + 1, npair), dtype=np.int64)
        p_start[0] = prs
        np.right_shift(key, 2, out=p_start[1:])
        votes = np.empty((mm + 1, npair), dtype=np.int16)
        votes[0] = start_votes
        for i in range(mm):
            votes[i + 1] = votes[i] + (key[i] & 3) - 1
    p_label = (2 * votes > mm).view(np.uint8)
    for i in range(1, mm + 1):  # pieces at the band's end: the label before them
        p_label[i] = np.where(p_start[i] == pre, p_label[i - 1], p_label[i])
    for i in range(mm - 1, -1, -1):  # pieces followed by one at the same row: that one's label
        p_label[i] = np.where(p_start[i] == p_start[i + 1], p_label[i + 1], p_label[i])
    # a mixed cell with a column flat at thr (any model) is evaluated pixel by pixel
    fb = np.zeros(len(it_n), dtype=bool)
    if npair:
        fb[mixed] = np.logical_or.reduceat(flat_cell, pair_first[:-1])
    # ---- groups (box, column band); every column of a group runs through the group's template of pieces
    # (start row, label): its items' pieces in row order, then the column's end (back to background). The
    # label before a column is always background, so a leading background item needs no piece, and a column
    # that ends in a background item no end piece.
    gkey = it_n * (wm + 1) + it_c
    g_first = np.flatnonzero(np.r_[True, gkey[1:] != gkey[:-1]])
    g_n, g_c = it_n[g_first], it_c[g_first]
    n_g = len(g_first)
    g_end = it_lab[np.r_[g_first[1:], len(it_n)] - 1] != 0
    uni = np.flatnonzero(it_lab < 2)
    fbi = np.flatnonzero(fb)
    it_sub = np.ones(len(it_n), dtype=np.int64)  # pieces per column
    it_sub[mixed] = mm + 1
    it_sub[fbi] = it_re[fbi] - it_rs[fbi]
    it_stride = np.zeros(len(it_n), dtype=np.int64)  # table entries from one column to the next
    it_stride[mixed] = 1
    it_stride[fbi] = it_sub[fbi]
    it_substride = np.ones(len(it_n), dtype=np.int64)  # table entries from one piece to the next
    it_substride[mixed] = npair
    it_substride[fbi] = 1
    it_sub[g_first[it_lab[g_first] == 0]] = 0
    fb_rows, fb_labels, fb_first = _fallback_pieces(flat, fbi, it_n, it_rs, it_re, it_ncol, it_col, mm, hm, wm,
                                                    row_off, Y0, Y1, WY, CY, X0, X1, WX, CX, thr)
    n_uni = len(uni)
    off_pair = n_uni + n_g
    off_fb = off_pair + p_start.size
    ROW = np.concatenate([it_rs[uni], bh[g_n], p_start.ravel(), fb_rows])
    LAB = np.concatenate([it_lab[uni], np.zeros(n_g, np.uint8), p_label.ravel(), fb_labels])
    it_base = np.empty(len(it_n), dtype=np.int64)
    it_base[uni] = np.arange(n_uni)
    it_base[mixed] = off_pair + pair_first[:-1]
    it_base[fbi] = off_fb + fb_first
    g_items = np.diff(np.r_[g_first, len(it_n)])
    it_g = np.repeat(np.arange(n_g), g_items)
    g_P = np.add.reduceat(it_sub, g_first) + g_end if n_g else np.zeros(0, np.int64)
    g_tpl = _starts(g_P)
    it_cum = _starts(it_sub)
    it_tpl = g_tpl[it_g] + (it_cum[:-1] - it_cum[g_first][it_g])
    T = int(g_tpl[-1])
    t_base = np.empty(T, dtype=np.int64)
    t_stride = np.zeros(T, dtype=np.int64)
    slot_item = np.repeat(np.arange(len(it_n)), it_sub)
    slot_sub = np.arange(it_cum[-1]) - it_cum[slot_item]
    slot = it_tpl[slot_item] + slot_sub
    t_base[slot] = it_base[slot_item] + slot_sub * it_substride[slot_item]
    t_stride[slot] = it_stride[slot_item]
    t_base[g_tpl[1:][g_end] - 1] = n_uni + np.flatnonzero(g_end)
    # ---- expand the templates over the columns
    g_ncol = cs[g_n, g_c + 1] - cs[g_n, g_c]
    gc_first = _starts(g_ncol)
    gc_g = np.repeat(np.arange(n_g), g_ncol)
    gc_j = np.arange(gc_first[-1]) - gc_first[gc_g]  # column within the band
    gc_n = g_n[gc_g]
    kbase = _starts(hw + 1)
    gc_key = kbase[gc_n] + (c0[gc_n] + cs[gc_n, g_c[gc_g]] + gc_j) * hh[gc_n] + r0[gc_n]
    gc_P = g_P[gc_g]
    f_first = _starts(gc_P)
    t = np.arange(f_first[-1]) - np.repeat(f_first[:-1] - g_tpl[gc_g], gc_P)
    idx = t_base[t] + np.repeat(gc_j, gc_P) * t_stride[t]
    key = np.repeat(gc_key, gc_P) + ROW[idx]
    lab = LAB[idx]
    # ---- pieces -> run boundaries. Pieces of no length are the neighbours' label, except the end of a column of
    # a box as tall as its image when the next column starts on its first row: it takes the next piece's label.
    full = (r0 == 0) & (bh == hh)
    if full.any():
        i = f_first[1:][np.flatnonzero(full[gc_n] & g_end[gc_g])] - 1
        i = i[i + 1 < len(key)]
        i = i[key[i] == key[i + 1]]
        lab[i] = lab[i + 1]
    change = np.empty(len(lab), dtype=bool)
    change[:1] = lab[:1] != 0
    np.not_equal(lab[1:], lab[:-1], out=change[1:])
    ek = key[change]
    eb = np.searchsorted(kbase, ek, "right") - 1
    pos = ek - kbase[eb]
    inside = pos < hw[eb]
    return eb[inside], pos[inside]


def _exact_crossing(a, b, cand, prs, pre, up, ro, CY, WY, thr):
    """First row of ``[prs, pre]`` past the crossing, from an estimate ``cand`` that may be one row off:
    the rows ``cand - 1`` and ``cand`` are evaluated with the definition's arithmetic."""
    def fg(rows):
        r = ro + np.clip(rows, prs, pre - 1)
        return (a * CY[r] + b * WY[r]) > thr

    before = (cand > prs) & (fg(cand - 1) == up)
    here = (cand < pre) & (fg(cand) == up)
    return np.where(before, cand - 1, np.where(here, cand, np.minimum(cand + 1, pre)))


def _starts(sizes: np.ndarray) -> np.ndarray:
    """[len + 1] exclusive cumulative sum: where each segment starts, then the total."""
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


def _fallback_pieces(flat, fbi, it_n, it_rs, it_re, it_ncol, it_col, mm, hm, wm, row_off, Y0, Y1, WY, CY,
                     X0, X1, WX, CX, thr):
    """Every pixel of the cells in ``fbi``, evaluated with the definition's arithmetic -> (rows, labels) in
    (item, column, row) order and each item's first entry."""
    nrow = it_re[fbi] - it_rs[fbi]
    size = it_ncol[fbi] * nrow
    first = _starts(size)
    if not len(fbi) or first[-1] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8), first[:-1]
    e_item = np.repeat(np.arange(len(fbi)), size)
    e = np.arange(first[-1]) - first[e_item]
    j, r = np.divmod(e, nrow[e_item])
    it = fbi[e_item]
    bn = it_n[it]
    rows = it_rs[it] + r
    gr = row_off[bn] + rows
    gcl = it_col[it] + j
    x0, x1, cx, wx = X0[gcl], X1[gcl], CX[gcl], WX[gcl]
    ya, yb = bn * (hm * wm) + Y0[gr] * wm, bn * (hm * wm) + Y1[gr] * wm
    cnt = np.zeros(len(e), dtype=np.int16)
    for f in flat:
        va = f[ya + x0] * cx + f[ya + x1] * wx
        vb = f[yb + x0] * cx + f[yb + x1] * wx
        cnt += (va * CY[gr] + vb * WY[gr]) > thr
    return rows, (2 * cnt > mm).astype(np.uint8), first[:-1]


def _rle_strings(ev_box: np.ndarray, ev_pos: np.ndarray, hw: np.ndarray) -> list[bytes]:
    """Run boundaries (sorted by box, then position) -> pycocotools' compressed counts string of each box."""
    n = len(hw)
    n_ev = np.bincount(ev_box, minlength=n)
    # the counts of a box: the gaps between its boundaries (from 0), then the tail up to hw
    c_first = _starts(n_ev + 1)
    ends = np.empty(c_first[-1], dtype=np.int64)
    tail = c_first[1:] - 1
    is_ev = np.ones(len(ends), dtype=bool)
    is_ev[tail] = False
    ends[is_ev] = ev_pos
    ends[tail] = hw
    counts = np.empty_like(ends)
    counts[0:1] = ends[0:1]
    np.subtract(ends[1:], ends[:-1], out=counts[1:])
    counts[c_first[:-1]] = ends[c_first[:-1]]
    # pycocotools' string (rleToString): x = counts[i] - counts[i - 2] for i > 2, written 5 bits a char from
    # the low end, 0x20 = more chars follow, +48; the last char's bit 0x10 is the sign
    x = counts.copy()
    i = np.arange(len(x))
    d = i - np.repeat(c_first[:-1], n_ev + 1) > 2
    x[2:] -= np.where(d[2:], counts[:-2], 0)
    y = np.where(x < 0, ~x, x)
    nch = np.frexp(y.astype(np.float64))[1] // 5 + 1  # signed: fits in 5 * nch bits
    ch_first = _starts(nch)
    buf = np.empty(int(ch_first[-1]), dtype=np.uint8)
    pos, left = ch_first[:-1], nch
    while len(x):
        more = left > 1
        buf[pos] = (x & 0x1F) + (more.view(np.uint8) << 5) + 48
        keep = np.flatnonzero(more)
        x, pos, left = x[keep] >> 5, pos[keep] + 1, left[keep] - 1
    data = buf.tobytes()
    bounds = ch_first[c_first].tolist()
    return [data[bounds[i]:bounds[i + 1]] for i in range(n)]
