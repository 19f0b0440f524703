"""Render the draft-tree results (benchmarks/trees.sh's JSON reports) as the README's markdown tables.

    python benchmarks/tree_table.py [--name trees] [FOLDER]     (FOLDER default: benchmarks/results)

Table 1: every lane of every setting: tokens/s, speedup over the run's fastest `ar`, τ, identical to `ar`
(`verify auto` rows: what `--tree auto` chose in that setting, then its lane's numbers).
Table 2: per setting, the best chain lane against the best tree lane (by tokens/s; τ of the deepest-τ lanes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_results import summary_table  # noqa: E402  (one row per lane, one column per report)

SETTINGS = ("prose_b1_greedy", "prose_b1_t1", "code_b1_greedy", "code_b8_greedy")


def load(folder: Path, prefix: str = "trees") -> dict[str, dict]:
    out = {}
    for name in SETTINGS:
        f = folder / f"{prefix}_{name}.json"
        if f.is_file():
            rep = out[name] = json.loads(f.read_text())
            for r in rep["results"]:  # one row for the auto lanes, whatever each setting chose
                if "auto" in r:
                    r["label"] = "verify auto" + (" (compiled)" if r.get("compiled") else "")
    if not out:
        raise SystemExit(f"no {prefix}_*.json in {folder}; run benchmarks/trees.sh first")
    return out


def same(r: dict) -> str:
    v = r.get("identical_to_ar")
    return "n/a" if v is None else "yes" if v else "NO"


def lanes_table(reports: dict[str, dict]) -> str:
    return summary_table(reports, first="lane", cell=lambda r: (f"{r['auto']}: " if "auto" in r else "")
                         + f"{r['tokens_per_s']:.0f} ({r['speedup_vs_ar']:.2f}x), τ {r['mean_accepted']:.2f}, "
                         f"= ar {same(r)}")


def best(rep: dict, tree: bool, key: str) -> dict:
    cands = [r for r in rep["results"] if r["mode"] == "verify" and bool(r.get("tree")) == tree
             and "auto" not in r]  # the auto lane repeats one of the others
    return max(cands, key=lambda r: r[key])


def best_table(reports: dict[str, dict]) -> str:
    lines = ["| setting | best chain (tokens/s) | best tree (tokens/s) | tree ÷ chain speed | chain τ (best) | "
             "tree τ (best) | τ gain |", "|---|---|---|---:|---:|---:|---:|"]
    for name, rep in reports.items():
        c, t = best(rep, False, "tokens_per_s"), best(rep, True, "tokens_per_s")
        ct, tt = best(rep, False, "mean_accepted"), best(rep, True, "mean_accepted")
        lines.append(f"| {name} | {c['label']}: {c['tokens_per_s']:.0f} | {t['label']}: {t['tokens_per_s']:.0f} | "
                     f"{t['tokens_per_s'] / c['tokens_per_s']:.2f}x | {ct['mean_accepted']:.2f} ({ct['label']}) | "
                     f"{tt['mean_accepted']:.2f} ({tt['label']}) | {tt['mean_accepted'] - ct['mean_accepted']:+.2f} |")
    return "\n".join(lines)


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description="the README's draft-tree tables from benchmarks/trees.sh reports")
    p.add_argument("folder", nargs="?", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", default="trees", help="report name prefix, trees.sh's NAME (default trees)")
    a = p.parse_args()
    reports = load(Path(a.folder), a.name)
    head = next(iter(reports.values()))
    m = head["machine"]
    print(f"{m['cpu']}, {m['threads']} torch threads, torch {head['torch']}, {head['dtype']}, "
          f"{head['max_new_tokens']} new tokens, median of each run's rounds; "
          + ", ".join(f"{n}: {r['date'][:10]}, {r['repeats']} rounds" for n, r in reports.items()) + "\n")
    print(lanes_table(reports) + "\n")
    print(best_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
