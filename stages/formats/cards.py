"""The model card (``results/train/<model>/card.json``, written by :mod:`stages.card`): what a trained detector is,
what it cost and how well it scored, for a user picking models for an ensemble. Its layout::

    {"model": name, "architecture": {...}, "parameters": {"total", "trainable"},
     "flops": {"gflops", "height", "width", "rois", ...}, "throughput": {"img_per_s", ...},
     "training": {...}, "data": {...}, "evaluation": {"val_a": {"mAP", ...}, "val_b": {...}},
     "test_time": {...}, "config_hash", "model_config_hash", "checkpoint", "code"}

:func:`read_card` checks the fields the report reads (:data:`REQUIRED`)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from stages.core.errors import InputError
from stages.formats.io import read_json

#: the card fields (as ``section/key`` paths) the report's model table reads
REQUIRED = ("model", "architecture/backbone/name", "architecture/head", "architecture/cascade", "architecture/dcn",
            "architecture/decoupled_backbone", "parameters/total", "parameters/trainable", "flops/gflops",
            "throughput/img_per_s", "training/epochs", "training/average_epochs", "evaluation")


def card_field(card: Mapping, path: str, *, source: object = None) -> object:
    """The value at ``path`` (``a/b/c``) of a card, or :class:`InputError` naming the field."""
    node: object = card
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            raise InputError("not a model card (stages.card): a field is missing", file=source, field=path)
        node = node[key]
    return node


def read_card(path: str | os.PathLike) -> dict:
    """A model card JSON, checked to hold every :data:`REQUIRED` field."""
    card = read_json(path)
    if not isinstance(card, dict):
        raise InputError("a model card must be a JSON object", file=path, field="(top level)")
    for f in REQUIRED:
        card_field(card, f, source=path)
    if not isinstance(card["evaluation"], Mapping):
        raise InputError("'evaluation' must map each validation split to its metrics", file=path,
                         field="evaluation")
    return card


__all__ = ["REQUIRED", "card_field", "read_card"]
