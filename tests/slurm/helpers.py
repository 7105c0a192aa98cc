"""Run Snakemake through the repo's slurm profile against the live test Slurm started by tests/slurm/up.sh.

    from tests.slurm.helpers import require_slurm, run_snakemake_slurm

    require_slurm()                                     # pytest.skip with the reason when no live Slurm
    proc, jobs = run_snakemake_slurm(workdir, ["submission.csv"], ["--configfile", cfg], timeout=900)
    assert proc.returncode == 0, proc_report(proc)
    assert {"train", "infer", "submission"} <= {job.rule for job in jobs}

Snakemake runs from the repo root (so `--profile slurm` resolves to the `slurm` link) under `timeout -s KILL`:
without a working `sacct` the executor can lose jobs and wait forever, and a hung run must not hang CI.
The jobs of one run are found in `sacct` by the executor's run ID, which it uses as every job's name.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MINI_SNAKEFILE = REPO / "tests" / "slurm" / "mini" / "Snakefile"

# snakemake 9.14.0 .. 9.14.4 fail every job inside Slurm with `assert self.workflow.is_main_process`
# (snakemake issues #3853/#3874, fixed by PR #3881); 9.14.5 is verified to work with this harness.
_BROKEN_SNAKEMAKE = ((9, 14, 0), (9, 14, 5))

# The single-node test cluster has job states in slurmdbd within a second; the profile's 20 s is for real ones.
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "5")

_RUN_ID = re.compile(r"SLURM run ID: ([0-9a-f-]{36})")


@dataclass(frozen=True)
class SacctJob:
    """One Slurm job as `sacct` records it. `name` is the executor's run ID; `rule` comes from the comment."""

    job_id: str
    name: str
    state: str
    comment: str
    alloc_tres: str  # e.g. "billing=1,cpu=1,gres/gpu=1,mem=300M,node=1"

    @property
    def rule(self) -> str:
        """The Snakemake rule (or group) the job ran: the comment is `rule_<name>[_wildcards_<values>]`."""
        return self.comment.removeprefix("rule_").split("_wildcards_")[0]


def slurm_unavailable_reason() -> str | None:
    """Why the live-Slurm tests cannot run here, or None when they can."""
    if os.environ.get("ORCHARD_SLURM") != "1":
        return "needs a live Slurm: run `sudo bash tests/slurm/up.sh` and set ORCHARD_SLURM=1"
    for tool in ("sbatch", "sacct", "sinfo"):
        if shutil.which(tool) is None:
            return f"ORCHARD_SLURM=1 but `{tool}` is not on PATH (run tests/slurm/up.sh)"
    return None


def require_slurm() -> None:
    """Skip the calling test (pytest.skip) unless a live Slurm is announced and reachable; fail if it is broken."""
    import pytest

    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if states.returncode != 0 or not {"idle", "mix", "alloc"} & set(states.stdout.split()):
        pytest.fail(f"ORCHARD_SLURM=1 but no usable Slurm node: sinfo says {states.stdout!r} {states.stderr!r}")
    problem = snakemake_version_problem()
    if problem:
        pytest.fail(problem)


def snakemake_version_problem(python: str = sys.executable) -> str | None:
    """A message when `python`'s snakemake is a release known to break Slurm jobs, else None."""
    out = subprocess.run(
        [python, "-c", "import snakemake; print(snakemake.__version__)"], capture_output=True, text=True
    )
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", out.stdout.strip())
    if not match:
        return f"cannot tell the snakemake version of {python}: {out.stdout!r} {out.stderr!r}"
    version = tuple(int(part) for part in match.groups())
    low, high = _BROKEN_SNAKEMAKE
    if low <= version < high:
        return (
            f"snakemake {out.stdout.strip()} fails every job inside Slurm (AssertionError is_main_process, "
            "snakemake#3853); use snakemake>=9.14.5"
        )
    return None


def sacct_jobs(run_id: str) -> list[SacctJob]:
    """The jobs `sacct` lists under one executor run ID (allocations only, no job steps), in job order."""
    out = subprocess.run(
        ["sacct", "-X", "--parsable2", "--noheader", "--starttime", "now-2days", "--name", run_id,
         "--format=JobIDRaw,JobName,State,AllocTRES,Comment"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    jobs = []
    for line in out.stdout.splitlines():
        job_id, name, state, tres, comment = line.split("|", 4)
        jobs.append(SacctJob(job_id=job_id, name=name, state=state, comment=comment, alloc_tres=tres))
    return sorted(jobs, key=lambda job: int(job.job_id))


def run_snakemake_slurm(
    workdir: Path | str,
    targets: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    timeout: int = 600,
    *,
    snakefile: Path | str | None = None,
    python: str = sys.executable,
) -> tuple[subprocess.CompletedProcess[str], list[SacctJob]]:
    """Run `snakemake --profile slurm -d <workdir> ... <targets>` from the repo root, killed after `timeout` s.

    Returns the completed process (stdout holds Snakemake's log; returncode -9 or 137 means it was killed) and
    the `sacct` records of every job it submitted. After a kill, that run's jobs still queued or running are
    cancelled so they do not outlive the test.
    """
    # Targets first: options such as --config take any number of values and would swallow them.
    cmd = ["timeout", "-s", "KILL", str(timeout), python, "-m", "snakemake", *targets, "--profile", "slurm",
           "-d", str(workdir)]
    if snakefile is not None:
        cmd += ["-s", str(snakefile)]
    cmd += [*FAST_POLLING, *extra_args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not an outer job's settings
    if not env.get("USER"):
        env["USER"] = _user_name()  # the executor reads $USER to find the account; some shells leave it unset
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout + 60,
    )
    match = _RUN_ID.search(proc.stdout)
    if match is None:
        return proc, []
    run_id = match.group(1)
    if proc.returncode != 0:
        subprocess.run(["scancel", "--name", run_id], capture_output=True, timeout=60)
    return proc, sacct_jobs(run_id)


def proc_report(proc: subprocess.CompletedProcess[str], tail: int = 60) -> str:
    """The command, its exit status and the last lines of its output, for an assertion message."""
    lines = proc.stdout.splitlines()[-tail:]
    return f"{' '.join(map(str, proc.args))}\nexit {proc.returncode}; last {len(lines)} lines:\n" + "\n".join(lines)


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
