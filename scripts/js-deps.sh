#!/usr/bin/env bash
# Installs the pinned npm packages of the JavaScript interop peer (tests/js: the npm
# `hypha-rpc` client, `ws`, and `playwright-core`, which drives Debian's Chromium for the
# browser WebRTC harness tests/js/rtc_browser.mjs and never downloads a browser) with
# `npm ci` from tests/js/package-lock.json.
# Idempotent: when node_modules already matches the lockfile (a stamp holds its hash), it
# only checks and returns. Serialized with flock, since parallel tests may call it at once.
# Usage: scripts/js-deps.sh            -> prints the tests/js directory on the last line
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JS="$ROOT/tests/js"
for tool in node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "js-deps: '$tool' not found on PATH; install Node.js (>= 19) with npm" >&2
    exit 127
  fi
done
LOCK_DIR="$ROOT/target"
mkdir -p "$LOCK_DIR"
exec 9>"$LOCK_DIR/js-deps.lock"
flock 9
STAMP="$JS/node_modules/.js-deps.stamp"
WANT="$(sha256sum "$JS/package-lock.json" | cut -d' ' -f1) node=$(node --version)"
installed() {
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
    && [[ -f "$JS/node_modules/hypha-rpc/package.json" && -f "$JS/node_modules/ws/package.json" ]] \
    && [[ -f "$JS/node_modules/playwright-core/package.json" ]]
}
if ! installed; then
  echo "js-deps: npm ci in $JS" >&2
  (cd "$JS" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
  (cd "$JS" && node --input-type=module -e 'await import("hypha-rpc"); await import("ws"); await import("playwright-core");' >&2)
  printf '%s\n' "$WANT" > "$STAMP"
fi
echo "$JS"
