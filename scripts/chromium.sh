#!/usr/bin/env bash
# Installs Debian's Chromium (used headless by tests/js/rtc_browser.mjs through playwright-core,
# which never downloads a browser of its own) when /usr/bin/chromium is missing.
# Idempotent and quiet; serialized with flock. Needs root (apt-get).
# Usage: scripts/chromium.sh            -> prints the chromium path on the last line
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [[ ! -x "$CHROMIUM" ]]; then
  mkdir -p "$ROOT/target"
  exec 9>"$ROOT/target/chromium.lock"
  flock 9
  if [[ ! -x "$CHROMIUM" ]]; then
    echo "chromium: apt-get install chromium" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends chromium >&2
  fi
fi
"$CHROMIUM" --version >&2 2>/dev/null || { echo "chromium: $CHROMIUM does not run" >&2; exit 1; }
echo "$CHROMIUM"
