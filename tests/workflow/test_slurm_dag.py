"""The real DAG through `--profile slurm` against a live Slurm (tests/slurm/up.sh): a reduced default DAG — a
training job, inference shards and the submission — goes through sbatch, and its submission equals the one a
local run of the same config writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.slurm.helpers import REPO, proc_report, require_slurm, run_snakemake_slurm
from tests.workflow.test_dag import TINY, snakemake

SLURM_TINY = {**TINY, "models": {"tiny_a": TINY["models"]["tiny_a"]}, "infer": {"shards": 2}}


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_reduced_dag_through_slurm_matches_local_run(tmp_path: Path) -> None:
    require_slurm()
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(SLURM_TINY))

    local = snakemake(tmp_path / "local", "submission.csv", "--configfile", str(cfg))
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-4000:]

    proc, jobs = run_snakemake_slurm(tmp_path / "slurm", ["submission.csv"], ["--configfile", str(cfg)],
                                     timeout=1200, snakefile=REPO / "Snakefile")
    assert proc.returncode == 0, proc_report(proc)
    rules = [job.rule for job in jobs]
    assert "train" in rules and "submit" in rules, jobs
    # 2 shards x (test, val_a, val_b: the auto ensemble that makes the submission is searched on val_a and
    # confirmed on val_b)
    assert rules.count("infer") == 2 * 3, jobs
    assert all(job.state == "COMPLETED" for job in jobs), jobs

    ours = (tmp_path / "slurm" / "submission.csv").read_text()
    assert ours.splitlines()[0] == "ImageId,PredictionString" and len(ours.splitlines()) == 1 + 4
    assert ours == (tmp_path / "local" / "submission.csv").read_text()
