"""The few array operations the ops need, for numpy arrays (the CPU path) and torch tensors (CUDA).

The post-processing ops are written once against this module, so the same code runs in numpy on a CPU (no
``import torch``: a stage that only post-processes starts in a fraction of a second) and in torch on a GPU.
torch is imported only when a tensor is passed in, or when :func:`default_backend` finds an NVIDIA driver.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

Array = Any  # np.ndarray | torch.Tensor


def is_numpy(x: Array) -> bool:
    return isinstance(x, np.ndarray)


def xp(x: Array):
    """The module (numpy or torch) that owns ``x``."""
    if isinstance(x, np.ndarray):
        return np
    import torch

    return torch


def to_numpy(x: Array) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()


def like(a: np.ndarray, x: Array) -> Array:
    """``a`` as the same kind of array as ``x`` (a tensor on ``x``'s device when ``x`` is a tensor)."""
    if isinstance(x, np.ndarray):
        return a
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).to(x.device)


def copy(x: Array) -> Array:
    return x.copy() if isinstance(x, np.ndarray) else x.clone()


def arange_like(n: int, x: Array) -> Array:
    if isinstance(x, np.ndarray):
        return np.arange(n)
    import torch

    return torch.arange(n, device=x.device)


def clamp_min(x: Array, v: float) -> Array:
    return np.maximum(x, v) if isinstance(x, np.ndarray) else x.clamp(min=v)


def topk_indices(x: Array, k: int) -> Array:
    """Indices of the ``k`` largest values along the last axis (in no particular order for numpy; which of
    several values tied at the k-th place is taken is unspecified)."""
    n = x.shape[-1]
    if isinstance(x, np.ndarray):
        if k >= n:
            return np.broadcast_to(np.arange(n), x.shape).copy()
        return np.argpartition(-x, k - 1, axis=-1)[..., :k]
    return x.topk(min(k, n), dim=-1).indices


def take_along(x: Array, idx: Array, axis: int) -> Array:
    if isinstance(x, np.ndarray):
        return np.take_along_axis(x, idx, axis)
    return x.gather(axis, idx)


def cuda_visible() -> bool:
    """True when a CUDA GPU may be usable, decided without importing torch where possible: torch already
    imported -> ask it; else an NVIDIA driver node must exist (then torch is imported and asked)."""
    if "torch" not in sys.modules:
        if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
            return False
        if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")):
            return False
    import torch

    return bool(torch.cuda.is_available())


def default_backend(device: object = None) -> str | None:
    """``None`` for numpy (the CPU), else the torch device string to use. ``device``: None/"auto" = CUDA if
    usable else numpy; "cpu"/"numpy" = numpy; anything else (e.g. "cuda:1") is taken as a torch device."""
    if device is None or str(device) == "auto":
        return "cuda" if cuda_visible() else None
    if str(device) in ("cpu", "numpy"):
        return None
    return str(device)
