"""The training launcher: python, torchrun or srun + torchrun from a job's GPUs and nodes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.core.launch import launch_command


def test_one_gpu_or_none_runs_python_itself():
    assert launch_command(0, 1, ["-m", "stages.train"]) == [sys.executable, "-m", "stages.train"]
    assert launch_command(1, 1, ["-m", "stages.train"]) == [sys.executable, "-m", "stages.train"]


def test_several_gpus_run_torchrun_one_process_per_gpu():
    assert launch_command(8, 1, ["-m", "stages.train", "--x"]) == [
        "torchrun", "--standalone", "--nproc_per_node", "8", "-m", "stages.train", "--x"]


def test_several_nodes_run_one_torchrun_per_node_in_the_slurm_job():
    cmd = launch_command(4, 2, ["-m", "stages.train"], env={"SLURM_JOB_ID": "123"})
    assert cmd[:8] == ["srun", "--ntasks-per-node=1", "torchrun", "--nnodes", "2", "--nproc_per_node", "4",
                       "--rdzv_backend"]
    assert cmd[cmd.index("--rdzv_id") + 1] == "123" and cmd[-2:] == ["-m", "stages.train"]
    assert cmd[cmd.index("--rdzv_endpoint") + 1].endswith(":29500")
    with pytest.raises(ValueError, match="SLURM_JOB_ID"):
        launch_command(4, 2, ["-m", "stages.train"], env={})


def test_the_module_replaces_itself_with_the_command():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-m", "stages.core.launch", "0", "1", "-c", "import sys; print(sys.argv)",
                        "a b"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['-c', 'a b']"
