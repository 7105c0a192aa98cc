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


class DetectionDataset(torch.utils.data.Dataset):
    """Images with their boxes in absolute xyxy pixels and 1-based class indices (0 is background)."""

    def __init__(self, images: pd.DataFrame, boxes: pd.DataFrame, label_index: dict[str, int]):
        self.images = images.reset_index(drop=True)
        b = boxes[boxes["label"].isin(label_index)]
        self.by_image = {k: g for k, g in b.groupby("image_id", sort=False)}
        self.label_index = label_index

    def __len__(self) -> int:
        return len(self.images)

    def target(self, i: int) -> dict[str, torch.Tensor]:
        row = self.images.iloc[i]
        g = self.by_image.get(row["image_id"])
        w, h = float(row["width"]), float(row["height"])
        if g is None or len(g) == 0:
            return {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
        xyxy = g[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float32) * np.array([w, h, w, h], np.float32)
        # torchvision drops degenerate boxes with an error; give every box at least a pixel
        xyxy[:, 2] = np.maximum(xyxy[:, 2], xyxy[:, 0] + 1)
        xyxy[:, 3] = np.maximum(xyxy[:, 3], xyxy[:, 1] + 1)
        labels = np.array([self.label_index[lab] for lab in g["label"]], np.int64)
        return {"boxes": torch.from_numpy(xyxy), "labels": torch.from_numpy(labels)}

    def box_sizes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(box (w, h) pixels (N, 2), their image's (w, h) (N, 2), class indices (N,)) over the dataset."""
        bw, iw, lab = [], [], []
        for i in range(len(self.images)):
            t = self.target(i)
            b = t["boxes"].numpy()
            bw.append(np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1))
            row = self.images.iloc[i]
            iw.append(np.tile([float(row["width"]), float(row["height"])], (len(b), 1)))
            lab.append(t["labels"].numpy())
        return np.concatenate(bw), np.concatenate(iw), np.concatenate(lab)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return load_image(self.images.iloc[i]["path"]), self.target(i)


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
