"""The class hierarchy: ancestors/descendants on the real 2019 hierarchy and on hand-built DAGs."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.core.errors import InputError
from stages.formats.hierarchy import Hierarchy

OID = Path(__file__).resolve().parents[3] / "shared" / "oid"


def dag() -> Hierarchy:
    # a -> b -> d ; a -> c -> d (d has two parents); e is a top-level leaf
    return Hierarchy.from_json_obj({"LabelName": "R", "Subcategory": [
        {"LabelName": "a", "Subcategory": [
            {"LabelName": "b", "Subcategory": [{"LabelName": "d"}]},
            {"LabelName": "c", "Subcategory": [{"LabelName": "d"}]}]},
        {"LabelName": "e"}]})


def test_ancestors_descendants_two_parents():
    h = dag()
    assert h.parents["d"] == ("b", "c")
    assert h.ancestors("d") == {"a", "b", "c"}
    assert h.ancestors("a") == frozenset()
    assert h.descendants("a") == {"b", "c", "d"}
    assert "R" not in h.labels
    assert h.depth() == 3
    pairs = set(map(tuple, h.expansion_pairs().to_numpy()))
    assert ("d", "d") in pairs and ("d", "a") in pairs and ("a", "d") not in pairs


def test_round_trip_edges_and_json():
    h = dag()
    assert Hierarchy.from_edges(h.to_edges(), labels=h.labels).parents == h.parents
    assert Hierarchy.from_json_obj(h.to_json_obj()).parents == h.parents


def test_cycle_is_rejected():
    with pytest.raises(InputError, match="cycle: R -> a -> b -> a"):
        Hierarchy.from_json_obj({"LabelName": "R", "Subcategory": [
            {"LabelName": "a", "Subcategory": [{"LabelName": "b", "Subcategory": [{"LabelName": "a"}]}]}]})


@pytest.mark.skipif(not OID.exists(), reason="shared/oid not present")
def test_real_2019_hierarchy():
    h = Hierarchy.from_json(OID / "challenge-2019-label500-hierarchy.json")
    assert len(h.labels) == 500
    assert sum(len(p) > 1 for p in h.parents.values()) == 16
    assert max(len(h.ancestors(lab)) for lab in h.labels) <= 5
    leaves = [lab for lab in h.labels if not h.descendants(lab)]
    assert len(leaves) == 443


def test_conform_ignores_the_input_index_and_atomic_files_are_readable(tmp_path):
    import os
    import stat

    import pandas as pd

    from stages.formats.io import read_table, write_table

    df = pd.DataFrame({"image_id": ["a", "b", "c"], "label": ["x", "y", "z"], "score": [0.1, 0.2, 0.3],
                       "x_min": 0.0, "y_min": 0.0, "x_max": 1.0, "y_max": 1.0})
    filtered = df[df["score"] > 0.15]          # index [1, 2]
    write_table(tmp_path / "d.parquet", filtered, "detections")
    back = read_table(tmp_path / "d.parquet", "detections")
    assert back["image_id"].tolist() == ["b", "c"]
    mode = stat.S_IMODE(os.stat(tmp_path / "d.parquet").st_mode)
    assert mode & stat.S_IRGRP, oct(mode)
