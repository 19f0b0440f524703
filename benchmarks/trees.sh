#!/usr/bin/env bash
# Draft trees against chains: one `recyclegpt bench` run per setting (prose greedy, prose T=1, code greedy,
# code batch 8), JSON reports in benchmarks/results/${NAME}_<setting>.json; `python benchmarks/tree_table.py
# [--name NAME]` renders the README tables. Run from anywhere, one process at a time on a quiet machine.
#
#   benchmarks/trees.sh                                   # the shipped checkpoint -> trees_*.json
#   NAME=trees_base LANES="--k 3 4 --tree 8 12 auto --tree-depth 4" benchmarks/trees.sh runs/base-kl2/checkpoint
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CKPT="${1:-$ROOT/src/recyclegpt/assets/shipped}"
OUT="$ROOT/benchmarks/results"
NAME="${NAME:-trees}"
read -r -a lanes <<< "${LANES:---k 3 4 --tree 6 8 12 --tree-depth 4}"
common=(--modes ar,verify "${lanes[@]}" --tree-topk 2 --max-new-tokens "${TOKENS:-128}"
        --repeats "${REPEATS:-3}" --compile headline --no-progress)
run() { local name="$1"; shift; echo "== $name"; recyclegpt bench "$CKPT" "${common[@]}" "$@" --json "$OUT/${NAME}_$name.json"; }
for setting in ${SETTINGS:-prose_b1_greedy prose_b1_t1 code_b1_greedy code_b8_greedy}; do
    case "$setting" in
        prose_b1_greedy) run "$setting" --prompts prose --num-prompts 4 ;;
        prose_b1_t1) run "$setting" --prompts prose --num-prompts 4 --temperature 1 ;;
        code_b1_greedy) run "$setting" --prompts code --num-prompts 4 ;;
        code_b8_greedy) run "$setting" --prompts code --num-prompts 8 --batch-size 8 ;;
        *) echo "unknown setting $setting" >&2; exit 2 ;;
    esac
done
