#!/usr/bin/env bash
# The same load through two servers: `vllm serve` (its CPU build, without and with the exported EAGLE draft)
# and `recyclegpt serve` (compiled; `ar` and `verify` requests), bf16, same weights, prompts and tokens, each
# measured by `recyclegpt bench serve` at concurrency 1 and 8. One server at a time; JSON reports in
# benchmarks/results/serve_vs_vllm_*.json. Needs the vLLM environment of benchmarks/vllm_cpu.py (.venv-vllm)
# and recyclegpt's own (.venv, with the serve extra). Usage: benchmarks/serve_vs_vllm.sh [CKPT]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CKPT="${1:-$ROOT/src/recyclegpt/assets/shipped}"
OUT="$ROOT/benchmarks/results"
RG="$ROOT/.venv/bin/recyclegpt"
# `python -m ...api_server`, not the `vllm` command: that one asks for the package "vllm", and the CPU build's
# distribution is named "vllm-cpu" (PackageNotFoundError).
VLLM=("$ROOT/.venv-vllm/bin/python" -m vllm.entrypoints.openai.api_server)
PORT=8123
N="${N:-16}"  # requests per concurrency level
TMP="$(mktemp -d /tmp/recyclegpt-serve-vs-vllm-XXXXXX)"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

wait_ready() {  # the server's /health answers 200 (vLLM: once loaded; recyclegpt: once compiled)
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then return 0; fi
    if ! kill -0 "$PID" 2>/dev/null; then echo "the server exited; its log: $TMP/server.log" >&2; tail -20 "$TMP/server.log" >&2; return 1; fi
    sleep 1
  done
  echo "the server did not get ready in 10 minutes" >&2; return 1
}

measure() {  # name, extra request fields
  "$RG" bench serve --url "http://127.0.0.1:$PORT" --prompts code --num-requests "$N" --max-tokens 128 \
    --concurrency 1 8 --no-progress --extra "$2" --json "$OUT/serve_vs_vllm_$1.json"
}

stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""; }

"$RG" export "$CKPT" --format all --out "$TMP/export" --num-speculative-tokens 3 >/dev/null
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-$(( $(nproc) - 1 ))}"
VARGS=(--model "$TMP/export/hf" --port "$PORT" --dtype bfloat16 --max-model-len 512 --max-num-seqs 8)

echo "== vLLM, no draft"
"${VLLM[@]}" "${VARGS[@]}" >"$TMP/server.log" 2>&1 & PID=$!
wait_ready; measure vllm_ar '{}'; stop

echo "== vLLM + the exported EAGLE draft (k=3)"
"${VLLM[@]}" "${VARGS[@]}" --speculative-config \
  "{\"method\": \"eagle\", \"model\": \"$TMP/export/eagle-vllm\", \"num_speculative_tokens\": 3}" \
  >"$TMP/server.log" 2>&1 & PID=$!
wait_ready; measure vllm_eagle '{}'; stop

echo "== recyclegpt serve (compiled, 8 slots, k=3)"
"$RG" serve "$CKPT" --port "$PORT" --slots 8 --dtype bfloat16 >"$TMP/server.log" 2>&1 & PID=$!
wait_ready; measure recyclegpt_ar '{"mode": "ar"}'; measure recyclegpt_verify '{"mode": "verify", "k": 3}'; stop
echo "reports: $OUT/serve_vs_vllm_*.json"
