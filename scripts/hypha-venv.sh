#!/usr/bin/env bash
# Creates (or reuses) the project-local Python venv holding the pinned Hypha server and
# Python hypha-rpc client used by interop tests, benchmarks and the quickstart.
# Usage: scripts/hypha-venv.sh            -> prints the venv's python path on the last line
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HYPHA_VENV:-$ROOT/.venv}"
PINS=(hypha==0.21.137 hypha-rpc==0.21.47 aiobotocore "sqlmodel<0.0.45" msgpack numpy pynacl==1.5.0
  aiortc==1.14.0 aioice==0.13.0 av==16.1.0)
STAMP="$VENV/.pins"
WANT="$(printf '%s\n' "${PINS[@]}")"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi
PY="${PYTHON:-python3}"
echo "creating venv $VENV with ${PINS[*]}" >&2
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
"$VENV/bin/python" -c "import hypha, hypha_rpc, msgpack, numpy, nacl, aiortc" >&2
printf '%s\n' "${PINS[@]}" > "$STAMP"
echo "$VENV/bin/python"
