"""Provenance names the code: a copy of the package in a temporary git repository writes that repository's
commit into parquet metadata, the dirty flag follows changes to tracked files, and outside git (or without a
git program) it is the package version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import stages
from stages.core.provenance import code_version, describe_code

ROOT = Path(__file__).resolve().parents[2]
WRITE = ("import json, pandas as pd; from stages.formats.io import read_provenance, write_table; "
         "write_table('t.parquet', pd.DataFrame({'image_id': ['a'], 'split': ['train']}), 'splits'); "
         "print(json.dumps(read_provenance('t.parquet')['code']))")

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git program")


def git(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def written_code(repo: Path) -> dict:
    """``code`` of a parquet file written by a fresh process that imports the package copy in ``repo``."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    r = subprocess.run([sys.executable, "-c", WRITE], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def test_commit_and_dirty_flag_of_a_checkout(package_copy: Path):
    repo = package_copy
    git(repo, "init", "-q")
    git(repo, "add", "stages")
    git(repo, "commit", "-qm", "package")
    head = git(repo, "rev-parse", "HEAD")
    assert written_code(repo) == {"commit": head, "dirty": False}
    assert describe_code(repo / "stages") == {"commit": head, "dirty": False}
    (repo / "notes.txt").write_text("untracked files do not make the code dirty\n")
    assert describe_code(repo / "stages") == {"commit": head, "dirty": False}
    with open(repo / "stages" / "formats" / "io.py", "a") as f:
        f.write("\n# a local change\n")
    assert written_code(repo) == {"commit": head, "dirty": True}
    git(repo, "commit", "-qam", "the change")
    assert written_code(repo) == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False}


def test_outside_git_it_is_the_version(package_copy: Path, monkeypatch):
    assert written_code(package_copy) == {"version": stages.__version__}
    assert describe_code(package_copy / "stages") == {"version": stages.__version__}
    monkeypatch.setenv("PATH", str(package_copy))  # no git program at all: the version, no error
    assert describe_code(ROOT / "stages") == {"version": stages.__version__}


def test_computed_once_per_process():
    assert code_version() is code_version()
