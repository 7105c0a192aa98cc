"""The train rule's wiring: a k-means-anchors model pulls in the anchors rule and passes its file; a model with
gpus > 1 is launched through torchrun; test_flip reaches the infer command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.workflow.test_dag import ROOT, TINY


def test_dry_run_shows_anchors_rule_and_torchrun(tmp_path: Path):
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["models"]["tiny_a"].update(anchors="kmeans", anchor_scales=[4, 6], gpus=2, test_flip=True)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
                        "--configfile", str(p), "-n", "-p", "--cores", "2",
                        "results/train/tiny_a/model.pt", "results/train/tiny_b/model.pt",
                        "results/infer/tiny_a/val_a/shard0.parquet"],
                       capture_output=True, text=True, timeout=300, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    lines = [x for x in out.splitlines() if "-m stages." in x]
    anchors = [x for x in lines if "-m stages.anchors" in x]
    assert len(anchors) == 1 and "results/anchors/tiny_a.json" in anchors[0] and "--scales 4 6" in anchors[0]
    train_a = next(x for x in lines if "stages.train" in x and "tiny_a/model.pt" in x)
    train_b = next(x for x in lines if "stages.train" in x and "tiny_b/model.pt" in x)
    assert "torchrun --standalone --nproc_per_node 2 -m stages.train" in train_a
    assert "--anchors results/anchors/tiny_a.json" in train_a
    assert "python -m stages.train" in train_b and "--anchors" not in train_b and "torchrun" not in train_b
    infer_a = next(x for x in lines if "stages.infer" in x and "tiny_a" in x)
    assert "--flip" in infer_a


def test_dry_run_wires_an_expert_model(tmp_path: Path):
    """An expert model's training pulls in the experts rule (the base model's checkpoint and val_a metric) and
    passes its class subset; the base model trains without --classes."""
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["models"]["tiny_x"] = {**cfg["models"]["tiny_a"], "expert": True, "expert_of": "tiny_a",
                               "expert_n_lowest": 2, "expert_sim_thr": 0.4}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
                        "--configfile", str(p), "-n", "-p", "--cores", "2", "results/train/tiny_x/model.pt"],
                       capture_output=True, text=True, timeout=300, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    lines = [x for x in out.splitlines() if "-m stages." in x]
    mine = [x for x in lines if "-m stages.experts" in x]
    assert len(mine) == 1
    assert "--model results/train/tiny_a/model.pt" in mine[0]
    assert "--metrics results/evaluate/postprocess/tiny_a/val_a.json" in mine[0]
    assert "--n-lowest 2 --sim-thr 0.4" in mine[0] and "--out results/experts/tiny_x.json" in mine[0]
    train_x = next(x for x in lines if "stages.train" in x and "tiny_x/model.pt" in x)
    train_a = next(x for x in lines if "stages.train" in x and "tiny_a/model.pt" in x)
    assert "--classes results/experts/tiny_x.json" in train_x and "--classes" not in train_a
