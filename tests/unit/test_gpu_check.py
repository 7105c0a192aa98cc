"""benchmarks/gpu.sh and the --device/--quick/--json options it uses, on this machine's CPU: without CUDA the
script says so and measures nothing; the CPU paths of the options run; the summary table reads the parts' files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_summary  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu.sh would measure")
def test_gpu_sh_without_cuda_measures_nothing(tmp_path):
    env = os.environ | {"PY": sys.executable, "OUT": str(tmp_path / "out")}
    p = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh")], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "CUDA is not available" in p.stdout and "nothing was measured" in p.stdout
    assert not list((tmp_path / "out").glob("*.json"))


def test_gpu_sh_with_a_python_without_torch_is_an_error(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'No module named torch' >&2\nexit 1\n")
    fake.chmod(0o755)
    p = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh")], capture_output=True, text=True,
                       env=os.environ | {"PY": str(fake), "OUT": str(tmp_path / "out")}, timeout=60)
    assert p.returncode == 1 and "cannot import torch" in p.stderr


def test_gpu_sh_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks/gpu.sh")]).returncode == 0


def _write_parts(log, *, agreement=0.8, same=True, dag_rc=0):
    log.mkdir()
    for name, rc, ms in (("dag_cpu", 0, 200000), ("dag_cuda", dag_rc, 100000), ("compare", 0, 900),
                         ("train_infer", 0, 60000), ("postprocess", 0, 9000), ("metric", 0, 5000)):
        (log / f"{name}.rc").write_text(f"{rc} {ms}\n")
    (log / "compare.json").write_text(json.dumps({
        "n_boxes_a": 100, "n_boxes_b": 110, "box_agreement": agreement, "max_score_diff": 0.01,
        "max_coord_diff": 0.02, "metrics_max_diff": 0.01, "metrics_rows": 9,
        "failures": [] if agreement >= 0.5 else ["box agreement 0.3 < 0.5"]}))
    names = ["torchvision frcnn R50-FPN fp32", "R50-FPN sibling fp32", "R50-FPN sibling AMP+CL", "R50-FPN TSD fp32",
             "R50-FPN TSD AMP+CL"]
    (log / "train_infer.json").write_text(json.dumps({
        "rows": [{"name": n, "train_img_s": 10.0 + i, "infer_img_s": 20.0 + 10 * i} for i, n in enumerate(names)],
        "tsd_amp_vs_torchvision_infer": 3.0, "tsd_cost_over_sibling_amp": 1.1}))
    (log / "postprocess.json").write_text(json.dumps({
        "device": "cuda", "images": 1000, "boxes": 300, "soft_nms_numpy_s": 0.2, "soft_nms_torch_s": 0.05,
        "same_kept": same}))
    (log / "metric.json").write_text(json.dumps({"device": "cuda", "images": 2000, "detection": [
        {"per_image": 100, "seconds": 0.2, "overlap_kernel": {"pairs": 1000, "numpy_s": 0.01, "torch_s": 0.001,
                                                              "max_abs_diff": 0.0}}]}))


def test_summary_table_of_passing_parts(tmp_path, capsys):
    _write_parts(tmp_path / "log")
    assert gpu_summary.main([str(tmp_path / "log")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split() == ["check", "figure", "CPU", "baseline", "CUDA", "ratio", "/", "pass"]
    assert any(x.startswith("dag") and "200" in x and "100" in x and "x2.00" in x for x in lines)
    assert any("80.0% PASS" in x for x in lines)
    assert any(x.startswith("train_infer") and "R50-FPN TSD AMP+CL infer" in x and "x3.00" in x for x in lines)
    assert any(x.startswith("postprocess") and "x4.00 same boxes" in x for x in lines)
    assert any(x.startswith("metric") and "x10.00" in x for x in lines)
    assert "overall: PASS" in out


@pytest.mark.parametrize("kw, expect", [({"agreement": 0.3}, "30.0% FAIL"), ({"same": False}, "DIFFERENT boxes"),
                                        ({"dag_rc": 124}, "timeout, see dag_cuda.log")])
def test_summary_table_of_failing_parts(tmp_path, capsys, kw, expect):
    _write_parts(tmp_path / "log", **kw)
    assert gpu_summary.main([str(tmp_path / "log")]) == 1
    out = capsys.readouterr().out
    assert expect in out and "overall: FAIL" in out


def test_summary_of_nothing(tmp_path, capsys):
    (tmp_path / "log").mkdir()
    assert gpu_summary.main([str(tmp_path / "log")]) == 1
    assert "did not run" in capsys.readouterr().out


def _run(args, timeout=120):
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow   # about 5 s alone, over 10 s on a loaded 2-core machine (ensemble_boxes and torch imports)
def test_postprocess_benchmark_device_cpu(tmp_path):
    out = _run(["benchmarks/postprocess.py", "--device", "cpu", "--quick", "--images", "40", "--boxes", "60",
                "--ref-images", "10", "--skip", "cli", "ensemble", "memory", "--json", str(tmp_path / "f.json")])
    f = json.loads((tmp_path / "f.json").read_text())
    assert "torch path on cpu" in out and f["device"] == "cpu" and f["images"] == 40
    assert f["same_kept"] is True and f["identical_to_ensemble_boxes"] is True
    assert f["soft_nms_numpy_s"] > 0 and f["soft_nms_torch_s"] > 0


@pytest.mark.slow   # about 4 s alone (the real 3,519-image OpenImages sample is read), more when loaded
def test_metric_benchmark_device_cpu(tmp_path):
    out = _run(["benchmarks/metric.py", "--device", "cpu", "--quick", "--images", "300", "--ref-images", "20",
                "--skip", "segmentation", "--json",
                str(tmp_path / "f.json")])
    f = json.loads((tmp_path / "f.json").read_text())
    (row,) = f["detection"]
    assert f["images"] == 300 and row["per_image"] == 100 and row["max_abs_dap"] == 0.0
    k = row["overlap_kernel"]
    assert k["pairs"] > 0 and k["max_abs_diff"] == 0.0 and "torch on cpu" in out


@pytest.mark.slow
def test_train_infer_r50_rows_json_on_cpu(tmp_path):
    """The R50-FPN comparison gpu.sh runs on CUDA, here on the CPU at 64 px: every variant (AMP = bfloat16
    autocast, channels-last) trains and infers, and --json holds the rows and the goal ratios."""
    _run(["benchmarks/train_infer.py", "--r50", "--size", "64", "--iters", "1", "--batch-size", "1", "--json",
          str(tmp_path / "t.json")], timeout=300)
    f = json.loads((tmp_path / "t.json").read_text())
    assert [r["name"] for r in f["rows"]] == ["torchvision frcnn R50-FPN fp32", "R50-FPN sibling fp32",
                                             "R50-FPN sibling AMP+CL", "R50-FPN TSD fp32", "R50-FPN TSD AMP+CL"]
    assert all(r["train_img_s"] > 0 and r["infer_img_s"] > 0 for r in f["rows"])
    assert f["tsd_amp_vs_torchvision_infer"] > 0 and f["tsd_cost_over_sibling_amp"] > 0
