#!/usr/bin/env bash
# Draft trees against chains: one `recyclegpt bench` run per setting, on the shipped checkpoint (or $1),
# JSON reports in benchmarks/results/trees_*.json; `python benchmarks/tree_table.py` renders the README table.
# Run from anywhere, one process at a time on a quiet machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CKPT="${1:-$ROOT/src/recyclegpt/assets/shipped}"
OUT="$ROOT/benchmarks/results"
common=(--modes ar,verify --k 3 4 --tree 6 8 12 --tree-depth 4 --tree-topk 2 --max-new-tokens 128
        --repeats 3 --compile headline --no-progress)
run() { local name="$1"; shift; echo "== $name"; recyclegpt bench "$CKPT" "${common[@]}" "$@" --json "$OUT/trees_$name.json"; }
run prose_b1_greedy --prompts prose --num-prompts 4
run prose_b1_t1 --prompts prose --num-prompts 4 --temperature 1
run code_b1_greedy --prompts code --num-prompts 4
run code_b8_greedy --prompts code --num-prompts 8 --batch-size 8
