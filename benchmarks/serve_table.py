"""The table of benchmarks/serve_compare.sh's reports (not a test).

    python benchmarks/serve_table.py [--folder benchmarks/results] [--prefix serve_compare]

Reads serve_compare_<lane>.json and prints two Markdown tables: output tokens/s per concurrency and lane,
and per lane and concurrency the latencies (TTFT, TPOT, inter-chunk ITL: p50 / p95, ms); then how many of
each lane's responses have the same text as recyclegpt `ar`'s response to the same prompt, and (with the
offline lane's report) served tokens/s at concurrency 1 against offline compiled decoding at batch 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LANES = {"recyclegpt_ar": "recyclegpt `ar`", "recyclegpt_verify": "recyclegpt `verify` k=3",
         "llama_server": "llama-server", "vllm_ar": "vLLM", "vllm_eagle": "vLLM + EAGLE draft"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--prefix", default="serve_compare", help="the reports' PREFIX (default serve_compare)")
    a = ap.parse_args()
    reps = {lane: json.loads((a.folder / f"{a.prefix}_{lane}.json").read_text())
            for lane in LANES if (a.folder / f"{a.prefix}_{lane}.json").is_file()}
    if not reps:
        raise SystemExit(f"no {a.prefix}_*.json in {a.folder}: run benchmarks/serve_compare.sh first")
    machine = next(iter(reps.values())).get("machine", {})
    print(f"CPU: {machine.get('cpu', '?')} ({machine.get('cpu_class', '?')}, {machine.get('cores', '?')} cores)\n")
    levels = sorted({lv["concurrency"] for r in reps.values() for lv in r["levels"]})
    by = {(lane, lv["concurrency"]): lv for lane, r in reps.items() for lv in r["levels"]}
    print("| concurrency | " + " | ".join(LANES[lane] for lane in reps) + " |")
    print("|---:|" + "---:|" * len(reps))
    for c in levels:
        cells = [f"{by[(lane, c)]['output_tokens_per_s']:.0f}" if (lane, c) in by else "" for lane in reps]
        print(f"| {c} | " + " | ".join(cells) + " |")
    print("\n| server | concurrency | tok/s | TTFT p50 / p95 | TPOT p50 / p95 | ITL p50 / p95 | failed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for lane in reps:
        for c in levels:
            lv = by.get((lane, c))
            if lv is None:
                continue
            pair = {k: f"{lv[k]['p50']:.1f} / {lv[k]['p95']:.1f}" for k in ("ttft_ms", "tpot_ms", "itl_ms")}
            print(f"| {LANES[lane]} | {c} | {lv['output_tokens_per_s']:.0f} | {pair['ttft_ms']} | {pair['tpot_ms']} | "
                  f"{pair['itl_ms']} | {lv['failed']} |")
    offline = a.folder / f"{a.prefix}_offline.json"
    if offline.is_file():
        lanes = {r["label"]: r["tokens_per_s"] for r in json.loads(offline.read_text())["results"]}
        print("\nserved at concurrency 1 / offline compiled at batch 1 (`recyclegpt bench`, prefill included):")
        for lane, label in (("recyclegpt_ar", "ar (compiled)"), ("recyclegpt_verify", "verify k=3 (compiled)")):
            if (lane, 1) in by and label in lanes:
                served = by[(lane, 1)]["output_tokens_per_s"]
                print(f"  {LANES[lane]}: {served:.0f} / {lanes[label]:.0f} tok/s = {served / lanes[label]:.2f}x")
    ref = {r["prompt_id"]: r.get("text") for lv in reps.get("recyclegpt_ar", {}).get("levels", [])
           for r in lv.get("requests", [])}
    if ref:
        print("\nresponses with the same text as recyclegpt `ar` (saved texts, greedy):")
        for lane in reps:
            reqs = [r for lv in reps[lane]["levels"] for r in lv.get("requests", []) if r.get("text") is not None]
            same = sum(r["text"] == ref.get(r["prompt_id"]) for r in reqs)
            print(f"  {LANES[lane]}: {same}/{len(reqs)}")


if __name__ == "__main__":
    main()
