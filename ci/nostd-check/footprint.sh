#!/usr/bin/env bash
# Code size of a minimal no_std client (engine handshake, one service, one reply: see
# hypha_nostd_engine in src/lib.rs), built with opt-level "z", LTO and panic=abort, linked into
# a C program with unused sections dropped. Prints the code (.text) it adds over the same C
# program without it. Target: <= 150 KB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
CARGO_PROFILE_FOOTPRINT_INHERITS=release CARGO_PROFILE_FOOTPRINT_OPT_LEVEL=z CARGO_PROFILE_FOOTPRINT_LTO=true \
  CARGO_PROFILE_FOOTPRINT_CODEGEN_UNITS=1 CARGO_PROFILE_FOOTPRINT_PANIC=abort \
  cargo build --profile footprint --quiet
cc -Os -ffunction-sections -fdata-sections -Wl,--gc-sections -o target/footprint-client footprint.c \
  target/footprint/libnostd_check.a
cc -Os -ffunction-sections -fdata-sections -Wl,--gc-sections -o target/baseline baseline.c
./target/footprint-client
text() { size -A "$1" | awk '$1 == ".text" { print $2 }'; }
ro() { size -A "$1" | awk '$1 == ".rodata" { print $2 }'; }
t=$(( $(text target/footprint-client) - $(text target/baseline) ))
r=$(( $(ro target/footprint-client) - $(ro target/baseline) ))
printf 'footprint: minimal no_std client: %d KB of code (.text), %d KB of read-only data (target: code <= 150 KB)\n' \
  $(( (t + 1023) / 1024 )) $(( (r + 1023) / 1024 ))
