"""The experts file (``stages.experts``' JSON: ``targets``, ``negatives``, ...) and the training tables of an
expert model: only the images holding a box of its classes, and only those classes' boxes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from stages.core.errors import InputError
from stages.formats.io import read_json


def read_experts(path: str | Path) -> list[str]:
    """Targets + negatives of an experts JSON: the classes an expert model is trained on."""
    return [*read_expert_targets(path), *read_json(path).get("negatives", [])]


def read_expert_targets(path: str | Path) -> list[str]:
    """The targets of an experts JSON: the classes an expert contributes to an ensemble (its negatives are
    trained on only to tell them apart)."""
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("targets"), list) or not obj["targets"]:
        raise InputError("an experts file needs a non-empty 'targets' list", file=path, field="targets")
    return list(obj["targets"])


def restrict_to_classes(*, images: pd.DataFrame, boxes: pd.DataFrame, classes: Sequence[str]
                        ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The images holding at least one box of ``classes``, and only those classes' boxes."""
    keep = boxes[boxes["label"].isin(set(classes))]
    images = images[images["image_id"].isin(set(keep["image_id"]))]
    return images, keep[keep["image_id"].isin(set(images["image_id"]))]
