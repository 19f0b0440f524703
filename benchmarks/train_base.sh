#!/usr/bin/env bash
# Train the 44.8M `base` model of the README's size table and tree table (about 42 min on 2 idle cores):
# the full model with its joint module (800 steps, however long they take), then two rounds of
# distilling the module on the full model's whole distribution (time-boxed, 10 and 9 minutes, as for
# the README's 44.8M model: keep the machine quiet meanwhile). Each step resumes if its run directory
# already holds a checkpoint, and is skipped once finished, so a stopped run loses at most one save
# interval: just run it again.
# Run from anywhere; writes runs/ under the repository root (git-ignored).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
step() {  # step OUT CMD...: run CMD with --out OUT (and --resume when OUT has a checkpoint)
    local out="$1"; shift
    if [[ -f "$out/.done" ]]; then echo "== $out: done"; return; fi
    local resume=()
    [[ -f "$out/checkpoint/config.json" ]] && resume=(--resume)
    echo "== $out ${resume[*]}"
    "$@" --out "$out" "${resume[@]}" --no-progress
    touch "$out/.done"
}
[[ -d runs/stdlib-train ]] || python benchmarks/train_data.py runs/stdlib-train
step runs/base recyclegpt train --data runs/stdlib-train --glob '*.py' --preset base \
    --tokenizer src/recyclegpt/assets/shipped/tokenizer.json --vocab-size 4096 --seq-len 256 \
    --batch-size 8 --max-steps 800
step runs/base-kl recyclegpt attach runs/base --init-from-checkpoint --data runs/stdlib-train \
    --glob '*.py' --unroll-steps 3 --distill-kl 1.0 --max-steps 500 --max-minutes 10
step runs/base-kl2 recyclegpt attach runs/base --init-from-checkpoint runs/base-kl/checkpoint \
    --data runs/stdlib-train --glob '*.py' --unroll-steps 3 --distill-kl 1.0 --max-steps 500 \
    --lr 5e-4 --max-minutes 9
