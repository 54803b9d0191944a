#!/usr/bin/env bash
# The benchmarks in one command (issue #8.5): our client against the Python client on one
# local server (connect, idle RSS, echo latency, calls/s sequential and 16 in flight, CPU per
# call, generators, 1/10/50 MB echoes with peak RSS), the cost of end-to-end encryption, WebRTC
# against the server websocket, the codec against Python's, and the code size of a minimal
# no_std client. Ratios are printed
# against figures measured in the same run.
# Usage: scripts/bench.sh [SECONDS]   (seconds per timed phase, default 5)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
S="${1:-5}"
scripts/hypha-venv.sh >/dev/null
cargo build --release --quiet -p hypha-rpc-tests --examples
# The idle client alone, so it has the client's default features (no WebRTC), as a user's would.
cargo build --release --quiet -p hypha-rpc-tokio --example client_idle
echo "== client vs Python hypha-rpc (tokio, 2 worker threads) =="
target/release/examples/client_bench "$S" 2>/dev/null
echo
echo "== the same on a current-thread tokio runtime =="
BENCH_RUNTIME=current target/release/examples/client_bench "$S" 2>/dev/null
echo
echo "== end-to-end encryption =="
target/release/examples/e2e_bench 2>/dev/null
echo
echo "== WebRTC data channel vs the server websocket =="
target/release/examples/rtc_bench 3 2>/dev/null
echo
echo "== codec: ours vs rmp vs Python hypha-rpc =="
cargo bench --quiet -p hypha-rpc-tests --bench codec 2>/dev/null | sed -n '/^codec round trip/,$p' 
echo
echo "== footprint =="
ci/nostd-check/footprint.sh
