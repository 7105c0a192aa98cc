"""The one table at the end of benchmarks/gpu.sh, from what its parts left in the log folder: ``<part>.rc``
("exit status, milliseconds"), compare.json (benchmarks/compare_submissions.py --out), train_infer.json,
postprocess.json and metric.json (the benchmarks' --json).

    python benchmarks/gpu_summary.py LOG_DIR      # prints the table; exit 0 when every part ran and passed
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEAD = ("check", "figure", "CPU baseline", "CUDA", "ratio / pass")


def _status(log: Path, name: str) -> tuple[int | None, float | None]:
    try:
        rc, ms = (log / f"{name}.rc").read_text().split()
        return int(rc), int(ms) / 1000
    except (OSError, ValueError):
        return None, None


def _load(log: Path, name: str) -> dict | None:
    try:
        return json.loads((log / name).read_text())
    except (OSError, ValueError):
        return None


def summarize(log: Path) -> tuple[list[tuple[str, ...]], bool]:
    rows: list[tuple[str, ...]] = []
    ok = True

    def ran(name: str) -> bool:
        nonlocal ok
        rc, _ = _status(log, name)
        if rc == 0:
            return True
        ok = False
        why = "did not run" if rc is None else ("timeout" if rc in (124, 137) else f"failed (rc {rc})")
        rows.append((name, f"{why}, see {name}.log", "", "", "FAIL"))
        return False

    if ran("dag_cpu") & ran("dag_cuda"):
        c_s, g_s = _status(log, "dag_cpu")[1], _status(log, "dag_cuda")[1]
        rows.append(("dag", "tiny DAG wall time, s (cpu vs cuda run, concurrently)", f"{c_s:.0f}", f"{g_s:.0f}",
                     f"x{c_s / g_s:.2f}"))
    cmp_ = _load(log, "compare.json")
    if cmp_ is None:
        ok = False
        rows.append(("dag", "submission / metrics comparison: no result, see compare.log", "", "", "FAIL"))
    else:
        fails = cmp_["failures"]
        ok &= _status(log, "compare")[0] == 0 and not fails
        agree = "FAIL" if any("box agreement" in f for f in fails) else "PASS"
        rows.append(("dag", "submission box agreement (same image+label, IoU>=0.5)", f"{cmp_['n_boxes_b']} boxes",
                     f"{cmp_['n_boxes_a']} boxes", f"{100 * cmp_['box_agreement']:.1f}% {agree}"))
        rows.append(("dag", "matched boxes: max |score diff|, max |coord diff|", "",
                     f"{cmp_['max_score_diff']:.3g}, {cmp_['max_coord_diff']:.3g}", "reported"))
        mm = cmp_.get("metrics_max_diff")
        mpass = "FAIL" if any("metrics tables" in f for f in fails) or mm is None else "PASS"
        rows.append(("dag", f"metrics.json: max |val_a/val_b mAP diff| ({cmp_.get('metrics_rows')} rows)", "",
                     "-" if mm is None else f"{mm:.4f}", mpass))
    ti = _load(log, "train_infer.json")
    if ran("train_infer") and ti:
        r = {x["name"]: x for x in ti["rows"]}
        base = r["torchvision frcnn R50-FPN fp32"]
        for name in ("R50-FPN TSD fp32", "R50-FPN TSD AMP+CL"):
            for what in ("train", "infer"):
                b, v = base[f"{what}_img_s"], r[name][f"{what}_img_s"]
                rows.append(("train_infer", f"{name} {what} img/s (baseline: torchvision fp32, cuda)", f"{b:.1f}",
                             f"{v:.1f}", f"x{v / b:.2f}"))
        g = ti["tsd_amp_vs_torchvision_infer"]
        rows.append(("train_infer", "goal: TSD AMP+CL infer >= 2x torchvision fp32", "", f"x{g:.2f}",
                     "PASS" if g >= 2 else "below goal"))
        g = ti["tsd_cost_over_sibling_amp"]
        rows.append(("train_infer", "goal: TSD cost <= 1.25x sibling (AMP+CL)", "", f"x{g:.2f}",
                     "PASS" if g <= 1.25 else "above goal"))
    pp = _load(log, "postprocess.json")
    if ran("postprocess") and pp:
        same = bool(pp["same_kept"])
        rows.append(("postprocess", f"soft-NMS {pp['images']}x{pp['boxes']} boxes, s (numpy vs torch {pp['device']})",
                     f"{pp['soft_nms_numpy_s']:.3f}", f"{pp['soft_nms_torch_s']:.3f}",
                     f"x{pp['soft_nms_numpy_s'] / pp['soft_nms_torch_s']:.2f} "
                     f"{'same boxes' if same else 'DIFFERENT boxes FAIL'}"))
        ok &= same
    me = _load(log, "metric.json")
    if ran("metric") and me:
        for d in me.get("detection", []):
            rows.append(("metric", f"OpenImages metric, {me['images']} images x {d['per_image']} dets, s",
                         f"{d['seconds']:.2f}", "-", "numpy only"))
            k = d.get("overlap_kernel")
            if k:
                same = k["max_abs_diff"] <= 1e-12
                ok &= same
                rows.append(("metric", f"its paired IoU, {k['pairs']} pairs, s (numpy vs torch {me['device']})",
                             f"{k['numpy_s']:.4f}", f"{k['torch_s']:.4f}",
                             f"x{k['numpy_s'] / k['torch_s']:.2f} max|diff| {k['max_abs_diff']:.0e}"
                             + ("" if same else " FAIL")))
    return rows, ok


def table(rows: list[tuple[str, ...]]) -> str:
    w = [max(len(str(r[i])) for r in [HEAD, *rows]) for i in range(len(HEAD))]
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(HEAD)), "  ".join("-" * x for x in w)]
    lines += ["  ".join(str(v).ljust(w[i]) for i, v in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    log = Path((argv if argv is not None else sys.argv[1:])[0])
    rows, ok = summarize(log)
    print("\n" + table(rows))
    print(f"\noverall: {'PASS' if ok else 'FAIL'} (logs and figures in {log})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
