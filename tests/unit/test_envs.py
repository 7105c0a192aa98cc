"""envs/orchard.yaml (conda, used by the rules) pins exactly what envs/requirements.txt (the venv) pins."""

from pathlib import Path

import yaml

ENVS = Path(__file__).resolve().parents[2] / "envs"


def test_conda_env_matches_requirements():
    reqs = [ln.strip() for ln in (ENVS / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    env = yaml.safe_load((ENVS / "orchard.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == reqs
    assert all("==" in r for r in reqs), "every requirement is pinned"
