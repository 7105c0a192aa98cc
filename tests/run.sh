#!/usr/bin/env bash
# The test command of the README (`make test`): the pinned environment, a live Slurm when this machine can run
# one (root with apt-get: tests/slurm/up.sh, stopped again on exit), then the whole pytest suite.
# ORCHARD_SLURM=0 skips the Slurm part; without root the Slurm tests are skipped with their reason.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash envs/bootstrap.sh)"
export PATH="$VENV/bin:$PATH"
if [ "${ORCHARD_SLURM:-auto}" != 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  trap 'bash tests/slurm/down.sh >/dev/null 2>&1 || true' EXIT
  if bash tests/slurm/up.sh; then
    export ORCHARD_SLURM=1
  elif [ "${CI:-}" = true ]; then
    echo "tests/run.sh: could not start the test Slurm (see above)" >&2
    exit 1
  else
    echo "tests/run.sh: no live Slurm; the slurm tests will be skipped" >&2
    unset ORCHARD_SLURM
  fi
fi
python -m pytest -q "$@"
