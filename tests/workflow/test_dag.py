"""The DAG: dry-run and lint are clean, and a tiny end-to-end run (a few images, one short epoch) leaves a
submission that parses and metrics that were computed; a second run has nothing to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "dataset": {"n_images": 30, "n_test": 4, "min_size": 128, "max_size": 160, "seed": 1},
    "split": {"fractions": [0.6, 0.2, 0.2], "mining_iters": 100},
    "models": {
        m: {"backbone": "resnet_small", "width": 8, "fpn_channels": 16, "sampling": s, "epochs": 1,
            "lr_steps": [1], "iters_per_epoch": 2, "batch_size": 2, "warmup_iters": 1, "min_size": 128,
            "max_size": 160, "test_scales": [128]}
        for m, s in (("tiny_a", "class_aware"), ("tiny_b", "uniform"))
    },
    "infer": {"shards": 2},
}


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--cores", "2",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def test_dry_run_default_config(tmp_path):
    r = snakemake(tmp_path, "-n", "--quiet", "rules")
    assert r.returncode == 0, r.stderr
    for rule in ("generate", "ingest", "split", "train", "infer", "postprocess", "evaluate", "submit"):
        assert rule in r.stdout + r.stderr


def test_lint_is_clean(tmp_path):
    r = snakemake(tmp_path, "--lint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Congratulations, your workflow is in a good condition!" in r.stdout + r.stderr


def test_bad_config_is_a_clear_error(tmp_path):
    bad = yaml.safe_load(yaml.safe_dump(TINY))
    bad["models"]["tiny_a"]["epochs"] = 0
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    r = snakemake(tmp_path, "-n", "--configfile", str(p))
    assert r.returncode != 0
    assert "field 'models/tiny_a/epochs'" in r.stderr + r.stdout


def test_variants_run_through_the_postprocess_and_ensemble_rules(tmp_path):
    """Ablation variants are the normal rules with another {variant}: the variant's keys reach the command line,
    the configured section's keys fill the rest, optional inputs appear only where the variant needs them."""
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["postprocess"] = {"iou_thr": 0.6, "conf_thr": 0.7}
    cfg["ensemble"] = {"min_iou": 0.2}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", "-p", "results/ablation/postprocess.json", "results/ablation/ensemble.json",
                  "--configfile", str(p))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x for x in (r.stdout + r.stderr).splitlines() if "-m stages." in x]

    def command(stage: str, out: str) -> str:
        found = [x for x in lines if f"-m stages.{stage} " in x and f"--out {out}" in x]
        assert len(found) == 1, (out, found)
        return found[0]

    nms = command("postprocess", "results/postprocess/nms/tiny_a/val_a/shard0.parquet")
    assert "--method nms --iou-thr 0.6" in nms and "--relations  --conf-thr 0.7" in nms
    assert "--expand-hierarchy results/ingest/hierarchy.parquet" in nms
    rel = command("postprocess", "results/postprocess/adj_nms_relations/tiny_a/val_b/shard1.parquet")
    assert "--method adj_nms" in rel and "--relations results/relations/stats.json --conf-thr 0.7" in rel
    plain = command("ensemble", "results/ensemble/concat_adj_nms/all/val_a/shard0.parquet")
    assert "--reweight False --ap-metrics  --vote False" in plain and "--min-iou 0.2" in plain
    both = command("ensemble", "results/ensemble/reweight_vote/all/val_b/shard0.parquet")
    # val_b is re-weighted with the APs on val_a of the configured post-processing
    assert ("--reweight True --ap-metrics results/evaluate/postprocess/default/tiny_a/val_a.json"
            " results/evaluate/postprocess/default/tiny_b/val_a.json --vote True") in both
    gathered = command("postprocess", "results/ensemble/vote/all/val_a.parquet")
    assert "--method none --score-thr 0 --max-per-image 0" in gathered
    scored = command("evaluate", "results/evaluate/ensemble/vote/all/val_a.json")
    assert "--predictions results/ensemble/vote/all/val_a.parquet" in scored and "--split val_a" in scored


@pytest.mark.parametrize("variants, field, msg", [
    ({"postprocess": {"default": {"method": "nms"}}}, "ablation/postprocess/default", "names the configured"),
    ({"ensemble": {"v": {"reweight": False, "k_nn": 3}}}, "ablation/ensemble/v", "unknown key(s) ['k_nn']"),
])
def test_bad_variant_is_a_clear_error(tmp_path, variants, field, msg):
    cfg = {**yaml.safe_load(yaml.safe_dump(TINY)), "ablation": variants}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", "--configfile", str(p))
    assert r.returncode != 0
    assert f"field '{field}'" in r.stderr + r.stdout and msg in r.stderr + r.stdout


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path, tiny_config):
    r = snakemake(tmp_path, "--configfile", str(tiny_config))   # the default target: everything
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    sub = pd.read_csv(tmp_path / "submission.csv", keep_default_na=False)
    assert list(sub.columns) == ["ImageId", "PredictionString"]
    test_ids = pd.read_csv(tmp_path / "data/orchard-mini/test-images.csv")["ImageID"]
    assert sorted(sub["ImageId"]) == sorted(test_ids)
    from stages.formats.io import read_table
    from stages.formats.openimages import read_detection_submission

    dets = read_detection_submission(tmp_path / "submission.csv")
    assert (dets["score"] >= 0).all()   # voting adds 0.05 x the neighbours: scores may pass 1
    metrics = json.loads((tmp_path / "results/metrics.json").read_text())
    names = {(m["stage"], m["variant"], m["name"]) for m in metrics}
    assert names == {("postprocess", "default", "tiny_a"), ("postprocess", "default", "tiny_b"),
                     ("ensemble", "default", "all")}
    for m in metrics:
        assert 0.0 <= m["val_a"] <= 1.0 and 0.0 <= m["val_b"] <= 1.0
    per_class = json.loads((tmp_path / "results/evaluate/ensemble/default/all/val_a.json").read_text())
    per_class = per_class["per_class"]
    assert len(per_class) > 0
    # the ablation tables and the report were written
    abl = json.loads((tmp_path / "results/ablation/postprocess.json").read_text())
    assert {(m["variant"], m["name"]) for m in abl} == {(v, "tiny_a") for v in
                                                        ("nms", "soft_nms", "adj_nms", "adj_nms_relations")}
    abl = json.loads((tmp_path / "results/ablation/ensemble.json").read_text())
    assert {m["variant"] for m in abl} == {"concat_adj_nms", "reweight", "vote", "reweight_vote"}
    assert (tmp_path / "results/ablation/ensemble.md").exists()
    # the configured ensemble and its ablation variant with the same keys agree
    same = [read_table(tmp_path / f"results/ensemble/{v}/all/val_a.parquet", "detections")
            for v in ("default", "reweight_vote")]
    pd.testing.assert_frame_equal(*same)
    # the heavy rules left benchmark files
    for rule in ("postprocess", "ensemble", "gather", "evaluate"):
        assert list((tmp_path / "benchmarks" / rule).rglob("*.tsv")), rule
    assert "<img" in (tmp_path / "results/report.html").read_text()
    # shards were written and gathered
    assert (tmp_path / "results/infer/tiny_a/test/shard1.parquet").exists()
    assert (tmp_path / "results/postprocess/default/tiny_a/val_a/shard1.parquet").exists()
    # nothing left to do
    again = snakemake(tmp_path, "-n", "--configfile", str(tiny_config))
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
