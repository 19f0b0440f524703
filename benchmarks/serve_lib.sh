# Shared by the serve benchmarks (sourced, not run): a temporary folder, one server process at a time
# ($PID, its log in $TMP/server.log) stopped on exit, and waiting for its /health to answer 200.
# The sourcing script sets PORT first.
TMP="$(mktemp -d /tmp/recyclegpt-serve-XXXXXX)"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

now() { date +%s.%N; }

wait_ready() {  # [start time]: until /health answers 200 (recyclegpt: once compiled; the others: once loaded),
  # then prints the seconds since the start time (default: now)
  local t0="${1:-$(now)}"
  for _ in $(seq 1 1800); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then
      python3 -c "import sys; print(f'  ready after {float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$t0" "$(now)"
      return 0
    fi
    if ! kill -0 "$PID" 2>/dev/null; then echo "the server exited; its log:" >&2; tail -20 "$TMP/server.log" >&2; return 1; fi
    sleep 0.5
  done
  echo "the server did not get ready in 15 minutes" >&2; return 1
}

stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""; }
