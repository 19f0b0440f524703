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
# shellcheck source=serve_lib.sh
source "$ROOT/benchmarks/serve_lib.sh"

cold() {  # label, then the environment to start the server with
  local label="$1"; shift
  local t0; t0="$(now)"
  env "$@" "$RG" serve "$CKPT" --port "$PORT" "${ARGS[@]}" >"$TMP/server.log" 2>&1 & PID=$!
  echo "$label:"; wait_ready "$t0"
  curl -s "http://127.0.0.1:$PORT/health"; echo
  stop
}

ARGS=("$@")
lscpu | grep -m1 "Model name"
cold "empty inductor cache" TORCHINDUCTOR_CACHE_DIR="$TMP/inductor1"
cold "empty inductor and recyclegpt caches" TORCHINDUCTOR_CACHE_DIR="$TMP/inductor2" RECYCLEGPT_CACHE="$TMP/recyclegpt"
