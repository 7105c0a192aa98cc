"""HRNet mask inference (``stages.infer_masks``): images/s and boxes/s, batched vs one box per pass, same run.

Random-weight networks (speed does not depend on the weights) on synthetic JPEGs written to a temporary folder:

- ``builtin``: the default config's ``hrnet_tiny`` (branch widths 8/16/32/64), 40 images of 320 x 288 with 30
  boxes each, crops of 56 px plus the flipped view, 32 x 32 maps (what ``make run``'s infer_masks jobs do);
- ``challenge``: ``hrnet_w48`` (the paper's HRNetV2-W48), 1024 x 768 images with 100 boxes, crops of 224 px plus
  flip, 64 x 64 maps (``configs/oid2019.yaml``); on the CPU only ``--challenge-images`` images (default 1).

Each setting runs :func:`stages.infer_masks.infer_masks` with ``--batch`` crops per forward pass and, as the
baseline, with one crop per pass; both produce the same maps (checked). Device: ``--device auto`` (CUDA when
present, else the CPU with ``--threads``).

    python benchmarks/mask_infer.py [--settings builtin challenge] [--device auto] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.infer_masks import infer_masks  # noqa: E402
from stages.models.detector import select_device  # noqa: E402
from stages.models.hrnet import build_mask_net  # noqa: E402
from stages.train_masks import mask_config  # noqa: E402

SETTINGS = {
    "builtin": {"backbone": "hrnet_tiny", "head_channels": 32, "width": 320, "height": 288, "boxes": 30,
                "scale": 56, "map": 32, "images": 40},
    "challenge": {"backbone": "hrnet_w48", "head_channels": 720, "width": 1024, "height": 768, "boxes": 100,
                  "scale": 224, "map": 64, "images": 1},
}


def make_data(folder: Path, s: dict, n_images: int, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    rows, paths = [], {}
    for i in range(n_images):
        img = rng.integers(0, 255, (s["height"], s["width"], 3), dtype=np.uint8)
        p = folder / f"im{i:04d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths[f"im{i:04d}"] = str(p)
        side = rng.uniform(0.05, 0.4, (s["boxes"], 2))
        x0, y0 = rng.uniform(0, 1 - side[:, 0]), rng.uniform(0, 1 - side[:, 1])
        for k in range(s["boxes"]):
            rows.append((f"im{i:04d}", "/m/x", 1.0 - k / 1000, x0[k], y0[k], x0[k] + side[k, 0], y0[k] + side[k, 1],
                         s["width"], s["height"]))
    cols = ["image_id", "label", "score", "x_min", "y_min", "x_max", "y_max", "width", "height"]
    return pd.DataFrame(rows, columns=cols), pd.Series(paths)


def run(name: str, s: dict, *, device: torch.device, batch: int, n_images: int, repeats: int) -> dict:
    torch.manual_seed(0)
    cfg = mask_config({"backbone": s["backbone"], "head_channels": s["head_channels"]})
    model = build_mask_net(cfg).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        boxes, paths = make_data(Path(tmp), s, n_images, seed=0)
        out = {}
        for label, b in (("batched", batch), ("one_box_per_pass", 1)):
            best, maps = float("inf"), None
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                maps, _ = infer_masks(model=model, boxes=boxes, paths=paths, scale=s["scale"], flip=True,
                                      map_size=s["map"], device=device, batch_size=b, log_every=10 ** 9)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            out[label] = {"seconds": round(best, 3), "images_per_s": round(n_images / best, 2),
                          "boxes_per_s": round(len(boxes) / best, 1), "maps": maps}
    diff = float(np.abs(out["batched"].pop("maps").astype(np.float32)
                        - out["one_box_per_pass"].pop("maps").astype(np.float32)).max())
    return {"setting": name, "backbone": s["backbone"], "device": str(device), "images": n_images,
            "boxes_per_image": s["boxes"], "crop": s["scale"], "views": 2, **out,
            "speedup": round(out["one_box_per_pass"]["seconds"] / out["batched"]["seconds"], 2),
            "max_map_difference": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=["builtin", "challenge"], choices=sorted(SETTINGS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="crops per forward pass (the stage's default)")
    ap.add_argument("--challenge-images", type=int, default=None,
                    help="images of the challenge setting (default: 1 on the CPU, 20 on CUDA)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = select_device(a.device)
    for name in a.settings:
        s = SETTINGS[name]
        n = s["images"] if name == "builtin" else (a.challenge_images or (20 if device.type == "cuda" else 1))
        r = run(name, s, device=device, batch=a.batch, n_images=n, repeats=a.repeats)
        print(json.dumps(r))
        print(f"{name} ({s['backbone']}, {device}): {r['batched']['images_per_s']} images/s, "
              f"{r['batched']['boxes_per_s']} boxes/s (x{r['speedup']} vs one box per pass; same maps within "
              f"{r['max_map_difference']:.1e})", flush=True)


if __name__ == "__main__":
    main()
