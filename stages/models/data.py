"""Training/inference data: images table + boxes -> tensors for torchvision detectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image

from stages.core.errors import InputError
from stages.formats.tables import NO_CLASS


def load_image(path: str) -> torch.Tensor:
    """JPEG -> float tensor [3, H, W] in [0, 1]."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError) as exc:
        raise InputError(f"cannot read image: {exc}", file=path) from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _positions(index: pd.Index, values: pd.Series) -> np.ndarray:
    """Position in ``index`` of each of ``values`` (-1: absent); a categorical column is looked up once per
    category (no Python object per row)."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        of_category = np.append(index.get_indexer(values.cat.categories.to_numpy(dtype=object)), -1)
        return of_category[values.cat.codes.to_numpy()]          # code -1 (missing) -> the appended -1
    return index.get_indexer(values.to_numpy(dtype=object))


def _pixel_boxes(xyxy_norm: np.ndarray, wh: np.ndarray) -> np.ndarray:
    """Normalised xyxy (N, 4) float32 -> absolute pixels for image sizes ``wh`` ((2,) or (N, 2)), each box at
    least a pixel wide and high (torchvision rejects degenerate boxes with an error)."""
    wh = np.asarray(wh, np.float32)
    xyxy = xyxy_norm * np.concatenate([wh, wh], -1)
    xyxy[:, 2] = np.maximum(xyxy[:, 2], xyxy[:, 0] + 1)
    xyxy[:, 3] = np.maximum(xyxy[:, 3], xyxy[:, 1] + 1)
    return xyxy


class DetectionDataset(torch.utils.data.Dataset):
    """Images with their boxes in absolute xyxy pixels and 1-based class indices (0 is background).

    Held as flat numpy arrays, built once without a Python loop per image or box: ``paths`` (n,) UTF-8 bytes,
    ``widths``/``heights`` (n,) float64, and the boxes of image ``i`` at rows ``offsets[i]:offsets[i + 1]`` of
    ``xyxy_norm`` (N, 4) float32 normalised xyxy and ``cls`` (N,) int64 (in the boxes table's order within an
    image). There is no Python object per row, so DataLoader workers forked from the training process share
    these pages instead of copying them as reference counts change; every rank builds the same arrays.
    Boxes of other images or of labels outside ``label_index`` are dropped.

    Weak supervision (``image_labels`` given, the :func:`image_level_matrix` of these images): each target also
    carries ``image_labels`` ((C,) int8: 1 present, 0 verified absent, -1 unknown) and ``box_annotated`` (a bool
    tensor, from the images table's optional ``box_annotated`` column; absent = True). Without it the targets
    hold ``boxes`` and ``labels`` only.
    """

    def __init__(self, images: pd.DataFrame, boxes: pd.DataFrame, label_index: Mapping[str, int],
                 image_labels: np.ndarray | None = None):
        ids = pd.Index(images["image_id"].to_numpy(dtype=object))
        if not ids.is_unique:
            dup = ids[ids.duplicated()][0]
            raise InputError(f"image {dup!r} appears twice in the images table", field="image_id")
        n = len(ids)
        self.paths = np.asarray(images["path"].astype(str).str.encode("utf-8").to_numpy(), dtype=np.bytes_)
        self.widths = images["width"].to_numpy(np.float64)
        self.heights = images["height"].to_numpy(np.float64)
        img = _positions(ids, boxes["image_id"])
        pos = _positions(pd.Index(list(label_index), dtype=object), boxes["label"])
        keep = np.flatnonzero((img >= 0) & (pos >= 0))
        order = keep[np.argsort(img[keep], kind="stable")]  # by image position, table order within an image
        index = np.fromiter(label_index.values(), np.int64, len(label_index))
        self.xyxy_norm = np.ascontiguousarray(
            boxes[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float32)[order])
        self.cls = index[pos[order]]
        self.offsets = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(img[keep], minlength=n), out=self.offsets[1:])
        self.box_annotated = box_annotated_column(images)
        if image_labels is not None and image_labels.shape != (n, len(label_index)):
            raise ValueError(f"image_labels must have shape ({n}, {len(label_index)}), got {image_labels.shape}")
        self.image_labels = image_labels

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return self.paths[i].decode("utf-8")

    def target(self, i: int) -> dict[str, torch.Tensor]:
        a, b = self.offsets[i], self.offsets[i + 1]
        xyxy = _pixel_boxes(self.xyxy_norm[a:b], (self.widths[i], self.heights[i]))
        out = {"boxes": torch.from_numpy(xyxy), "labels": torch.from_numpy(self.cls[a:b].copy())}
        if self.image_labels is not None:
            out["image_labels"] = torch.from_numpy(self.image_labels[i].copy())
            out["box_annotated"] = torch.tensor(bool(self.box_annotated[i]))
        return out

    def box_sizes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(box (w, h) pixels (N, 2), their image's (w, h) (N, 2), class indices (N,)) over the dataset, the
        boxes as :meth:`target` gives them."""
        of_box = np.repeat(np.arange(len(self.paths)), np.diff(self.offsets))
        image_wh = np.stack([self.widths, self.heights], 1)[of_box]
        b = _pixel_boxes(self.xyxy_norm, image_wh)
        return np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1), image_wh, self.cls.copy()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return load_image(self.path(i)), self.target(i)


def box_annotated_column(images: pd.DataFrame) -> np.ndarray:
    """The images table's optional ``box_annotated`` column as a bool array (absent: every image True)."""
    if "box_annotated" not in images.columns:
        return np.ones(len(images), dtype=bool)
    return images["box_annotated"].fillna(True).to_numpy(dtype=bool)


def image_level_matrix(image_labels: pd.DataFrame | None, *, image_ids: Sequence[str],
                       label_index: Mapping[str, int], source: object = None) -> np.ndarray:
    """The ``image_labels`` table (image_id, label, confidence 1 / 0) as an (images, classes) int8 matrix in the
    order of ``image_ids`` and ``label_index`` (column ``label_index[label] - 1``): 1 verified present, 0
    verified absent, -1 unknown. Rows of other images or classes are ignored (None: all unknown). A confidence
    other than 0 / 1, or an image with a class both present and absent, raises :class:`InputError` naming the
    row (0-based record of the table) and the field."""
    n, c = len(image_ids), len(label_index)
    out = np.full((n, c), -1, dtype=np.int8)
    if image_labels is None or image_labels.empty:
        return out
    conf = image_labels["confidence"].to_numpy()
    bad = np.flatnonzero((conf != 0) & (conf != 1))
    if len(bad):
        raise InputError(f"confidence must be 0 or 1, got {conf[bad[0]]}", file=source, row=f"record {bad[0]}",
                         field="confidence")
    img = _positions(pd.Index(list(image_ids), dtype=object), image_labels["image_id"])
    pos = _positions(pd.Index(list(label_index), dtype=object), image_labels["label"])
    keep = np.flatnonzero((img >= 0) & (pos >= 0))
    col = np.fromiter(label_index.values(), np.int64, c)[pos[keep]] - 1
    flat = img[keep] * c + col
    present = np.zeros(n * c, dtype=bool)
    absent = np.zeros(n * c, dtype=bool)
    present[flat[conf[keep] == 1]] = True
    absent[flat[conf[keep] == 0]] = True
    both = present & absent
    if both.any():
        cell = np.flatnonzero(both)[0]
        rec = keep[np.flatnonzero(flat == cell)[0]]
        image, label = image_labels["image_id"].iloc[rec], image_labels["label"].iloc[rec]
        raise InputError(f"image {image!r} has label {label!r} "
                         "both verified present (1) and absent (0)", file=source, row=f"record {rec}",
                         field="confidence")
    out.reshape(-1)[absent] = 0
    out.reshape(-1)[present] = 1
    return out


def hflip(img: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    w = img.shape[-1]
    b = target["boxes"].clone()
    if len(b):
        b[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    return img.flip(-1), {**target, "boxes": b}


def collate(batch: Sequence) -> tuple[list, list]:
    return [b[0] for b in batch], [b[1] for b in batch]


@dataclass(frozen=True)
class SamplingDraw:
    """The training draw as arrays: pair k is (image position ``image[k]``, class index ``cls[k]``, 1-based; -1
    for a draw without a class) with probability ``p[k]`` (summing to 1); ``n_images`` images in all."""

    image: np.ndarray
    cls: np.ndarray
    p: np.ndarray
    n_images: int

    def remap(self, positions: np.ndarray, n_images: int) -> "SamplingDraw":
        """The same draw with image ``k`` renamed ``positions[k]`` among ``n_images`` images."""
        return SamplingDraw(np.asarray(positions)[self.image], self.cls, self.p, n_images)

    def image_p(self) -> np.ndarray:
        """Probability of each image position (n_images,): the sum of its pairs."""
        return np.bincount(self.image, weights=self.p, minlength=self.n_images)


def training_draw(weights: pd.DataFrame | None, *, image_ids: Sequence[str], label_index: Mapping[str, int]
                  ) -> SamplingDraw:
    """The sample stage's ``sampling`` table (image_id, label, weight) as the draw of a model trained on
    ``image_ids`` (the positions are into this sequence) and the classes of ``label_index`` (label -> 1-based
    index): the pairs of other images or classes are dropped and the rest renormalised (an expert model draws
    from the stage's distribution conditioned on its classes). None: every image equally, without a class."""
    ids = pd.Index(image_ids)
    if weights is None:
        n = len(ids)
        return SamplingDraw(np.arange(n), np.full(n, -1, dtype=np.int64), np.full(n, 1.0 / n), n)
    img = ids.get_indexer(weights["image_id"].to_numpy(dtype=object))
    labels = weights["label"].to_numpy(dtype=object)
    pos = pd.Index(list(label_index), dtype=object).get_indexer(labels)
    index = np.append(np.fromiter(label_index.values(), np.int64, len(label_index)), 0)  # 0: not trained on
    cls = np.where(labels == NO_CLASS, -1, index[pos])
    keep = (img >= 0) & (cls != 0) & (weights["weight"].to_numpy() > 0)
    p = weights["weight"].to_numpy(np.float64)[keep]
    if not keep.any() or p.sum() <= 0:
        raise InputError("the sampling table gives no weight to any training image and class", field="weight")
    return SamplingDraw(img[keep].astype(np.int64), cls[keep], p / p.sum(), len(ids))


def image_level_draw(labels: np.ndarray, *, class_aware: bool) -> SamplingDraw:
    """The draw of the image-level-only pool from its (images, classes) :func:`image_level_matrix`: class-aware
    (a class uniformly among those with a positive label in the pool, then an image of that class uniformly;
    pair classes 1-based) or uniform over the images (class -1). Images without a positive label are never
    drawn class-aware."""
    n = labels.shape[0]
    if not class_aware:
        return SamplingDraw(np.arange(n), np.full(n, -1, dtype=np.int64), np.full(n, 1.0 / n), n)
    img, col = np.nonzero(labels == 1)
    if len(img) == 0:
        raise InputError("no image-level-only training image has a positive label of a trained class",
                         field="image_labels")
    per_class = np.bincount(col, minlength=labels.shape[1])
    p = 1.0 / (per_class[col] * np.count_nonzero(per_class))
    return SamplingDraw(img.astype(np.int64), (col + 1).astype(np.int64), p / p.sum(), n)
