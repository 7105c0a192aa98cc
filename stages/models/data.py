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
    """

    def __init__(self, images: pd.DataFrame, boxes: pd.DataFrame, label_index: Mapping[str, int]):
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

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return self.paths[i].decode("utf-8")

    def target(self, i: int) -> dict[str, torch.Tensor]:
        a, b = self.offsets[i], self.offsets[i + 1]
        xyxy = _pixel_boxes(self.xyxy_norm[a:b], (self.widths[i], self.heights[i]))
        return {"boxes": torch.from_numpy(xyxy), "labels": torch.from_numpy(self.cls[a:b].copy())}

    def box_sizes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(box (w, h) pixels (N, 2), their image's (w, h) (N, 2), class indices (N,)) over the dataset, the
        boxes as :meth:`target` gives them."""
        of_box = np.repeat(np.arange(len(self.paths)), np.diff(self.offsets))
        image_wh = np.stack([self.widths, self.heights], 1)[of_box]
        b = _pixel_boxes(self.xyxy_norm, image_wh)
        return np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1), image_wh, self.cls.copy()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return load_image(self.path(i)), self.target(i)


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
