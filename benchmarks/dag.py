"""DAG-building benchmark: `snakemake -n` of the challenge config (configs/oid2019.yaml) against empty stand-ins
of the OpenImages files, timed as a whole process, next to the floor measured in the same run: Snakemake's dry
run of a workflow with as many jobs of one trivial rule (an output, a log, a benchmark file and a params function
each, one input) in the same interpreter.

    python benchmarks/dag.py [--repeats 3] [--configfile configs/oid2019.yaml]

Prints each run's wall time, the median, the jobs, milliseconds per job of both workflows, and peak RSS.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.workflow.test_challenge_config import EXTERNAL_STUBS, STUB_FILES  # noqa: E402

FLOOR = '''
N = {jobs}

rule all:
    input: expand("out/{{i}}.txt", i=range(N))

rule one:
    input: "in.txt"
    output: "out/{{i}}.txt"
    log: "logs/{{i}}.log"
    benchmark: "benchmarks/{{i}}.tsv"
    params: x=lambda wildcards: wildcards.i
    shell: "echo {{params.x}} > {{output}} 2> {{log}}"
'''


def dry_run(snakefile: Path, workdir: Path, *args: str) -> tuple[float, float, str]:
    """(wall s, peak RSS MB, output) of one `snakemake -n` in a fresh process (no .snakemake state)."""
    subprocess.run(["rm", "-rf", str(workdir / ".snakemake")], check=True)
    code = ("import resource, sys, runpy; sys.argv = ['snakemake'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('snakemake', run_name='__main__')\n"
            "finally:\n    print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, "-s", str(snakefile), "-d", str(workdir), "--cores", "2", "-n",
                        "--quiet", "rules", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise SystemExit(f"snakemake -n failed:\n{out[-3000:]}")
    peak = int(re.findall(r"PEAK_KB (\d+)", out)[-1]) / 1024
    return wall, peak, out


def jobs_of(out: str) -> int:
    return int(re.search(r"^total\s+(\d+)$", out, re.M).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configfile", type=Path, default=ROOT / "configs" / "oid2019.yaml")
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        work, floor = Path(tmp) / "challenge", Path(tmp) / "floor"
        for name in STUB_FILES + EXTERNAL_STUBS:
            (work / "data" / "oid2019" / name).parent.mkdir(parents=True, exist_ok=True)
            (work / "data" / "oid2019" / name).touch()
        rows = {"challenge DAG": [], "floor": []}
        jobs = None
        for r in range(a.repeats):
            wall, peak, out = dry_run(ROOT / "Snakefile", work, "--configfile", str(a.configfile))
            jobs = jobs_of(out)
            rows["challenge DAG"].append((wall, peak))
            if r == 0:
                floor.mkdir()
                (floor / "Snakefile").write_text(FLOOR.format(jobs=jobs - 1))
                (floor / "in.txt").touch()
            rows["floor"].append(dry_run(floor / "Snakefile", floor)[:2])
            print(f"  run {r + 1}: challenge DAG {wall:.1f} s, floor {rows['floor'][-1][0]:.1f} s", flush=True)
    print(f"\n[snakemake -n --quiet rules, {jobs} jobs, {a.repeats} runs each, alternating]")
    for name, runs in rows.items():
        med = statistics.median(w for w, _ in runs)
        print(f"  {name:14s} median {med:5.1f} s ({1000 * med / jobs:.2f} ms a job), "
              f"min {min(w for w, _ in runs):.1f}, max {max(w for w, _ in runs):.1f}, "
              f"peak RSS {max(p for _, p in runs):.0f} MB")
    ratio = statistics.median(w for w, _ in rows["challenge DAG"]) / statistics.median(w for w, _ in rows["floor"])
    print(f"  challenge DAG / floor: x{ratio:.2f}   (target: the challenge DAG <= 30 s)")


if __name__ == "__main__":
    main()
