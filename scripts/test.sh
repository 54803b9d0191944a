#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs (the Python venv with the pinned
# Hypha server and clients, the npm packages, Debian's Chromium), then formatting, lints, tests
# (real server, Python, JS and browser peers, WebRTC), the no_std link check and the docs, all
# with warnings denied. Where `unshare -n` is allowed, the tests run in a network namespace of
# their own that has only loopback: no test can send a packet off 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
step() { printf '\n==> %s\n' "$*"; }

step "python venv (hypha server + hypha-rpc client)"
scripts/hypha-venv.sh

step "cargo fmt --check"
cargo fmt --all --check
cargo fmt --check --manifest-path fuzz/Cargo.toml
cargo fmt --check --manifest-path ci/nostd-check/Cargo.toml

step "cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
cargo clippy -p hypha-rpc-core --no-default-features -- -D warnings
# The client as a user builds it: default features only (the workspace run unifies `webrtc` in).
cargo clippy -p hypha-rpc -p hypha-rpc-tokio -p hypha-rpc-smol --all-targets -- -D warnings

step "npm packages and Chromium (JS and browser interop tests)"
scripts/js-deps.sh
scripts/chromium.sh

step "cargo test"
cargo test --workspace --all-features --no-run
if command -v ip >/dev/null 2>&1 && unshare -n -- true 2>/dev/null; then
  echo "(in a new network namespace: only loopback exists)"
  unshare -n -- sh -c 'ip link set lo up && exec cargo test --workspace --all-features --offline'
else
  echo "(unshare -n is not allowed here: the tests run in this network namespace, on loopback)"
  cargo test --workspace --all-features
fi

step "quickstart (Rust <-> Python through a local server)"
scripts/quickstart.sh

step "no_std link check"
ci/nostd-check/run.sh

step "fuzz smoke: each target ${FUZZ_SECONDS:-20} s on stable (cargo fuzz -s none)"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
for target in frame_decode engine_frames chunk_reassembly e2e_envelope json_text; do
  scratch="$(mktemp -d)"   # new inputs go here; the committed corpus is only read
  (cd fuzz && cargo fuzz run -s none "$target" "$scratch" "corpus/$target" -- \
      -max_total_time="${FUZZ_SECONDS:-20}" -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
    | grep -E "^(stat::number_of_executed_units|Done|==|SUMMARY)" || true)
  rm -rf "$scratch"
  if [ -n "$(ls fuzz/artifacts/"$target" 2>/dev/null)" ]; then
    echo "fuzz target $target found a crash: fuzz/artifacts/$target"; exit 1
  fi
done

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --all-features --quiet

echo
echo "all checks passed"
