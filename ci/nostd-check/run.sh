#!/usr/bin/env bash
# Builds hypha-rpc-core as part of a no_std staticlib (fails with "duplicate lang item" if
# anything links std), then links it into a C program and runs a codec round trip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
cargo build --release --quiet
cc -O1 -o target/nostd-check main.c target/release/libnostd_check.a
./target/nostd-check
