"""Training/inference data: images table + boxes -> tensors for torchvision detectors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from stages.core.errors import InputError


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

    def class_images(self, num_classes: int) -> list[np.ndarray]:
        """For class index c = 1..num_classes, entry c - 1 holds the (sorted) indices of images with a box of c."""
        ids = {v: i for i, v in enumerate(self.images["image_id"])}
        out: list[list[int]] = [[] for _ in range(num_classes)]
        for image_id, g in self.by_image.items():
            if image_id not in ids:
                continue
            for c in sorted({self.label_index[lab] for lab in g["label"]}):
                out[c - 1].append(ids[image_id])
        return [np.asarray(sorted(x), dtype=np.int64) for x in out]

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
