"""Parameter averaging of checkpoints (the paper averages the weights of epochs [9, 13] for inference)."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_NESTED_KEYS = ("model", "state_dict", "model_state_dict")


def extract_state_dict(obj: object, *, source: object = None) -> Mapping[str, Tensor]:
    """The model state dict inside a loaded checkpoint.

    A checkpoint is either a state dict itself (every value a tensor) or a dict holding one under ``model``,
    ``state_dict`` or ``model_state_dict`` (so training checkpoints with optimizer state work as they are).
    """
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return obj
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and all(isinstance(v, Tensor) for v in inner.values()):
                return inner
    raise ValueError(f"no state dict found in checkpoint {source!s} (expected a dict of tensors or one "
                     f"under {list(_NESTED_KEYS)})")


def average_state_dicts(state_dicts: Sequence[Mapping[str, Tensor]]) -> OrderedDict[str, Tensor]:
    """Average floating-point tensors over ``state_dicts``; other tensors (e.g. ``num_batches_tracked``) are
    taken from the last one. Accumulates in float64 and casts back to each tensor's dtype. Keys and shapes must
    agree (``ValueError`` otherwise). Output order is the last dict's key order; tensors are on the CPU.
    """
    if not state_dicts:
        raise ValueError("average_state_dicts needs at least one state dict")
    last = state_dicts[-1]
    keys = list(last.keys())
    for i, sd in enumerate(state_dicts):
        if set(sd.keys()) != set(keys):
            diff = sorted(set(sd.keys()) ^ set(keys))
            raise ValueError(f"state dict {i} has different keys from the last one: {diff[:5]}")
    out: OrderedDict[str, Tensor] = OrderedDict()
    n = len(state_dicts)
    for k in keys:
        ref = last[k]
        if not torch.is_floating_point(ref) and not torch.is_complex(ref):
            out[k] = ref.detach().cpu().clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for i, sd in enumerate(state_dicts):
            t = sd[k]
            if t.shape != ref.shape:
                raise ValueError(f"tensor {k!r} has shape {tuple(t.shape)} in state dict {i}, "
                                 f"{tuple(ref.shape)} in the last")
            acc += t.detach().cpu().to(torch.float64)
        out[k] = (acc / n).to(ref.dtype)
    return out


def average_checkpoints(paths: Sequence[str | os.PathLike], *, weights_only: bool = True
                        ) -> OrderedDict[str, Tensor]:
    """Load the checkpoint files ``paths`` (e.g. epochs a..b in order, the last one last) onto the CPU and
    return their averaged model state dict (see :func:`average_state_dicts`)."""
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint path")
    sds = []
    for p in paths:
        obj = torch.load(p, map_location="cpu", weights_only=weights_only)
        sds.append(extract_state_dict(obj, source=p))
    log.info("averaging %d checkpoints: %s", len(sds), ", ".join(os.fspath(p) for p in paths))
    return average_state_dicts(sds)


__all__ = ["average_checkpoints", "average_state_dicts", "extract_state_dict"]
