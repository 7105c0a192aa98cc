"""The tree JSON of the auto ensemble: schema defaults, round trip, content keys, shape edits, bad input."""

import json

import pytest

from stages.core.errors import InputError
from stages.ops.ensemble_tree import Tree, insert_leaf, make_node, parse_tree, remove_leaf, renumber


def _tree(nodes, root="n2", **top):
    return {"root": root, "nodes": nodes, **top}


THREE = _tree({"n1": {"children": ["a", "b"], "method": "nms"}, "n2": {"children": ["n1", "c"]}})


def test_defaults_filled_and_round_trip():
    t = parse_tree(THREE, leaves={"a", "b", "c"})
    n = t.nodes["n2"]
    assert (n.weights, n.merge, n.k, n.score_weight, n.box_weight, n.method, n.iou_thr, n.sigma, n.dropout) == (
        (1.0, 1.0), "vote", 4, 0.05, 0.7, "adj_nms", 0.5, 0.5, "none")
    assert t.nodes["n1"].method == "nms"
    assert t.leaves == ["a", "b", "c"] and t.depths() == {"n2": 0, "n1": 1, "c": 1, "a": 2, "b": 2}
    again = parse_tree(json.loads(json.dumps(t.to_json())))
    assert again == t and again.key() == t.key()


def test_keys_ignore_node_names_but_not_operators_or_order():
    t = parse_tree(THREE)
    renamed = parse_tree(_tree({"x": {"children": ["a", "b"], "method": "nms"}, "y": {"children": ["x", "c"]}},
                               root="y"))
    assert renamed.key() == t.key() and renamed.keys()["x"] == t.keys()["n1"]
    other_op = parse_tree(_tree({"n1": {"children": ["a", "b"], "method": "nms", "iou_thr": 0.6},
                                 "n2": {"children": ["n1", "c"]}}))
    assert other_op.keys()["n1"] != t.keys()["n1"] and other_op.key() != t.key()
    assert other_op.keys()["c"] == t.keys()["c"]
    swapped = parse_tree(_tree({"n1": {"children": ["b", "a"], "method": "nms"}, "n2": {"children": ["n1", "c"]}}))
    assert swapped.key() != t.key()
    assert parse_tree({**THREE, "max_per_image": 10}).key() != t.key()


def test_one_leaf_tree():
    t = parse_tree({"root": "a"}, leaves={"a"})
    assert t.leaves == ["a"] and t.nodes == {}


@pytest.mark.parametrize("obj, row, field, words", [
    (_tree({"n1": {"children": ["a", "b"]}, "n2": {"children": ["n1", "zz"]}}), "node n2", "children",
     "'zz' is neither a node nor one of the given leaves"),
    (_tree({"n1": {"children": ["n2", "b"]}, "n2": {"children": ["n1", "c"]}}), "node n1", "children", "cycle"),
    (_tree({"n1": {"children": ["a", "b"]}, "n2": {"children": ["n1", "n1"]}}), "node n2", "children",
     "used twice"),
    (_tree({"n1": {"children": ["a", "b"]}, "n2": {"children": ["n1", "a"]}}), "node n2", "children",
     "leaf 'a' is used twice"),
    (_tree({"n1": {"children": ["a", "b"]}, "n2": {"children": ["b", "c"]}, "n3": {"children": ["n2", "n1"]}},
           root="n3"), "node n1", "children", "leaf 'b' is used twice (also by node 'n2')"),
    (_tree({"n1": {"children": ["a", "b"]}, "n2": {"children": ["c", "b"]}}, root="n1"), "node n2", None,
     "not reachable"),
    (_tree({"n1": {"children": ["a", "b"], "weights": [1, -2]}, "n2": {"children": ["n1", "c"]}}), "node n1",
     "weights/1", "minimum"),
    (_tree({"n1": {"children": ["a"]}, "n2": {"children": ["n1", "c"]}}), "node n1", "children", "short"),
    (_tree({"n1": {"children": ["a", "b"], "method": "wbf"}, "n2": {"children": ["n1", "c"]}}), "node n1",
     "method", "is not one of"),
    (_tree({"n1": {"children": ["a", "b"], "merge": "keep_best", "dropout": "scores_0"},
            "n2": {"children": ["n1", "c"]}}), "node n1", "dropout", "'none' was expected"),
    (_tree({"n1": {"children": ["a", "b"], "nms": 0.5}, "n2": {"children": ["n1", "c"]}}), "node n1",
     None, "('nms' was unexpected)"),
    ({"nodes": {}}, None, "(top level)", "'root' is a required property"),
    ({"root": "q"}, None, "root", "not among the given leaves"),
])
def test_bad_trees_name_node_and_field(obj, row, field, words):
    with pytest.raises(InputError) as e:
        parse_tree(obj, source="t.json", leaves={"a", "b", "c"})
    assert e.value.file == "t.json" and e.value.row == row and words in e.value.message
    assert e.value.field == field


def test_make_node_rejects_invalid_operators():
    assert make_node(("a", "b"), k=2).k == 2
    with pytest.raises(ValueError, match="box_weight"):
        make_node(("a", "b"), box_weight=1.5)


def test_insert_remove_renumber():
    t = Tree("a", {})
    t = insert_leaf(t, "b", "a")
    t = insert_leaf(t, "c", "a")                 # below the root: (a c) b
    assert t.leaves == ["a", "c", "b"] and len(t.nodes) == 2
    t = insert_leaf(t, "d", t.root)              # above the root
    assert t.depths()["d"] == 1 and t.depths()["c"] == 3
    r = remove_leaf(t, "c")
    assert r.leaves == ["a", "b", "d"] and len(r.nodes) == 2
    assert remove_leaf(remove_leaf(r, "d"), "b") == Tree("a", {})
    n = renumber(t)
    assert sorted(n.nodes) == ["n1", "n2", "n3"] and n.root == "n3" and n.key() == t.key()
    # a leaf called like a node name is left alone
    clash = renumber(insert_leaf(Tree("n1", {}), "b", "n1"))
    assert clash.leaves == ["n1", "b"] and clash.root == "n2"
