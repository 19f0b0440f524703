"""Render vLLM-against-recyclegpt speed as the README's markdown tables.

    python benchmarks/vllm_table.py [benchmarks/results]

Reads vllm_cpu_speed.json (`benchmarks/vllm_cpu.py --speed-only`: offline, batch 1 and 8, without and with
the LD_PRELOAD of vLLM's CPU docs) and serve_vs_vllm_*.json (`benchmarks/serve_vs_vllm.sh`: through the
servers, concurrency 1 and 8), whichever exist.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LANES = {"vllm_ar": "vLLM, no draft", "vllm_eagle": "vLLM + exported EAGLE draft (k=3)",
         "recyclegpt_ar": "recyclegpt `ar` (compiled)", "recyclegpt_verify": "recyclegpt `verify` k=3 (compiled)"}


def offline(rep: dict) -> str:
    runs = rep["speed"]["runs"]
    batches = sorted({b for r in runs.values() for b in r if b.startswith("b")}, key=lambda b: int(b[1:]))
    preloads = sorted({name.split("|")[1] for name in runs}, key=lambda p: p != "preload off")  # off first
    head = "| lane | " + " | ".join(f"batch {b[1:]}, {p}" for p in preloads
                                     for b in batches) + " |"
    lines = [head, "|---|" + "---:|" * (len(batches) * len(preloads))]
    for lane, title in LANES.items():
        cells = []
        for p in preloads:
            for b in batches:
                r = runs.get(f"{lane}|{p}", {}).get(b)
                cells.append("–" if r is None else f"{r['tokens_per_s']:.0f}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    ver = {p: {b: runs[f"recyclegpt_verify|{p}"][b]["tokens_per_s"] / runs[f"vllm_eagle|{p}"][b]["tokens_per_s"]
               for b in batches} for p in preloads if f"vllm_eagle|{p}" in runs and f"recyclegpt_verify|{p}" in runs}
    lines.append("| recyclegpt `verify` ÷ vLLM + draft | " + " | ".join(
        f"{ver[p][b]:.2f}x" if p in ver else "–" for p in preloads for b in batches) + " |")
    return "\n".join(lines)


def served(folder: Path) -> str | None:
    reps = {lane: json.loads((folder / f"serve_vs_vllm_{lane}.json").read_text())
            for lane in LANES if (folder / f"serve_vs_vllm_{lane}.json").is_file()}
    if not reps:
        return None
    levels = [lv["concurrency"] for lv in next(iter(reps.values()))["levels"]]
    lines = ["| server, requests | " + " | ".join(f"concurrency {c}: output tokens/s, TPOT p50 ms" for c in levels)
             + " |", "|---|" + "---:|" * len(levels)]
    for lane, rep in reps.items():
        cells = []
        for lv in rep["levels"]:
            bad = f", {lv['failed']} failed" if lv["failed"] else ""
            cells.append(f"{lv['output_tokens_per_s']:.0f}, {lv['tpot_ms']['p50']:.1f}{bad}")
        lines.append(f"| {LANES[lane]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    f = folder / "vllm_cpu_speed.json"
    if f.is_file():
        rep = json.loads(f.read_text())
        st = rep["speed"]["settings"]
        print(f"offline, {rep['cpu']}, {st['dtype']}, {st['threads']} threads, {st['tokens']} tokens, "
              f"{rep['date']}; preload libraries: {rep['speed'].get('preload_libraries')}\n")
        print(offline(rep) + "\n")
    table = served(folder)
    if table:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
