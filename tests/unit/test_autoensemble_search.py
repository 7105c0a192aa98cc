"""stages.autoensemble CLIs: apply (vs the naive ensemble stage and the leaf itself), search (determinism,
resume after a kill, agreement with apply + evaluate), and bad input."""

import json

import numpy as np
import pandas as pd
import pytest

from stages import autoensemble, ensemble, evaluate
from stages.formats.io import read_table, write_table
from tests import autoensemble_data as ad

COLS = ["image_id", "label", "score", "x_min", "y_min", "x_max", "y_max"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return ad.write_inputs(tmp_path_factory.mktemp("ae"), np.random.default_rng(0), n_images=80, n_leaves=4)


def _tree_file(path, obj):
    path.write_text(json.dumps(obj))
    return path


def _apply(inputs, tree, out, *extra, split="val_a"):
    leaves = [f"{n}={p}" for n, p in inputs["leaves"][split].items()]
    return autoensemble.main(["apply", "--tree", str(tree), "--leaves", *leaves, "--classes",
                              str(inputs["classes"]), "--out", str(out), *extra])


def test_apply_two_leaves_equals_ensemble_stage(inputs, tmp_path):
    tree = _tree_file(tmp_path / "t.json", {"root": "n1", "nodes": {"n1": {"children": ["m1", "m3"]}}})
    assert _apply(inputs, tree, tmp_path / "auto.parquet", "--split-ids", str(inputs["splits"]),
                  "--split", "val_a") == 0
    leaves = inputs["leaves"]["val_a"]
    assert ensemble.main(["--detections", str(leaves["m1"]), str(leaves["m3"]), "--reweight", "false",
                          "--out", str(tmp_path / "naive.parquet")]) == 0
    got, want = read_table(tmp_path / "auto.parquet", "detections"), read_table(tmp_path / "naive.parquet",
                                                                                "detections")
    assert len(got) > 0
    pd.testing.assert_frame_equal(got[COLS], want[COLS], check_exact=True)


def test_apply_cap_per_class_equals_the_ensemble_stage_with_it(inputs, tmp_path):
    """--max-per-class (default: the schema's) reaches every node: a two-leaf tree capped at 2 per image and
    class is the naive ensemble stage capped alike, and differs from the uncapped one."""
    tree = _tree_file(tmp_path / "t.json", {"root": "n1", "nodes": {"n1": {"children": ["m1", "m3"]}}})
    leaves = inputs["leaves"]["val_a"]
    outs = {}
    for cap in ("2", "100000"):
        assert _apply(inputs, tree, tmp_path / f"auto{cap}.parquet", "--max-per-class", cap) == 0
        assert ensemble.main(["--detections", str(leaves["m1"]), str(leaves["m3"]), "--reweight", "false",
                              "--max-per-class", cap, "--out", str(tmp_path / f"naive{cap}.parquet")]) == 0
        got = read_table(tmp_path / f"auto{cap}.parquet", "detections")
        pd.testing.assert_frame_equal(got[COLS], read_table(tmp_path / f"naive{cap}.parquet", "detections")[COLS],
                                      check_exact=True)
        outs[cap] = got
    assert outs["2"].groupby(["image_id", "label"], observed=True).size().max() <= 2
    assert len(outs["2"]) < len(outs["100000"])


def test_apply_one_leaf_tree_reproduces_the_leaf(inputs, tmp_path):
    tree = _tree_file(tmp_path / "t.json", {"root": "m2"})
    assert _apply(inputs, tree, tmp_path / "out.parquet") == 0
    want = read_table(inputs["leaves"]["val_a"]["m2"], "detections")[COLS]
    pd.testing.assert_frame_equal(read_table(tmp_path / "out.parquet", "detections")[COLS], want, check_exact=True)


def _search(inputs, out, *extra):
    return autoensemble.main(ad.search_args(inputs, out, "--max-candidates", "40", "--node-trials", "6", *extra))


def _log_records(path):
    lines = path.read_text().splitlines()
    return json.loads(lines[0]), [{k: v for k, v in json.loads(ln).items() if k not in ("t", "s")}
                                  for ln in lines[1:]]


@pytest.fixture(scope="module")
def searched(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    assert _search(inputs, out) == 0
    return out


def test_search_finds_a_tree_that_apply_and_evaluate_reproduce(inputs, searched, tmp_path):
    scores = json.loads((searched / "scores.json").read_text())
    tree = json.loads((searched / "tree.json").read_text())
    assert sorted(scores["vertices"]) == sorted(["m0", "m1", "m2", "m3", *tree["nodes"]])
    best_leaf = max(v["search_map"] for v in scores["vertices"].values() if v["leaf"])
    assert scores["chosen"]["search_map"] >= scores["shape_only"]["search_map"]
    assert scores["chosen"]["search_map"] > best_leaf
    assert scores["candidates"] >= 40 and sum(r["chosen"] for r in scores["top"]) == 1
    assert _apply(inputs, searched / "tree.json", tmp_path / "b.parquet", split="val_b") == 0
    assert evaluate.main(["--boxes", str(inputs["boxes"]), "--image-labels", str(inputs["image_labels"]),
                          "--hierarchy", str(inputs["hierarchy"]), "--classes", str(inputs["classes"]),
                          "--predictions", str(tmp_path / "b.parquet"), "--split-ids", str(inputs["splits"]),
                          "--split", "val_b", "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["mAP"] == scores["chosen"]["check_map"]


def test_search_is_deterministic_for_a_seed(inputs, searched, tmp_path):
    assert _search(inputs, tmp_path) == 0
    assert (tmp_path / "tree.json").read_text() == (searched / "tree.json").read_text()
    assert _log_records(tmp_path / "log.jsonl") == _log_records(searched / "log.jsonl")


class Killed(Exception):
    pass


def test_resume_after_a_kill_gives_the_same_tree(inputs, searched, tmp_path, monkeypatch):
    score = autoensemble.Split.score
    calls = {"n": 0}

    def dying(self, tree):
        calls["n"] += 1
        if calls["n"] > 23:
            raise Killed
        return score(self, tree)

    monkeypatch.setattr(autoensemble.Split, "score", dying)
    with pytest.raises(Killed):
        _search(inputs, tmp_path)
    monkeypatch.setattr(autoensemble.Split, "score", score)
    assert not (tmp_path / "tree.json").exists()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"split": "val_a", "stage": "ops:n2", "ke')       # a line cut short by the kill
    assert _search(inputs, tmp_path) == 0
    assert (tmp_path / "tree.json").read_text() == (searched / "tree.json").read_text()
    assert _log_records(tmp_path / "log.jsonl") == _log_records(searched / "log.jsonl")
    first = json.loads((searched / "scores.json").read_text())
    resumed = json.loads((tmp_path / "scores.json").read_text())
    assert resumed["computed"] == first["computed"] - 23           # the logged candidates were not recomputed
    assert (resumed["chosen"], resumed["top"]) == (first["chosen"], first["top"])


def test_resume_refuses_a_log_of_other_settings(inputs, searched, tmp_path):
    (tmp_path / "log.jsonl").write_text((searched / "log.jsonl").read_text())
    assert _search(inputs, tmp_path, "--seed", "1") == 2
    assert not (tmp_path / "tree.json").exists()


def test_stale_log_restart_sets_the_log_aside_and_starts_afresh(inputs, searched, tmp_path):
    """What the DAG does when the leaves or settings change: the old log is kept as *.stale, the search is the
    one a fresh start gives."""
    old = (searched / "log.jsonl").read_text()
    (tmp_path / "log.jsonl").write_text(old)
    assert _search(inputs, tmp_path, "--seed", "1", "--stale-log", "restart") == 0
    assert (tmp_path / "log.jsonl.stale").read_text() == old
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert _search(inputs, fresh, "--seed", "1") == 0
    assert _log_records(tmp_path / "log.jsonl") == _log_records(fresh / "log.jsonl")
    assert (tmp_path / "tree.json").read_text() == (fresh / "tree.json").read_text()


def test_search_options_are_the_config_keys():
    """The search's options are the autoensemble section's keys with the schema's defaults (one owner)."""
    from stages.core.config import schema_property

    a = autoensemble.parse_args(["search", "--search-leaves", "m=a", "--check-leaves", "m=b", "--boxes", "x",
                                 "--image-labels", "x", "--hierarchy", "x", "--classes", "x", "--split-ids", "x",
                                 "--search-split", "val_a", "--check-split", "val_b", "--out-tree", "t",
                                 "--log", "l", "--scores", "s"])
    section = schema_property("autoensemble")["properties"]
    settings = autoensemble.SearchSettings()
    for key in autoensemble.SearchSettings.__dataclass_fields__:
        assert getattr(a, key) == getattr(settings, key) == section[key]["default"], key
    assert set(section) - set(autoensemble.SearchSettings.__dataclass_fields__) == {"leaves"}


def test_guard_choice_rule(inputs, searched, tmp_path):
    (tmp_path / "log.jsonl").write_text((searched / "log.jsonl").read_text())
    assert _search(inputs, tmp_path, "--choice", "guard", "--guard", "0") == 0
    top = json.loads((tmp_path / "scores.json").read_text())["top"]
    best_check = max(r["check_map"] for r in top)
    chosen = next(r for r in top if r["chosen"])
    assert chosen["check_map"] == best_check


# ---------------------------------------------------------------------------------------------- bad input


def _leaf_variant(inputs, tmp_path, name, change, provenance=None):
    df = read_table(inputs["leaves"]["val_a"][name], "detections")
    p = tmp_path / f"{name}_bad.parquet"
    write_table(p, change(df), "detections", provenance=provenance or {"split": "val_a"})
    return p


@pytest.mark.parametrize("case", ["missing_leaf", "cycle", "split_provenance", "image_outside_split",
                                  "unknown_label", "unknown_filter_class"])
def test_apply_bad_input(inputs, tmp_path, capsys, case):
    leaves = {n: str(p) for n, p in inputs["leaves"]["val_a"].items()}
    tree = {"root": "n1", "nodes": {"n1": {"children": ["m0", "m1"]}}}
    extra = ["--split-ids", str(inputs["splits"]), "--split", "val_a"]
    if case == "missing_leaf":
        tree["nodes"]["n1"]["children"] = ["m0", "m9"]
        words = "node n1: field 'children': 'm9' is neither a node nor one of the given leaves"
    elif case == "cycle":
        tree["nodes"] = {"n1": {"children": ["m0", "n2"]}, "n2": {"children": ["n1", "m1"]}}
        words = "node n2: field 'children': cycle"
    elif case == "split_provenance":
        leaves["m1"] = str(_leaf_variant(inputs, tmp_path, "m1", lambda d: d, {"upstream": {"split": "val_b"}}))
        words = "field 'split': leaf 'm1' holds split 'val_b', not 'val_a'"
    elif case == "image_outside_split":
        b = read_table(inputs["leaves"]["val_b"]["m1"], "detections")
        leaves["m1"] = str(_leaf_variant(inputs, tmp_path, "m1", lambda d: pd.concat([d, b.head(1)])))
        words = "field 'image_id': image not in the split"
    elif case == "unknown_label":
        leaves["m1"] = str(_leaf_variant(inputs, tmp_path, "m1", lambda d: d.assign(
            label=np.where(np.arange(len(d)) == 3, "/m/nope", d["label"]))))
        words = "row 3: field 'label'"
    else:
        tree["nodes"]["n1"]["classes"] = [None, ["/m/c1", "/m/zz"]]
        words = "node n1: field 'classes': class '/m/zz' is not in the class list"
    p = _tree_file(tmp_path / "t.json", tree)
    out = tmp_path / "out.parquet"
    assert autoensemble.main(["apply", "--tree", str(p), "--leaves", *[f"{n}={q}" for n, q in leaves.items()],
                              "--classes", str(inputs["classes"]), "--out", str(out), *extra]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_search_bad_leaves(inputs, tmp_path, capsys):
    args = ad.search_args(inputs, tmp_path, "--max-candidates", "5")
    i = args.index("--boxes")
    assert autoensemble.main(args[: i - 1] + args[i:]) == 2       # m3 missing from --check-leaves
    assert "field '--check-leaves': leaf 'm3' is missing" in capsys.readouterr().err
    bad = [a if not a.startswith("m0=") or "val_b" in a else "m0" for a in args]
    assert autoensemble.main(bad) == 2
    assert "expected NAME=PATH, not 'm0'" in capsys.readouterr().err
    assert not (tmp_path / "tree.json").exists() and not (tmp_path / "log.jsonl").exists()


def test_expert_leaf_keeps_its_class_filter(inputs, tmp_path):
    (tmp_path / "experts.json").write_text(json.dumps({"targets": ["/m/c1"], "negatives": ["/m/c2"]}))
    assert _search(inputs, tmp_path, "--leaf-classes", f"m0={tmp_path / 'experts.json'}",
                   "--max-candidates", "25") == 0
    tree = json.loads((tmp_path / "tree.json").read_text())
    slots = [(c, cls) for n in tree["nodes"].values() for c, cls in zip(n["children"], n["classes"])]
    assert sorted(c for c, _ in slots if c.startswith("m")) == ["m0", "m1", "m2", "m3"]
    assert all((cls == ["/m/c1"]) == (c == "m0") for c, cls in slots)   # its targets; negatives filtered out


def test_minutes_budget_spent_still_gives_a_full_tree(inputs, tmp_path):
    assert autoensemble.main(ad.search_args(inputs, tmp_path, "--max-candidates", "0",
                                            "--max-minutes", "0.00001")) == 0
    tree = json.loads((tmp_path / "tree.json").read_text())
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert len(tree["nodes"]) == 3 and scores["chosen"]["key"] == scores["shape_only"]["key"]
