"""Binary trees of ensemble operators (the auto ensemble, MMfruit §4.2): structure, JSON form and checks.

A tree is a set of named inner nodes, each merging two children (a node or a leaf) with its operators (see
``workflow/schemas/autoensemble_tree.schema.yaml``, which holds every operator's default, and
:func:`stages.ops.tree_merge.merge`). Leaves are names, bound to detections tables when the tree is run.
The JSON form is flat (``{"root": ..., "nodes": {name: {"children": [a, b], ...}}}``) so that a hand edit or a
search step shows as a small diff; :func:`parse_tree` rejects what the schema cannot express: a child that is
neither a node nor a given leaf, a cycle, a node or leaf used twice, a node not reachable from the root.

Every subtree has a content key (:meth:`Tree.keys`): a hash of its operators and its children's keys, with
node names left out, so two candidate trees share the cached outputs of every subtree they have in common.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from stages.core.config import defaults_validator
from stages.core.errors import InputError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "autoensemble_tree.schema.yaml"
FORMAT = "orchard-autoensemble-tree/1"


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.Validator:
    with open(SCHEMA_PATH) as f:
        schema = yaml.safe_load(f)
    return defaults_validator(schema)


@dataclass(frozen=True)
class Node:
    """An inner node: ``children`` (two names) and the operators applied when merging them (see the schema)."""

    children: tuple[str, str]
    weights: tuple[float, float]
    classes: tuple[tuple[str, ...] | None, tuple[str, ...] | None]
    merge: str
    k: int
    score_weight: float
    box_weight: float
    min_iou: float
    match_iou: float
    dropout: str
    method: str
    iou_thr: float
    sigma: float
    score_thr: float

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["children"], d["weights"] = list(self.children), list(self.weights)
        d["classes"] = [None if c is None else list(c) for c in self.classes]
        return d

    def operators(self) -> dict[str, Any]:
        """The operators (everything but the children), JSON-ready."""
        d = self.to_json()
        del d["children"]
        return d


def _node_from_json(obj: Mapping[str, Any]) -> Node:
    """A schema-valid node object with its defaults filled in -> :class:`Node`."""
    d = dict(obj)
    d["children"] = tuple(d["children"])
    d["weights"] = tuple(float(w) for w in d["weights"])
    d["classes"] = tuple(None if c is None else tuple(c) for c in d["classes"])
    for f in ("score_weight", "box_weight", "min_iou", "match_iou", "iou_thr", "sigma", "score_thr"):
        d[f] = float(d[f])
    return Node(**d)


def make_node(children: tuple[str, str] | list[str], **operators: Any) -> Node:
    """A node with the schema's defaults for the operators not given (``ValueError`` if one is invalid)."""
    tree = {"root": "n", "nodes": {"n": {"children": list(children), **copy.deepcopy(operators)}}}
    err = next(iter(_validator().iter_errors(tree)), None)
    if err is not None:
        raise ValueError(f"invalid node operators {operators}: {err.message}")
    return _node_from_json(tree["nodes"]["n"])


@dataclass(frozen=True)
class Tree:
    """``root`` (a node or leaf name), ``nodes`` (name -> :class:`Node`), ``max_per_image`` (root cap or None).
    Build with :func:`parse_tree` or :func:`check_tree` (which make sure it is a tree)."""

    root: str
    nodes: Mapping[str, Node]
    max_per_image: int | None = None

    def is_leaf(self, name: str) -> bool:
        return name not in self.nodes

    def walk(self, name: str | None = None) -> Iterator[str]:
        """Every vertex under ``name`` (default the root), children before their parent, left to right."""
        name = self.root if name is None else name
        if not self.is_leaf(name):
            for c in self.nodes[name].children:
                yield from self.walk(c)
        yield name

    @property
    def leaves(self) -> list[str]:
        return [v for v in self.walk() if self.is_leaf(v)]

    def parent(self) -> dict[str, tuple[str, int]]:
        """vertex -> (its parent node, child slot)."""
        return {c: (p, i) for p, n in self.nodes.items() for i, c in enumerate(n.children)}

    def depths(self) -> dict[str, int]:
        """vertex -> number of edges from the root."""
        out = {self.root: 0}
        for v in reversed(list(self.walk())):
            if not self.is_leaf(v):
                for c in self.nodes[v].children:
                    out[c] = out[v] + 1
        return out

    def keys(self) -> dict[str, str]:
        """vertex -> content key of its subtree (independent of node names)."""
        out: dict[str, str] = {}
        for v in self.walk():
            if self.is_leaf(v):
                out[v] = "leaf:" + v
            else:
                n = self.nodes[v]
                body = json.dumps([n.operators(), [out[c] for c in n.children]], sort_keys=True)
                out[v] = hashlib.sha1(body.encode()).hexdigest()[:20]
        return out

    def key(self) -> str:
        """Content key of the whole tree (the root's key and ``max_per_image``)."""
        return hashlib.sha1(f"{self.keys()[self.root]}|{self.max_per_image}".encode()).hexdigest()[:20]

    def to_json(self) -> dict[str, Any]:
        """The JSON form, every operator written out; nodes listed children first."""
        return {"format": FORMAT, "root": self.root, "max_per_image": self.max_per_image,
                "nodes": {v: self.nodes[v].to_json() for v in self.walk() if not self.is_leaf(v)}}


def parse_tree(obj: object, *, source: object = "tree", leaves: Collection[str] | None = None) -> Tree:
    """Validate a tree's JSON object (against the schema, then :func:`check_tree`) and build the :class:`Tree`.

    Errors are :class:`InputError` naming ``source``, the node (as the row) and the field. With ``leaves``,
    every leaf of the tree must be one of them.
    """
    if not isinstance(obj, dict):
        raise InputError("a tree must be a JSON object", file=source)
    obj = copy.deepcopy(obj)
    errors = sorted(_validator().iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        path = [str(p) for p in errors[0].absolute_path]
        row = f"node {path[1]}" if len(path) >= 2 and path[0] == "nodes" else None
        field = "/".join(path[2:] if row else path) or (None if row else "(top level)")
        raise InputError(f"does not match {SCHEMA_PATH.name}: {errors[0].message}", file=source, row=row,
                         field=field)
    nodes = {name: _node_from_json(n) for name, n in obj["nodes"].items()}
    return check_tree(Tree(obj["root"], nodes, obj["max_per_image"]), source=source, leaves=leaves)


def check_tree(tree: Tree, *, source: object = "tree", leaves: Collection[str] | None = None) -> Tree:
    """Return ``tree`` if it is a tree whose leaves are all in ``leaves`` (when given); else InputError."""
    state: dict[str, str] = {}          # node -> "open" while its subtree is walked, then "done"
    seen_leaves: dict[str, str] = {}    # leaf -> the node that uses it
    if tree.root in tree.nodes:
        state[tree.root] = "open"
    elif leaves is not None and tree.root not in leaves:
        raise InputError(f"the root is a leaf {tree.root!r} that is not among the given leaves {sorted(leaves)}",
                         file=source, field="root")
    stack = [(tree.root, iter(tree.nodes[tree.root].children if tree.root in tree.nodes else ()))]
    while stack:
        name, it = stack[-1]
        child = next(it, None)
        if child is None:
            state[name] = "done"
            stack.pop()
            continue
        where = {"file": source, "row": f"node {name}", "field": "children"}
        if child in tree.nodes:
            if state.get(child) == "open":
                raise InputError(f"cycle: {child!r} is its own descendant", **where)
            if state.get(child) == "done":
                raise InputError(f"node {child!r} is used twice (a tree has one parent per node)", **where)
            state[child] = "open"
            stack.append((child, iter(tree.nodes[child].children)))
        else:
            if leaves is not None and child not in leaves:
                raise InputError(f"{child!r} is neither a node nor one of the given leaves {sorted(leaves)}",
                                 **where)
            if child in seen_leaves:
                raise InputError(f"leaf {child!r} is used twice (also by node {seen_leaves[child]!r})", **where)
            seen_leaves[child] = name
    unreachable = sorted(set(tree.nodes) - set(state))
    if unreachable:
        raise InputError(f"not reachable from the root {tree.root!r}", file=source, row=f"node {unreachable[0]}")
    return tree


# ---------------------------------------------------------------------------------------- shape edits


def _names(taken: Collection[str]) -> Iterator[str]:
    """``n1, n2, ...`` skipping the names in ``taken``."""
    i = 0
    while True:
        i += 1
        if f"n{i}" not in taken:
            yield f"n{i}"


def _replace_child(tree: Tree, nodes: dict[str, Node], old: str, new: str) -> str:
    """Put ``new`` where ``old`` hangs; returns the new root."""
    if old == tree.root:
        return new
    p, i = tree.parent()[old]
    ch = list(nodes[p].children)
    ch[i] = new
    nodes[p] = dataclasses.replace(nodes[p], children=tuple(ch))
    return tree.root


def insert_leaf(tree: Tree, leaf: str, above: str, node: Node | None = None) -> Tree:
    """A copy of ``tree`` with ``leaf`` joined to vertex ``above`` by a new node (``above`` left, ``leaf``
    right) with ``node``'s operators (default: the schema's)."""
    name = next(_names(set(tree.nodes) | set(tree.leaves)))
    nodes = dict(tree.nodes)
    root = _replace_child(tree, nodes, above, name)
    new = make_node((above, leaf)) if node is None else dataclasses.replace(node, children=(above, leaf))
    nodes[name] = new
    return Tree(root, nodes, tree.max_per_image)


def remove_leaf(tree: Tree, leaf: str) -> Tree:
    """A copy of ``tree`` without ``leaf``: its parent node is replaced by the leaf's sibling."""
    p, i = tree.parent()[leaf]
    sibling = tree.nodes[p].children[1 - i]
    nodes = dict(tree.nodes)
    root = _replace_child(tree, nodes, p, sibling)
    del nodes[p]
    return Tree(root, nodes, tree.max_per_image)


def renumber(tree: Tree) -> Tree:
    """The same tree with its nodes named ``n1, n2, ...`` in :meth:`Tree.walk` order (children first)."""
    names = dict(zip((v for v in tree.walk() if not tree.is_leaf(v)), _names(set(tree.leaves))))

    def rn(v: str) -> str:
        return names.get(v, v)

    nodes = {names[v]: dataclasses.replace(n, children=tuple(rn(c) for c in n.children))
             for v, n in tree.nodes.items()}
    return Tree(rn(tree.root), nodes, tree.max_per_image)
