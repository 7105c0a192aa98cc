"""Benchmark the OpenImages Challenge metric against slow baselines measured in the same run.

Detection: the real 3,519-image box sample (``<oid-dir>/derived``) replicated to 41,620 images (the challenge
validation size), predictions made by jittering ground truth, dropping some, and adding false positives, at
about 10, 100 and 300 per image. Prints seconds and peak memory of the vectorized metric, and its speed-up over
the slow per-image reference (``tests/metric_reference.py``) on a subset, checking they agree.

Segmentation: 1,000 images x 20 predicted masks; the RLE metric against the same metric with mask IoU computed
by decoding every mask densely.

    python benchmarks/metric.py [--oid-dir tests/fixtures/oid2019] [--per-image 10 100 300] [--ref-images 300]
    python benchmarks/metric.py --device cuda --quick --skip segmentation --json figures.json

The metric itself runs on numpy (sorts and segment operations; it has no torch path). ``--device cuda`` (or ``cpu``) adds, per
``--per-image`` setting, its one arithmetic kernel on torch CUDA tensors: the paired IoU of every (detection,
ground-truth box) pair of the same image and class that the metric forms (``stages.ops.boxes.paired_iou``, the
same function on numpy arrays and on tensors), timed after a warm-up between ``torch.cuda.synchronize()`` calls,
against the numpy call on the same pairs, with the largest difference of the values. ``--quick``: 2,000 images,
100 detections per image, 50 reference images, 50 segmentation images.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from metric_reference import reference_evaluate  # noqa: E402

from stages.formats import openimages as oi  # noqa: E402
from stages.formats.hierarchy import Hierarchy  # noqa: E402
from stages.metrics import evaluate_detections, prepare_ground_truth  # noqa: E402
from stages.metrics.detection import prepare_detections, run_starts, segment_pairs  # noqa: E402
from stages.ops.boxes import paired_iou  # noqa: E402
from stages.metrics import segmentation as seg  # noqa: E402

N_IMAGES = 41_620


def load(oid: Path) -> tuple[pd.DataFrame, pd.DataFrame, Hierarchy, pd.DataFrame]:
    classes = oi.read_classes(oid / "challenge-2019-classes-description-500.csv")
    known = set(classes["label"])
    h = Hierarchy.from_json(oid / "challenge-2019-label500-hierarchy.json")
    boxes = oi.read_boxes(oid / "derived" / "leaf_boxes.csv", known_labels=known)
    labels = oi.read_image_labels(oid / "derived" / "leaf_imagelabels.csv", known_labels=known)
    return boxes, labels, h, classes


def replicate(boxes: pd.DataFrame, labels: pd.DataFrame, n_images: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    ids = np.unique(np.concatenate([boxes["image_id"], labels["image_id"]]).astype(object))
    reps = -(-n_images // len(ids))
    out_b, out_l = [], []
    for r in range(reps):
        keep = ids[: max(0, min(len(ids), n_images - r * len(ids)))]
        b = boxes[boxes["image_id"].isin(keep)].copy()
        b["image_id"] = b["image_id"] + f"_{r}"
        lab = labels[labels["image_id"].isin(keep)].copy()
        lab["image_id"] = lab["image_id"] + f"_{r}"
        out_b.append(b)
        out_l.append(lab)
    return pd.concat(out_b, ignore_index=True), pd.concat(out_l, ignore_index=True)


def make_predictions(boxes: pd.DataFrame, h: Hierarchy, classes: pd.DataFrame, per_image: int,
                     rng: np.random.Generator) -> pd.DataFrame:
    """Jittered ground truth (80% kept, with their parents as a real submission would), then false positives:
    duplicates of ground truth shifted off target and random boxes of random classes, up to ``per_image``."""
    labels = classes["label"].to_numpy(dtype=object)
    pairs = h.expansion_pairs(up=True)
    b = boxes[rng.random(len(boxes)) < 0.8]
    b = b.merge(pairs, on="label", how="left")
    b["label"] = b["expanded"].fillna(b["label"])
    n = len(b)
    xy = b[["x_min", "y_min", "x_max", "y_max"]].to_numpy()
    wh = np.concatenate([xy[:, 2:] - xy[:, :2]] * 2, axis=1)
    xy = np.clip(xy + rng.normal(0, 0.05, (n, 4)) * wh, 0, 1)
    tp = pd.DataFrame({"image_id": b["image_id"].to_numpy(), "label": b["label"].to_numpy(),
                       "score": rng.beta(4, 2, n)})
    tp[["x_min", "y_min"]] = np.minimum(xy[:, :2], xy[:, 2:])
    tp[["x_max", "y_max"]] = np.maximum(xy[:, :2], xy[:, 2:])
    ids = boxes["image_id"].unique()
    have = tp.groupby("image_id").size().reindex(ids, fill_value=0).to_numpy()
    n_fp = np.maximum(per_image - have, 0)
    img = np.repeat(ids, n_fp)
    m = len(img)
    c = rng.random((m, 2)) * 0.8
    s = rng.random((m, 2)) * 0.3 + 0.02
    fp = pd.DataFrame({"image_id": img, "label": rng.choice(labels, m), "score": rng.beta(2, 4, m),
                       "x_min": c[:, 0], "y_min": c[:, 1], "x_max": np.minimum(c[:, 0] + s[:, 0], 1),
                       "y_max": np.minimum(c[:, 1] + s[:, 1], 1)})
    # half of the false positives take a class verified on their image, so that they are scored
    img_lab = boxes.drop_duplicates("image_id").set_index("image_id")["label"]
    half = rng.random(m) < 0.5
    fp.loc[half, "label"] = img_lab.reindex(fp.loc[half, "image_id"]).to_numpy()
    dets = pd.concat([tp, fp], ignore_index=True)
    return dets.sample(frac=1.0, random_state=int(rng.integers(1 << 31))).reset_index(drop=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def traced_peak_mb(fn) -> float:
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def overlap_pairs(gt, dets: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The (detection box, ground-truth box) pairs, ``[P, 4]`` each, whose IoU the metric computes (the same pair
    enumeration as ``stages.metrics.detection.best_overlap``)."""
    d = prepare_detections(gt=gt, detections=dets)
    n = len(d.key)
    starts = run_starts(d.key)
    lens = np.diff(np.append(starts, n))
    uk = d.key[starts]
    ulo = np.searchsorted(gt.box_key, uk, "left")
    lo = np.repeat(ulo, lens)
    cnt = np.repeat(np.searchsorted(gt.box_key, uk, "right") - ulo, lens)
    da, ga = [], []
    for sel, rep, tgt, _ in segment_pairs(lo, cnt):
        da.append(d.box[sel][rep])
        ga.append(gt.box[tgt])
    if not da:
        return np.zeros((0, 4)), np.zeros((0, 4))
    return np.concatenate(da), np.concatenate(ga)


def bench_overlap_kernel(det: np.ndarray, gtb: np.ndarray, device: str, repeats: int = 3) -> dict:
    """Seconds (best of ``repeats``) of ``paired_iou`` on the pairs as numpy arrays and as torch tensors on
    ``device`` (transfers excluded, synchronized), and the largest difference of the values."""
    import torch

    best_np = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        ref = paired_iou(det, gtb)
        best_np = min(best_np, time.perf_counter() - t)
    td, tg = torch.from_numpy(det).to(device), torch.from_numpy(gtb).to(device)
    paired_iou(td[:1000], tg[:1000])   # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    best_t = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = paired_iou(td, tg)
        if device == "cuda":
            torch.cuda.synchronize()
        best_t = min(best_t, time.perf_counter() - t)
    diff = float(np.abs(out.cpu().numpy() - ref).max(initial=0.0))
    return {"pairs": len(det), "numpy_s": best_np, "torch_s": best_t, "max_abs_diff": diff}


def bench_detection(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    boxes0, labels0, h, classes = load(args.oid_dir)
    boxes, labels = replicate(boxes0, labels0, args.images)
    print(f"# detection: {boxes['image_id'].nunique()} images with boxes, {len(boxes)} leaf boxes, "
          f"{len(labels)} image labels, {len(classes)} classes")
    gt, t_prep = timed(lambda: prepare_ground_truth(boxes=boxes, image_labels=labels, hierarchy=h,
                                                    classes=classes))
    print(f"prepare_ground_truth: {t_prep:.2f} s ({len(gt.box_key) + len(gt.group_key)} expanded boxes)")
    print(f"{'per_image':>9} {'dets':>10} {'seconds':>8} {'peak_traced_MB':>14} {'peak_rss_MB':>11} "
          f"{'mAP':>8} {'ref_s/img':>9} {'fast_s/img':>10} {'speedup':>8} {'max|dAP|':>9}")
    for k in args.per_image:
        dets = make_predictions(boxes, h, classes, k, rng)
        res, t = timed(lambda: evaluate_detections(gt=gt, detections=dets))
        peak = traced_peak_mb(lambda: evaluate_detections(gt=gt, detections=dets))
        # slow reference on a subset of images, the fast one on the same subset
        sub_ids = np.unique(boxes["image_id"])[: args.ref_images]
        sb = boxes[boxes["image_id"].isin(sub_ids)]
        sl = labels[labels["image_id"].isin(sub_ids)]
        sd = dets[dets["image_id"].isin(sub_ids)]
        ref, t_ref = timed(lambda: reference_evaluate(boxes=sb, image_labels=sl, hierarchy=h, classes=classes,
                                                      detections=sd))
        sgt = prepare_ground_truth(boxes=sb, image_labels=sl, hierarchy=h, classes=classes)
        fast_sub, t_fast_sub = timed(lambda: evaluate_detections(gt=sgt, detections=sd))
        a = fast_sub.per_class.set_index("label")["ap"]
        r = pd.Series(ref["ap"])
        d = np.nanmax(np.abs(a.reindex(r.index).to_numpy() - r.to_numpy()), initial=0.0)
        ref_per_img = t_ref / len(sub_ids)
        fast_per_img = t / args.images
        print(f"{k:>9} {len(dets):>10} {t:>8.2f} {peak:>14.0f} {peak_rss_mb():>11.0f} {res.map:>8.4f} "
              f"{ref_per_img:>9.5f} {fast_per_img:>10.6f} {ref_per_img / fast_per_img:>7.0f}x {d:>9.1e}")
        print(f"          (same {len(sub_ids)}-image subset: reference {t_ref:.2f} s, vectorized "
              f"{t_fast_sub:.3f} s, {t_ref / t_fast_sub:.0f}x; mAP {ref['mAP']:.6f} vs {fast_sub.map:.6f})")
        row = {"per_image": k, "dets": len(dets), "seconds": t, "map": res.map, "ref_speedup":
               ref_per_img / fast_per_img, "max_abs_dap": float(d)}
        if args.device:
            kern = bench_overlap_kernel(*overlap_pairs(gt, dets), args.device)
            row["overlap_kernel"] = kern
            print(f"          (paired IoU of the metric's {kern['pairs']} pairs: numpy {kern['numpy_s']:.4f} s, "
                  f"torch on {args.device} {kern['torch_s']:.4f} s, x{kern['numpy_s'] / kern['torch_s']:.1f}; "
                  f"max |diff| {kern['max_abs_diff']:.1e})")
        args.figures.setdefault("detection", []).append(row)
        if k == 100:
            tied = dets.assign(score=dets["score"].round(2))
            _, t_tied = timed(lambda: evaluate_detections(gt=gt, detections=tied))
            cat = dets.astype({"image_id": "category", "label": "category"})
            _, t_cat = timed(lambda: evaluate_detections(gt=gt, detections=cat))
            print(f"          (scores rounded to 2 decimals, many exact ties: {t_tied:.2f} s; "
                  f"categorical image_id/label columns: {t_cat:.2f} s)")


# ----- segmentation ---------------------------------------------------------------------------------------
def _rect_masks(rng: np.random.Generator, n: int, h: int, w: int, base: np.ndarray | None = None):
    """n random ellipse masks (or jittered copies of ``base`` boxes) -> (RLEs, boxes xyxy normalized)."""
    from pycocotools import mask as mu

    yy, xx = np.mgrid[0:h, 0:w]
    rles, bxs = [], []
    for i in range(n):
        if base is not None:
            x0, y0, x1, y1 = base[i] + rng.normal(0, 0.02, 4)
        else:
            x0, y0 = rng.random(2) * 0.7
            x1, y1 = x0 + 0.1 + rng.random() * 0.3, y0 + 0.1 + rng.random() * 0.3
        x0, x1 = sorted(np.clip([x0, x1], 0, 1))
        y0, y1 = sorted(np.clip([y0, y1], 0, 1))
        cx, cy, rx, ry = (x0 + x1) / 2 * w, (y0 + y1) / 2 * h, max((x1 - x0) / 2 * w, 2), max((y1 - y0) / 2 * h, 2)
        m = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.uint8)
        rle = mu.encode(np.asfortranarray(m))
        bb = mu.toBbox(rle)
        rles.append(rle)
        bxs.append([bb[0] / w, bb[1] / h, (bb[0] + bb[2]) / w, (bb[1] + bb[3]) / h])
    return rles, np.asarray(bxs, dtype=np.float64).reshape(-1, 4)


def _dense_best_mask_overlap(det_key, det_rle, gt_key, gt_rle, crowd):
    """Baseline: the same matching with every mask decoded to a dense [h, w] array (as the official does)."""
    from pycocotools import mask as mu

    n = len(det_key)
    best = np.full(n, -np.inf)
    arg = np.full(n, -1, dtype=np.int64)
    if not len(gt_key) or not n:
        return best, arg
    keys, d_lo = np.unique(det_key, return_index=True)
    d_hi = np.append(d_lo[1:], n)
    g_lo = np.searchsorted(gt_key, keys, "left")
    g_hi = np.searchsorted(gt_key, keys, "right")
    for k in np.flatnonzero(g_hi > g_lo).tolist():
        a, b, ga, gb = int(d_lo[k]), int(d_hi[k]), int(g_lo[k]), int(g_hi[k])
        dm = mu.decode(list(det_rle[a:b])).transpose(2, 0, 1).reshape(b - a, -1).astype(np.float32)
        gm = mu.decode(list(gt_rle[ga:gb])).transpose(2, 0, 1).reshape(gb - ga, -1).astype(np.float32)
        inter = dm @ gm.T
        ad = dm.sum(1)[:, None]
        ag = gm.sum(1)[None, :]
        iou = inter / ad if crowd else inter / (ad + ag - inter)
        j = np.argmax(iou, axis=1)
        best[a:b] = iou[np.arange(b - a), j]
        arg[a:b] = ga + j
    return best, arg


def bench_segmentation(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(1)
    n_img, per_img, h, w = args.seg_images, 20, 480, 640
    classes = pd.DataFrame({"label": [f"/m/c{i}" for i in range(10)], "name": [f"c{i}" for i in range(10)]})
    hier = Hierarchy(parents={lab: () for lab in classes["label"]})
    gt_rows, gt_rles, det_rows = [], [], []
    for i in range(n_img):
        img = f"img{i}"
        n_gt = 5
        rl, bx = _rect_masks(rng, n_gt, h, w)
        labs = rng.choice(classes["label"].to_numpy(), n_gt)
        gt_rles += rl
        gt_rows += [(img, lab, *b, False) for lab, b in zip(labs, bx)]
        pick = rng.integers(0, n_gt, per_img // 2)
        drl, dbx = _rect_masks(rng, len(pick), h, w, base=bx[pick])
        frl, fbx = _rect_masks(rng, per_img - len(pick), h, w)
        dl = np.concatenate([labs[pick], rng.choice(classes["label"].to_numpy(), len(frl))])
        for r, b, lab in zip(drl + frl, np.concatenate([dbx, fbx]), dl):
            det_rows.append((img, lab, float(rng.random()), *b, r["counts"].decode(), h, w))
    boxes = pd.DataFrame(gt_rows, columns=["image_id", "label", "x_min", "y_min", "x_max", "y_max", "is_group_of"])
    labels = boxes[["image_id", "label"]].drop_duplicates().assign(confidence=np.int8(1))
    masks = pd.DataFrame(det_rows, columns=["image_id", "label", "score", "x_min", "y_min", "x_max", "y_max",
                                            "rle", "mask_height", "mask_width"])
    gt = seg.prepare_mask_ground_truth(boxes=boxes, image_labels=labels, hierarchy=hier, classes=classes,
                                       masks=gt_rles)
    fast, t_fast = timed(lambda: seg.evaluate_masks(gt=gt, masks=masks))
    orig = seg._best_mask_overlap
    seg._best_mask_overlap = _dense_best_mask_overlap
    try:
        dense, t_dense = timed(lambda: seg.evaluate_masks(gt=gt, masks=masks))
    finally:
        seg._best_mask_overlap = orig
    d = np.nanmax(np.abs(fast.per_class["ap"].to_numpy() - dense.per_class["ap"].to_numpy()))
    print(f"# segmentation: {n_img} images x {per_img} predicted masks ({h}x{w}), {len(boxes)} gt masks")
    print(f"RLE (pycocotools) {t_fast:.2f} s, dense decoding {t_dense:.2f} s: {t_dense / t_fast:.1f}x faster; "
          f"mAP {fast.map:.6f} vs {dense.map:.6f} (max |dAP| {d:.1e})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--oid-dir", type=Path, default=ROOT / "tests" / "fixtures" / "oid2019")
    p.add_argument("--images", type=int, default=N_IMAGES)
    p.add_argument("--per-image", type=int, nargs="+", default=[10, 100, 300])
    p.add_argument("--ref-images", type=int, default=300)
    p.add_argument("--seg-images", type=int, default=1000)
    p.add_argument("--skip", choices=["detection", "segmentation"], action="append", default=[])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="also time the metric's paired-IoU kernel on torch tensors on this device against numpy "
                        "(the metric itself is numpy)")
    p.add_argument("--quick", action="store_true",
                   help="2,000 images, 100 detections per image, 50 reference and 50 segmentation images")
    p.add_argument("--json", type=Path, help="write the detection figures as JSON")
    args = p.parse_args()
    if args.quick:
        args.images, args.per_image = min(args.images, 2000), [100]
        args.ref_images, args.seg_images = min(args.ref_images, 50), min(args.seg_images, 50)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
        print(f"device: {torch.cuda.get_device_name(0)} (torch {torch.__version__}) for the paired-IoU kernel")
    args.figures = {"device": args.device, "images": args.images}
    if "detection" not in args.skip:
        bench_detection(args)
    if "segmentation" not in args.skip:
        bench_segmentation(args)
    if args.json:
        import json

        args.json.write_text(json.dumps(args.figures, indent=1))


if __name__ == "__main__":
    main()
