"""Post-processing benchmark: batched soft-NMS vs ensemble_boxes, adj-NMS through the stage CLI, the naive
ensemble CLI, peak memory at three input sizes, and one crowded (image, class) without a cap (sliced pairwise
blocks vs whole ones). Everything is measured in this run, on this machine.

    python benchmarks/postprocess.py [--images 10000] [--ref-images 10000] [--ensemble-images 10000]
    python benchmarks/postprocess.py --device cuda --quick --skip cli ensemble memory --json figures.json

``--device`` picks where the torch path of soft-NMS runs (``auto``, the default: CUDA when available); on CUDA the
op gets torch CUDA tensors, runs once on a slice to warm up, and is timed between ``torch.cuda.synchronize()``
calls. ``--quick`` shrinks every size (1,000 images, 200 of them through ensemble_boxes). ``--json`` writes the
soft-NMS figures (seconds of the numpy path, of the torch path, and whether they keep the same boxes).

``crowded``: adj-NMS and top-k voting of one (image, class) of N boxes (``--crowded-sizes``), no candidate cap,
each in a fresh interpreter: time and peak RSS with the pairwise blocks as built (at most ``BLOCK_ELEMS``
elements, the N x N IoUs a slice of rows at a time) against whole [N, N] blocks (``BLOCK_ELEMS`` raised), the
latter only while N x N float64 stays under 1 GB.

``--ref-images N`` times ``ensemble_boxes`` on the first N images only and extrapolates linearly to all images
(the output says so); the kept boxes are compared on those N images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.formats.io import write_table  # noqa: E402
from stages.ops.nms import adj_nms, soft_nms, suppress  # noqa: E402


def make(rng: np.random.Generator, images: int, boxes: int, classes: int, *, offset: int = 0):
    """Random detections: ``boxes`` per image over ``classes`` labels, boxes inside [0, 1] with positive area."""
    c = rng.random((images, boxes, 2)) * 0.69
    wh = rng.random((images, boxes, 2)) * 0.3 + 0.01
    b = np.concatenate([c, c + wh], -1)
    s = rng.random((images, boxes))
    lab = rng.integers(0, classes, (images, boxes))
    return b, s, lab


def frame(b, s, lab, *, offset: int = 0, model: str | None = None) -> pd.DataFrame:
    n_img, n_box = s.shape
    img = np.repeat(np.array([f"img{i + offset:07d}" for i in range(n_img)], dtype=object), n_box)
    labels = np.array([f"/m/c{k:03d}" for k in range(int(lab.max()) + 1)], dtype=object)
    d = pd.DataFrame({"image_id": img, "label": labels[lab.reshape(-1)], "score": s.reshape(-1),
                      "x_min": b[..., 0].reshape(-1), "y_min": b[..., 1].reshape(-1),
                      "x_max": b[..., 2].reshape(-1), "y_max": b[..., 3].reshape(-1)})
    if model:
        d["model"] = model
    return d


def run_cli(args: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       env=os.environ | {"ORCHARD_LOG": "WARNING", "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{args} failed:\n{p.stderr}")
    return wall, p.stdout.strip()


#: expression, in a fresh interpreter, of its peak RSS in kB: VmHWM of its own address space (unlike
#: ``ru_maxrss``, which a child inherits from the forking parent across exec)
VM_HWM_KB = "int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"


def peak_rss_mb(module: str, argv: list[str]) -> float:
    """Peak RSS of a fresh interpreter running ``module.main(argv)`` (:data:`VM_HWM_KB`)."""
    code = f"from {module} import main; rc = main({argv!r}); print({VM_HWM_KB})"
    _, out = run_cli(["-c", code])
    return float(out.splitlines()[-1]) / 1024


CROWDED = """
import time, numpy as np, stages.ops.nms as nm, stages.ops.ensemble as en
nm.BLOCK_ELEMS = {block}
rng = np.random.default_rng(0)
n = {n}
c, wh = rng.random((n, 2)) * 0.5 + 0.25, rng.random((n, 2)) * 0.2 + 0.05
b, s = np.concatenate([c - wh / 2, c + wh / 2], 1), rng.random(n)
g, src = np.zeros(n, np.int64), rng.integers(0, 10, n)
t0 = time.perf_counter()
keep, _ = nm.suppress_arrays(b, s, g, method="adj_nms", iou_thr=0.5, sigma=0.5, score_thr=0.001)
t1 = time.perf_counter()
en.topk_vote(b, s, g, src, k=4)
t2 = time.perf_counter()
print(len(keep), t1 - t0, t2 - t1, {hwm} / 1024)
"""


def crowded(n: int, block: int) -> tuple[int, float, float, float]:
    """(kept, adj-NMS s, voting s, peak RSS MB) of one crowded group of ``n`` boxes, fresh interpreter."""
    _, out = run_cli(["-c", CROWDED.format(n=n, block=block, hwm=VM_HWM_KB)])
    kept, t_nms, t_vote, mb = out.split()[-4:]
    return int(kept), float(t_nms), float(t_vote), float(mb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--boxes", type=int, default=300)
    ap.add_argument("--classes", type=int, default=30)
    ap.add_argument("--ref-images", type=int, default=None, help="time ensemble_boxes on this many images")
    ap.add_argument("--ensemble-images", type=int, default=10000)
    ap.add_argument("--ensemble-models", type=int, default=5)
    ap.add_argument("--ensemble-boxes", type=int, default=100)
    ap.add_argument("--rows-per-shard", type=int, default=1 << 20, help="for the timed CLI runs")
    ap.add_argument("--memory-rows-per-shard", type=int, default=250_000, help="for the peak-RSS runs")
    ap.add_argument("--crowded-sizes", type=int, nargs="+", default=[2000, 8000, 20000])
    ap.add_argument("--skip", nargs="*", default=[], choices=["soft", "cli", "ensemble", "memory", "crowded"])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where the torch path of soft-NMS runs (auto: CUDA when available)")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes: 1,000 images (200 through ensemble_boxes), 1,000 ensemble images")
    ap.add_argument("--json", type=Path, help="write the soft-NMS figures as JSON")
    a = ap.parse_args()
    if a.quick:
        a.images, a.ensemble_images = min(a.images, 1000), min(a.ensemble_images, 1000)
        a.ref_images = min(a.ref_images or 200, 200)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n_ref = min(a.ref_images or a.images, a.images)
    gpu = f" ({torch.cuda.get_device_name(0)})" if dev == "cuda" else ""
    print(f"machine: {os.cpu_count()} CPUs, torch threads 1, torch path on {dev}{gpu}, torch {torch.__version__}")
    figures: dict[str, object] = {"device": dev, "images": a.images, "boxes": a.boxes}
    b, s, lab = make(rng, a.images, a.boxes, a.classes)
    tmp = Path(tempfile.mkdtemp(prefix="orchard-bench-"))

    if "soft" not in a.skip:
        from ensemble_boxes import soft_nms as eb_soft_nms

        print(f"\n[soft-NMS gaussian sigma 0.5, score thr 0.001] {a.images} images x {a.boxes} boxes, "
              f"{a.classes} classes")
        B, S = b.reshape(-1, 4), s.reshape(-1)
        G = (np.arange(a.images)[:, None] * a.classes + lab).reshape(-1)
        t = time.perf_counter()
        keep, new = soft_nms(B, S, G, method="gaussian", sigma=0.5, score_thr=0.001)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        adj_nms(B, S, G, iou_thr=0.5, sigma=0.5, score_thr=0.001)
        t_adj = time.perf_counter() - t
        TB, TS, TG = (torch.from_numpy(x).to(dev) for x in (B, S, G))
        if dev == "cuda":   # warm-up (CUDA context, kernels) on the first images, then time the whole input
            w = min(len(TS), 100 * a.boxes)
            soft_nms(TB[:w], TS[:w], TG[:w], method="gaussian", sigma=0.5, score_thr=0.001)
            torch.cuda.synchronize()
        t = time.perf_counter()
        tk, _ = soft_nms(TB, TS, TG, method="gaussian", sigma=0.5, score_thr=0.001)
        if dev == "cuda":
            torch.cuda.synchronize()
        t_torch = time.perf_counter() - t
        same = bool(np.array_equal(tk.cpu().numpy(), keep))
        figures.update(soft_nms_numpy_s=t_ours, soft_nms_torch_s=t_torch, same_kept=same, adj_nms_numpy_s=t_adj)
        assert same, "torch and numpy paths differ"
        df = frame(b, s, lab)
        t = time.perf_counter()
        suppress(df, method="soft_nms", sigma=0.5, score_thr=0.001)
        t_frame = time.perf_counter() - t
        t = time.perf_counter()
        ref_keys = set()
        with contextlib.redirect_stdout(io.StringIO()):
            for i in range(n_ref):
                bb, ss, ll = eb_soft_nms([b[i]], [s[i]], [lab[i]], method=2, sigma=0.5, thresh=0.001)
                ref_keys |= {(i, int(x), *np.round(y, 12)) for x, y in zip(ll, bb)}
        t_ref = time.perf_counter() - t
        k = keep[keep // a.boxes < n_ref]
        flat_b, flat_l = b.reshape(-1, 4), lab.reshape(-1)
        our_keys = {(int(i // a.boxes), int(flat_l[i]), *np.round(flat_b[i], 12)) for i in k}
        ref_all = t_ref * a.images / n_ref
        figures.update(ensemble_boxes_s=ref_all, identical_to_ensemble_boxes=our_keys == ref_keys)
        note = "" if n_ref == a.images else f" (timed on {n_ref} images, extrapolated x{a.images / n_ref:.1f})"
        print(f"  ensemble_boxes.soft_nms(method=2): {ref_all:8.2f} s{note}")
        print(f"  stages.ops.nms.soft_nms (numpy, the CPU path): {t_ours:8.2f} s   speed-up x{ref_all / t_ours:.1f}")
        print(f"  stages.ops.nms.soft_nms (torch tensors on {dev}, same code): {t_torch:8.2f} s   "
              f"speed-up x{ref_all / t_torch:.1f}   same kept boxes as numpy: {same}   "
              f"(x{t_ours / t_torch:.2f} over numpy)")
        print(f"  stages.ops.nms.adj_nms (numpy, NMS 0.5 + gaussian re-weighting): {t_adj:8.2f} s")
        print(f"  stages.ops.nms.suppress (frame, incl. grouping by image/label strings): {t_frame:8.2f} s   "
              f"speed-up x{ref_all / t_frame:.1f}")
        print(f"  kept boxes on the {n_ref} compared images: ours {len(our_keys)}, ensemble_boxes {len(ref_keys)}, "
              f"identical: {our_keys == ref_keys}")

    if "cli" not in a.skip:
        inp = tmp / "dets.parquet"
        write_table(inp, frame(b, s, lab), "detections")
        print(f"\n[stage CLI, {a.images * a.boxes} rows, --rows-per-shard {a.rows_per_shard}, wall time incl. "
              f"Python start-up and parquet I/O]")
        t0, _ = run_cli(["-c", "import pandas, pyarrow.parquet"])
        t1, _ = run_cli(["-c", "import torch"])
        print(f"  bare interpreter + pandas/pyarrow imports: {t0:.2f} s (import torch, which the CPU path skips: "
              f"{t1:.2f} s)")
        for method in ("adj_nms", "soft_nms"):
            wall, out = run_cli(["-m", "stages.postprocess", "--detections", str(inp), "--out",
                                 str(tmp / f"{method}.parquet"), "--method", method, "--rows-per-shard",
                                 str(a.rows_per_shard)])
            print(f"  python -m stages.postprocess --method {method}: {wall:.2f} s  ({out})")
            if method == "adj_nms" and "soft" not in a.skip:
                print(f"    adj-NMS through the CLI incl. start-up and I/O {wall:.2f} s vs soft-NMS in process "
                      f"{t_ours:.2f} s (target: ~2 s, ensemble_boxes / 20 = {ref_all / 20:.2f} s)")

    if "ensemble" not in a.skip:
        n_img, n_m = a.ensemble_images, a.ensemble_models
        print(f"\n[naive ensemble CLI] {n_m} models x {n_img} images x {a.ensemble_boxes} boxes "
              f"({a.classes} classes): AP re-weighting + top-4 voting + adj-NMS")
        paths, aps = [], []
        base_b, base_s, base_l = make(rng, n_img, a.ensemble_boxes, a.classes)
        for m in range(n_m):
            # models agree roughly: jitter a shared set of boxes and scores
            jb = np.clip(base_b + rng.normal(0, 0.01, base_b.shape), 0, 1)
            jb = np.concatenate([np.minimum(jb[..., :2], jb[..., 2:]), np.maximum(jb[..., :2], jb[..., 2:])], -1)
            js = np.clip(base_s + rng.normal(0, 0.05, base_s.shape), 0.0011, 1)
            p = tmp / f"model{m}.parquet"
            write_table(p, frame(jb, js, base_l, model=f"m{m}"), "detections")
            ap_path = tmp / f"model{m}.json"
            per = {f"/m/c{k:03d}": {"name": f"c{k}", "ap": float(rng.random())} for k in range(a.classes)}
            ap_path.write_text(json.dumps({"mAP": float(np.mean([v["ap"] for v in per.values()])),
                                           "per_class": per}))
            paths.append(str(p))
            aps.append(str(ap_path))
        wall, out = run_cli(["-m", "stages.ensemble", "--detections", *paths, "--ap-metrics", *aps,
                             "--out", str(tmp / "ensemble.parquet"), "--rows-per-shard", str(a.rows_per_shard)])
        print(f"  python -m stages.ensemble: {wall:.2f} s (target <= 30 s)  ({out})")

    if "memory" not in a.skip:
        print(f"\n[peak RSS of python -m stages.postprocess --method adj_nms, --rows-per-shard "
              f"{a.memory_rows_per_shard}]")
        for n in (a.images // 4, a.images // 2, a.images):
            p = tmp / f"mem{n}.parquet"
            write_table(p, frame(b[:n], s[:n], lab[:n]), "detections")
            mb = peak_rss_mb("stages.postprocess", ["--detections", str(p), "--out", str(tmp / f"mo{n}.parquet"),
                                                    "--method", "adj_nms", "--rows-per-shard",
                                                    str(a.memory_rows_per_shard)])
            print(f"  {n:6d} images ({n * a.boxes} rows): peak RSS {mb:.0f} MB")
    if "crowded" not in a.skip:
        from stages.ops.nms import BLOCK_ELEMS
        print(f"\n[one (image, class) of N boxes, no cap: adj-NMS + top-k voting; pairwise blocks of at most "
              f"{BLOCK_ELEMS} elements vs whole [N, N] blocks]")
        for n in a.crowded_sizes:
            kept, t_nms, t_vote, mb = crowded(n, BLOCK_ELEMS)
            line = f"  N={n:6d}: sliced {t_nms:6.2f} + {t_vote:6.2f} s, peak RSS {mb:6.0f} MB"
            if n * n * 8 <= 1 << 30:
                kept_w, w_nms, w_vote, w_mb = crowded(n, n * n)
                assert kept_w == kept, (kept_w, kept)
                line += f" | whole {w_nms:6.2f} + {w_vote:6.2f} s, peak RSS {w_mb:6.0f} MB (same {kept} kept)"
            else:
                line += f" | whole: not run (one [N, N] float64 array alone is {n * n * 8 / 2**30:.1f} GB)"
            print(line)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    if a.json:
        a.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
