"""Collect metric JSONs (results/evaluate/<stage>/<variant>/<name>/<split>.json) into one table (JSON and
Markdown) and, with ``--out-html``, a self-contained HTML report: mAP per model and stage on val_a / val_b (table
and chart), ablation tables, per-class AP plots and sample images with their detections (images embedded as
base64 PNG).

    python -m stages.report --metrics results/evaluate/*/default/*/*.json \\
        [--out-json results/metrics.json] [--out-md results/metrics.md] \\
        [--out-html results/report.html --detections results/ensemble/default/all/val_a.parquet \\
         --images results/ingest/images.parquet results/ingest/test_images.parquet \\
         --boxes results/ingest/boxes.parquet --classes results/ingest/classes.parquet \\
         --ablation results/ablation/postprocess.json results/ablation/ensemble.json]
        [--autoensemble results/autoensemble/search_val_a/scores.json ...]

``--experts results/experts/<expert>.json ... [--expert-models results/train/<base>/model.pt ...]`` adds, in the
HTML, each mined expert set (targets, negatives, how confusion was defined) and per base model the class-by-class
cosine similarity of its classifier FC weights as a heatmap, the targets and negatives of every set marked (the
base model's checkpoint: the one given for each experts file, else the file's ``base_model``).

``--cards results/train/<model>/card.json ...`` adds a table of the model cards (stages.card: backbone, head,
parameters, GFLOPs, training images/s, epochs, averaging, mAP on val_a / val_b; sorted by mean validation mAP) to
the Markdown and the HTML, and in the HTML a chart of each model's mAP against its GFLOPs.

``--autoensemble`` adds how each auto-ensemble search went (Markdown and HTML) and, in the HTML, its chosen tree
drawn with every node's mAP; both check the paper's observation that leaves with lower mAP sit deeper (the rank
correlation of leaf mAP and depth).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats.cards import read_card
from stages.formats.io import read_json, read_provenance, read_table, write_json, write_text
from stages.formats.readers import read_class_names, read_metrics
from stages.ops.ensemble_tree import Tree, parse_tree
from stages.viz.overlay import render_image
from stages.viz.tree import draw_tree

log = logging.getLogger(__name__)

VAL_SPLITS = ("val_a", "val_b")


# ----- metric files -----------------------------------------------------------------------------------------
#: a run's identity: the stage, its variant ("default": the configured chain; else an ablation variant), the
#: model or ensemble group
RUN = ["stage", "variant", "name"]


def _metric_key(p: Path) -> tuple[str, str, str, str]:
    """(stage, variant, name, split) from .../evaluate/<stage>/<variant>/<name>/<split>.json (the DAG's layout)."""
    parts = p.with_suffix("").parts
    rest = parts[parts.index("evaluate") + 1:] if "evaluate" in parts else ()
    if len(rest) != 4:
        raise InputError("a metric file's path must end in evaluate/<stage>/<variant>/<name>/<split>.json",
                         file=p)
    return rest[0], rest[1], rest[2], rest[3]


def _float(v: object) -> float:
    return float("nan") if v is None else float(v)


def _metrics(paths: Sequence[Path]) -> Iterator[tuple[tuple[str, str, str, str], dict]]:
    """``((stage, variant, name, split), metric JSON)`` of each metric file."""
    for p in map(Path, paths):
        yield _metric_key(p), read_metrics(p)


def metrics_frame(paths: Sequence[Path]) -> pd.DataFrame:
    """One row per run (stage, variant, name) with a column of mAP per split, from the metric files."""
    rows = [{"stage": stage, "variant": variant, "name": name, "split": split, "mAP": _float(m["mAP"])}
            for (stage, variant, name, split), m in _metrics(paths)]
    df = pd.DataFrame(rows)
    out = df.pivot_table(index=RUN, columns="split", values="mAP").reset_index()
    out.columns.name = None
    return out


def tail_classes(boxes: pd.DataFrame, splits: pd.DataFrame, *, share: float) -> list[str]:
    """The tail classes: the ``share`` of the classes with training boxes that have the fewest (ties broken by
    MID, so the set is reproducible); what the weak-label tricks of paper 5.7 and 5.9 aim at."""
    if not 0 < share <= 1:
        raise InputError(f"the tail share must lie in (0, 1], got {share}", field="--tail-share")
    train = set(splits.loc[splits["split"] == "train", "image_id"])
    counts = boxes.loc[boxes["image_id"].isin(train), "label"].value_counts()
    order = sorted(counts.index, key=lambda c: (int(counts[c]), str(c)))
    return order[:max(1, round(share * len(order)))] if order else []


def add_tail_columns(df: pd.DataFrame, paths: Sequence[Path], tail: Collection[str]) -> pd.DataFrame:
    """``df`` (:func:`metrics_frame`) with a column ``tail_<split>`` per split: the mean AP of the ``tail``
    classes that have ground truth in that split (the metric files' per-class APs)."""
    tail = set(tail)
    rows = []
    for (stage, variant, name, split), m in _metrics(paths):
        aps = [rec["ap"] for mid, rec in m["per_class"].items() if mid in tail and rec["ap"] is not None]
        rows.append({"stage": stage, "variant": variant, "name": name, "split": f"tail_{split}",
                     "ap": float(np.mean(aps)) if aps else float("nan")})
    if not rows:
        return df
    wide = pd.DataFrame(rows).pivot_table(index=RUN, columns="split", values="ap", dropna=False).reset_index()
    wide.columns.name = None
    return df.merge(wide, on=RUN, how="left")


def add_class_columns(df: pd.DataFrame, paths: Sequence[Path], classes: Sequence[str]) -> pd.DataFrame:
    """``df`` (:func:`metrics_frame`) with the AP of each of ``classes`` (MIDs or display names) per split, in
    columns ``<name> <split>``: e.g. a planted confusing pair before and after class mixing."""
    rows = []
    for (stage, variant, name, split), m in _metrics(paths):
        for mid, rec in m["per_class"].items():
            cname = rec.get("name", mid)
            if mid in classes or cname in classes:
                rows.append({"stage": stage, "variant": variant, "name": name, "split": f"{cname} {split}",
                             "ap": _float(rec["ap"])})
    if not rows:
        raise InputError(f"none of the classes {list(classes)} is in the metric files", field="--show-classes")
    wide = pd.DataFrame(rows).pivot_table(index=RUN, columns="split", values="ap", dropna=False).reset_index()
    wide.columns.name = None
    return df.merge(wide, on=RUN, how="left")


def per_class_frame(paths: Sequence[Path]) -> pd.DataFrame:
    """Long table of per-class results: stage, variant, name, split, label, class_name, ap (NaN: no ground
    truth), n_gt, n_det, n_tp — one row per class of each metric file's ``per_class``."""
    rows = []
    for (stage, variant, name, split), m in _metrics(paths):
        for label, c in m["per_class"].items():
            rows.append({"stage": stage, "variant": variant, "name": name, "split": split, "label": label,
                         "class_name": c.get("name", label), "ap": _float(c["ap"]),
                         "n_gt": int(c.get("n_gt", 0)), "n_det": int(c.get("n_det", 0)),
                         "n_tp": int(c.get("n_tp", 0))})
    cols = [*RUN, "split", "label", "class_name", "ap", "n_gt", "n_det", "n_tp"]
    return pd.DataFrame(rows, columns=cols)


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines) + "\n"


def run_name(stage: str, variant: str, name: str) -> str:
    """How a run is called in the report: ``postprocess/r50``, or ``postprocess/nms/r50`` for a variant."""
    return f"{stage}/{name}" if variant == "default" else f"{stage}/{variant}/{name}"


def _splits(metrics: pd.DataFrame) -> list[str]:
    return [s for s in VAL_SPLITS if s in metrics] or [c for c in metrics if c not in RUN]


def best_run(metrics: pd.DataFrame, stage: str) -> str | None:
    """The run of ``stage`` with the highest mean mAP over the validation splits present (None if there is
    none)."""
    splits = _splits(metrics)
    cand = metrics[metrics["stage"] == stage]
    if cand.empty or not splits:
        return None
    mean = cand[splits].mean(axis=1, skipna=True)
    if mean.isna().all():
        return None
    r = cand.loc[mean.idxmax()]
    return run_name(r["stage"], r["variant"], r["name"])


def class_ap_table(per_class: pd.DataFrame) -> pd.DataFrame:
    """Per class (rows: label, class_name, n_gt) the AP of each run averaged over its splits (columns: runs).

    Classes without ground truth anywhere are dropped; ``n_gt`` is the largest count over the files."""
    pc = per_class.dropna(subset=["ap"])
    if pc.empty:
        return pd.DataFrame(columns=["label", "class_name", "n_gt"])
    pc = pc.assign(run=[run_name(*r) for r in pc[RUN].itertuples(index=False)])
    ap = pc.pivot_table(index="label", columns="run", values="ap", aggfunc="mean")
    info = pc.groupby("label").agg(class_name=("class_name", "first"), n_gt=("n_gt", "max"))
    out = info.join(ap).reset_index()
    out.columns.name = None
    return out


def read_ablation(path: Path) -> pd.DataFrame:
    """An ablation table from TSV/CSV (header row) or JSON (a list of records, a dict of columns, or a dict of
    row name -> record)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            obj = json.loads(path.read_text())
            if isinstance(obj, list):
                return pd.DataFrame(obj)
            if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
                return pd.DataFrame.from_dict(obj, orient="index").rename_axis("name").reset_index()
            if isinstance(obj, dict):
                return pd.DataFrame(obj)
            raise InputError("expected a list of records or a dict", file=path)
        sep = "," if path.suffix.lower() == ".csv" else "\t"
        return pd.read_csv(path, sep=sep)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(f"unreadable ablation table: {exc}", file=path) from exc


# ----- auto ensemble ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AutoSearch:
    """One auto-ensemble search (its scores JSON, written by ``stages.autoensemble search``): name (the folder,
    e.g. ``search_val_a``), the chosen tree and the summary."""

    name: str
    tree: Tree
    scores: dict


def read_auto_search(path: Path) -> AutoSearch:
    obj = read_json(path)
    keys = ("chosen", "vertices", "search_split", "check_split", "shape_only", "candidates", "elapsed_s")
    absent = [k for k in keys if k not in obj] if isinstance(obj, dict) else ["(top level)"]
    if not absent and "tree" not in obj["chosen"]:
        absent = ["chosen/tree"]
    if absent:
        raise InputError("not an auto-ensemble scores file", file=path, field=absent[0])
    tree = parse_tree(obj["chosen"]["tree"], source=path)
    missing = sorted(set(tree.walk()) - set(obj["vertices"]))
    if missing:
        raise InputError(f"no scores of vertex {missing[0]!r}", file=path, field="vertices")
    return AutoSearch(Path(path).parent.name, tree, obj)


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank); NaN when either side is constant."""
    rx, ry = pd.Series(x, dtype=np.float64).rank(), pd.Series(y, dtype=np.float64).rank()
    if len(rx) < 2 or rx.nunique() < 2 or ry.nunique() < 2:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def auto_frame(searches: Sequence[AutoSearch]) -> pd.DataFrame:
    """One row per search: where it searched and checked, its size and cost, the mAP of the tree of stage 1
    (shape, default operators) and of the chosen tree on both splits, and the rank correlation of each leaf's mAP
    on the searched split with its depth (negative: leaves with lower mAP sit deeper, as in the paper)."""
    rows = []
    for a in searches:
        s, v = a.scores, a.scores["vertices"]
        leaves = [x for x in a.tree.walk() if a.tree.is_leaf(x)]
        rows.append({
            "search": a.name, "searched": s["search_split"], "checked": s["check_split"], "leaves": len(leaves),
            "depth": max(a.tree.depths().values()), "candidates": s["candidates"], "seconds": s["elapsed_s"],
            "shape_searched": s["shape_only"]["search_map"], "shape_checked": s["shape_only"]["check_map"],
            "chosen_searched": s["chosen"]["search_map"], "chosen_checked": s["chosen"]["check_map"],
            "leaf_mAP_depth_spearman": rank_correlation([v[x]["search_map"] for x in leaves],
                                                        [v[x]["depth"] for x in leaves]),
        })
    return pd.DataFrame(rows)


AUTO_NOTE = ("shape = the tree of stage 1 (every node with the default operators), chosen = after the operator "
             "search and the confirmation; leaf_mAP_depth_spearman = rank correlation of each leaf's mAP on the "
             "searched split with its depth in the chosen tree (negative: leaves with lower mAP sit deeper, the "
             "paper's observation; NaN: all leaves at one depth)")


# ----- model cards ------------------------------------------------------------------------------------------
CARD_COLUMNS = ["model", "backbone", "head", "kind", "params_M", "GFLOPs", "train_img_s", "epochs", "averaging",
                "val_a", "val_b", "mean_mAP"]


def _card_map(card: Mapping, split: str) -> float:
    ev = card["evaluation"].get(split)
    return _float(ev.get("mAP") if isinstance(ev, Mapping) else None)


def cards_frame(cards: Sequence[Mapping]) -> pd.DataFrame:
    """One row per model card (:mod:`stages.card`): model, backbone (+dcn, decoupled), head (+cascade), kind
    (global, expert of a base model, or the external dataset it trained on), parameters in millions, GFLOPs of one
    forward at its training size, training images/s, epochs, the averaged epochs, mAP on val_a and val_b and their
    mean; sorted by the mean (models without any mAP last)."""
    rows = []
    for c in cards:
        arch, ex = c["architecture"], c.get("expert") or {}
        backbone = arch["backbone"]["name"] + ("+dcn" if arch["dcn"] else "") + \
            (" (decoupled)" if arch["decoupled_backbone"] else "")
        if ex.get("expert_of"):
            kind = f"expert of {ex['expert_of']}"
        elif ex.get("external"):
            kind = f"external: {(c.get('data') or {}).get('train_data')}"
        else:
            kind = "expert mode" if ex.get("expert_mode") else "global"
        avg = c["training"].get("averaged_epochs") or c["training"]["average_epochs"]
        val = {s: _card_map(c, s) for s in VAL_SPLITS}
        done = [v for v in val.values() if np.isfinite(v)]
        rows.append({"model": c["model"], "backbone": backbone,
                     "head": arch["head"] + ("+cascade" if arch["cascade"] else ""), "kind": kind,
                     "params_M": c["parameters"]["total"] / 1e6, "GFLOPs": _float(c["flops"]["gflops"]),
                     "train_img_s": _float(c["throughput"]["img_per_s"]), "epochs": c["training"]["epochs"],
                     "averaging": f"{avg[0]}-{avg[1]}" if avg else "none", **val,
                     "mean_mAP": float(np.mean(done)) if done else float("nan")})
    df = pd.DataFrame(rows, columns=CARD_COLUMNS)
    return df.sort_values("mean_mAP", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


CARDS_NOTE = ("params_M: parameters (millions); GFLOPs: one forward in eval mode at the model's training size "
              "(torch FlopCounterMode, a multiply-add = 2 FLOPs); train_img_s: images/s measured while it trained "
              "(all epochs; see each card for the device); averaging: the epochs whose weights were averaged; "
              "mAP after the configured post-processing")


def cards_chart(frame: pd.DataFrame) -> bytes:
    """Scatter of each model's mean validation mAP against its GFLOPs (log scale when they span more than 10x),
    points labelled, marker area growing with the parameters. PNG bytes."""
    from matplotlib.figure import Figure

    f = frame[np.isfinite(frame["GFLOPs"]) & np.isfinite(frame["mean_mAP"]) & (frame["GFLOPs"] > 0)]
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    ax.scatter(f["GFLOPs"], f["mean_mAP"], s=30 + 8 * np.sqrt(f["params_M"].to_numpy(np.float64)), alpha=0.7)
    for _, r in f.iterrows():
        ax.annotate(r["model"], (r["GFLOPs"], r["mean_mAP"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    if len(f) and f["GFLOPs"].max() > 10 * f["GFLOPs"].min():   # costs over orders of magnitude
        ax.set_xscale("log")
    ax.set_xlabel("GFLOPs (one forward at the training size)")
    ax.set_ylabel("mAP (mean of val_a and val_b)")
    ax.set_title("Model cards: mAP against cost (marker area ~ parameters)")
    ax.grid(True, alpha=0.3)
    return _png(fig)


def _card_summary(card: Mapping) -> dict:
    """A card as the report shows it in full: everything but the per-epoch records and the class list."""
    out = {k: v for k, v in card.items()}
    out["throughput"] = {k: v for k, v in card["throughput"].items() if k != "per_epoch"}
    if isinstance(card.get("data"), Mapping):
        out["data"] = {k: v for k, v in card["data"].items() if k != "labels"}
    return out


# ----- expert models ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertSet:
    """One mined expert set (``stages.experts``' JSON): the expert's name (the file's stem), its base model's
    checkpoint, the definition of confusion, targets, negatives and the (target, negative) pairs mined."""

    name: str
    base_model: str
    confusion: str
    targets: tuple[str, ...]
    negatives: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    names: Mapping[str, str] = field(default_factory=dict)


def read_expert_set(path: Path, base_model: Path | None = None) -> ExpertSet:
    """An experts JSON; ``base_model`` overrides the file's ``base_model`` (the checkpoint it was mined from)."""
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("targets"), list) or not obj["targets"]:
        raise InputError("an experts file needs a non-empty 'targets' list", file=path, field="targets")
    base = base_model if base_model is not None else obj.get("base_model")
    if not base:
        raise InputError("no 'base_model' in the experts file and no --expert-models given", file=path,
                         field="base_model")
    sim = obj.get("similarity") or {}
    if not isinstance(sim, dict) or not all(isinstance(v, dict) for v in sim.values()):
        raise InputError("'similarity' must map each target to {negative: value}", file=path, field="similarity")
    pairs = tuple((t, n) for t, near in sim.items() for n in near)
    return ExpertSet(name=Path(path).stem, base_model=str(base), confusion=str(obj.get("confusion", "cosine")),
                     targets=tuple(obj["targets"]), negatives=tuple(obj.get("negatives", [])), pairs=pairs,
                     names=dict(obj.get("names") or {}))


def heatmap_classes(labels: Sequence[str], sets: Sequence[ExpertSet], *, max_classes: int) -> list[str]:
    """The classes a cosine heatmap shows: all of ``labels`` when there are at most ``max_classes``, else only
    the targets and negatives of ``sets`` (in ``labels`` order)."""
    if len(labels) <= max_classes:
        return list(labels)
    mined = {c for s in sets for c in (*s.targets, *s.negatives)}
    return [c for c in labels if c in mined]


_SET_STYLES = [("s", "black"), ("o", "lime"), ("D", "magenta"), ("^", "orange"), ("v", "cyan")]


def expert_heatmap(*, cosine: np.ndarray, labels: Sequence[str], sets: Sequence[ExpertSet],
                   names: Mapping[str, str] | None = None, max_classes: int = 50, title: str = "") -> tuple[bytes, str]:
    """Heatmap of a base model's class-by-class classifier FC weight cosine ``[C, C]`` (``labels`` in row order),
    class names on the axes; each set's (target, negative) cells carry a marker of its own, target names are red
    and bold, negative names blue. Returns (PNG bytes, caption)."""
    from matplotlib.figure import Figure

    names = dict(names or {})
    for s in sets:
        names = {**s.names, **names}
    shown = heatmap_classes(labels, sets, max_classes=max_classes)
    pos = {c: i for i, c in enumerate(labels)}
    idx = np.asarray([pos[c] for c in shown], dtype=np.int64)
    cos = np.asarray(cosine, dtype=np.float64)[np.ix_(idx, idx)]
    n = len(shown)
    side = max(4.0, 1.5 + 0.28 * n)
    fig = Figure(figsize=(side + 1.5, side + 0.3 * len(sets)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(cos, cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine of classifier FC weights")
    at = {c: i for i, c in enumerate(shown)}
    for k, s in enumerate(sets):
        marker, color = _SET_STYLES[k % len(_SET_STYLES)]
        cells = [(at[t], at[c]) for t, c in s.pairs if t in at and c in at]
        diag = [at[t] for t in s.targets if t in at]
        label = f"{s.name} ({s.confusion}): target rows × negative columns; targets ★ on the diagonal"
        ax.scatter([c for _, c in cells], [r for r, _ in cells], marker=marker, s=60, facecolors="none",
                   edgecolors=color, linewidths=1.5, label=label)
        ax.scatter(diag, diag, marker="*", s=80, color=color)
    targets = {t for s in sets for t in s.targets}
    negatives = {c for s in sets for c in s.negatives} - targets
    ticks = [names.get(c, c) for c in shown]
    fs = 8 if n <= 30 else 6
    ax.set_xticks(np.arange(n), ticks, rotation=90, fontsize=fs)
    ax.set_yticks(np.arange(n), ticks, fontsize=fs)
    for axis in (ax.get_xticklabels(), ax.get_yticklabels()):
        for c, lab in zip(shown, axis):
            if c in targets:
                lab.set_color("red")
                lab.set_fontweight("bold")
            elif c in negatives:
                lab.set_color("blue")
    if sets:
        fig.legend(loc="outside lower center", fontsize=8)
    ax.set_title(title or "classifier FC weight cosine")
    caption = (f"{n} classes" if n == len(labels) else
               f"the {n} mined classes of {len(labels)} (more than {max_classes})")
    caption += "; targets red, negatives blue; each set's (target, negative) pairs marked"
    return _png(fig), caption


@dataclass(frozen=True)
class ExpertView:
    """One base model's heatmap and the expert sets mined from it."""

    base_model: str
    sets: tuple[ExpertSet, ...]
    png: bytes
    caption: str


def expert_views(sets: Sequence[ExpertSet], *, names: Mapping[str, str] | None = None, max_classes: int = 50
                 ) -> list[ExpertView]:
    """One heatmap per base model (its checkpoint read once) with every set mined from it."""
    from stages.experts import cosine_matrix, load_classifier

    by_base: dict[str, list[ExpertSet]] = {}
    for s in sets:
        by_base.setdefault(s.base_model, []).append(s)
    out = []
    for base, mine in by_base.items():
        labels, weight = load_classifier(base)
        unknown = sorted({c for s in mine for c in (*s.targets, *s.negatives)} - set(labels))
        if unknown:
            raise InputError(f"class {unknown[0]!r} of expert {mine[0].name!r} is not a class of its base model",
                             file=base, field="labels")
        png, caption = expert_heatmap(cosine=cosine_matrix(weight), labels=labels, sets=mine, names=names,
                                      max_classes=max_classes, title=f"{base}: classifier FC weight cosine")
        out.append(ExpertView(base_model=base, sets=tuple(mine), png=png, caption=caption))
    return out


def experts_frame(views: Sequence[ExpertView], names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per expert set: expert, base model, confusion, targets and negatives (display names)."""
    rows = []
    for v in views:
        for s in v.sets:
            nm = {**s.names, **(names or {})}
            rows.append({"expert": s.name, "base_model": v.base_model, "confusion": s.confusion,
                         "targets": ", ".join(nm.get(c, c) for c in s.targets),
                         "negatives": ", ".join(nm.get(c, c) for c in s.negatives) or "(none)"})
    return pd.DataFrame(rows, columns=["expert", "base_model", "confusion", "targets", "negatives"])


# ----- plots (matplotlib without pyplot: no global state) ---------------------------------------------------
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def map_chart(metrics: pd.DataFrame) -> bytes:
    """Grouped horizontal bars: mAP of each run on each validation split. PNG bytes."""
    from matplotlib.figure import Figure

    splits = _splits(metrics)
    runs = [run_name(*r) for r in metrics[RUN].itertuples(index=False)]
    fig = Figure(figsize=(8, 1.0 + 0.45 * len(runs) * max(1, len(splits)) / 2))
    ax = fig.add_subplot()
    y = np.arange(len(runs))
    h = 0.8 / max(1, len(splits))
    for k, s in enumerate(splits):
        v = metrics[s].to_numpy(np.float64)
        bars = ax.barh(y + (k - (len(splits) - 1) / 2) * h, np.nan_to_num(v), height=h, label=s)
        ax.bar_label(bars, labels=[f"{x:.3f}" if np.isfinite(x) else "n/a" for x in v], fontsize=7, padding=2)
    ax.set_yticks(y, runs)
    ax.invert_yaxis()
    ax.set_xlabel("mAP")
    ax.set_xlim(0, max(1e-3, float(np.nanmax(metrics[splits].to_numpy(np.float64), initial=0.0))) * 1.15)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("mAP per model and stage")
    return _png(fig)


def class_ap_chart(table: pd.DataFrame, runs: Sequence[str], *, max_classes: int = 50) -> tuple[bytes, str]:
    """Grouped horizontal bars of per-class AP for ``runs`` (columns of :func:`class_ap_table`), sorted by the
    first run's AP. With more than ``max_classes`` classes, the lowest and highest halves are shown.
    Returns (PNG bytes, a caption saying which classes are shown)."""
    from matplotlib.figure import Figure

    t = table.sort_values(runs[0], ascending=False, na_position="last", kind="stable")
    caption = f"{len(t)} classes, sorted by {runs[0]} AP"
    if len(t) > max_classes:
        half = max_classes // 2
        t = pd.concat([t.head(half), t.tail(max_classes - half)])
        caption = (f"the {half} highest and {max_classes - half} lowest of {len(table)} classes by "
                   f"{runs[0]} AP")
    labels = [f"{n} ({g})" for n, g in zip(t["class_name"], t["n_gt"])]
    fig = Figure(figsize=(8, 1.2 + 0.22 * len(t) * max(1, len(runs)) ** 0.5))
    ax = fig.add_subplot()
    y = np.arange(len(t))
    h = 0.8 / len(runs)
    for k, r in enumerate(runs):
        ax.barh(y + (k - (len(runs) - 1) / 2) * h, np.nan_to_num(t[r].to_numpy(np.float64)), height=h, label=r)
    if len(t) < len(table):  # mark where the highest half ends and the lowest begins
        ax.axhline(max_classes // 2 - 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AP (mean over validation splits); class (ground-truth boxes)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title("Per-class AP")
    return _png(fig), caption


# ----- sample images ----------------------------------------------------------------------------------------
def sample_ids(dets: pd.DataFrame, images: pd.DataFrame, *, n: int, score_thr: float) -> list[str]:
    """Up to ``n`` image ids evenly spread over the sorted ids that have a detection >= ``score_thr`` and a row in
    the images table (deterministic). ``dets`` needs only its image_id and score columns."""
    hit = pd.unique(np.asarray(dets.loc[dets["score"].to_numpy() >= score_thr, "image_id"], dtype=object))
    ids = np.intersect1d(hit.astype(str), images["image_id"].to_numpy(dtype=str))
    if len(ids) <= n:
        return [str(i) for i in ids]
    return [str(i) for i in ids[np.unique(np.linspace(0, len(ids) - 1, n).round().astype(int))]]


def read_sample_detections(path: Path, images: pd.DataFrame, *, n: int, score_thr: float
                           ) -> tuple[pd.DataFrame, dict, list[str]]:
    """What the report draws of a detections file, read without loading the rest: the image ids and scores
    pick the sample (:func:`sample_ids`), then only those images' rows are read. (rows, provenance, ids)."""
    prov = read_provenance(path)
    names = pq.read_schema(path).names
    if "score" not in names or "image_id" not in names:
        raise InputError(f"a table with columns {names} has no scores: not detections", file=path)
    table = "masks" if "rle" in names else "detections"   # masks are drawn filled
    ids = sample_ids(read_table(path, table, columns=["image_id", "score"]), images, n=n,
                     score_thr=score_thr)
    return read_table(path, table, image_ids=ids), prov, ids


@dataclass(frozen=True)
class Samples:
    """One detections file's sample drawings: title, provenance and (image id, caption, image) triples."""

    title: str
    provenance: dict
    images: list[tuple[str, str, Image.Image]] = field(default_factory=list)


def draw_samples(*, title: str, dets: pd.DataFrame, images: pd.DataFrame, provenance: Mapping | None = None,
                 gt: pd.DataFrame | None = None, names: Mapping[str, str] | None = None, n: int = 6,
                 score_thr: float = 0.3, min_side: int = 384, source: object = None) -> Samples:
    """Draw ``n`` sample images of a detections table (with ground truth when given) for the report."""
    out = []
    for image_id in sample_ids(dets, images, n=n, score_thr=score_thr):
        img = render_image(image_id=image_id, images=images, dets=dets, names=names, score_thr=score_thr,
                           gt=gt, min_side=min_side, source=source)
        mine = dets[dets["image_id"] == image_id]
        caption = f"{image_id}: {int((mine['score'] >= score_thr).sum())} of {len(mine)} detections ≥ {score_thr}"
        if gt is not None:
            caption += f", {int((gt['image_id'] == image_id).sum())} ground-truth boxes (dashed)"
        out.append((image_id, caption, img))
    return Samples(title=title, provenance=dict(provenance or {}), images=out)


# ----- HTML -------------------------------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f2f2f2}td{text-align:right}td:first-child,.per-class td:nth-child(2){text-align:left}
figure{display:inline-block;margin:6px;vertical-align:top;max-width:420px}figcaption{font-size:12px}
figure img{max-width:400px}.prov{font-size:12px;color:#555}details{margin:1em 0}"""


def img_tag(data: bytes | Image.Image, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a base64 data URI."""
    if isinstance(data, Image.Image):
        buf = io.BytesIO()
        data.save(buf, format="PNG")
        data = buf.getvalue()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(df: pd.DataFrame, cls: str) -> str:
    return df.to_html(index=False, escape=True, na_rep="–", float_format=lambda v: f"{v:.4f}", classes=cls,
                      border=0)


def build_html(*, metrics: pd.DataFrame, per_class: pd.DataFrame,
               ablations: Mapping[str, pd.DataFrame] | None = None, samples: Sequence[Samples] = (),
               searches: Sequence[AutoSearch] = (), experts: Sequence[ExpertView] = (),
               names: Mapping[str, str] | None = None, title: str = "Orchard report", max_classes: int = 50,
               cards: Sequence[Mapping] = ()) -> str:
    """The report as one self-contained HTML page (charts and images inline); ``cards``: model cards
    (:mod:`stages.card`), a section of their own."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"]
    parts.append("<h2 id='map'>mAP per model and stage</h2>")
    m = metrics.copy()
    m.insert(0, "run", [run_name(*r) for r in m[RUN].itertuples(index=False)])
    parts.append(_table(m.drop(columns=RUN), "metrics"))
    if len(m):
        parts.append(img_tag(map_chart(metrics), "mAP per model and stage"))

    if cards:
        frame = cards_frame(cards)
        parts.append("<h2 id='cards'>Model cards</h2>" + _table(frame, "cards")
                     + f"<p class='prov'>{e(CARDS_NOTE)}</p>")
        parts.append(img_tag(cards_chart(frame), "mAP against GFLOPs"))
        for c in cards:
            parts.append(f"<details><summary>card of {e(c['model'])}</summary><pre>"
                         f"{e(json.dumps(_card_summary(c), indent=1, default=str))}</pre></details>")

    if ablations:
        parts.append("<h2 id='ablations'>Ablations</h2>")
        for name, df in ablations.items():
            parts.append(f"<h3>{e(name)}</h3>" + _table(df, "ablation"))

    if searches:
        parts.append("<h2 id='autoensemble'>Auto ensemble</h2>" + _table(auto_frame(searches), "autoensemble")
                     + f"<p class='prov'>{e(AUTO_NOTE)}</p>")
        for a in searches:
            png = draw_tree(a.tree, a.scores["vertices"], search_split=a.scores["search_split"],
                            check_split=a.scores["check_split"], title=f"{a.name}: the chosen tree")
            parts.append(f"<figure style='max-width:none'>{img_tag(png, f'{a.name} tree')}<figcaption>"
                         f"{e(a.name)}: each vertex with its mAP on {e(a.scores['search_split'])} (searched) / "
                         f"{e(a.scores['check_split'])} (checked)</figcaption></figure>")

    if experts:
        parts.append("<h2 id='experts'>Expert models</h2>" + _table(experts_frame(experts, names), "experts"))
        for v in experts:
            parts.append(f"<figure style='max-width:none'>{img_tag(v.png, f'{v.base_model} FC cosine')}"
                         f"<figcaption>{e(v.base_model)}: {e(v.caption)}</figcaption></figure>")

    table = class_ap_table(per_class)
    if len(table):
        parts.append("<h2 id='per-class'>Per-class AP</h2>")
        runs = [c for c in table.columns if c not in ("label", "class_name", "n_gt")]
        best = [best_run(metrics, stage) for stage in ("postprocess", "ensemble", "autoensemble")]
        shown = [r for r in best if r in runs] or runs[:1]
        png, caption = class_ap_chart(table, shown, max_classes=max_classes)
        parts.append(f"<figure style='max-width:none'>{img_tag(png, 'per-class AP')}"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
        order = [r for r in shown] + [r for r in runs if r not in shown]
        full = table[["class_name", "label", "n_gt", *order]].sort_values(order[0], ascending=False,
                                                                          na_position="last")
        parts.append(f"<details><summary>AP of every class and run ({len(full)} classes)</summary>"
                     f"{_table(full, 'per-class')}</details>")

    if samples:
        parts.append("<h2 id='samples'>Sample images</h2>")
        for s in samples:
            parts.append(f"<h3>{e(s.title)}</h3>")
            prov = {k: v for k, v in s.provenance.items() if k != "columns"}
            if prov:
                parts.append(f"<p class='prov'>{e(json.dumps(prov, default=str))}</p>")
            for image_id, caption, img in s.images:
                parts.append(f"<figure>{img_tag(img, image_id)}<figcaption>{e(caption)}</figcaption></figure>")
            if not s.images:
                parts.append("<p>no image with a detection above the score threshold</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", type=Path, nargs="+", required=True)
    p.add_argument("--out-json", type=Path)
    p.add_argument("--out-md", type=Path)
    p.add_argument("--out-html", type=Path)
    p.add_argument("--ablation", type=Path, nargs="*", default=[], help="ablation tables (TSV, CSV or JSON)")
    p.add_argument("--cards", type=Path, nargs="*", default=[],
                   help="model cards (stages.card): a table of the models, and in the HTML mAP against GFLOPs")
    p.add_argument("--autoensemble", type=Path, nargs="*", default=[],
                   help="scores JSONs of auto-ensemble searches (stages.autoensemble search --scores)")
    p.add_argument("--experts", type=Path, nargs="*", default=[],
                   help="experts JSONs (stages.experts): their sets and the base models' FC-weight cosine heatmaps")
    p.add_argument("--expert-models", type=Path, nargs="*", default=[],
                   help="the base model checkpoint of each --experts file, in order (default: its base_model)")
    p.add_argument("--detections", type=Path, nargs="*", default=[], help="detection files to draw samples of")
    p.add_argument("--images", type=Path, nargs="*", default=[], help="images tables (labelled and test)")
    p.add_argument("--boxes", type=Path, help="ground-truth boxes table (drawn dashed on the samples)")
    p.add_argument("--classes", type=Path, help="classes table or CSV (display names on the samples)")
    p.add_argument("--samples", type=int, default=6, help="sample images per detections file")
    p.add_argument("--score-thr", type=float, default=0.3, help="draw detections scoring at least this")
    p.add_argument("--max-classes", type=int, default=50, help="classes in the per-class AP chart")
    p.add_argument("--title", default="Orchard report")
    p.add_argument("--tail-boxes", type=Path, help="ground-truth boxes table: adds the mean AP of the tail classes "
                   "(the --tail-share of the classes with the fewest training boxes) per split (needs --tail-splits)")
    p.add_argument("--tail-splits", type=Path, help="splits table (which boxes are training boxes)")
    p.add_argument("--tail-share", type=float, default=1 / 3, help="share of the classes counted as tail")
    p.add_argument("--show-classes", nargs="*", default=[], help="classes (MIDs or display names) whose AP per "
                   "split gets a column of its own (e.g. a confusing pair)")
    a = p.parse_args(argv)
    if not (a.out_json or a.out_md or a.out_html):
        p.error("give at least one of --out-json, --out-md, --out-html")
    if a.expert_models and len(a.expert_models) != len(a.experts):
        p.error(f"--expert-models gives {len(a.expert_models)} checkpoints for {len(a.experts)} --experts files")
    df = metrics_frame(a.metrics)
    if bool(a.tail_boxes) != bool(a.tail_splits):
        p.error("--tail-boxes and --tail-splits go together")
    if a.tail_boxes:
        tail = tail_classes(read_table(a.tail_boxes, "boxes"), read_table(a.tail_splits, "splits"),
                            share=a.tail_share)
        log.info("tail classes (%d, the %.0f%% with the fewest training boxes): %s", len(tail),
                 100 * a.tail_share, ", ".join(tail))
        df = add_tail_columns(df, a.metrics, tail)
    if a.show_classes:
        df = add_class_columns(df, a.metrics, a.show_classes)
    searches = [read_auto_search(x) for x in a.autoensemble]
    cards = [read_card(x) for x in a.cards]
    md = to_markdown(df)
    if cards:
        md += f"\n## Model cards\n\n{to_markdown(cards_frame(cards))}\n{CARDS_NOTE}.\n"
    if searches:
        md += f"\n## Auto ensemble\n\n{to_markdown(auto_frame(searches))}\n{AUTO_NOTE}.\n"
    if a.out_json:
        write_json(a.out_json, df.to_dict(orient="records"))
    if a.out_md:
        write_text(a.out_md, md)
    if a.out_html:
        if a.detections and not a.images:
            raise InputError("--detections needs --images to find the image files", field="--images")
        images = (pd.concat([read_table(x, "images") for x in a.images], ignore_index=True)
                  if a.images else None)
        names = read_class_names(a.classes) if a.classes else {}
        samples = []
        for path in a.detections:   # only the drawn images' rows are read (of detections and ground truth)
            dets, prov, ids = read_sample_detections(path, images, n=a.samples, score_thr=a.score_thr)
            gt = read_table(a.boxes, "boxes", image_ids=ids) if a.boxes else None
            samples.append(draw_samples(title=str(path), dets=dets, images=images, provenance=prov, gt=gt,
                                        names=names, n=a.samples, score_thr=a.score_thr,
                                        source=", ".join(map(str, a.images))))
        ablations = {x.stem: read_ablation(x) for x in a.ablation}
        sets = [read_expert_set(x, m) for x, m in zip(a.experts, a.expert_models or [None] * len(a.experts))]
        views = expert_views(sets, names=names, max_classes=a.max_classes) if sets else []
        page = build_html(metrics=df, per_class=per_class_frame(a.metrics), ablations=ablations,
                          samples=samples, searches=searches, experts=views, names=names, title=a.title,
                          max_classes=a.max_classes, cards=cards)
        write_text(a.out_html, page)
        log.info("wrote %s (%d KiB)", a.out_html, len(page) // 1024)
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
