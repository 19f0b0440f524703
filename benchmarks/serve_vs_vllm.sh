#!/usr/bin/env bash
# The vLLM comparison of docs/attach.md: `vllm serve` (its CPU build, without and with the exported EAGLE
# draft) and `recyclegpt serve` (`ar` and `verify` requests), bf16, 16 requests at concurrency 1 and 8; JSON
# reports in benchmarks/results/serve_vs_vllm_*.json (benchmarks/vllm_table.py reads them). It is
# benchmarks/serve_compare.sh narrowed to those lanes and settings; it needs the vLLM environment of
# benchmarks/vllm_cpu.py (.venv-vllm). Usage: benchmarks/serve_vs_vllm.sh [CKPT]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ -x "$HERE/../.venv-vllm/bin/python" ] || { echo "no .venv-vllm: see benchmarks/vllm_cpu.py" >&2; exit 1; }
LANES="vllm recyclegpt" LEVELS="1 8" N=16 DTYPE=bfloat16 PREFIX=serve_vs_vllm exec "$HERE/serve_compare.sh" "$@"
