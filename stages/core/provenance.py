"""Which code wrote a file: the git commit (and whether tracked files differ from it) when the package runs from
a git checkout, the package version otherwise. Computed once per process (two ``git`` calls), never failing:
no git, no repository or a slow git all fall back to the version."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import stages

PACKAGE_DIR = Path(stages.__file__).resolve().parent


def _git(where: Path, *args: str) -> str | None:
    """stdout of ``git -C where args`` or None when git is missing, fails or takes over 10 s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}  # no GIT_DIR from a caller's hook
    try:
        r = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10,
                           env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def describe_code(package_dir: str | os.PathLike = PACKAGE_DIR) -> dict[str, object]:
    """``{"commit": sha, "dirty": bool}`` for a package inside a git checkout (``dirty``: a tracked file of the
    checkout differs from the commit), else ``{"version": stages.__version__}``."""
    where = Path(package_dir)
    commit = _git(where, "rev-parse", "--verify", "HEAD")
    if commit:
        status = _git(where, "status", "--porcelain", "--untracked-files=no")
        if status is not None:
            return {"commit": commit, "dirty": status != ""}
    return {"version": stages.__version__}


@functools.cache
def code_version() -> dict[str, object]:
    """:func:`describe_code` of this package, computed on first use and kept for the process."""
    return describe_code()
