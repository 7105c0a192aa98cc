"""Scale benchmark: the CPU stages at the OpenImages Challenge 2019 sizes, without pixels.

Writes OpenImages-format files at a fraction ``scale`` of the challenge (1.0: 1,743,042 training images with
12.2M boxes, 100,000 test images), built by resampling the real validation sample in ``<oid-dir>/derived``
(its class frequencies and long tail, classes per image, boxes per image, group-of share and verified-absent
labels) under the real 500-class hierarchy, with image sizes given as a known images table in the official
``train_0`` … ``train_f`` layout. Then it runs each stage as its command line (``python -m stages.<name>``) and
prints its wall time and peak memory (the process's maximum resident set) against the issue's targets:

    ingest      the box and label CSVs -> tables
    split       train / val_a / val_b
    sample      class-aware sampling weights of train
    anchors     k-means anchors of train
    evaluate    the challenge metric on val_a (about 170k images at full scale) x 100 detections per image
    ensemble    the naive ensemble of 10 models on the test images x 100 raw detections per image and model
                (two test-time views each; hierarchy expansion, AP re-weighting, view merge, voting, adj-NMS)
    submit      the Kaggle CSV of the test images x 300 detections per image

Every stage runs on a small scale too, and its result at the large scale is checked against the small one
(the split's divergences and per-class shares, flat class-aware weights, the same anchors and mAP, the
ensemble's rows per image, and 20 images of its output against the same ensemble computed in process, ...).

The exit status is 1 when a consistency check fails (timings depend on the machine and are only printed).
A stage is one :class:`Stage` in ``STAGES``: how to write the inputs no earlier stage writes (untimed), its
command line, the figures read from its outputs, and the consistency check of the two scales' figures.

    python benchmarks/scale.py --quick    # 5% of the challenge against 0.5% (CI: about a minute or two)
    python benchmarks/scale.py --full     # the challenge's sizes against 1%
    [--only STAGE[,STAGE]] [--oid-dir DIR] [--work DIR] [--keep] [--json OUT]

``--only ensemble,submit`` runs and reports those stages only (the ones they read from run first, unreported;
the ensemble writes its own inputs, so ``--only ensemble`` writes no challenge files).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.formats.columns import positions  # noqa: E402
from stages.formats.io import read_json, read_table, write_json, write_table  # noqa: E402
from stages.formats.stream import TableWriter  # noqa: E402
from stages.formats.tables import BOX_COLUMNS  # noqa: E402

N_TRAIN = 1_743_042          # challenge 2019 training images
N_BOXES = 12_200_000         # their boxes (12.2M)
N_TEST = 100_000             # test images
EVAL_PER_IMAGE = 100
TEST_PER_IMAGE = 300
ENSEMBLE_MODELS = 10         # the naive ensemble's models
ENSEMBLE_PER_IMAGE = 100     # raw detections per test image and model: two test-time views (flip) of 50
ENSEMBLE_OBJECTS = 8         # objects per test image that every model finds
CLASSES_CSV = "challenge-2019-classes-description-500.csv"
HIERARCHY_JSON = "challenge-2019-label500-hierarchy.json"
#: (width, height) of the images and how often: the shapes of the official download (longer side 1024)
IMAGE_SIZES = ([(1024, 768), (768, 1024), (1024, 683), (683, 1024), (1024, 1024), (1024, 576), (1024, 819)],
               [0.45, 0.15, 0.2, 0.07, 0.05, 0.05, 0.03])
GB = 1 << 30


@dataclass
class Run:
    """One scale's dataset and stage outputs under ``dir``."""
    scale: float
    dir: Path
    oid: Path
    seed: int = 0
    n_train: int = 0
    n_test: int = 0
    figures: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.n_train = max(int(round(N_TRAIN * self.scale)), 100)
        self.n_test = max(int(round(N_TEST * self.scale)), 10)

    def __truediv__(self, name: str) -> Path:
        return self.dir / name


# ----- the dataset ------------------------------------------------------------------------------------------
def hex_ids(rng: np.random.Generator, n: int) -> pa.Array:
    """``n`` distinct random 16-hex-digit image ids (like the official ones), sorted, as an arrow string array."""
    v = np.unique(rng.integers(0, 1 << 62, size=int(n * 1.01) + 16, dtype=np.int64))
    v = np.sort(rng.choice(v, n, replace=False)).astype(np.uint64)
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    text = digits[((v[:, None] >> np.arange(60, -4, -4, dtype=np.uint64)) & np.uint64(15)).astype(np.intp)]
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * 16).tobytes())
    return pa.StringArray.from_buffers(n, offsets, pa.py_buffer(np.ascontiguousarray(text).tobytes()))


def _expand(rows_of: pd.Series, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For synthetic images copying source images ``source``: (synthetic image of each row, source row)."""
    start = np.r_[0, np.cumsum(rows_of.to_numpy())][:-1]
    count = rows_of.to_numpy()[source]
    image = np.repeat(np.arange(len(source)), count)
    within = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    return image, start[source][image] + within


def _take(values: pd.Series, rows: np.ndarray) -> pa.Array:
    """``values[rows]`` as an arrow string array, without a Python object per row."""
    code, uniq = pd.factorize(values)
    names = pa.array(uniq.astype(str))
    return pa.DictionaryArray.from_arrays(code.astype(np.int32)[rows], names).cast(pa.string())


def _repeat(text: str, n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), pa.array([text])).cast(pa.string())


def _write_csv(path: Path, columns: dict[str, pa.Array | np.ndarray]) -> None:
    pacsv.write_csv(pa.table(columns), path, write_options=pacsv.WriteOptions(quoting_style="none"))


def write_dataset(run: Run, oid: Path) -> dict:
    """The challenge's files at ``run.scale``: boxes, image labels (with verified negatives), classes and
    hierarchy, a sample submission listing the test images, and the known images table (sizes, paths)."""
    rng = np.random.default_rng(run.seed)
    src_boxes = pd.read_csv(oid / "derived" / "leaf_boxes.csv").sort_values("ImageID", kind="stable")
    src_labels = pd.read_csv(oid / "derived" / "leaf_imagelabels.csv").sort_values("ImageID", kind="stable")
    per_src = src_boxes.groupby("ImageID").size()
    src_ids = per_src.index
    n_labels = src_labels.groupby("ImageID").size().reindex(src_ids, fill_value=0)
    src_labels = src_labels[src_labels["ImageID"].isin(src_ids)]
    # images drawn with probability ~ boxes^alpha, alpha set so that boxes per image is the challenge's
    n = per_src.to_numpy(np.float64)
    lo, hi = -1.0, 2.0
    for _ in range(60):
        alpha = 0.5 * (lo + hi)
        lo, hi = (alpha, hi) if (n ** (alpha + 1)).sum() / (n ** alpha).sum() < N_BOXES / N_TRAIN else (lo, alpha)
    p = n ** alpha
    source = rng.choice(len(src_ids), run.n_train, p=p / p.sum())
    ids = hex_ids(rng, run.n_train + run.n_test)
    order = rng.permutation(run.n_train + run.n_test)
    train_ids, test_ids = ids.take(np.sort(order[:run.n_train])), ids.take(np.sort(order[run.n_train:]))

    image, row = _expand(per_src, source)
    xy = src_boxes[["XMin", "XMax", "YMin", "YMax"]].to_numpy()[row]
    w, h = xy[:, 1] - xy[:, 0], xy[:, 3] - xy[:, 2]
    xy = np.clip(xy + rng.normal(0, 0.02, xy.shape) * np.stack([w, w, h, h], 1), 0, 1).round(6)
    x, y = np.sort(xy[:, :2], 1), np.sort(xy[:, 2:], 1)
    box_cols = {"ImageID": train_ids.take(image), "Source": _repeat("xclick", len(row)),
                "LabelName": _take(src_boxes["LabelName"], row), "Confidence": np.ones(len(row), np.int8),
                "XMin": x[:, 0], "XMax": x[:, 1], "YMin": y[:, 0], "YMax": y[:, 1]}
    for flag in ["IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"]:
        box_cols[flag] = src_boxes[flag].to_numpy(np.int8)[row]
    _write_csv(run / "boxes.csv", box_cols)
    n_boxes = len(row)
    del box_cols, xy, x, y
    image, row = _expand(n_labels, source)
    _write_csv(run / "labels.csv", {"ImageID": train_ids.take(image), "Source": _repeat("verification", len(row)),
                                    "LabelName": _take(src_labels["LabelName"], row),
                                    "Confidence": src_labels["Confidence"].to_numpy(np.int8)[row]})
    shutil.copy(oid / CLASSES_CSV, run / CLASSES_CSV)
    shutil.copy(oid / HIERARCHY_JSON, run / HIERARCHY_JSON)
    _write_csv(run / "sample_submission.csv", {"ImageId": test_ids,
                                               "PredictionString": _repeat("", run.n_test)})
    every = pa.concat_arrays([train_ids, test_ids])
    folder = pa.concat_arrays([pc.binary_join_element_wise("train_", pc.utf8_slice_codeunits(train_ids, 0, 1), ""),
                               _repeat("test", run.n_test)])
    path = pc.binary_join_element_wise(str(run / "images"), folder,
                                       pc.binary_join_element_wise(every, ".jpg", ""), "/")
    wh = np.asarray(IMAGE_SIZES[0])[rng.choice(len(IMAGE_SIZES[0]), len(every), p=IMAGE_SIZES[1])]
    known = pd.DataFrame({"image_id": every.to_numpy(zero_copy_only=False),
                          "path": path.to_numpy(zero_copy_only=False), "width": wh[:, 0], "height": wh[:, 1]})
    write_table(run / "known_images.parquet", known, "images")
    return {"images": run.n_train, "boxes": n_boxes, "image_labels": len(row), "test_images": run.n_test}


def _random_boxes(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    lo, hi = np.sort(rng.random((2, n, 2)), axis=0)
    return {"x_min": lo[:, 0], "y_min": lo[:, 1], "x_max": hi[:, 0], "y_max": hi[:, 1]}


def _write_detections(path: Path, image_ids: np.ndarray, per_image: int,
                      make: Callable[[np.ndarray], pd.DataFrame], chunk: int = 1 << 20) -> int:
    """``per_image`` detections for each of the sorted ``image_ids``, made ``chunk`` rows at a time by
    ``make(images of the rows)``, written sorted by image."""
    step = max(chunk // per_image, 1)
    rows = 0
    with TableWriter(path, "detections", provenance={"stage": "benchmark"}) as w:
        for i in range(0, len(image_ids), step):
            part = image_ids[i:i + step]
            dets = make(part)
            w.write(dets)
            rows += len(dets)
    return rows


def write_val_detections(run: Run) -> None:
    """100 detections per val_a image: 80% of its ground-truth boxes jittered (scores high-ish), then false
    positives (random boxes of classes drawn by frequency, scores low-ish) up to the count."""
    rng = np.random.default_rng(run.seed + 1)
    splits = read_table(run / "split/splits.parquet", "splits", columns=["image_id", "split"])
    val = np.sort(splits.loc[(splits["split"] == "val_a").to_numpy(), "image_id"].to_numpy(object))
    boxes = read_table(run / "ingest/boxes.parquet", "boxes", columns=["image_id", "label", *BOX_COLUMNS])
    freq = boxes["label"].value_counts(normalize=True)
    boxes = boxes[boxes["image_id"].isin(val).to_numpy()]
    img = positions(boxes["image_id"], pd.Index(val))
    keep = rng.random(len(boxes)) < 0.8
    boxes, img = boxes[keep], img[keep]
    order = np.argsort(img, kind="stable")
    boxes, img = boxes.iloc[order], img[order]
    rank = np.arange(len(img)) - np.searchsorted(img, img)
    boxes, img = boxes[rank < EVAL_PER_IMAGE], img[rank < EVAL_PER_IMAGE]
    start = np.searchsorted(img, np.arange(len(val) + 1))
    xy = boxes[["x_min", "y_min", "x_max", "y_max"]].to_numpy()
    wh = np.tile(xy[:, 2:] - xy[:, :2], 2)
    xy = np.clip(xy + rng.normal(0, 0.05, xy.shape) * wh, 0, 1)
    tp = pd.DataFrame({"label": boxes["label"].to_numpy(object), "score": rng.beta(4, 2, len(xy)),
                       "x_min": np.minimum(xy[:, 0], xy[:, 2]), "y_min": np.minimum(xy[:, 1], xy[:, 3]),
                       "x_max": np.maximum(xy[:, 0], xy[:, 2]), "y_max": np.maximum(xy[:, 1], xy[:, 3])})
    index = pd.Index(val)

    def make(part: np.ndarray) -> pd.DataFrame:
        a, b = index.get_loc(part[0]), index.get_loc(part[-1]) + 1
        mine = tp.iloc[start[a]:start[b]].assign(image_id=np.repeat(part, np.diff(start[a:b + 1])))
        n_fp = EVAL_PER_IMAGE - np.diff(start[a:b + 1])
        fp = pd.DataFrame({"image_id": np.repeat(part, n_fp),
                           "label": rng.choice(freq.index.to_numpy(object), n_fp.sum(), p=freq.to_numpy()),
                           "score": rng.beta(2, 4, n_fp.sum()), **_random_boxes(rng, int(n_fp.sum()))})
        return pd.concat([mine, fp], ignore_index=True)

    _write_detections(run / "val_detections.parquet", val, EVAL_PER_IMAGE, make)


def write_test_detections(run: Run) -> None:
    """300 detections per test image: random boxes of classes drawn by frequency, random scores."""
    rng = np.random.default_rng(run.seed + 2)
    ids = np.sort(read_table(run / "ingest/test_images.parquet", "images", columns=["image_id"])["image_id"]
                  .to_numpy(object))
    labels = read_table(run / "ingest/boxes.parquet", "boxes", columns=["label"])["label"]
    freq = labels.value_counts(normalize=True)

    def make(part: np.ndarray) -> pd.DataFrame:
        n = len(part) * TEST_PER_IMAGE
        return pd.DataFrame({"image_id": np.repeat(part, TEST_PER_IMAGE),
                             "label": rng.choice(freq.index.to_numpy(object), n, p=freq.to_numpy()),
                             "score": rng.random(n), **_random_boxes(rng, n)})

    _write_detections(run / "test_detections.parquet", ids, TEST_PER_IMAGE, make)


def _label_frequencies(oid: Path) -> pd.Series:
    return pd.read_csv(oid / "derived" / "leaf_boxes.csv", usecols=["LabelName"])["LabelName"].value_counts(
        normalize=True)


def write_ensemble_inputs(run: Run) -> None:
    """The naive ensemble's inputs: ``ENSEMBLE_MODELS`` models' raw detections of ``run.n_test`` test images,
    ``ENSEMBLE_PER_IMAGE`` per image and model in two test-time views (unflipped, flipped) as the infer stage
    writes them, and each model's per-class AP (the re-weighting). Every image holds ``ENSEMBLE_OBJECTS``
    objects (classes drawn by the real box frequencies); 60% of a view's boxes are jittered copies of them
    (scores high-ish), the others false positives (classes by frequency, random boxes, scores low-ish)."""
    rng = np.random.default_rng(run.seed + 3)
    (run / "ensemble_in").mkdir(parents=True, exist_ok=True)
    freq = _label_frequencies(run.oid)
    names, p = pd.Index(freq.index.to_numpy(object)), freq.to_numpy()
    ids = np.asarray(hex_ids(rng, run.n_test).to_numpy(zero_copy_only=False), dtype=object)
    n, o, per_view = run.n_test, ENSEMBLE_OBJECTS, ENSEMBLE_PER_IMAGE // 2
    obj_cls = rng.choice(len(names), (n, o), p=p)
    centre, size = rng.random((n, o, 2)), rng.uniform(0.05, 0.5, (n, o, 2))
    obj_box = np.clip(np.concatenate([centre - size / 2, centre + size / 2], 2), 0, 1)
    step = 20_000
    for m in range(ENSEMBLE_MODELS):
        mrng = np.random.default_rng([run.seed, m])
        aps = {c: float(a) for c, a in zip(names, mrng.uniform(0.2, 0.8, len(names)))}
        write_json(run / f"ensemble_in/ap{m}.json", {"mAP": float(np.mean(list(aps.values()))),
                                                     "per_class": {c: {"ap": a} for c, a in aps.items()}})
        with TableWriter(run / f"ensemble_in/m{m}.parquet", "detections",
                         provenance={"stage": "benchmark", "model": f"m{m}"}) as w:
            for a in range(0, n, step):
                k = min(step, n - a)
                shape = (k, 2, per_view)                                      # image, view, box
                hit = mrng.random(shape) < 0.6
                img = np.broadcast_to(np.arange(a, a + k)[:, None, None], shape)
                j = mrng.integers(0, o, shape)
                box = obj_box[img, j]
                wh = np.tile(box[..., 2:] - box[..., :2], 2)
                box = np.where(hit[..., None], box + mrng.normal(0, 0.05, box.shape) * wh, mrng.random(box.shape))
                box = np.clip(np.concatenate([np.minimum(box[..., :2], box[..., 2:]),
                                              np.maximum(box[..., :2], box[..., 2:])], -1), 0, 1).reshape(-1, 4)
                cls = np.where(hit, obj_cls[img, j], mrng.choice(len(names), shape, p=p)).reshape(-1)
                score = np.where(hit, mrng.beta(4, 2, shape), mrng.beta(1.5, 5, shape)).reshape(-1)
                w.write(pd.DataFrame({
                    "image_id": pd.Categorical.from_codes(np.repeat(np.arange(k), 2 * per_view), ids[a:a + k]),
                    "label": pd.Categorical.from_codes(cls, names), "score": score,
                    **{c: box[:, i] for i, c in enumerate(("x_min", "y_min", "x_max", "y_max"))},
                    "model": pd.Categorical.from_codes(np.zeros(len(cls), np.int8), [f"m{m}"]),
                    "scale": np.full(len(cls), 800, np.int32),
                    "flip": np.broadcast_to(np.array([False, True])[None, :, None], shape).reshape(-1)}))


# ----- the stages -------------------------------------------------------------------------------------------
def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def ingest_figures(run: Run) -> dict:
    s = read_json(run / "ingest" / "summary.json")
    return {**s, "boxes_per_image": s["boxes"] / s["images"], "group_of_share": s["group_of"] / s["boxes"],
            "negative_share": s["negative_labels"] / s["image_labels"]}


def ingest_check(small: dict, large: dict, run: Run) -> list[str]:
    out = [f"{k}: {large[k]} written, {run.figures['dataset'][k]} in the CSVs"
           for k in ("images", "boxes", "image_labels", "test_images") if large[k] != run.figures["dataset"][k]]
    out += [f"{k}: {small[k]:.4f} small vs {large[k]:.4f} large" for k, rel in
            (("boxes_per_image", 0.05), ("group_of_share", 0.1), ("negative_share", 0.05))
            if not _close(small[k], large[k], rel)]
    return out


def split_figures(run: Run) -> dict:
    rep = read_json(run / "split" / "report.json")
    splits = read_table(run / "split" / "splits.parquet", "splits", columns=["image_id", "split"])
    boxes = read_table(run / "ingest" / "boxes.parquet", "boxes", columns=["image_id", "label"])
    part = pd.Series(splits["split"].to_numpy(object)).map({"train": 0, "val_a": 1, "val_b": 2}).to_numpy()
    lab, labels = pd.factorize(boxes["label"])
    per_class = np.bincount(lab * 3 + part[positions(boxes["image_id"], pd.Index(splits["image_id"]))],
                            minlength=3 * len(labels)).reshape(-1, 3)
    per_class = per_class[per_class.sum(1) >= 100]
    dev = np.abs(per_class[:, 1] / per_class.sum(1) - 0.1)
    return {"js": rep["js_divergence"], "random_js": rep["random_split_js_divergence"], "images": rep["images"],
            "classes_missing": rep["classes_missing"], "val_a_share_deviation": float(dev.mean()),
            "classes_100_boxes": len(per_class)}


def split_check(small: dict, large: dict, run: Run) -> list[str]:
    out = []
    for f in (small, large):
        out += [f"{p}: JS {f['js'][p]:.2e} not below a random split's {f['random_js'][p]:.2e}"
                for p in ("val_a", "val_b") if not f["js"][p] < f["random_js"][p]]
    out += [f"{p}: JS {large['js'][p]:.2e} at large scale above the small scale's {small['js'][p]:.2e}"
            for p in ("val_a", "val_b") if large["js"][p] > small["js"][p]]
    if large["val_a_share_deviation"] > small["val_a_share_deviation"]:
        out.append(f"per-class val_a share deviates more at large scale ({large['val_a_share_deviation']:.4f}) "
                   f"than at small scale ({small['val_a_share_deviation']:.4f})")
    n = sum(large["images"].values())
    out += [f"{p}: {large['images'][p]} images, not {f:.0%} of {n}" for p, f in
            (("train", 0.8), ("val_a", 0.1), ("val_b", 0.1)) if abs(large["images"][p] - f * n) > 2]
    return out


def sample_figures(run: Run) -> dict:
    w = read_table(run / "sample" / "class_aware.parquet", "sampling", columns=["image_id", "label", "weight"])
    per_class = w.groupby("label", observed=True)["weight"].sum()
    return {"pairs": len(w), "images": int(w["image_id"].nunique()), "classes": len(per_class),
            "class_weight_spread": float(per_class.max() / per_class.min() - 1),
            "weight_sum": float(w["weight"].sum())}


def sample_check(small: dict, large: dict, run: Run) -> list[str]:
    out = [f"{s}: class-aware weight per class not flat (spread {f['class_weight_spread']:.2e})"
           for s, f in (("small", small), ("large", large)) if f["class_weight_spread"] > 1e-6]
    out += [f"{s}: weights sum to {f['weight_sum']}" for s, f in (("small", small), ("large", large))
            if abs(f["weight_sum"] - 1) > 1e-9]
    if not _close(small["pairs"] / small["images"], large["pairs"] / large["images"], 0.05):
        out.append(f"classes per image {small['pairs'] / small['images']:.3f} small vs "
                   f"{large['pairs'] / large['images']:.3f} large")
    return out


def anchors_figures(run: Run) -> dict:
    a = read_json(run / "anchors.json")
    return {"ratios": a["aspect_ratios"][0], "mean_iou": a["mean_iou"], "boxes": a["num_boxes"]}


def anchors_check(small: dict, large: dict, run: Run) -> list[str]:
    out = [f"aspect ratio {s} small vs {g} large" for s, g in zip(small["ratios"], large["ratios"])
           if not _close(s, g, 0.2)]
    if abs(small["mean_iou"] - large["mean_iou"]) > 0.03:
        out.append(f"mean IoU {small['mean_iou']:.3f} small vs {large['mean_iou']:.3f} large")
    return out


def evaluate_figures(run: Run) -> dict:
    m = read_json(run / "metrics.json")
    return {"mAP": m["mAP"], "classes": sum(1 for c in m["per_class"].values() if c.get("n_gt", 0) > 0)}


def evaluate_check(small: dict, large: dict, run: Run) -> list[str]:
    return [] if abs(small["mAP"] - large["mAP"]) <= 0.03 else \
        [f"mAP {small['mAP']:.4f} small vs {large['mAP']:.4f} large"]


def submit_figures(run: Run) -> dict:
    n = run.figures["ingest"]["test_images"]
    return {"images": n, "predictions": n * TEST_PER_IMAGE, "bytes": (run / "submission.csv").stat().st_size}


def submit_check(small: dict, large: dict, run: Run) -> list[str]:
    per = [f["bytes"] / f["predictions"] for f in (small, large)]
    return [] if _close(*per, 0.02) else [f"bytes per prediction {per[0]:.2f} small vs {per[1]:.2f} large"]


def ensemble_argv(r: Run) -> list[str]:
    d = r / "ensemble_in"
    return ["--detections", *(d / f"m{m}.parquet" for m in range(ENSEMBLE_MODELS)),
            "--ap-metrics", *(d / f"ap{m}.json" for m in range(ENSEMBLE_MODELS)),
            "--expand-hierarchy", r.oid / HIERARCHY_JSON, "--out", r / "ensemble.parquet"]


def _ensemble_in_process(r: Run, first: str, last: str) -> pd.DataFrame:
    """The stage's computation for the images ``first`` .. ``last``, in this process with the CLI's defaults
    (the schema's): what the stage must have written for them, whatever its shards."""
    from stages.core.config import schema_default
    from stages.formats.hierarchy import Hierarchy
    from stages.formats.readers import read_class_aps
    from stages.formats.stream import read_shard
    from stages.ops.ensemble import naive_ensemble
    from stages.ops.hierarchy import expand_hierarchy
    from stages.ops.nms import top_per_image

    d = r / "ensemble_in"
    hierarchy = Hierarchy.read(r.oid / HIERARCHY_JSON)
    frames = [expand_hierarchy(read_shard(d / f"m{m}.parquet", "detections", first, last, categorical=True),
                               hierarchy) for m in range(ENSEMBLE_MODELS)]
    ens, post = ("ensemble", "postprocess")
    out = naive_ensemble(frames, ap_per_model=[read_class_aps(d / f"ap{m}.json") for m in range(ENSEMBLE_MODELS)],
                         k=schema_default(ens, "k"), score_weight=schema_default(ens, "score_weight"),
                         box_weight=schema_default(ens, "box_weight"), min_iou=schema_default(ens, "min_iou"),
                         method=schema_default(ens, "method"), iou_thr=schema_default(post, "iou_thr"),
                         sigma=schema_default(post, "sigma"), score_thr=schema_default(post, "score_thr"),
                         max_per_class=schema_default(post, "max_per_class"),
                         merge_views=schema_default(ens, "merge_views"), device="cpu")
    return top_per_image(out, max_per_image=schema_default(post, "max_per_image"))


def _dictionary_codes(t: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(int64 codes per row, values) of a dictionary column of ``t`` (its chunks' dictionaries unified)."""
    chunks = t.column(column).chunks
    if not chunks:
        return np.zeros(0, np.int64), np.zeros(0, object)
    return (np.concatenate([c.indices.to_numpy(zero_copy_only=False).astype(np.int64) for c in chunks]),
            chunks[0].dictionary.to_numpy(zero_copy_only=False))


def ensemble_figures(run: Run) -> dict:
    """Per-image figures of the output, and whether 20 images' rows equal the same computation in process."""
    from stages.formats.stream import read_shard

    path = run / "ensemble.parquet"
    t = pq.read_table(path, columns=["image_id", "label", "score"],
                      read_dictionary=["image_id", "label"]).unify_dictionaries()
    (img, ids), (lab, _) = _dictionary_codes(t, "image_id"), _dictionary_codes(t, "label")
    present = np.unique(img)
    ids = np.sort(ids[present])
    first, last = ids[len(ids) // 2], ids[min(len(ids) // 2 + 19, len(ids) - 1)]
    want = _ensemble_in_process(run, first, last)
    got = read_shard(path, "detections", first, last)
    cols = ["image_id", "label", "score", *BOX_COLUMNS]
    a, b = (f[cols].astype({"image_id": object, "label": object}).sort_values(cols).reset_index(drop=True)
            for f in (got, want))
    same = len(a) == len(b) and bool((a[["image_id", "label"]] == b[["image_id", "label"]]).all().all()) and \
        np.allclose(a[cols[2:]].to_numpy(), b[cols[2:]].to_numpy(), rtol=0, atol=1e-9)
    n_img = len(present)
    return {"rows": t.num_rows, "images": n_img, "test_images": run.n_test, "rows_per_image": t.num_rows / n_img,
            "pairs_per_image": len(np.unique(img * (int(lab.max()) + 1) + lab)) / n_img,
            "mean_score": float(pc.mean(t.column("score")).as_py()), "sample_images": int(b["image_id"].nunique()),
            "sample_same_as_in_process": bool(same)}


def ensemble_check(small: dict, large: dict, run: Run) -> list[str]:
    out = []
    for s, f in (("small", small), ("large", large)):
        if not f["sample_same_as_in_process"]:
            out.append(f"{s}: the stage's rows of {f['sample_images']} images differ from the same ensemble "
                       "computed in process")
        if f["images"] != f["test_images"]:
            out.append(f"{s}: {f['images']} images with detections, not {f['test_images']}")
    out += [f"{k}: {small[k]:.4f} small vs {large[k]:.4f} large" for k, rel in
            (("rows_per_image", 0.02), ("pairs_per_image", 0.05), ("mean_score", 0.05))
            if not _close(small[k], large[k], rel)]
    return out


@dataclass(frozen=True)
class Stage:
    name: str
    argv: Callable[[Run], list[str]]                 # the stage's command line after ``python -m stages.<name>``
    figures: Callable[[Run], dict]                   # what its outputs say, compared across the two scales
    check: Callable[[dict, dict, Run], list[str]]    # (small, large, large run) -> failed consistency checks
    target: tuple[float, float]                      # the target at full scale: seconds, GB
    prepare: Callable[[Run], None] | None = None     # writes the inputs no earlier stage writes (untimed)
    needs: tuple[str, ...] = ()                      # the stages whose outputs it reads (run first)
    dataset: bool = True                             # reads the written challenge files (else: its own inputs)


def _ingest_argv(r: Run) -> list[str]:
    return ["--boxes-csv", r / "boxes.csv", "--labels-csv", r / "labels.csv", "--classes-csv", r / CLASSES_CSV,
            "--hierarchy-json", r / HIERARCHY_JSON, "--images-dir", r / "images", "--known-images",
            r / "known_images.parquet", "--sample-submission", r / "sample_submission.csv",
            "--out-dir", r / "ingest"]


STAGES = [
    Stage("ingest", _ingest_argv, ingest_figures, ingest_check, (180, 6)),
    Stage("split", lambda r: ["--images", r / "ingest/images.parquet", "--boxes", r / "ingest/boxes.parquet",
                              "--out", r / "split/splits.parquet", "--report", r / "split/report.json"],
          split_figures, split_check, (180, 6), needs=("ingest",)),
    Stage("sample", lambda r: ["--boxes", r / "ingest/boxes.parquet", "--splits", r / "split/splits.parquet",
                               "--method", "class_aware", "--out", r / "sample/class_aware.parquet"],
          sample_figures, sample_check, (120, 6), needs=("ingest", "split")),
    Stage("anchors", lambda r: ["--boxes", r / "ingest/boxes.parquet", "--images", r / "ingest/images.parquet",
                                "--splits", r / "split/splits.parquet", "--out", r / "anchors.json"],
          anchors_figures, anchors_check, (120, 6), needs=("ingest", "split")),
    Stage("evaluate", lambda r: ["--boxes", r / "ingest/boxes.parquet", "--image-labels",
                                 r / "ingest/image_labels.parquet", "--hierarchy", r / "ingest/hierarchy.parquet",
                                 "--classes", r / "ingest/classes.parquet", "--predictions",
                                 r / "val_detections.parquet", "--split-ids", r / "split/splits.parquet",
                                 "--split", "val_a", "--out", r / "metrics.json"],
          evaluate_figures, evaluate_check, (30, 8), prepare=write_val_detections, needs=("ingest", "split")),
    Stage("ensemble", ensemble_argv, ensemble_figures, ensemble_check, (600, 6), prepare=write_ensemble_inputs,
          dataset=False),
    Stage("submit", lambda r: ["--detections", r / "test_detections.parquet", "--images",
                               r / "ingest/test_images.parquet", "--out", r / "submission.csv"],
          submit_figures, submit_check, (120, 4), prepare=write_test_detections, needs=("ingest",)),
]


# ----- running ----------------------------------------------------------------------------------------------
#: runs a stage module as ``python -m`` does and writes its peak resident memory (VmHWM, kB) to argv[1] at exit.
#: (A child's ru_maxrss is no use here: Linux carries the parent's high-water mark over fork and exec.)
_MEASURED = """
import atexit, runpy, sys
out, module = sys.argv[1], sys.argv[2]
def peak():
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(out, "w") as f:
        f.write(kb)
atexit.register(peak)
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_stage(stage: Stage, run: Run) -> tuple[float, float]:
    """Run the stage's CLI; (wall seconds, peak resident GB)."""
    log, peak = run / f"{stage.name}.log", run / f"{stage.name}.peak_kb"
    cmd = [sys.executable, "-c", _MEASURED, str(peak), f"stages.{stage.name}", *map(str, stage.argv(run))]
    env = dict(os.environ, PYTHONPATH=str(ROOT), ORCHARD_LOG="WARNING")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"{stage.name} failed (exit {rc}) at scale {run.scale}:\n"
                         + "\n".join(log.read_text().splitlines()[-20:]))
    return seconds, int(peak.read_text()) * 1024 / GB



def run_scale(run: Run, stages: list[Stage]) -> dict[str, dict]:
    """Run ``stages`` (in order) at ``run``'s scale; {stage name: its timing row}."""
    t0 = time.perf_counter()
    run.dir.mkdir(parents=True, exist_ok=True)
    if any(stage.dataset for stage in stages):
        run.figures["dataset"] = write_dataset(run, run.oid)
        d = run.figures["dataset"]
        print(f"\nscale {run.scale:g}: {d['images']:,} images, {d['boxes']:,} boxes, "
              f"{d['image_labels']:,} image labels, "
              f"{d['test_images']:,} test images (written in {time.perf_counter() - t0:.0f} s)", flush=True)
    else:
        print(f"\nscale {run.scale:g}: {run.n_test:,} test images", flush=True)
    rows = {}
    for stage in stages:
        prep = 0.0
        if stage.prepare is not None:
            t = time.perf_counter()
            stage.prepare(run)
            prep = time.perf_counter() - t
        seconds, gb = run_stage(stage, run)
        run.figures[stage.name] = stage.figures(run)
        rows[stage.name] = {"stage": stage.name, "scale": run.scale, "seconds": seconds, "peak_gb": gb,
                            "prepare_seconds": prep}
        print(f"  {stage.name:<9} {seconds:7.1f} s  {gb:5.2f} GB   (inputs prepared in {prep:.0f} s)", flush=True)
    return rows


def selected(only: list[str] | None) -> list[Stage]:
    """The stages to run for ``only`` (None: all): those named and the ones they need, in ``STAGES`` order."""
    by_name = {s.name: s for s in STAGES}
    want: set[str] = set()
    todo = list(only or by_name)
    while todo:
        name = todo.pop()
        if name not in want:
            want.add(name)
            todo.extend(by_name[name].needs)
    return [s for s in STAGES if s.name in want]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--quick", action="store_true", help="5%% of the challenge against 0.5%%")
    size.add_argument("--full", action="store_true", help="the challenge's sizes against 1%%")
    p.add_argument("--only", metavar="STAGE[,STAGE]",
                   help=f"run and report only these stages (of {', '.join(s.name for s in STAGES)}); the stages "
                   "whose outputs they read run first, unreported")
    p.add_argument("--oid-dir", type=Path, default=ROOT / "tests" / "fixtures" / "oid2019",
                   help="the real 2019 class files and derived/ sample (default: the copy in tests/fixtures/oid2019)")
    p.add_argument("--work", type=Path, help="where to write (default: a temporary folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args(argv)
    if a.oid_dir is None or not (a.oid_dir / "derived" / "leaf_boxes.csv").exists():
        p.error("--oid-dir: need the 2019 class files and derived/leaf_boxes.csv (see tests/fixtures/oid2019/README.md)")
    only = None
    if a.only is not None:
        only = [x.strip() for x in a.only.split(",") if x.strip()]
        unknown = sorted(set(only) - {s.name for s in STAGES})
        if unknown or not only:
            p.error(f"--only: unknown stage {unknown[0]!r}" if unknown else "--only: name a stage")
    stages = selected(only)
    reported = [s for s in stages if only is None or s.name in only]
    small_scale, large_scale = (0.005, 0.05) if a.quick else (0.01, 1.0)
    work = a.work or Path(tempfile.mkdtemp(prefix="orchard-scale-"))
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    try:
        small, large = (Run(s, work / f"scale-{s:g}", a.oid_dir) for s in (small_scale, large_scale))
        rows = {"small": run_scale(small, stages), "large": run_scale(large, stages)}
    finally:
        if not a.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    print(f"\n{'stage':<9} {'scale':>6} {'seconds':>8} {'peak GB':>8}   target at full scale   "
          f"consistency (vs scale {small_scale:g})")
    failed = 0
    for stage in reported:
        row = rows["large"][stage.name]
        problems = stage.check(small.figures[stage.name], large.figures[stage.name], large)
        within = row["seconds"] <= stage.target[0] and row["peak_gb"] <= stage.target[1]
        verdict = ("met" if within else "MISSED") if large_scale == 1 else "-"
        failed += bool(problems)
        print(f"{stage.name:<9} {large_scale:>6g} {row['seconds']:8.1f} {row['peak_gb']:8.2f}   "
              f"<= {stage.target[0]:>4.0f} s, {stage.target[1]:.0f} GB {verdict:>6}   "
              f"{'ok' if not problems else '; '.join(problems)}")
    print(f"total {total:.0f} s (datasets and stage inputs included); load average {load0[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} CPUs")
    if a.json:
        a.json.write_text(json.dumps({"rows": [r for scale in rows.values() for r in scale.values()],
                                      "total_seconds": total, "small": small.figures, "large": large.figures},
                                     indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
