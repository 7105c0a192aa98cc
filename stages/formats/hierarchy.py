"""The OpenImages class hierarchy (a DAG: a class may have several parents).

JSON form (as the challenge ships it): ``{"LabelName": root, "Subcategory": [{"LabelName": ..., "Subcategory":
[...]}, ...]}``. The root (``/m/0bl9f`` in the challenge) is not a class: ancestors never include it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.errors import InputError
from stages.formats.io import read_json, read_table


@dataclass(frozen=True)
class Hierarchy:
    """Parent edges of the class DAG, root excluded. ``parents[c]`` are the direct parents of ``c``."""

    parents: Mapping[str, tuple[str, ...]]
    root: str = "/m/0bl9f"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ----- construction -------------------------------------------------------------------------------
    @classmethod
    def from_json_obj(cls, obj: Mapping, *, source: object = None) -> Hierarchy:
        if not isinstance(obj, Mapping) or "LabelName" not in obj:
            raise InputError("hierarchy root must be an object with 'LabelName'", file=source, field="LabelName")
        root = obj["LabelName"]
        parents: dict[str, set[str]] = {}

        def walk(node: Mapping, path: tuple[str, ...], jpath: str) -> None:
            for i, sub in enumerate(node.get("Subcategory", []) or []):
                here = f"{jpath}.Subcategory[{i}]"
                if not isinstance(sub, Mapping) or not isinstance(sub.get("LabelName"), str):
                    raise InputError("node without a string 'LabelName'", file=source, row=here,
                                     field="LabelName")
                name = sub["LabelName"]
                if name in path or name == root:
                    raise InputError(f"cycle: {' -> '.join(path + (name,))}", file=source, row=here,
                                     field="LabelName")
                parents.setdefault(name, set())
                if node is not obj:
                    parents[name].add(node["LabelName"])
                walk(sub, path + (name,), here)

        walk(obj, (root,), "$")
        h = cls(parents={k: tuple(sorted(v)) for k, v in parents.items()}, root=root)
        h._check_acyclic(source)
        return h

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Hierarchy:
        return cls.from_json_obj(read_json(path), source=path)

    @classmethod
    def from_edges(cls, edges: pd.DataFrame, labels: Iterable[str] = (), root: str = "/m/0bl9f") -> Hierarchy:
        """From the ``hierarchy`` table (child, parent); ``labels`` adds classes without parents."""
        parents: dict[str, set[str]] = {lab: set() for lab in labels}
        for c, p in zip(edges["child"], edges["parent"]):
            parents.setdefault(c, set()).add(p)
            parents.setdefault(p, set())
        h = cls(parents={k: tuple(sorted(v)) for k, v in parents.items()}, root=root)
        h._check_acyclic("hierarchy table")
        return h

    @classmethod
    def read(cls, path: str | os.PathLike, labels: Iterable[str] = ()) -> Hierarchy:
        """From the challenge JSON or the ``hierarchy`` parquet table (child, parent), by extension; ``labels``
        adds classes without parents to a table (the JSON names every class)."""
        if Path(path).suffix.lower() == ".parquet":
            return cls.from_edges(read_table(path, "hierarchy"), labels=labels)
        return cls.from_json(path)

    def to_edges(self) -> pd.DataFrame:
        rows = [(c, p) for c in sorted(self.parents) for p in self.parents[c]]
        return pd.DataFrame(rows, columns=["child", "parent"], dtype=object)

    def to_json_obj(self) -> dict:
        children: dict[str, list[str]] = {}
        for c, ps in self.parents.items():
            for p in ps:
                children.setdefault(p, []).append(c)

        def node(label: str) -> dict:
            d: dict = {"LabelName": label}
            if children.get(label):
                d["Subcategory"] = [node(c) for c in sorted(children[label])]
            return d

        tops = sorted(c for c, ps in self.parents.items() if not ps)
        return {"LabelName": self.root, "Subcategory": [node(t) for t in tops]}

    def _check_acyclic(self, source: object) -> None:
        state: dict[str, int] = {}
        for start in self.parents:
            stack = [(start, iter(self.parents.get(start, ())))]
            if state.get(start):
                continue
            state[start] = 1
            while stack:
                node, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    state[node] = 2
                    stack.pop()
                elif state.get(nxt) == 1:
                    cyc = [n for n, _ in stack] + [nxt]
                    raise InputError(f"cycle: {' -> '.join(cyc)}", file=source, field="LabelName")
                elif not state.get(nxt):
                    state[nxt] = 1
                    stack.append((nxt, iter(self.parents.get(nxt, ()))))

    # ----- queries ------------------------------------------------------------------------------------
    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(sorted(self.parents))

    def ancestors(self, label: str) -> frozenset[str]:
        """All ancestors of ``label`` (not the root, not ``label`` itself)."""
        memo = self._cache.setdefault("anc", {})
        if label not in memo:
            out: set[str] = set()
            for p in self.parents.get(label, ()):
                out.add(p)
                out |= self.ancestors(p)
            memo[label] = frozenset(out)
        return memo[label]

    @cached_property
    def children(self) -> dict[str, tuple[str, ...]]:
        ch: dict[str, list[str]] = {k: [] for k in self.parents}
        for c, ps in self.parents.items():
            for p in ps:
                ch.setdefault(p, []).append(c)
        return {k: tuple(sorted(v)) for k, v in ch.items()}

    def descendants(self, label: str) -> frozenset[str]:
        """All descendants of ``label`` (not ``label`` itself)."""
        memo = self._cache.setdefault("desc", {})
        if label not in memo:
            out: set[str] = set()
            for c in self.children.get(label, ()):
                out.add(c)
                out |= self.descendants(c)
            memo[label] = frozenset(out)
        return memo[label]

    def depth(self) -> int:
        """Number of levels below the root (1 for a flat class list)."""
        return 1 + max((len(self._longest_chain(c)) for c in self.parents), default=0)

    def _longest_chain(self, label: str) -> tuple[str, ...]:
        ps = self.parents.get(label, ())
        if not ps:
            return ()
        return max(((p,) + self._longest_chain(p) for p in ps), key=len)

    def expansion_pairs(self, *, up: bool = True) -> pd.DataFrame:
        """(label, expanded) pairs including (label, label): ancestors when ``up``, descendants otherwise.

        Joining a table on ``label`` with this gives its hierarchy expansion without a Python loop per row.
        """
        rows = []
        for lab in self.labels:
            rows.append((lab, lab))
            rows.extend((lab, a) for a in sorted(self.ancestors(lab) if up else self.descendants(lab)))
        return pd.DataFrame(rows, columns=["label", "expanded"], dtype=object)

    def ancestor_matrix(self, labels: list[str]) -> np.ndarray:
        """Boolean [n, n] matrix M with M[i, j] true iff labels[j] is labels[i] or an ancestor of it."""
        idx = {lab: i for i, lab in enumerate(labels)}
        m = np.eye(len(labels), dtype=bool)
        for lab, i in idx.items():
            for a in self.ancestors(lab):
                if a in idx:
                    m[i, idx[a]] = True
        return m
