"""The class hierarchy: ancestors/descendants on the real 2019 hierarchy and on hand-built DAGs."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.core.errors import InputError
from stages.formats.hierarchy import Hierarchy
from stages.formats.io import write_table
from stages.formats.readers import read_classes

#: the real OpenImages Challenge 2019 class files (public data), copied into the repository
OID = Path(__file__).resolve().parents[1] / "fixtures" / "oid2019"


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


def test_real_2019_hierarchy():
    h = Hierarchy.from_json(OID / "challenge-2019-label500-hierarchy.json")
    assert len(h.labels) == 500
    assert sum(len(p) > 1 for p in h.parents.values()) == 16
    assert max(len(h.ancestors(lab)) for lab in h.labels) <= 5
    leaves = [lab for lab in h.labels if not h.descendants(lab)]
    assert len(leaves) == 443
    assert set(read_classes(OID / "challenge-2019-classes-description-500.csv")["label"]) == set(h.labels)


def test_real_2019_segmentable_hierarchy_is_a_subset():
    seg = Hierarchy.from_json(OID / "challenge-2019-label300-segmentable-hierarchy.json")
    det = Hierarchy.from_json(OID / "challenge-2019-label500-hierarchy.json")
    assert len(seg.labels) == 300 and sum(not seg.descendants(lab) for lab in seg.labels) == 275
    classes = read_classes(OID / "challenge-2019-classes-description-segmentable.csv")
    assert set(classes["label"]) == set(seg.labels) and set(seg.labels) <= set(det.labels)


def test_read_json_or_table_gives_the_same_hierarchy(tmp_path):
    """``Hierarchy.read``: the challenge JSON and the ingested table (child, parent) + class list agree."""
    h = Hierarchy.read(OID / "challenge-2019-label500-hierarchy.json")
    write_table(tmp_path / "h.parquet", h.to_edges(), "hierarchy")
    back = Hierarchy.read(tmp_path / "h.parquet", labels=h.labels)
    assert back.parents == h.parents and back.root == h.root
    assert set(Hierarchy.read(tmp_path / "h.parquet").labels) < set(h.labels)  # top-level leaves need labels
    (tmp_path / "bad.json").write_text('{"LabelName": ')
    with pytest.raises(InputError, match="malformed JSON"):
        Hierarchy.read(tmp_path / "bad.json")


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
