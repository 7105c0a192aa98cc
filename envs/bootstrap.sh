#!/usr/bin/env bash
# Create (or reuse) Orchard's Python environment and print its path.
#
# The venv lives outside the clone, keyed by the hash of envs/requirements.txt, so a second clone or a
# second run reuses it; a fresh machine with nothing cached builds it from scratch. Override the location
# with ORCHARD_ENV_ROOT. Usage:  VENV=$(bash envs/bootstrap.sh)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements.txt"
python="${ORCHARD_PYTHON:-python3}"
hash="$(cat "$req" "$here/bootstrap.sh" | sha256sum | cut -c1-12)"
root="${ORCHARD_ENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/orchard}"
venv="$root/venv-$hash"
mkdir -p "$root"
# one build at a time: a second caller (another clone, a helper, a parallel make) waits for the first
exec 9>"$root/.lock-$hash"
flock 9
if [ ! -f "$venv/.complete" ]; then
  echo "[bootstrap] building $venv from $req (first time only; torch is large)" >&2
  rm -rf "$venv"   # an earlier, interrupted build has no .complete marker
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -r "$req" >&2
  touch "$venv/.complete"
  echo "[bootstrap] ready: $venv" >&2
fi
echo "$venv"
