"""The full challenge setup builds its DAG against a stub directory of OpenImages files, quickly; changing a
post-processing parameter reruns post-processing and what depends on it, never training or inference."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from tests.workflow.test_dag import ROOT, TINY, snakemake

STUB_FILES = ["challenge-2019-train-detection-bbox.csv", "challenge-2019-train-detection-human-imagelabels.csv",
              "challenge-2019-classes-description-500.csv", "challenge-2019-label500-hierarchy.json",
              "test-images.csv"]


def job_counts(text: str) -> dict[str, int]:
    block = text.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


def test_oid2019_dag_builds_from_stub_files(tmp_path: Path) -> None:
    stub = tmp_path / "data" / "oid2019"
    stub.mkdir(parents=True)
    for name in STUB_FILES:
        (stub / name).touch()
    t0 = time.perf_counter()
    r = snakemake(tmp_path, "-n", "--quiet", "rules", "--configfile", str(ROOT / "configs" / "oid2019.yaml"))
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    counts = job_counts(r.stdout + r.stderr)
    print(f"oid2019 DAG: {counts['total']} jobs built in {seconds:.1f} s: {counts}")
    cfg = yaml.safe_load((ROOT / "configs" / "oid2019.yaml").read_text())
    n_models, shards = len(cfg["models"]), cfg["infer"]["shards"]
    n_experts = sum(1 for m in cfg["models"].values() if m.get("expert_of"))
    assert (n_models, n_experts) == (28 + 13, 13)           # the zoo and the paper's 3 + 2 + 8 expert models
    assert counts["train"] == 28 + 13 and counts["anchors"] == n_models
    assert counts["experts"] == n_experts
    assert counts["infer"] == n_models * 3 * shards           # val_a, val_b, test
    # validation splits; the ablation variants of one model / group: 4 each; on test, the auto ensemble's leaves:
    # its models (the experts) and naive groups (the backbones)
    leaves = cfg["autoensemble"]["leaves"]
    assert (len(leaves["models"]), len(leaves["groups"]), leaves["views"]) == (13, 7, False)
    assert counts["postprocess"] == (n_models + 4) * 2 * shards + 13 * shards
    assert counts["ensemble"] == (len(cfg["ensemble"]["groups"]) + 4) * 2 * shards + 7 * shards
    # two searches (on val_a, on val_b), each applied to both validation splits; the first to test too
    assert counts["autoensemble_search"] == 2 and counts["autoensemble_apply"] == (2 * 2 + 1) * shards
    assert counts["evaluate"] == (n_models + 4 + 8 + 4) * 2 + 2 * 2
    assert counts["gather"] == counts["evaluate"] + 1    # + the auto ensemble's test detections
    assert seconds < 60, "the issue's target is 30 s on the 2-core machine; this bound only catches blow-ups"


@pytest.mark.slow
def test_changing_postprocess_param_reruns_only_downstream(tmp_path: Path) -> None:
    cfg = {**TINY, "models": {"tiny_a": TINY["models"]["tiny_a"]}, "infer": {"shards": 1}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = snakemake(tmp_path, "submission.csv", "--configfile", str(path))
    assert first.returncode == 0, first.stderr[-3000:]
    t0 = time.perf_counter()
    noop = snakemake(tmp_path, "-n", "submission.csv", "--configfile", str(path))
    print(f"no-op dry run of the tiny DAG: {time.perf_counter() - t0:.1f} s")
    assert "Nothing to be done" in noop.stdout + noop.stderr

    cfg["postprocess"] = {"iou_thr": 0.6}
    path.write_text(yaml.safe_dump(cfg))
    dry = snakemake(tmp_path, "submission.csv", "-n", "--quiet", "rules", "--configfile", str(path))
    assert dry.returncode == 0, dry.stderr[-3000:]
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts.get("postprocess", 0) >= 1 and counts.get("submit") == 1
    for upstream in ("generate", "ingest", "split", "sample", "train", "infer"):
        assert upstream not in counts, counts
