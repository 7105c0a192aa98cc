"""Mine the class subset of an expert model (MMfruit §4.1, expert models).

An expert detector is trained on the classes its base model detects worst, plus the classes that the base
model confuses with them as negatives:

- targets: the ``n_lowest`` classes with the lowest validation AP of the base model, among the classes with
  ground truth that the base model was trained on (with a hierarchy and ``only_leaves``, leaf classes only:
  a parent's AP is mostly made of its children's expanded detections);
- negatives: every other trained class whose classifier FC weight row has cosine similarity ``>= sim_thr`` to
  the row of at least one target (the background row 0 never counts).

The expert is then trained on the images holding a box of a target or a negative, with the other classes'
boxes dropped (``stages.train --classes``), and runs with ``expert: true`` at inference (an RoI whose
background score wins is dropped before regression).

    python -m stages.experts --model results/train/<base>/model.pt \\
        --metrics results/evaluate/postprocess/<base>/val_a.json --n-lowest 3 --sim-thr 0.3 \\
        [--hierarchy results/ingest/hierarchy.parquet] --out results/experts/<expert>.json
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import write_json
from stages.formats.readers import read_class_aps

log = logging.getLogger(__name__)

#: state-dict keys of a classifier FC weight [C+1, D]: sibling / cascade (``box_predictor[.t]``) and TSD /
#: TSD cascade (``decoupled[.t]``); the decoupled branch is the one that classifies when both are present
_CLS_KEY = re.compile(r"roi_heads\.(box_predictor|decoupled)(?:\.(\d+))?\.cls_score\.weight")


def classifier_weight(state: Mapping[str, Any], *, source: object = None) -> np.ndarray:
    """The classifier FC weight ``[C+1, D]`` (row 0: background) of a detector state dict: the decoupled (TSD)
    classifier over the sibling one, and the last cascade stage over earlier ones."""
    found = []
    for key in state:
        m = _CLS_KEY.fullmatch(key)
        if m:
            found.append((m.group(1) == "decoupled", int(m.group(2) or 0), key))
    if not found:
        raise InputError("no classifier weight (roi_heads.*.cls_score.weight) in the model's state dict",
                         file=source, field="model")
    key = max(found)[2]
    log.info("classifier weight %s", key)
    return np.asarray(state[key].detach().float().cpu().numpy(), dtype=np.float64)


def _ap_value(v: object) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def mine_experts(*, ap: Mapping[str, float | None], fc_weight: np.ndarray, labels: Sequence[str], n_lowest: int,
                 sim_thr: float, hierarchy: Hierarchy | None = None, only_leaves: bool = True) -> dict[str, Any]:
    """The class subset of one expert model.

    ``ap``: the base model's validation AP per class (None / NaN: no ground truth); ``fc_weight`` ``[C+1, D]``:
    its classifier FC weight, row 0 background, row ``i`` the class ``labels[i-1]``; ``labels``: the base
    model's trained classes. Returns ``{"targets": [...] (lowest AP first, ties by label), "negatives": [...]
    (sorted), "similarity": {target: {negative: cosine}}}``.
    """
    labels = list(labels)
    w = np.asarray(fc_weight, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != len(labels) + 1:
        raise ValueError(f"fc_weight must be [C+1, D] with C = {len(labels)} labels, got shape {w.shape}")
    if n_lowest < 1:
        raise ValueError(f"n_lowest must be >= 1, not {n_lowest}")
    parents = set()
    if hierarchy is not None and only_leaves:
        known = set(hierarchy.labels)
        parents = {c for c in labels if c in known and hierarchy.descendants(c)}
    candidates = [(v, c) for c in labels if c not in parents and (v := _ap_value(ap.get(c))) is not None]
    if not candidates:
        raise InputError("no trained class has a validation AP (ground truth) to pick experts from",
                         field="per_class")
    targets = [c for _, c in sorted(candidates)[:n_lowest]]
    if len(targets) < n_lowest:
        log.warning("only %d classes have a validation AP; n_lowest=%d", len(targets), n_lowest)
    rows = w[1:]
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = rows / np.where(norms > 0, norms, 1.0)
    index = {c: i for i, c in enumerate(labels)}
    tset = set(targets)
    similarity: dict[str, dict[str, float]] = {}
    negatives: set[str] = set()
    for t in targets:
        sims = unit @ unit[index[t]]
        near = {labels[j]: float(sims[j]) for j in np.flatnonzero(sims >= sim_thr) if labels[j] not in tset}
        similarity[t] = dict(sorted(near.items(), key=lambda kv: (-kv[1], kv[0])))
        negatives.update(near)
    return {"targets": targets, "negatives": sorted(negatives), "similarity": similarity}


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    import torch

    p = argparse.ArgumentParser(prog="python -m stages.experts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="the base model's checkpoint (stages.train --out)")
    p.add_argument("--metrics", type=Path, required=True, help="the base model's metric JSON (stages.evaluate)")
    p.add_argument("--hierarchy", type=Path, help="hierarchy table/JSON: targets are leaf classes only")
    p.add_argument("--n-lowest", type=int, default=3)
    p.add_argument("--sim-thr", type=float, default=0.3)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        ckpt = torch.load(a.model, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise InputError(f"cannot load the model: {exc}", file=a.model) from exc
    if not isinstance(ckpt, Mapping) or "model" not in ckpt or "labels" not in ckpt:
        raise InputError("not a stages.train checkpoint (needs 'model' and 'labels')", file=a.model)
    ap = read_class_aps(a.metrics)
    hierarchy = Hierarchy.read(a.hierarchy) if a.hierarchy else None
    weight = classifier_weight(ckpt["model"], source=a.model)
    out = mine_experts(ap=ap, fc_weight=weight, labels=list(ckpt["labels"]), n_lowest=a.n_lowest,
                       sim_thr=a.sim_thr, hierarchy=hierarchy)
    out = {**out, "ap": {c: ap.get(c) for c in out["targets"]}, "base_model": str(a.model),
           "n_lowest": a.n_lowest, "sim_thr": a.sim_thr}
    write_json(a.out, out)
    print(f"experts: {len(out['targets'])} targets, {len(out['negatives'])} negatives -> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
