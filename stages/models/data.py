"""Training/inference data: images table + boxes -> tensors for torchvision detectors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from stages.errors import InputError


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
