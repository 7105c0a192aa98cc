"""Mask paste + vote + COCO RLE encoding (``stages.ops.masks``) against a plain full-image baseline, same run.

3 models x 1,000 images x 100 boxes, 64 x 64 probability maps, 1024 x 768 images (the issue's target:
<= 20 s on 2 cores, >= 10x the baseline, memory flat in the number of images). The maps are smooth random
blobs (an 8 x 8 random field with a centre bias, upsampled, through a sigmoid; the three models share the
field and differ by noise), the boxes have sides uniform in 2-40% of the image's (about 210 x 160 px on
average). Maps are made image batch by image batch and only :func:`stages.ops.masks.vote_masks` is timed.

- fast: ``vote_masks`` on batches of ``--batch`` images, in ``--workers`` processes (each a share of the
  images; the figure is the slowest worker's time in the op, i.e. the wall time with one core each), for
  each vote in ``--votes``; each worker's peak RSS (VmHWM) is reported, and the same for a run on a tenth of
  the images, to show that memory does not grow with the number of images;
- baseline: per box, each model's map pasted into a zeros array of the full image (the plain resize of
  ``resize_bilinear``), the vote taken on the full image, ``pycocotools.mask.encode``; timed on the first
  ``--ref-images`` images and extrapolated linearly to all (the output says so); its RLEs must equal the fast
  path's on those images (``mean``: the op averages the maps before resizing, the baseline after; bilinear
  resizing is linear, so they differ only where a pixel is within float rounding of 0.5).

    python benchmarks/masks.py [--images 1000] [--votes mean majority] [--workers 2] [--ref-images 10]
    python benchmarks/masks.py --quick      # 100 images, baseline on 2 (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.ops.masks import _axis, resize_bilinear, retain_freed_memory, vote_masks  # noqa: E402

FIELD = 8


def _upsample_matrix(n_src: int, n_dst: int) -> np.ndarray:
    i0, i1, w, _ = _axis(np.arange(n_dst, dtype=np.float64), n_src / n_dst, n_src)
    r = np.zeros((n_dst, n_src))
    np.add.at(r, (np.arange(n_dst), i0), 1.0 - w)
    np.add.at(r, (np.arange(n_dst), i1), w)
    return r


def make_batch(seed: int, first_image: int, images: int, *, boxes: int, models: int, size: int):
    """Maps [models, images * boxes, size, size] float32 and boxes [images * boxes, 4] for images
    ``first_image ..``; image i's data depend only on (seed, i)."""
    r = _upsample_matrix(FIELD, size)
    yy, xx = np.meshgrid(np.linspace(-1, 1, FIELD), np.linspace(-1, 1, FIELD), indexing="ij")
    bias = 2.0 * (0.6 - (yy ** 2 + xx ** 2))
    maps, bxs = [], []
    for i in range(first_image, first_image + images):
        rng = np.random.default_rng([seed, i])
        field = rng.normal(size=(boxes, FIELD, FIELD)) + bias
        field = field[None] + 0.5 * rng.normal(size=(models, boxes, FIELD, FIELD))
        maps.append((1.0 / (1.0 + np.exp(-2.5 * (r @ field @ r.T)))).astype(np.float32))
        wh = rng.uniform(0.02, 0.4, (boxes, 2))
        lo = rng.random((boxes, 2)) * (1.0 - wh)
        bxs.append(np.concatenate([lo, lo + wh], axis=1))
    return np.concatenate(maps, axis=1), np.concatenate(bxs)


def baseline(maps: np.ndarray, boxes: np.ndarray, *, height: int, width: int, vote: str) -> list[bytes]:
    """Per box: every model's map pasted into a full-image array (zeros, the plain ``resize_bilinear`` into the
    box), the vote taken there (mean of the pasted maps > 0.5, or > half of the pasted masks), pycocotools."""
    from pycocotools import mask as mask_utils

    out = []
    m = len(maps)
    for i, b in enumerate(boxes):
        c0, c1 = int(np.ceil(b[0] * width - 0.5)), int(np.ceil(b[2] * width - 0.5))
        r0, r1 = int(np.ceil(b[1] * height - 0.5)), int(np.ceil(b[3] * height - 0.5))
        acc = np.zeros((height, width), dtype=np.float64 if vote == "mean" else np.int64)
        for k in range(m):
            full = np.zeros((height, width), dtype=np.float64)
            if r1 > r0 and c1 > c0:
                full[r0:r1, c0:c1] = resize_bilinear(maps[k, i], r1 - r0, c1 - c0)
            acc += full if vote == "mean" else (full > 0.5)
        mask = acc / m > 0.5 if vote == "mean" else 2 * acc > m
        out.append(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"])
    return out


def child(a: argparse.Namespace) -> None:
    """Worker: the fast path on images [first, first + count); prints one JSON line."""
    retain_freed_memory()
    op = cpu = 0.0
    n_boxes = n_bytes = 0
    for s in range(a.first, a.first + a.count, a.batch):
        k = min(a.batch, a.first + a.count - s)
        maps, boxes = make_batch(a.seed, s, k, boxes=a.boxes, models=a.models, size=a.map)
        t, c = time.perf_counter(), time.process_time()
        rles = vote_masks(maps, boxes, height=a.height, width=a.width, vote=a.vote)
        op += time.perf_counter() - t
        cpu += time.process_time() - c
        n_boxes += len(rles)
        n_bytes += sum(len(r["counts"]) for r in rles)
    hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
    print(json.dumps({"op_s": op, "cpu_s": cpu, "boxes": n_boxes, "rle_bytes": n_bytes,
                      "peak_rss_mb": float(hwm) / 1024}))


def run_children(a: argparse.Namespace, vote: str, images: int, workers: int) -> list[dict]:
    share = -(-images // workers)
    procs = []
    for w in range(workers):
        first, count = w * share, min(share, images - w * share)
        if count <= 0:
            continue
        cmd = [sys.executable, __file__, "--child", "--first", str(first), "--count", str(count), "--vote", vote,
               "--boxes", str(a.boxes), "--models", str(a.models), "--map", str(a.map), "--height",
               str(a.height), "--width", str(a.width), "--batch", str(a.batch), "--seed", str(a.seed)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=os.environ | {"OMP_NUM_THREADS": "1"}))
    res = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed:\n{err}")
        res.append(json.loads(out.strip().splitlines()[-1]))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--boxes", type=int, default=100, help="boxes per image")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--map", type=int, default=64, help="probability map side")
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--votes", nargs="+", default=["mean", "majority"], choices=["mean", "majority"])
    ap.add_argument("--workers", type=int, default=2, help="processes for the fast path (the 2 cores)")
    ap.add_argument("--batch", type=int, default=10, help="images per vote_masks call")
    ap.add_argument("--ref-images", type=int, default=10, help="images the baseline is timed on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="100 images, baseline on 2 (CI)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--vote", default="mean", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    if a.quick:
        a.images, a.ref_images = 100, 2
    retain_freed_memory()
    n_boxes = a.images * a.boxes
    print(f"{a.models} models x {a.images} images x {a.boxes} boxes = {n_boxes:,} boxes, {a.map}x{a.map} maps, "
          f"{a.width}x{a.height} images; fast path in {a.workers} worker process(es), {a.batch} images per call; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    # the memory comparison: a tenth of the images, but at least 3 calls a worker
    small = min(a.images, max(a.images // 10, 3 * a.batch * a.workers))
    for vote in a.votes:
        t = time.perf_counter()
        res = run_children(a, vote, a.images, a.workers)
        wall = time.perf_counter() - t
        op = max(r["op_s"] for r in res)
        cpu = sum(r["cpu_s"] for r in res)
        mem_big = [r["peak_rss_mb"] for r in res]
        mem_small = [r["peak_rss_mb"] for r in run_children(a, vote, small * len(res), len(res))]
        # baseline on the first ref images, the fast path on the same ones, outputs compared
        maps, boxes = make_batch(a.seed, 0, a.ref_images, boxes=a.boxes, models=a.models, size=a.map)
        t = time.perf_counter()
        ref = baseline(maps, boxes, height=a.height, width=a.width, vote=vote)
        t_ref = (time.perf_counter() - t) * a.images / a.ref_images
        fast = [r["counts"] for r in vote_masks(maps, boxes, height=a.height, width=a.width, vote=vote)]
        same = sum(x == y for x, y in zip(fast, ref))
        print(f"\nvote={vote}")
        print(f"  fast      {op:7.2f} s in the op (slowest of {len(res)} workers, each "
              f"{a.images // len(res)} images; {cpu:.2f} CPU s in all = {cpu / n_boxes * 1e6:.0f} us a box; "
              f"the whole run incl. making the maps {wall:.1f} s wall)")
        print(f"  baseline  {t_ref:7.1f} s one process (timed on {a.ref_images} images = "
              f"{a.ref_images * a.boxes} boxes, x{a.images / a.ref_images:g} extrapolated): "
              f"{t_ref / cpu:.1f}x the fast path's CPU time, {t_ref / op:.1f}x its {len(res)}-core time")
        print(f"  identical RLEs on the baseline's boxes: {same}/{len(ref)}")
        print(f"  peak RSS per worker: {', '.join(f'{m:.0f}' for m in mem_big)} MB with {a.images // len(res)} "
              f"images each vs {', '.join(f'{m:.0f}' for m in mem_small)} MB with {small // len(res)} each")
        if same != len(ref):
            raise SystemExit("the fast path and the baseline differ")


if __name__ == "__main__":
    main()
