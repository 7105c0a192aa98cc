"""Eval-time cost of the RoI heads alone: torchvision's sibling head vs the Decoupling Head (TSD) vs the
modified cascade (plain and decoupled), on the same random FPN features and proposals, measured in one run.

    python benchmarks/roi_heads.py --size 800 --proposals 1000 --repeats 3

Prints ms per image and the ratio to the sibling head (the issue's target: TSD <= 1.25x).
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict

import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

from stages.models.cascade import CascadeRoIHeads
from stages.models.tsd import TSDRoIHeads, TSDSettings


def _features(size: int, channels: int, device: torch.device) -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    feats = OrderedDict()
    for i, stride in enumerate((4, 8, 16, 32)):
        feats[str(i)] = torch.randn(1, channels, size // stride, size // stride, generator=g).to(device)
    feats["pool"] = torch.randn(1, channels, size // 64, size // 64, generator=g).to(device)
    return feats


def _proposals(size: int, n: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(n, 2, generator=g) * size * 0.8
    wh = torch.rand(n, 2, generator=g) * size * 0.5 + 8
    return [torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1).to(device)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--proposals", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=501)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = 256
    pool = lambda: MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)  # noqa: E731
    common = dict(score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)
    heads = {
        "sibling (torchvision)": RoIHeads(pool(), TwoMLPHead(c * 49, 1024), FastRCNNPredictor(1024, a.classes),
                                          0.5, 0.5, 512, 0.25, None, **common),
        "TSD": TSDRoIHeads(pool(), in_channels=c, num_classes=a.classes, **common),
        "cascade x4": CascadeRoIHeads(pool(), in_channels=c, num_classes=a.classes, **common),
        "cascade x4 + TSD": CascadeRoIHeads(pool(), in_channels=c, num_classes=a.classes, decoupled=TSDSettings(),
                                            **common),
    }
    feats = _features(a.size, c, device)
    props = _proposals(a.size, a.proposals, device)
    shapes = [(a.size, a.size)]
    times = {}
    for name, h in heads.items():
        h.to(device).eval()
        with torch.no_grad():
            h(feats, props, shapes)  # warm-up
            best = float("inf")
            for _ in range(a.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                h(feats, props, shapes)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
        times[name] = best
    base = times["sibling (torchvision)"]
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {a.threads} thread(s)"
    print(f"RoI heads, eval, {a.proposals} proposals, {a.size}px, {a.classes} classes, {dev}; best of {a.repeats}")
    for name, t in times.items():
        print(f"  {name:24s} {1000 * t:8.1f} ms/image   x{t / base:.2f}")


if __name__ == "__main__":
    main()
