"""The full challenge setup builds its DAG against a stub directory of OpenImages files, quickly; a change reruns
exactly the rules that read it: post-processing parameters never retrain or re-infer, a model's resources rerun
nothing, its inference keys rerun its inference and what follows, its training keys retrain that model alone, an
expert model's mining keys re-mine and retrain that expert alone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tests.workflow.test_dag import ROOT, TINY, job_counts, snakemake

STUB_FILES = ["challenge-2019-train-detection-bbox.csv", "challenge-2019-train-detection-human-imagelabels.csv",
              "challenge-2019-classes-description-500.csv", "challenge-2019-label500-hierarchy.json",
              "sample_submission.csv", "challenge-2019-classes-description-segmentable.csv",
              "challenge-2019-label300-segmentable-hierarchy.json", "challenge-2019-train-segmentation-masks.csv"]


EXTERNAL_STUBS = ["coco/annotations/instances_train2017.json", "objects365/annotations/objects365_train.json"]


def stub_dataset(workdir: Path) -> None:
    stub = workdir / "data" / "oid2019"
    stub.mkdir(parents=True)
    for name in STUB_FILES + EXTERNAL_STUBS:
        (stub / name).parent.mkdir(parents=True, exist_ok=True)
        (stub / name).touch()


def test_oid2019_dag_builds_from_stub_files(tmp_path: Path) -> None:
    stub_dataset(tmp_path)
    t0 = time.perf_counter()
    r = snakemake(tmp_path, "-n", "--quiet", "rules", "--configfile", str(ROOT / "configs" / "oid2019.yaml"))
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    counts = job_counts(r.stdout + r.stderr)
    print(f"oid2019 DAG: {counts['total']} jobs built in {seconds:.1f} s: {counts}")
    cfg = yaml.safe_load((ROOT / "configs" / "oid2019.yaml").read_text())
    n_models, shards = len(cfg["models"]), cfg["infer"]["shards"]
    n_experts = sum(1 for m in cfg["models"].values() if m.get("expert_of"))
    data = [m["train_data"] for m in cfg["models"].values() if m.get("train_data")]
    # the zoo and the paper's 3 + 2 + 8 expert models: 3 mined, 2 of COCO, 8 of Objects365
    assert (n_models, n_experts, data.count("coco"), data.count("objects365")) == (28 + 13, 3, 2, 8)
    assert counts["train"] == 28 + 13 and counts["anchors"] == n_models
    assert counts["experts"] == n_experts and counts["ingest_external"] == 2
    assert counts["infer"] == n_models * 3 * shards           # val_a, val_b, test
    # validation splits; the ablation variants of one model / group: 4 each; on test, the auto ensemble's leaves:
    # its models (the experts) and naive groups (the backbones)
    leaves = cfg["autoensemble"]["leaves"]
    assert (len(leaves["models"]), len(leaves["groups"]), leaves["views"]) == (13, 8, False)
    # the 28 global models per family (paper 7.3): 4 variants (DH, + DCN, + cascade, + both) of each ResNet-family
    # trunk, 2 (DH, + cascade) of EfficientNet-B7 and NASNet-A large (no DCN there)
    glob = {n: m for n, m in cfg["models"].items() if not m.get("expert_of") and not m.get("train_data")}
    family = {"senet154": "SENet", "seresnext101_32x4d": "SENet", "resnext101_64x4d": "ResNeXt",
              "resnext101_32x8d": "ResNeXt", "resnet152": "ResNet", "resnet101": "ResNet",
              "efficientnet_b7": "EfficientNet", "nasnetalarge": "NASNet"}
    per_family = {}
    for m in glob.values():
        per_family[family[m["backbone"]]] = per_family.get(family[m["backbone"]], 0) + 1
    assert per_family == {"SENet": 8, "ResNeXt": 8, "ResNet": 8, "EfficientNet": 2, "NASNet": 2}
    assert all(m["head"] == "tsd" for m in glob.values())
    assert not any(m.get("dcn") for m in glob.values() if family[m["backbone"]] in ("EfficientNet", "NASNet"))
    assert counts["postprocess"] == (n_models + 4) * 2 * shards + 13 * shards
    assert counts["ensemble"] == (len(cfg["ensemble"]["groups"]) + 4) * 2 * shards + len(leaves["groups"]) * shards
    # two searches (on val_a, on val_b), each applied to both validation splits; the first to test too
    assert counts["autoensemble_search"] == 2 and counts["autoensemble_apply"] == (2 * 2 + 1) * shards
    assert counts["evaluate"] == (n_models + 4 + len(cfg["ensemble"]["groups"]) + 4) * 2 + 2 * 2
    assert counts["gather"] == counts["evaluate"] + 1    # + the auto ensemble's test detections
    # the segmentation track: 4 HRNet-W48 mask models, each on the refined boxes of val_a / val_b / test and,
    # for the ablation, the unrefined and the ground-truth boxes of val_a / val_b; per image shard
    seg = cfg["segmentation"]
    assert len(seg["models"]) == 4 and {m["backbone"] for m in seg["models"].values()} == {"hrnet_w48"}
    assert cfg["refiner"]["detector"] in cfg["models"]
    assert (counts["ingest_masks"], counts["train_masks"], counts["train_refiner"]) == (1, 4, 1)
    assert counts["refine"] == counts["segment"] == 3 * shards
    assert counts["infer_masks"] == 4 * (3 + 2 + 2) * shards
    assert counts["evaluate_seg"] == 2 and counts["submit_seg"] == counts["seg_ablation"] == 1
    assert seconds < 150, "this bound only catches blow-ups (34-58 s alone, 104 s beside a make run)"


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


@pytest.fixture(scope="module")
def finished_challenge_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(work directory, config): the challenge config (one image shard) in a directory where its whole DAG looks
    finished: every output exists, and a ``--touch --forceall`` run recorded each job's metadata (parameters,
    code, input files), which is what Snakemake compares to decide a rerun."""
    work = tmp_path_factory.mktemp("oid2019")
    stub_dataset(work)
    cfg = yaml.safe_load((ROOT / "configs" / "oid2019.yaml").read_text())
    cfg["infer"]["shards"] = 1
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = snakemake(work, "--summary", "--configfile", str(path))
    assert summary.returncode == 0, summary.stderr[-3000:]
    outputs = [line.split("\t")[0] for line in summary.stdout.splitlines()[1:] if "\t" in line]
    assert "results/train/resnet152_tsd/model.pt" in outputs and "submission.csv" in outputs
    for name in outputs:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).touch()
    touched = snakemake(work, "--touch", "--forceall", "--configfile", str(path))
    assert touched.returncode == 0, touched.stderr[-3000:]
    assert job_counts(dry_run(work, cfg)) == {}
    return work, cfg


def dry_run(work: Path, cfg: dict) -> str:
    path = work / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = snakemake(work, "-n", "--quiet", "rules", "--configfile", str(path))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r.stdout + r.stderr


def rerun_after(run: tuple[Path, dict], model: str, **change) -> dict[str, int]:
    """Jobs per rule that a dry run schedules after ``change`` to one model's section."""
    work, cfg = run
    changed = yaml.safe_load(yaml.safe_dump(cfg))
    changed["models"][model].update(change)
    return job_counts(dry_run(work, changed))


@pytest.mark.slow
def test_changing_a_resource_reruns_nothing(finished_challenge_run) -> None:
    counts = rerun_after(finished_challenge_run, "resnet152_tsd", gpus=4, nodes=2, gpu_model="h100",
                         cpus_per_gpu=8, threads=2, workers=7, mem_mb=64000,
                         runtime_min=60)
    assert counts == {}
    work, cfg = finished_challenge_run
    changed = yaml.safe_load(yaml.safe_dump(cfg))
    for rule in ("ingest", "split", "ensemble", "evaluate", "submit", "report", "autoensemble_search"):
        changed["resources"][rule] = {"threads": 3, "mem_mb": 99000, "runtime": 7}
    assert job_counts(dry_run(work, changed)) == {}


@pytest.mark.slow
def test_changing_an_inference_key_reruns_inference_and_what_follows(finished_challenge_run) -> None:
    counts = rerun_after(finished_challenge_run, "resnet152_tsd", test_scales=[800, 1200])
    assert counts["infer"] == 3 and counts["postprocess"] == 2      # val_a, val_b, test; the validation splits
    assert counts["submit"] == 1
    for upstream in ("ingest", "split", "sample", "anchors", "train", "experts"):
        assert upstream not in counts, counts
    assert rerun_after(finished_challenge_run, "resnet152_tsd", box_nms_thresh=0.6)["infer"] == 3
    counts = rerun_after(finished_challenge_run, "resnet152_tsd", expert=True)    # the background gate
    assert counts["infer"] == 3 and "train" not in counts


@pytest.mark.slow
def test_changing_a_training_key_retrains_that_model_only(finished_challenge_run) -> None:
    counts = rerun_after(finished_challenge_run, "resnet152_tsd", lr=0.01)
    assert counts["train"] == 1 and counts["infer"] == 3 and counts["submit"] == 1
    for upstream in ("ingest", "split", "sample", "anchors", "experts"):
        assert upstream not in counts, counts
    # a key the anchors rule reads too
    counts = rerun_after(finished_challenge_run, "resnet152_tsd", anchor_scales=[8, 12, 16])
    assert counts["anchors"] == 1 and counts["train"] == 1


@pytest.mark.slow
def test_changing_an_experts_key_remines_and_retrains_that_expert_only(finished_challenge_run) -> None:
    counts = rerun_after(finished_challenge_run, "resnet101_tsd_expert1", expert_sim_thr=0.5)
    assert counts["experts"] == 1 and counts["train"] == 1 and counts["infer"] == 3
    assert "anchors" not in counts
