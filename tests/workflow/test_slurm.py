"""The slurm profile against a live Slurm: the mini 3-shard + gather workflow goes through sbatch and sacct.

Needs `sudo bash tests/slurm/up.sh` and ORCHARD_SLURM=1 (the CI script does both); skipped otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.slurm.helpers import MINI_SNAKEFILE, REPO, proc_report, require_slurm, run_snakemake_slurm

def test_profile_links_resolve_from_repo_root() -> None:
    """`snakemake --profile slurm` from the repo root finds workflow/profiles/slurm through the link."""
    link = REPO / "slurm"
    assert link.is_symlink() and link.resolve() == (REPO / "workflow" / "profiles" / "slurm").resolve()
    assert (link / "config.yaml").is_file()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_mini_workflow_runs_through_sbatch_and_retries_with_more_memory(tmp_path: Path) -> None:
    require_slurm()
    proc, jobs = run_snakemake_slurm(tmp_path, ["all"], ["--config", "shards=3", "shard0_min_mem_mb=600", "gather_gpus=1"],
                                     timeout=360, snakefile=MINI_SNAKEFILE)
    assert proc.returncode == 0, proc_report(proc)

    # Every job went through sbatch: sacct lists three shards, the failed first try of shard 0, and the gather.
    assert sorted(job.rule for job in jobs) == ["gather"] + ["square"] * 4, jobs
    states = sorted(job.state for job in jobs)
    assert states == ["COMPLETED"] * 4 + ["FAILED"], jobs
    failed = next(job for job in jobs if job.state == "FAILED")
    assert failed.comment == "rule_square_wildcards_0", failed

    # Each output was written inside the Slurm job sacct recorded for it, with the memory the attempt asked for:
    # 300 MB, and 600 MB for the retry of shard 0 (the profile's retries: 1 with mem_mb = 300 * attempt).
    done = {job.job_id for job in jobs if job.rule == "square" and job.state == "COMPLETED"}
    shards = [json.loads((tmp_path / "shards" / f"{i}.json").read_text()) for i in range(3)]
    assert [s["value"] for s in shards] == [0, 1, 4]
    assert {s["slurm_job_id"] for s in shards} == done
    assert [s["slurm_mem_per_node"] for s in shards] == ["600", "300", "300"]
    assert int(shards[0]["slurm_job_id"]) > int(failed.job_id)

    # The gather asked for gpu=1 and cpus_per_gpu=1: Slurm allocated one (fake) GPU and one CPU to it.
    gather = next(job for job in jobs if job.rule == "gather")
    total = json.loads((tmp_path / "total.json").read_text())
    assert total["total"] == 5 and total["shards"] == [0, 1, 2]
    assert total["slurm_job_id"] == gather.job_id
    assert "gres/gpu=1" in gather.alloc_tres.split(",") and "cpu=1" in gather.alloc_tres.split(","), gather
    assert total["cuda_visible_devices"] != ""
