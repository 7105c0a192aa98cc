"""The DAG: dry-run and lint are clean, and a tiny end-to-end run (a few images, one short epoch) leaves a
submission that parses and metrics that were computed; a second run has nothing to do."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.tiny_dag import TINY, tiny_with_experts

ROOT = Path(__file__).resolve().parents[2]


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--cores", "2",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def job_counts(text: str) -> dict[str, int]:
    """Jobs per rule from the "Job stats" table of a dry run ({} when there is nothing to do)."""
    if "Nothing to be done" in text:
        return {}
    block = text.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


def dry_run(tmp_path: Path, cfg: dict, *targets: str) -> tuple[dict[str, int], list[str]]:
    """Jobs per rule and the ``python -m stages.*`` command lines of a dry run of ``targets`` under ``cfg``."""
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", "-p", *targets, "--configfile", str(p))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    return job_counts(out), [x.strip() for x in out.splitlines() if "-m stages." in x]


def command(lines: list[str], stage: str, out: str) -> str:
    """The one command line of ``stages.<stage>`` that writes ``out``."""
    found = [x for x in lines if f"-m stages.{stage} " in x and f"--out {out}" in x]
    assert len(found) == 1, (out, found)
    return found[0]


def options(cmd: str) -> dict[str, list[str]]:
    """{option: its words} of a stage's command line (the words after `-m stages.<stage>`, up to `>`); an
    option given with no value maps to []."""
    words = shlex.split(cmd.split(" -m stages.", 1)[1].split(" > ", 1)[0])[1:]
    out: dict[str, list[str]] = {}
    for w in words:
        if w.startswith("--"):
            assert w not in out, f"{w} given twice in {cmd}"
            key = out.setdefault(w, [])
        else:
            key.append(w)
    return out


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny_with_experts()))
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
    nms = options(command(lines, "postprocess", "results/postprocess/nms/tiny_a/val_a/shard0.parquet"))
    assert nms["--method"] == ["nms"] and nms["--iou-thr"] == ["0.6"] and nms["--conf-thr"] == ["0.7"]
    assert nms["--relations"] == [] and nms["--expand-hierarchy"] == ["results/ingest/hierarchy.parquet"]
    rel = options(command(lines, "postprocess", "results/postprocess/adj_nms_relations/tiny_a/val_b/shard1.parquet"))
    assert rel["--method"] == ["adj_nms"] and rel["--relations"] == ["results/relations/stats.json"]
    assert rel["--conf-thr"] == ["0.7"]
    plain = options(command(lines, "ensemble", "results/ensemble/concat_adj_nms/all/val_a/shard0.parquet"))
    assert (plain["--reweight"], plain["--ap-metrics"], plain["--vote"]) == (["False"], [], ["False"])
    assert plain["--min-iou"] == ["0.2"] and plain["--iou-thr"] == ["0.6"]    # the postprocess section's
    both = options(command(lines, "ensemble", "results/ensemble/reweight_vote/all/val_b/shard0.parquet"))
    # val_b is re-weighted with the APs on val_a of the configured post-processing
    assert both["--reweight"] == both["--vote"] == ["True"]
    assert both["--ap-metrics"] == ["results/evaluate/postprocess/default/tiny_a/val_a.json",
                                    "results/evaluate/postprocess/default/tiny_b/val_a.json"]
    gathered = command(lines, "postprocess", "results/ensemble/vote/all/val_a.parquet")
    assert "--method none --score-thr 0 --max-per-image 0" in gathered
    scored = command(lines, "evaluate", "results/evaluate/ensemble/vote/all/val_a.json")
    assert "--predictions results/ensemble/vote/all/val_a.parquet" in scored and "--split val_a" in scored


@pytest.mark.parametrize("mode", ["auto", "naive"])
def test_autoensemble_rules(tmp_path, mode):
    """Leaves = each model's test-time views, post-processed on their own; two searches (roles of val_a and val_b
    swapped), each applied per split and shard, the val_a one to test too when it makes the submission."""
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["ensemble"] = {"mode": mode}
    counts, lines = dry_run(tmp_path, cfg)
    auto = mode == "auto"
    assert counts["autoensemble_search"] == 2 and counts["autoensemble_apply"] == (2 * 2 + auto) * 2
    # 3 views x 2 shards on val_a, val_b (and test when auto); the configured chain and 4 ablation variants
    assert counts["postprocess"] == 3 * (2 + auto) * 2 + (2 + 4) * 2 * 2
    assert counts["ensemble"] == (1 + 4) * 2 * 2 + (not auto) * 2      # the naive test ensemble only if naive
    flip = options(command(lines, "postprocess", "results/postprocess/view128flip/tiny_a/val_b/shard1.parquet"))
    assert (flip["--scale"], flip["--flip"]) == (["128"], ["True"])
    plain = options(command(lines, "postprocess", "results/postprocess/view128/tiny_b/val_a/shard0.parquet"))
    assert (plain["--scale"], plain["--flip"]) == (["128"], ["False"])
    whole = options(command(lines, "postprocess", "results/postprocess/default/tiny_b/val_a/shard0.parquet"))
    assert "--scale" not in whole and "--flip" not in whole                  # every view's rows
    def leaves(where: str) -> str:
        return " ".join(f"tiny_{m}@128{f}=results/postprocess/view128{f}/tiny_{m}/{where}.parquet"
                        for m, f in (("a", ""), ("a", "flip"), ("b", "")))

    for search, check in (("val_a", "val_b"), ("val_b", "val_a")):
        s = next(x for x in lines if f"--out-tree results/autoensemble/search_{search}/tree.json" in x)
        assert f"--search-leaves {leaves(search)} --check-leaves {leaves(check)} --leaf-classes  " in s
        assert f"--search-split {search} --check-split {check} --max-candidates 24" in s and "--node-trials 4" in s
        assert f"--log results/autoensemble/search_{search}/search.jsonl" in s and "--stale-log restart" in s
    apply = command(lines, "autoensemble", "results/autoensemble/default/search_val_b/val_a/shard1.parquet")
    assert f"--tree results/autoensemble/search_val_b/tree.json --leaves {leaves('val_a/shard1')}" in apply
    sub = next(x for x in lines if "-m stages.submit" in x)
    source = "autoensemble/default/search_val_a" if auto else "ensemble/default/all"
    assert f"--detections results/{source}/test.parquet" in sub
    # no expert model: the report draws no FC-weight heatmap
    assert "--experts" not in next(x for x in lines if "-m stages.report" in x and "--out-html" in x)
    # the auto ensemble in the metrics, the ensemble ablation (with the naive baseline) and the report
    table = next(x for x in lines if "--out-md results/ablation/ensemble.md" in x)
    assert ("results/evaluate/ensemble/default/all/val_b.json results/evaluate/autoensemble/default/search_val_a/"
            "val_a.json") in table
    assert ("--autoensemble results/autoensemble/search_val_a/scores.json results/autoensemble/search_val_b/"
            "scores.json") in table
    assert "results/evaluate/autoensemble/default/search_val_b/val_b.json" in next(
        x for x in lines if "--out-md results/metrics.md" in x)


def test_autoensemble_leaves_of_models_experts_and_naive_groups(tmp_path):
    """leaves.views off: a model's post-processed detections are one leaf; an expert's leaf gets its class
    filter; a naive group is a leaf too (its test ensemble is then needed, per shard)."""
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["models"]["tiny_x"] = {**cfg["models"]["tiny_a"], "expert": True, "expert_of": "tiny_a"}
    cfg["autoensemble"]["leaves"] = {"models": ["tiny_b", "tiny_x"], "views": False, "groups": ["all"]}
    counts, lines = dry_run(tmp_path, cfg, "results/autoensemble/search_val_a/tree.json",
                            "results/autoensemble/default/search_val_a/test/shard0.parquet")
    s = next(x for x in lines if "--out-tree results/autoensemble/search_val_a/tree.json" in x)
    assert ("--search-leaves tiny_b=results/postprocess/default/tiny_b/val_a.parquet tiny_x=results/postprocess/"
            "default/tiny_x/val_a.parquet all.naive=results/ensemble/default/all/val_a.parquet") in s
    assert "--leaf-classes tiny_x=results/experts/tiny_x.json --boxes" in s
    apply = command(lines, "autoensemble", "results/autoensemble/default/search_val_a/test/shard0.parquet")
    assert "all.naive=results/ensemble/default/all/test/shard0.parquet" in apply
    assert "tiny_x=results/postprocess/default/tiny_x/test/shard0.parquet" in apply
    assert "/view" not in " ".join(lines) and counts["autoensemble_search"] == 1   # no view variants


def test_the_default_run_has_an_expert_mined_trained_scored_and_merged(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    experts = [m for m, c in cfg["models"].items() if c.get("expert_of")]
    assert experts, "the default config has no expert model"
    x = experts[0]
    counts, lines = dry_run(tmp_path, cfg)
    assert counts["experts"] == len(experts) and counts["experts_table"] == 1
    mine = command(lines, "experts", f"results/experts/{x}.json")
    assert f"--model results/train/{cfg['models'][x]['expert_of']}/model.pt" in mine
    train = next(line for line in lines if f"--out results/train/{x}/model.pt" in line)
    assert f"--classes results/experts/{x}.json" in train
    assert next(line for line in lines if f"--out results/infer/{x}/test/shard0.parquet" in line).count("--expert")
    # scored on its own classes; in the naive group `all` it contributes its targets only, `global` has no filter
    ev = command(lines, "evaluate", f"results/evaluate/postprocess/default/{x}/val_b.json")
    assert f"--only-classes results/experts/{x}.json" in ev
    group = cfg["ensemble"]["groups"]["all"]
    def contributes(m):
        c = cfg["models"][m]
        if c.get("train_data"):
            return f"results/ingest_external/{c['train_data']}/targets.json"
        return f"results/experts/{m}.json" if m in experts else "-"

    filters = " ".join(contributes(m) for m in group)
    assert any(cfg["models"][m].get("train_data") for m in group), "no external-dataset expert in `all`"
    assert f"--class-filters {filters} " in command(lines, "ensemble", "results/ensemble/default/all/val_a/shard0.parquet")
    assert "--class-filters" not in command(lines, "ensemble", "results/ensemble/default/global/val_a/shard0.parquet")
    search = next(line for line in lines if "--out-tree results/autoensemble/search_val_a/tree.json" in line)
    assert f"--leaf-classes {x}" in search


def test_expert_mining_definitions_and_the_report(tmp_path):
    """expert_confusion reaches the experts rule; the matrix definition adds its base model's post-processed val_a
    detections, the ground truth and the splits (only it); the report gets each expert set and base model."""
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["models"]["tiny_x"] = {**cfg["models"]["tiny_a"], "expert": True, "expert_of": "tiny_a",
                               "expert_confusion": "siblings"}
    cfg["models"]["tiny_y"] = {**cfg["models"]["tiny_b"], "expert": True, "expert_of": "tiny_b",
                               "expert_confusion": "matrix", "expert_confusion_thr": 0.2,
                               "expert_confusion_score_thr": 0.4}
    _, lines = dry_run(tmp_path, cfg, "results/report.html")
    x = command(lines, "experts", "results/experts/tiny_x.json")
    assert "--classes results/ingest/classes.parquet" in x and "--confusion siblings" in x
    assert "--detections" not in x and "--confusion-thr" not in x
    y = command(lines, "experts", "results/experts/tiny_y.json")
    assert ("--confusion matrix --sim-thr 0.3 --detections results/postprocess/default/tiny_b/val_a.parquet"
            " --boxes results/ingest/boxes.parquet --splits results/split/splits.parquet --split val_a"
            " --confusion-thr 0.2 --confusion-score-thr 0.4") in y
    rep = next(x for x in lines if "-m stages.report" in x and "--out-html" in x)
    assert ("--experts results/experts/tiny_x.json results/experts/tiny_y.json"
            " --expert-models results/train/tiny_a/model.pt results/train/tiny_b/model.pt") in rep


@pytest.mark.parametrize("auto, field, msg", [
    ({"leaves": {"models": ["tiny_z"]}}, "autoensemble/leaves/models", "unknown models ['tiny_z']"),
    ({"leaves": {"groups": ["best"]}}, "autoensemble/leaves/groups", "unknown groups ['best']"),
    ({"leaves": {"models": []}}, "autoensemble/leaves", "no leaves"),
    ({"max_candidates": 0}, "autoensemble/max_candidates", "give a search budget"),
    ({"choice": "best"}, "autoensemble/choice", "'best' is not one of ['mean', 'guard']"),
])
def test_bad_autoensemble_config_is_a_clear_error(tmp_path, auto, field, msg):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({**yaml.safe_load(yaml.safe_dump(TINY)), "autoensemble": auto}))
    r = snakemake(tmp_path, "-n", "--configfile", str(p))
    assert r.returncode != 0
    assert f"field '{field}'" in r.stderr + r.stdout and msg in r.stderr + r.stdout


def test_cpu_rules_take_their_resources_and_ingest_options_from_the_config(tmp_path):
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["resources"] = {"ingest": {"threads": 2, "mem_mb": 12345, "runtime": 17}, "evaluate": {"mem_mb": 23456}}
    cfg["dataset"] |= {"generate": False, "test_list_csv": None, "sample_submission_csv": "sample_submission.csv",
                       "image_check": "decode"}
    data = tmp_path / "data" / "orchard-mini"    # the files of a downloaded dataset (a dry run only looks)
    data.mkdir(parents=True)
    for name in ("challenge-2019-train-detection-bbox.csv", "challenge-2019-train-detection-human-imagelabels.csv",
                 "challenge-2019-classes-description-500.csv", "challenge-2019-label500-hierarchy.json",
                 "sample_submission.csv"):
        (data / name).touch()
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", "-p", "results/ingest/images.parquet", "results/evaluate/postprocess/default/"
                  "tiny_a/val_a.json", "--configfile", str(p))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    ingest = out[out.index("rule ingest:"):]
    ingest = ingest[: ingest.index("rule ", 10)]
    assert "mem_mb=12345" in ingest and "runtime=17" in ingest, ingest
    assert "sample_submission.csv" in ingest and "--test-list" not in ingest
    assert "--image-check decode --workers 2" in ingest
    evaluate = out[out.index("rule evaluate:"):].split("\n\n")[0]
    assert "mem_mb=23456" in evaluate, evaluate


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
    assert names == {("postprocess", "default", m) for m in ("tiny_a", "tiny_b", "tiny_x", "tiny_e", "tiny_w",
                                                             "tiny_m")} | {
        ("ensemble", "default", "all"), ("ensemble", "default", "global"), ("autoensemble", "default", "search_val_a"),
        ("autoensemble", "default", "search_val_b"), ("segment", "default", "masks")}
    # the experts: each scored on its own classes only, contributing its targets only to `all`
    mined = json.loads((tmp_path / "results/experts/tiny_x.json").read_text())["targets"]
    ext = json.loads((tmp_path / "results/ingest_external/ext/targets.json").read_text())["targets"]
    ext_map = pd.read_csv(tmp_path / "data/orchard-mini/external/label_map.csv")
    assert sorted(ext) == sorted(set(ext_map["mid"]))
    for name, targets in (("tiny_x", mined), ("tiny_e", ext)):
        own = json.loads((tmp_path / f"results/evaluate/postprocess/default/{name}/val_a.json").read_text())
        assert set(own["per_class"]) <= set(targets) | set(json.loads(
            (tmp_path / "results/experts/tiny_x.json").read_text())["negatives"] if name == "tiny_x" else [])
    merged = read_table(tmp_path / "results/ensemble/default/all/val_a.parquet", "detections")
    for name, targets in (("tiny_x", mined), ("tiny_e", ext)):
        assert set(merged.loc[merged["model"] == name, "label"]) <= set(targets)
    gain = json.loads((tmp_path / "results/ablation/experts.json").read_text())
    assert {r["expert"] for r in gain} == {"tiny_x", "tiny_e"}
    assert {r["label"] for r in gain if r["expert"] == "tiny_e"} <= set(ext) | {"mean"}
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
    assert {(m["stage"], m["variant"]) for m in abl} == {
        ("ensemble", v) for v in ("concat_adj_nms", "reweight", "vote", "reweight_vote", "default")} | {
        ("autoensemble", "default")}
    md = (tmp_path / "results/ablation/ensemble.md").read_text()
    assert "| autoensemble | default | search_val_b |" in md and "| search_val_b | val_b | val_a | 3 |" in md
    # the auto ensemble: each search's tree over the 3 leaves, applied per shard and gathered, scores on both
    # validation splits what the search scored in process; its test detections made the submission
    from stages.ops.ensemble_tree import parse_tree

    for search, check in (("val_a", "val_b"), ("val_b", "val_a")):
        out = tmp_path / "results/autoensemble" / f"search_{search}"
        tree = parse_tree(json.loads((out / "tree.json").read_text()))
        assert sorted(tree.leaves) == ["tiny_a@128", "tiny_a@128flip", "tiny_b@128"]
        scores = json.loads((out / "scores.json").read_text())
        # at most the budget: a pass without gain stops the search early
        assert scores["chosen"]["tree"] == tree.to_json() and 0 < scores["candidates"] <= 24
        log = (out / "search.jsonl").read_text().splitlines()
        assert "header" in json.loads(log[0]) and len(log) - 1 == scores["computed"]   # a line per computed tree
        for split, key in ((search, "search_map"), (check, "check_map")):
            m = json.loads((tmp_path / "results/evaluate/autoensemble/default" / f"search_{search}" /
                            f"{split}.json").read_text())
            assert m["mAP"] == pytest.approx(scores["chosen"][key], abs=1e-12), (search, split)
    auto_test = read_table(tmp_path / "results/autoensemble/default/search_val_a/test.parquet", "detections")
    assert len(dets) == len(auto_test) > 0
    # the configured ensemble and its ablation variant with the same keys agree
    same = [read_table(tmp_path / f"results/ensemble/{v}/all/val_a.parquet", "detections")
            for v in ("default", "reweight_vote")]
    pd.testing.assert_frame_equal(*same)
    # the heavy rules left benchmark files
    for rule in ("postprocess", "ensemble", "gather", "evaluate", "autoensemble_search", "autoensemble_apply"):
        assert list((tmp_path / "benchmarks" / rule).rglob("*.tsv")), rule
    page = (tmp_path / "results/report.html").read_text()
    assert "<img" in page and 'alt="search_val_a tree"' in page and 'alt="search_val_b tree"' in page
    # a model card per model, with the images/s measured in training and the mAP of its evaluation; in the report
    for name in ("tiny_a", "tiny_b", "tiny_x", "tiny_e"):
        card = json.loads((tmp_path / f"results/train/{name}/card.json").read_text())
        assert card["model"] == name and card["throughput"]["img_per_s"] > 0 and card["flops"]["gflops"] > 0
        for split in ("val_a", "val_b"):
            ev = json.loads((tmp_path / f"results/evaluate/postprocess/default/{name}/{split}.json").read_text())
            assert card["evaluation"][split]["mAP"] == pytest.approx(ev["mAP"])
    assert "<h2 id='cards'>Model cards</h2>" in page and 'alt="mAP against GFLOPs"' in page
    # the model ablation gives the tail classes' mean AP beside the mAP
    models_abl = json.loads((tmp_path / "results/ablation/models.json").read_text())
    assert {r["name"] for r in models_abl} == {"tiny_a", "tiny_b", "tiny_w", "tiny_m"}
    assert {"tail_val_a", "tail_val_b", "Digit one val_a", "Digit seven val_b"} <= set(models_abl[0])
    # the weak labels: image-level-only images in train only; the variants started from tiny_a's weights, the
    # WSDDN one trained its branch, the mask-box one on the mask-derived boxes (their report names the class)
    images = read_table(tmp_path / "results/ingest/images.parquet", "images")
    splits = read_table(tmp_path / "results/split/splits.parquet", "splits").set_index("image_id")["split"]
    weak_ids = images.loc[~images["box_annotated"], "image_id"]
    assert len(weak_ids) == 8 and set(splits[weak_ids]) == {"train"}
    import torch

    w = torch.load(tmp_path / "results/train/tiny_w/model.pt", map_location="cpu", weights_only=False)
    assert w["config"]["weights"].endswith("results/train/tiny_a/model.pt") and w["config"]["wsddn"]
    assert any(k.startswith("wsddn.") for k in w["model"])
    report = json.loads((tmp_path / "results/mask_boxes/report.json").read_text())
    assert report["classes_chosen"] and report["boxes_added_total"] > 0, report
    m = torch.load(tmp_path / "results/train/tiny_m/model.pt", map_location="cpu", weights_only=False)
    a = torch.load(tmp_path / "results/train/tiny_a/model.pt", map_location="cpu", weights_only=False)
    assert m["data"]["boxes"] == a["data"]["boxes"] + report["boxes_added_total"]
    # the segmentation track: every test image in segmentation.csv, its masks decodable at the image size and
    # of segmentable classes; mask mAP on both validation splits; the ablation's rows; refined boxes per shard
    from stages.formats.seg_submission import read_segmentation_submission

    seg_sub = pd.read_csv(tmp_path / "segmentation.csv", keep_default_na=False)
    assert list(seg_sub.columns) == ["ImageID", "ImageWidth", "ImageHeight", "PredictionString"]
    assert sorted(seg_sub["ImageID"]) == sorted(test_ids)
    seg_masks = read_segmentation_submission(tmp_path / "segmentation.csv")
    seg_classes = read_table(tmp_path / "results/ingest/seg_classes.parquet", "classes")
    assert len(seg_masks) > 0 and set(seg_masks["label"]) <= set(seg_classes["label"])
    test_images = read_table(tmp_path / "results/ingest/test_images.parquet", "images").set_index("image_id")
    sizes = test_images.loc[seg_masks["image_id"], ["height", "width"]].to_numpy()
    assert (seg_masks[["mask_height", "mask_width"]].to_numpy() == sizes).all()
    rows = json.loads((tmp_path / "results/ablation/segmentation.json").read_text())
    masks_rows = {(r["variant"], r["boxes"]) for r in rows if r["measure"] == "mask mAP"}
    assert {("m_a (s32)", "refined"), ("m_a + s32_flip", "refined"), ("m_b (s32)", "refined")} <= masks_rows
    assert {b for v, b in masks_rows if v.startswith("vote")} == {"refined", "raw", "gt"}
    assert {r["boxes"] for r in rows if r["measure"] == "box AP@0.75"} == {"unrefined", "refined"}
    vote = next(r for r in rows if r["measure"] == "mask mAP" and r["variant"].startswith("vote")
                and r["boxes"] == "refined")
    for split in ("val_a", "val_b"):   # the ablation's vote is the pipeline's own masks, scored the same way
        m = json.loads((tmp_path / f"results/evaluate/segment/default/masks/{split}.json").read_text())
        assert m["mAP"] == pytest.approx(vote[split], abs=1e-12)
    for split in ("val_a", "test"):
        refined = pd.concat([read_table(tmp_path / f"results/refine/{split}/shard{i}.parquet", "detections")
                             for i in range(2)])
        final = read_table(tmp_path / f"results/autoensemble/default/search_val_a/{split}.parquet", "detections")
        assert len(refined) == len(final)
    # shards were written and gathered
    assert (tmp_path / "results/infer/tiny_a/test/shard1.parquet").exists()
    assert (tmp_path / "results/postprocess/default/tiny_a/val_a/shard1.parquet").exists()
    # nothing left to do
    again = snakemake(tmp_path, "-n", "--configfile", str(tiny_config))
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
