"""``stages.expert_gain``: the target classes' AP before and after an expert joins the ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.expert_gain import main


def metric(path: Path, aps: dict[str, float | None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    per = {k: {"name": k.upper(), "ap": v, "n_gt": 1, "n_det": 1, "n_tp": 1} for k, v in aps.items()}
    vals = [v for v in aps.values() if v is not None]
    path.write_text(json.dumps({"mAP": sum(vals) / len(vals), "per_class": per, "counts": {}}))
    return path


def test_rows_per_target_and_split_with_the_gain(tmp_path, capsys):
    exp = tmp_path / "x.json"
    exp.write_text(json.dumps({"targets": ["a", "b"], "negatives": ["c"]}))
    files = {}
    for s, off in (("val_a", 0.0), ("val_b", 0.1)):
        files[("base", s)] = metric(tmp_path / "base" / f"{s}.json", {"a": 0.1 + off, "b": 0.2, "c": 0.9})
        files[("expert", s)] = metric(tmp_path / "expert" / f"{s}.json", {"a": 0.5, "b": None, "c": 0.4})
        files[("before", s)] = metric(tmp_path / "before" / f"{s}.json", {"a": 0.3, "b": 0.4, "c": 0.9})
        files[("after", s)] = metric(tmp_path / "after" / f"{s}.json", {"a": 0.6 + off, "b": 0.3, "c": 0.9})
    argv = ["--experts", str(exp), "--names", "x", "--out-json", str(tmp_path / "o.json"),
            "--out-md", str(tmp_path / "o.md")]
    for k in ("base", "expert", "before", "after"):
        argv += [f"--{k}", str(files[(k, "val_a")]), str(files[(k, "val_b")])]
    assert main(argv) == 0
    rows = {(r["split"], r["label"]): r for r in json.loads((tmp_path / "o.json").read_text())}
    assert set(rows) == {(s, c) for s in ("val_a", "val_b") for c in ("a", "b", "mean")}   # targets only
    assert rows[("val_b", "a")]["gain"] == pytest.approx(0.4) and rows[("val_a", "b")]["gain"] == pytest.approx(-0.1)
    assert rows[("val_a", "a")]["base"] == pytest.approx(0.1) and rows[("val_a", "b")]["expert_ap"] is None
    assert rows[("val_a", "mean")]["gain"] == pytest.approx((0.3 - 0.1) / 2)
    assert "| x | val_a | a | A |" in (tmp_path / "o.md").read_text()
    # one file short: a clear error, nothing written
    (tmp_path / "o.json").unlink()
    short = [x for x in argv if x != str(files[("base", "val_b")])]
    assert main(short) == 2
    assert "--base needs 2 file(s) per expert" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
