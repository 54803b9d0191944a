#!/usr/bin/env bash
# Starts/stops a local pinned Hypha server on 127.0.0.1 for interop tests, benchmarks and manual poking.
# Usage:
#   scripts/hypha-server.sh start [PORT]   start in the background (default PORT 9527), print the URL
#   scripts/hypha-server.sh stop  [PORT]   SIGTERM, then SIGKILL after 10 s; removes the pid file
#   scripts/hypha-server.sh status [PORT]  print the URL and exit 0 if running and ready, else exit 1
# The server uses a fixed HYPHA_JWT_SECRET and a raised per-connection rate limit (see DESIGN.md §6).
# Logs and pid files live in $HYPHA_SERVER_DIR (default <repo>/target/hypha-server).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${HYPHA_SERVER_DIR:-$ROOT/target/hypha-server}"
CMD="${1:-}"
PORT="${2:-9527}"
HOST=127.0.0.1
URL="http://$HOST:$PORT"
PIDFILE="$DIR/server-$PORT.pid"
LOG="$DIR/server-$PORT.log"
# The server's temp files (an SQLite event log it deletes only on a clean exit) go here.
TMP="$DIR/tmp-$PORT"

usage() {
  echo "usage: $0 start|stop|status [PORT]" >&2
  exit 2
}

[[ "$PORT" =~ ^[0-9]+$ ]] || usage

running_pid() {
  [[ -f "$PIDFILE" ]] || return 1
  local pid
  pid="$(cat "$PIDFILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# True when GET /health/readiness answers 200 (curl if present, else python3; never via a proxy).
ready() {
  local code
  if command -v curl >/dev/null 2>&1; then
    code="$(curl -s --noproxy '*' -o /dev/null -m 2 -w '%{http_code}' "$URL/health/readiness" 2>/dev/null || true)"
  else
    code="$(python3 - "$URL/health/readiness" 2>/dev/null <<'PY' || true
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    print(opener.open(sys.argv[1], timeout=2).status)
except Exception as e:
    print(getattr(e, "code", 0))
PY
)"
  fi
  [[ "$code" == 200 ]]
}

log_tail() {
  echo "---- last lines of $LOG ----" >&2
  tail -n 40 "$LOG" >&2 2>/dev/null || true
}

stop_server() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$PIDFILE"
    echo "no server running on port $PORT" >&2
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "server $pid ignored SIGTERM for 10 s, sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$PIDFILE"
  rm -rf "$TMP"
  echo "stopped server $pid on port $PORT" >&2
}

case "$CMD" in
  start)
    mkdir -p "$DIR"
    if pid="$(running_pid)"; then
      if ready; then
        echo "server already running (pid $pid)" >&2
        echo "$URL"
        exit 0
      fi
      echo "pid file names live process $pid but $URL is not ready; stopping it" >&2
      stop_server
    fi
    if ready; then
      echo "something else already answers on $URL; refusing to start" >&2
      exit 1
    fi
    PY="$("$ROOT/scripts/hypha-venv.sh" | tail -n 1)"
    mkdir -p "$TMP"
    # setsid: the server gets its own session, so it survives this shell and a terminal hangup.
    TMPDIR="$TMP" NO_PROXY="$HOST,localhost" no_proxy="$HOST,localhost" \
    HYPHA_JWT_SECRET="${HYPHA_JWT_SECRET:-hypha-rpc-rs-test-secret}" \
    HYPHA_WS_MSG_RATE_LIMIT="${HYPHA_WS_MSG_RATE_LIMIT:-100000}" \
    HYPHA_WS_MSG_BURST_LIMIT="${HYPHA_WS_MSG_BURST_LIMIT:-100000}" \
      setsid "$PY" -m hypha.server --host "$HOST" --port "$PORT" </dev/null >"$LOG" 2>&1 &
    pid=$!
    echo "$pid" > "$PIDFILE"
    for _ in $(seq 1 120); do
      if ready; then
        echo "hypha server ready (pid $pid, log $LOG)" >&2
        echo "$URL"
        exit 0
      fi
      if ! kill -0 "$pid" 2>/dev/null; then
        echo "hypha server exited before becoming ready" >&2
        rm -f "$PIDFILE"
        rm -rf "$TMP"
        log_tail
        exit 1
      fi
      sleep 0.5
    done
    echo "hypha server not ready on $URL after 60 s" >&2
    log_tail
    stop_server
    exit 1
    ;;
  stop)
    stop_server
    ;;
  status)
    if pid="$(running_pid)" && ready; then
      echo "running (pid $pid, log $LOG)" >&2
      echo "$URL"
      exit 0
    fi
    echo "not running on port $PORT" >&2
    exit 1
    ;;
  *)
    usage
    ;;
esac
