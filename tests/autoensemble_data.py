"""Synthetic ground truth and model detections for the auto-ensemble tests and benchmark.

Every image holds a few objects of a few classes and some distractors (background that looks like an
object: the same for every model, so their false positives overlap as real detectors' do). Every "model"
(leaf) finds each object with its own recall, box noise and score quality, fires on most distractors, and
fills its ``per_image`` boxes with random false positives, half of them of classes the metric ignores on
that image. Leaves differ in mAP and an ensemble of them can beat each one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.formats.tables import BOX_COLUMNS


def labels(n: int) -> list[str]:
    """``n`` synthetic MIDs (``/m/c0, /m/c1, ...``)."""
    return [f"/m/c{i}" for i in range(n)]


def _boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    c = rng.random((n, 2)) * 0.8 + 0.1
    half = (rng.random((n, 2)) * 0.3 + 0.05) / 2
    return np.clip(np.concatenate([c - half, c + half], 1), 0.0, 1.0)


def _frame(ids: np.ndarray, labs: np.ndarray, scores: np.ndarray, b: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"image_id": ids, "label": labs, "score": scores,
                         **{c: b[:, j] for j, c in enumerate(BOX_COLUMNS)}})


def scene(rng: np.random.Generator, *, n_images: int, n_labels: int, objects: int = 6, distractors: int = 30,
          classes_per_image: int = 3) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(boxes, image_labels, distractors)``: about ``objects`` boxes per image over ``classes_per_image``
    classes (a few group-of), a verified-present label per class with boxes and a verified-absent one for
    another class; ``distractors`` per image as a detections table (score 0), half of them of labelled
    classes."""
    names = np.asarray(labels(n_labels), dtype=object)
    ids = np.array([f"img{i:06d}" for i in range(n_images)], dtype=object)
    cls_img = rng.integers(0, n_labels, (n_images, classes_per_image))
    img = np.repeat(np.arange(n_images), rng.integers(1, 2 * objects, n_images))
    lab = cls_img[img, rng.integers(0, classes_per_image, len(img))]
    boxes = _frame(ids[img], names[lab], np.zeros(len(img)), _boxes(rng, len(img))).drop(columns="score")
    boxes["is_group_of"] = rng.random(len(img)) < 0.03
    pos = boxes[["image_id", "label"]].drop_duplicates()
    neg = pd.DataFrame({"image_id": ids, "label": names[rng.integers(0, n_labels, n_images)]})
    neg = neg.merge(pos, how="left", indicator=True).query("_merge == 'left_only'").drop(columns="_merge")
    image_labels = pd.concat([pos.assign(confidence=1), neg.assign(confidence=0)], ignore_index=True)
    image_labels["confidence"] = image_labels["confidence"].astype(np.int8)
    d_img = np.repeat(np.arange(n_images), distractors)
    d_lab = np.where(rng.random(len(d_img)) < 0.5, cls_img[d_img, rng.integers(0, classes_per_image, len(d_img))],
                     rng.integers(0, n_labels, len(d_img)))
    dis = _frame(ids[d_img], names[d_lab], np.zeros(len(d_img)), _boxes(rng, len(d_img)))
    return boxes, image_labels, dis


def _jitter(rng: np.random.Generator, b: np.ndarray, noise: float) -> np.ndarray:
    size = np.concatenate([b[:, 2:] - b[:, :2]] * 2, 1)
    j = np.clip(b + rng.normal(0, noise, b.shape) * size, 0.0, 1.0)
    return np.concatenate([np.minimum(j[:, :2], j[:, 2:]), np.maximum(j[:, :2], j[:, 2:])], 1)


def model_detections(rng: np.random.Generator, boxes: pd.DataFrame, distractors: pd.DataFrame, *,
                     recall: float, noise: float, quality: float, per_image: int, n_labels: int) -> pd.DataFrame:
    """One model's post-processed detections (module doc), sorted by image, score descending."""
    cols = list(BOX_COLUMNS)
    hit = boxes[rng.random(len(boxes)) < recall]
    tps = _frame(hit["image_id"].to_numpy(), hit["label"].to_numpy(),
                 np.clip(rng.beta(2 + 4 * quality, 2.5, len(hit)), 1e-3, 1.0),
                 _jitter(rng, hit[cols].to_numpy(), noise))
    fd = distractors[rng.random(len(distractors)) < 0.7]
    fds = _frame(fd["image_id"].to_numpy(), fd["label"].to_numpy(),
                 np.clip(rng.beta(2, 3 + 2 * quality, len(fd)), 1e-3, 1.0),
                 _jitter(rng, fd[cols].to_numpy(), noise))
    imgs = np.unique(np.concatenate([boxes["image_id"].to_numpy(dtype=object),
                                     distractors["image_id"].to_numpy(dtype=object)]))
    have = pd.concat([tps["image_id"], fds["image_id"]]).value_counts().reindex(imgs, fill_value=0).to_numpy()
    fp_img = np.repeat(imgs, np.maximum(per_image - have, 0))
    fps = _frame(fp_img, np.asarray(labels(n_labels), dtype=object)[rng.integers(0, n_labels, len(fp_img))],
                 np.clip(rng.beta(1.5, 6, len(fp_img)), 1e-3, 1.0), _boxes(rng, len(fp_img)))
    out = pd.concat([tps, fds, fps], ignore_index=True)
    return out.sort_values(["image_id", "score"], ascending=[True, False], kind="stable").reset_index(drop=True)


def leaves(rng: np.random.Generator, boxes: pd.DataFrame, distractors: pd.DataFrame, n: int, *,
           per_image: int, n_labels: int) -> dict[str, pd.DataFrame]:
    """``n`` models of increasing quality: ``{"m0": dets, "m1": ...}``."""
    out = {}
    for i in range(n):
        q = (i + 1) / n
        out[f"m{i}"] = model_detections(rng, boxes, distractors, recall=0.4 + 0.4 * q, noise=0.2 - 0.12 * q,
                                        quality=q, per_image=per_image, n_labels=n_labels)
    return out


def write_inputs(root, rng: np.random.Generator, *, n_images: int = 60, n_labels: int = 8, n_leaves: int = 4,
                 per_image: int = 12) -> dict:
    """Ground-truth tables, splits (half val_a, half val_b) and per-split leaf files under ``root`` (a
    Path); returns the paths: ``boxes, image_labels, classes, hierarchy, splits`` and ``leaves[split][name]``."""
    from stages.formats.io import write_table

    boxes, image_labels, dis = scene(rng, n_images=n_images, n_labels=n_labels, objects=3, distractors=4)
    ids = np.unique(np.concatenate([boxes["image_id"], image_labels["image_id"]]).astype(object))
    split = pd.DataFrame({"image_id": ids, "split": np.where(np.arange(len(ids)) % 2 == 0, "val_a", "val_b")})
    names = labels(n_labels)
    paths = {k: root / f"{k}.parquet" for k in ("boxes", "image_labels", "classes", "hierarchy", "splits")}
    write_table(paths["boxes"], boxes, "boxes")
    write_table(paths["image_labels"], image_labels, "image_labels")
    write_table(paths["classes"], pd.DataFrame({"label": names, "name": names}), "classes")
    write_table(paths["hierarchy"], pd.DataFrame({"child": names[1:3], "parent": [names[0]] * 2}), "hierarchy")
    write_table(paths["splits"], split, "splits")
    models = leaves(rng, boxes, dis, n_leaves, per_image=per_image, n_labels=n_labels)
    paths["leaves"] = {}
    for s in ("val_a", "val_b"):
        keep = set(split.loc[split["split"] == s, "image_id"])
        paths["leaves"][s] = {}
        for name, d in models.items():
            p = root / s / f"{name}.parquet"
            write_table(p, d[d["image_id"].isin(keep)], "detections", provenance={"stage": "test", "split": s})
            paths["leaves"][s][name] = p
    return paths


def search_args(p: dict, out, *extra: str) -> list[str]:
    """``stages.autoensemble search`` arguments for :func:`write_inputs` files, outputs under ``out``."""
    return ["search", "--search-leaves", *[f"{n}={q}" for n, q in p["leaves"]["val_a"].items()],
            "--check-leaves", *[f"{n}={q}" for n, q in p["leaves"]["val_b"].items()],
            "--boxes", str(p["boxes"]), "--image-labels", str(p["image_labels"]),
            "--hierarchy", str(p["hierarchy"]), "--classes", str(p["classes"]), "--split-ids", str(p["splits"]),
            "--search-split", "val_a", "--check-split", "val_b", "--out-tree", str(out / "tree.json"),
            "--log", str(out / "log.jsonl"), "--scores", str(out / "scores.json"), *extra]
