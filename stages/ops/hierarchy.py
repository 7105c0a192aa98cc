"""Hierarchy expansion of predictions: every box is also emitted for each ancestor of its class."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.formats.columns import codes
from stages.formats.hierarchy import Hierarchy
from stages.formats.tables import BOX_COLUMNS
from stages.ops.nms import segment_order


def expand_hierarchy(dets: pd.DataFrame, hierarchy: Hierarchy) -> pd.DataFrame:
    """Emit each detection for its label and every ancestor (root excluded), by a join on
    :meth:`Hierarchy.expansion_pairs` (no loop per row).

    Copies of the same box (image_id and exact coordinates) under the same label keep the highest score;
    the other columns come from that row. Labels the hierarchy does not know pass through unchanged.
    Idempotent: expanding an expanded table returns the same rows. Output sorted by image_id, score desc.
    """
    pairs = hierarchy.expansion_pairs(up=True)
    pairs = pairs[pairs["label"] != pairs["expanded"]]
    anc = dets.merge(pairs, on="label", how="inner", sort=False)
    anc["label"] = anc.pop("expanded")
    out = pd.concat([dets, anc], ignore_index=True)
    key = ["image_id", "label", *BOX_COLUMNS]
    img, n_img = codes(out["image_id"], sort=True)
    out = out.iloc[segment_order(img, out["score"].to_numpy(np.float64), n_img)]
    out = out[~out.duplicated(subset=key, keep="first")]
    return out.reset_index(drop=True)
