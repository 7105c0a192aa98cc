"""Collect metric JSONs (results/evaluate/<stage>/<name>/<split>.json) into one table: JSON and Markdown."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from stages.cli import stage_main
from stages.errors import InputError
from stages.formats.io import write_json, write_text


def metrics_frame(paths: Sequence[Path]) -> pd.DataFrame:
    """One row per (stage, name) with a column of mAP per split, from the metric files' paths and contents."""
    rows = []
    for p in paths:
        p = Path(p)
        try:
            m = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"unreadable metrics JSON: {exc}", file=p) from exc
        if "mAP" not in m:
            raise InputError("no 'mAP' key", file=p, field="mAP")
        parts = p.with_suffix("").parts
        i = parts.index("evaluate") if "evaluate" in parts else len(parts) - 3
        rest = parts[i + 1:]
        stage, name, split = (rest[0], "/".join(rest[1:-1]) or rest[0], rest[-1])
        rows.append({"stage": stage, "name": name, "split": split, "mAP": float(m["mAP"])})
    df = pd.DataFrame(rows)
    return df.pivot_table(index=["stage", "name"], columns="split", values="mAP").reset_index()


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines) + "\n"


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__)
    p.add_argument("--metrics", type=Path, nargs="+", required=True)
    p.add_argument("--out-json", type=Path, required=True)
    p.add_argument("--out-md", type=Path, required=True)
    a = p.parse_args(argv)
    df = metrics_frame(a.metrics)
    write_json(a.out_json, df.to_dict(orient="records"))
    write_text(a.out_md, to_markdown(df))
    print(to_markdown(df))


if __name__ == "__main__":
    raise SystemExit(main())
