"""What an expert model adds: its target classes' AP before and after it joins an ensemble.

For each expert (its mined set, ``stages.experts``) and each validation split, one row per target class: the
base model's AP, the expert's own AP, the ensemble's AP without the expert (``--before``) and with it
(``--after``), and the difference. Written as JSON (records) and Markdown (``results/ablation/experts.md``).

    python -m stages.expert_gain --experts results/experts/<expert>.json \\
        --base results/evaluate/postprocess/default/<base>/{val_a,val_b}.json \\
        --expert results/evaluate/postprocess/default/<expert>/{val_a,val_b}.json \\
        --before results/evaluate/ensemble/default/<group without>/{val_a,val_b}.json \\
        --after results/evaluate/ensemble/default/<group with>/{val_a,val_b}.json \\
        --out-json experts.json --out-md experts.md

Each of ``--base``, ``--expert``, ``--before``, ``--after`` takes one metric file per split, in the same order
(the split is the file's stem); several experts repeat ``--experts`` and give their ``--base`` / ``--expert``
files expert by expert (all of the first expert's splits, then the next's); ``-`` for a base file that does
not exist (an expert trained on an external dataset has no base model).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.cli import stage_main
from stages.core.errors import InputError
from stages.formats.experts import read_expert_targets
from stages.formats.io import write_json, write_text
from stages.formats.readers import read_metrics

NO_METRICS = {"mAP": None, "per_class": {}}
COLUMNS = ["expert", "split", "label", "name", "base", "expert_ap", "before", "after", "gain"]


def _ap(metrics: Mapping, label: str) -> float:
    rec = metrics["per_class"].get(label)
    return float("nan") if rec is None or rec["ap"] is None else float(rec["ap"])


def gain_table(*, expert: str, targets: Sequence[str], split: str, base: Mapping, own: Mapping, before: Mapping,
               after: Mapping) -> pd.DataFrame:
    """One row per target class of one expert on one split (metric dicts as :func:`read_metrics` returns),
    plus a row ``mean`` over the targets with ground truth."""
    rows = []
    for t in targets:
        rec = before["per_class"].get(t) or after["per_class"].get(t) or {}
        b, a = _ap(before, t), _ap(after, t)
        rows.append({"expert": expert, "split": split, "label": t, "name": rec.get("name", t),
                     "base": _ap(base, t), "expert_ap": _ap(own, t), "before": b, "after": a, "gain": a - b})
    df = pd.DataFrame(rows, columns=COLUMNS)
    valid = df[np.isfinite(df["before"]) & np.isfinite(df["after"])]
    if len(valid):
        mean = {c: float(valid[c].mean()) for c in ("base", "expert_ap", "before", "after", "gain")}
        df = pd.concat([df, pd.DataFrame([{"expert": expert, "split": split, "label": "mean",
                                           "name": f"{len(valid)} targets", **mean}])], ignore_index=True)
    return df


def _by_split(paths: Sequence[Path], flag: str) -> dict[str, dict]:
    out = {}
    for p in paths:
        if str(p) == "-":   # no file (an expert of an external dataset has no base model)
            continue
        if p.stem in out:
            raise InputError(f"two metric files of split {p.stem!r}", file=p, field=flag)
        out[p.stem] = read_metrics(p)
    return out


def to_markdown(df: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |\n" for _, r in df.iterrows())


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.expert_gain", description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=Path, nargs="+", required=True, help="mined sets (stages.experts JSON)")
    p.add_argument("--names", nargs="*", help="the experts' model names (default: the files' stems)")
    for flag in ("--base", "--expert", "--before", "--after"):
        p.add_argument(flag, type=Path, nargs="+", required=True)
    p.add_argument("--out-json", type=Path, required=True)
    p.add_argument("--out-md", type=Path, required=True)
    a = p.parse_args(argv)
    names = a.names or [e.stem for e in a.experts]
    if len(names) != len(a.experts):
        raise InputError(f"{len(a.experts)} --experts but {len(names)} --names", field="--names")
    before, after = _by_split(a.before, "--before"), _by_split(a.after, "--after")
    splits = sorted(before)
    if sorted(after) != splits:
        raise InputError(f"--after has splits {sorted(after)}, --before {splits}", field="--after")
    n = len(splits)
    for flag, files in (("--base", a.base), ("--expert", a.expert)):
        if len(files) != n * len(a.experts):
            raise InputError(f"{flag} needs {n} file(s) per expert ({splits}), got {len(files)}", field=flag)
    frames = []
    for i, (path, name) in enumerate(zip(a.experts, names)):
        targets = read_expert_targets(path)
        base = _by_split(a.base[i * n:(i + 1) * n], "--base")
        own = _by_split(a.expert[i * n:(i + 1) * n], "--expert")
        for s in splits:
            if s not in own:
                raise InputError(f"no metric file of split {s!r} for expert {name!r}", field="--expert")
            frames.append(gain_table(expert=name, targets=targets, split=s, base=base.get(s, NO_METRICS),
                                     own=own[s],
                                     before=before[s], after=after[s]))
    df = pd.concat(frames, ignore_index=True)
    write_json(a.out_json, df.astype(object).where(df.notna(), None).to_dict(orient="records"))  # NaN: null
    md = ("Target classes of each expert: AP of the base model, of the expert alone, of the ensemble without "
          "and with the expert (gain = with - without).\n\n" + to_markdown(df))
    write_text(a.out_md, md)
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
