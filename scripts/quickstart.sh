#!/usr/bin/env bash
# Quickstart: starts a local Hypha server (installing it into .venv on first use), then a Rust
# service and a Python client talk through it, both ways. Stops the server when done.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="$(scripts/hypha-venv.sh | tail -n 1)"
PORT="${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
export HYPHA_SERVER_DIR="${HYPHA_SERVER_DIR:-$PWD/target/quickstart-server}"
scripts/hypha-server.sh start "$PORT" >/dev/null
trap 'scripts/hypha-server.sh stop >/dev/null 2>&1 || true' EXIT
cargo run --quiet -p hypha-rpc-tokio --example quickstart -- "http://127.0.0.1:$PORT" "$PY" tests/py/quickstart_client.py
