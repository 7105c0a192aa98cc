"""The train rule's wiring: a k-means-anchors model pulls in the anchors rule and passes its file; the launcher
gets the model's GPUs and nodes (and the train stage its DataLoader workers) from the job's resources; the
inference keys reach the infer command."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.workflow.test_dag import TINY, snakemake


def _dry_run_commands(tmp_path: Path, cfg: dict, *targets: str) -> list[str]:
    """The ``python -m stages.*`` command lines a dry run of ``targets`` under ``cfg`` would execute."""
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", "-p", *targets, "--configfile", str(p), timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    return [x for x in out.splitlines() if "-m stages." in x]


def test_dry_run_shows_anchors_rule_and_torchrun(tmp_path: Path):
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["models"]["tiny_a"].update(anchors="kmeans", anchor_scales=[4, 6], gpus=2, test_flip=True,
                                   box_nms_thresh=0.6, rpn_post_nms_top_n_test=77, workers=3)
    lines = _dry_run_commands(tmp_path, cfg, "results/train/tiny_a/model.pt", "results/train/tiny_b/model.pt",
                              "results/infer/tiny_a/val_a/shard0.parquet")
    anchors = [x for x in lines if "-m stages.anchors" in x]
    assert len(anchors) == 1 and "results/anchors/tiny_a.json" in anchors[0] and "--scales 4 6" in anchors[0]
    train_a = next(x for x in lines if "stages.train" in x and "tiny_a/model.pt" in x)
    train_b = next(x for x in lines if "stages.train" in x and "tiny_b/model.pt" in x)
    assert "python -m stages.core.launch 2 1 -m stages.train" in train_a
    assert "--anchors results/anchors/tiny_a.json" in train_a
    assert "python -m stages.core.launch 0 1 -m stages.train" in train_b and "--anchors" not in train_b
    # DataLoader workers: the model's resource (the schema's default 0 for tiny_b)
    assert "--workers 3 " in train_a and "--workers 0 " in train_b
    infer_a = next(x for x in lines if "stages.infer" in x and "tiny_a" in x)
    assert "--flip" in infer_a and "--box-nms-thresh 0.6" in infer_a and "--rpn-post-nms-top-n-test 77" in infer_a
    # the training config holds no inference key and no resource
    assert '"box_nms_thresh"' not in train_a and '"gpus"' not in train_a and '"test_flip"' not in train_a
    assert '"workers"' not in train_a


def test_dry_run_wires_an_expert_model(tmp_path: Path):
    """An expert model's training pulls in the experts rule (the base model's checkpoint and val_a metric) and
    passes its class subset; the base model trains without --classes."""
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["models"]["tiny_x"] = {**cfg["models"]["tiny_a"], "expert": True, "expert_of": "tiny_a",
                               "expert_n_lowest": 2, "expert_sim_thr": 0.4}
    lines = _dry_run_commands(tmp_path, cfg, "results/train/tiny_x/model.pt")
    mine = [x for x in lines if "-m stages.experts" in x]
    assert len(mine) == 1
    assert "--model results/train/tiny_a/model.pt" in mine[0]
    assert "--metrics results/evaluate/postprocess/default/tiny_a/val_a.json" in mine[0]
    assert "--n-lowest 2 --confusion cosine --sim-thr 0.4" in mine[0]
    assert "--out results/experts/tiny_x.json" in mine[0]
    train_x = next(x for x in lines if "stages.train" in x and "tiny_x/model.pt" in x)
    train_a = next(x for x in lines if "stages.train" in x and "tiny_a/model.pt" in x)
    assert "--classes results/experts/tiny_x.json" in train_x and "--classes" not in train_a
