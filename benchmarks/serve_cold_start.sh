#!/usr/bin/env bash
# How long `recyclegpt serve` takes to answer /health 200 from a cold start: inductor's compile cache empty
# (a fresh TORCHINDUCTOR_CACHE_DIR), then also recyclegpt's own cache empty (RECYCLEGPT_CACHE: its CPU
# kernels are rebuilt with g++). Prints the seconds from launching the process to the first 200.
# Usage: benchmarks/serve_cold_start.sh [CKPT] [more `recyclegpt serve` flags]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CKPT="${1:-$ROOT/src/recyclegpt/assets/shipped}"
shift || true
RG="$ROOT/.venv/bin/recyclegpt"
PORT=8124
TMP="$(mktemp -d /tmp/recyclegpt-cold-XXXXXX)"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

cold() {  # label, then env assignments
  local label="$1"; shift
  local t0; t0=$(date +%s.%N)
  env "$@" "$RG" serve "$CKPT" --port "$PORT" "${ARGS[@]}" >"$TMP/server.log" 2>&1 & PID=$!
  until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    if ! kill -0 "$PID" 2>/dev/null; then echo "the server exited; its log:" >&2; tail -20 "$TMP/server.log" >&2; exit 1; fi
    sleep 0.5
  done
  python3 -c "import sys; print(f'{sys.argv[1]}: ready after {float(sys.argv[3]) - float(sys.argv[2]):.1f} s')" \
    "$label" "$t0" "$(date +%s.%N)"
  curl -s "http://127.0.0.1:$PORT/health"; echo
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
}

ARGS=("$@")
lscpu | grep -m1 "Model name"
cold "empty inductor cache" TORCHINDUCTOR_CACHE_DIR="$TMP/inductor1"
cold "empty inductor and recyclegpt caches" TORCHINDUCTOR_CACHE_DIR="$TMP/inductor2" RECYCLEGPT_CACHE="$TMP/recyclegpt"
