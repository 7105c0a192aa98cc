"""Instance masks of detections: the per-pixel vote of several HRNet mask models (paper §8.4) -> ``masks`` table.

Each input is a :mod:`stages.infer_masks` file: the same boxes (same rows, same order) with one probability map
per box and test-time view (e.g. ``s56`` and ``s56_flip``). The vote takes the selected views of every file
(``--views all``: every view; ``first``: each file's first, unflipped view), ``M`` maps per box, and makes one
full-image mask per box with :func:`stages.ops.masks.vote_masks`: ``mean`` (foreground where the mean
probability > ``thr``) or ``majority`` (foreground where more than half of the ``M`` thresholded maps say so; a
tie is background). One file with one view is the plain paste of that model.

The output keeps every input row (scores, labels, boxes unchanged) with its mask as a COCO RLE (``rle``,
``mask_height``, ``mask_width``): what :mod:`stages.evaluate` scores and :mod:`stages.submit_seg` encodes.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from stages.core.cli import add_config_args, stage_main
from stages.core.errors import InputError
from stages.formats.io import write_table
from stages.formats.mask_probs import read_mask_probs
from stages.ops.masks import retain_freed_memory, vote_masks

log = logging.getLogger(__name__)

KEY_COLUMNS = ["image_id", "label", "score", "x_min", "y_min", "x_max", "y_max"]
VIEW_CHOICES = ("all", "first")


def select_views(probs: np.ndarray, views: Sequence[str], which: str) -> np.ndarray:
    """``probs`` [V, N, h, w] -> the maps of the chosen views (``all`` or ``first``)."""
    if which not in VIEW_CHOICES:
        raise ValueError(f"views must be one of {VIEW_CHOICES}, got {which!r}")
    return probs if which == "all" else probs[:1]


def _plain(v: object) -> object:
    """A numpy scalar as the Python value (its repr without ``np.float64(...)``)."""
    return v.item() if isinstance(v, np.generic) else v


def same_boxes(a: pd.DataFrame, b: pd.DataFrame, *, source: object, reference: object = None) -> None:
    """Raise :class:`InputError` unless ``b`` (read from ``source``) holds the rows of ``a`` (read from
    ``reference``, named in the message) in the same order (the vote pairs maps by row)."""
    ref = "the first file" if reference is None else str(reference)
    if len(a) != len(b):
        raise InputError(f"{len(b)} boxes where {ref} has {len(a)}: the vote needs the same boxes",
                         file=source, field="image_id")
    for c in KEY_COLUMNS:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        differ = x != y if x.dtype == object else ~np.isclose(x.astype(np.float64), y.astype(np.float64),
                                                               rtol=0, atol=1e-9)
        if differ.any():
            i = int(np.flatnonzero(differ)[0])
            raise InputError(f"row {i} differs from {ref}'s ({_plain(y[i])!r} vs {_plain(x[i])!r} there): "
                             "the vote needs the same boxes in the same order", file=source, row=f"row {i}",
                             field=c)


def vote_rows(dets: pd.DataFrame, probs: np.ndarray, *, vote: str, thr: float) -> pd.DataFrame:
    """Boxes ``dets`` (with ``width``, ``height``) and their ``M`` maps ``probs`` [M, N, h, w] -> ``masks``
    table rows (every row kept, its RLE added)."""
    out = dets[KEY_COLUMNS].reset_index(drop=True).copy()
    if len(out):
        boxes = out[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float64)
        rles = vote_masks(probs, boxes, height=dets["height"].to_numpy(), width=dets["width"].to_numpy(),
                          vote=vote, thr=thr)
        out["rle"] = [r["counts"].decode() for r in rles]
    else:
        out["rle"] = pd.Series([], dtype=object)
    out["mask_height"] = dets["height"].to_numpy(np.int32)
    out["mask_width"] = dets["width"].to_numpy(np.int32)
    return out


def segment(paths: Sequence[str], *, views: str = "all", vote: str, thr: float) -> tuple[pd.DataFrame, int]:
    """The vote of the maps in ``paths`` (see the module docstring) -> (``masks`` table, number of maps per
    box)."""
    if not paths:
        raise ValueError("segment needs at least one mask-probability file")
    first, maps = None, []
    for p in paths:
        dets, probs, names = read_mask_probs(p)
        if first is None:
            first = dets
        else:
            same_boxes(first, dets, source=p, reference=paths[0])
        chosen = select_views(probs, names, views)
        log.info("%s: %d boxes, views %s", p, len(dets), list(names[: len(chosen)]))
        maps.append(chosen)
    stacked = np.concatenate(maps, axis=0) if len(maps) > 1 else maps[0]
    return vote_rows(first, stacked, vote=vote, thr=thr), int(stacked.shape[0])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.segment", description=__doc__.split("\n")[0])
    p.add_argument("--probs", nargs="+", required=True, help="stages.infer_masks files (.npz) of the same boxes")
    p.add_argument("--views", choices=VIEW_CHOICES, default="all",
                   help="the views of each file that vote: all (default) or the first (unflipped) only")
    add_config_args(p, "segmentation", ["vote", "thr"])
    p.add_argument("--out", required=True, help="masks parquet to write")
    return p.parse_args(argv)


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    retain_freed_memory()
    t0 = time.perf_counter()
    masks, m = segment(args.probs, views=args.views, vote=args.vote, thr=args.thr)
    write_table(args.out, masks, "masks")
    dt = time.perf_counter() - t0
    print(f"{len(masks)} masks from {m} map(s) per box ({args.vote} vote) of "
          f"{masks['image_id'].nunique() if len(masks) else 0} images in {dt:.1f} s -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
