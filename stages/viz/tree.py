"""An auto-ensemble tree (:mod:`stages.ops.ensemble_tree`) drawn as a picture: leaves along the bottom in walk
order, each inner node above the middle of its children, every vertex tagged with its mAP on the split the tree
was searched on and on the check split, and coloured by the first; used by ``stages.report``."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np

from stages.ops.ensemble_tree import Tree


def layout(tree: Tree) -> dict[str, tuple[float, float]]:
    """vertex -> (x, y): leaves at x = 0, 1, ... in :meth:`Tree.walk` order and y = -depth; an inner node at the
    mean x of its children."""
    depth = tree.depths()
    pos: dict[str, tuple[float, float]] = {}
    n_leaves = 0
    for v in tree.walk():
        if tree.is_leaf(v):
            x, n_leaves = float(n_leaves), n_leaves + 1
        else:
            x = float(np.mean([pos[c][0] for c in tree.nodes[v].children]))
        pos[v] = (x, -float(depth[v]))
    return pos


def _ops(node) -> str:
    """A node's operators in a few words: merge rule, suppression, the child weights when not equal."""
    merge = f"vote k={node.k}" if node.merge == "vote" else "keep best"
    if node.dropout != "none":
        merge += f", {node.dropout}"
    w = "" if node.weights[0] == node.weights[1] else f"\nw {node.weights[0]:g}:{node.weights[1]:g}"
    return f"{merge}\n{node.method}{w}"


def draw_tree(tree: Tree, vertices: Mapping[str, Mapping], *, search_split: str, check_split: str,
              title: str) -> bytes:
    """PNG of ``tree``; ``vertices`` maps every vertex to ``{"search_map", "check_map"}`` (the search's scores
    JSON)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    pos = layout(tree)
    n_leaves = sum(1 for v in pos if tree.is_leaf(v))
    depth = -min(y for _, y in pos.values())
    fig = Figure(figsize=(max(6.0, 1.45 * n_leaves), 1.6 + 1.25 * (depth + 1)))
    ax = fig.add_subplot()
    maps = np.array([vertices[v]["search_map"] for v in pos], dtype=np.float64)
    norm = Normalize(vmin=float(np.nanmin(maps)), vmax=float(np.nanmax(maps)) + 1e-9)
    cmap = colormaps["viridis"]
    for v, n in tree.nodes.items():
        for c in n.children:
            ax.plot([pos[v][0], pos[c][0]], [pos[v][1], pos[c][1]], color="0.55", linewidth=1, zorder=1)
    for v, (x, y) in pos.items():
        m = vertices[v]
        text = v.replace("@", "\n@") if tree.is_leaf(v) else f"{v}: {_ops(tree.nodes[v])}"
        text += f"\n{m['search_map']:.3f} / {m['check_map']:.3f}"
        colour = cmap(norm(m["search_map"]))
        ax.text(x, y, text, ha="center", va="center", fontsize=7, zorder=2,
                color="white" if norm(m["search_map"]) < 0.6 else "black",
                bbox={"boxstyle": "round" if tree.is_leaf(v) else "square", "facecolor": colour,
                      "edgecolor": "0.3"})
    ax.set_xlim(-0.7, n_leaves - 0.3)
    ax.set_ylim(-depth - 0.6, 0.6)
    ax.axis("off")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.025, pad=0.01,
                 label=f"mAP on {search_split}")
    ax.set_title(f"{title}\nmAP on {search_split} (searched) / {check_split} (checked)", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()

