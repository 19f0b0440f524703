"""Reproduce every number in the README's results section from the shipped checkpoint.

    python benchmarks/readme_results.py [--ckpt DIR] [--out benchmarks/results] [--readme README.md] [--quick]

In one process run it
  1. benchmarks decoding speed (`recyclegpt bench`, all modes) on the shipped code prompts at batch 1
     greedy (the headline), on the prose prompts at batch 1 greedy, on the code prompts at batch 8
     greedy and at batch 1 with temperature 1;
  2. evaluates quality (`recyclegpt eval`, fp32): held-out perplexity standard vs recycle, module
     top-1 agreement, and the greedy agreement of `recycle` with `ar` on the code prompts;
and writes OUT/*.json (the raw reports), OUT/bench.png (the headline plot) and OUT/RESULTS.md (the
tables, with machine, torch version, dtype and date). With --readme, the part of that file between
`<!-- results:start -->` and `<!-- results:end -->` is replaced by the same tables.

Run it on a quiet machine: the timings are only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from build_prompts import val_sources  # noqa: E402

from recyclegpt.api import RecycleGPT  # noqa: E402
from recyclegpt.bench.prompts import load_prompts  # noqa: E402
from recyclegpt.bench.quality import greedy_agreement, load_eval_tokens, perplexity  # noqa: E402
from recyclegpt.bench.report import print_table, write_json, write_plot  # noqa: E402
from recyclegpt.bench.speed import BenchOptions, run_bench  # noqa: E402
from recyclegpt.runtime import set_threads  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"


def default_ckpt() -> str:
    for c in (ROOT / "src/recyclegpt/assets/shipped", ROOT / "runs/shipped/checkpoint"):
        if (c / "config.json").is_file():
            return str(c)
    raise SystemExit("no shipped checkpoint found; pass --ckpt DIR")


def configs(quick: bool) -> list[tuple[str, str, dict]]:
    n = 4 if quick else None
    new = 32 if quick else 128
    base = dict(max_new_tokens=new, repeats=1 if quick else 3)
    # Batch-1 greedy runs carry compiled lanes for every mode (the graphs are shared by the code and
    # prose runs); the batch-8 and sampled runs add only the compiled `ar` baseline, each further
    # graph costing tens of seconds of compile time on CPU.
    return [
        ("code_b1_greedy", "code", dict(base, batch_size=1, num_prompts=n, compile="all")),
        ("prose_b1_greedy", "prose", dict(base, batch_size=1, num_prompts=n, compile="all")),
        ("code_b8_greedy", "code", dict(base, batch_size=8, num_prompts=n, compile="ar")),
        ("code_b1_t1", "code", dict(base, batch_size=1, temperature=1.0, num_prompts=n, compile="ar")),
    ]


def _acc(r: dict) -> str:
    a = r.get("acceptance_by_position")
    return " / ".join(f"{x:.2f}" for x in a) if a else "–"


def _same(r: dict, n: int) -> str:
    v = r.get("identical_to_ar")
    if v is None:
        return "n/a (sampled)"
    return "yes" if v else f"no ({r.get('prompts_identical_to_ar', '?')}/{n} prompts)"


def headline_table(rep: dict) -> str:
    lines = ["| mode | dtype | tokens/s | speedup vs ar | full passes / token | τ | acceptance by position | "
             "identical to ar | compile time |", "|---|---|---:|---:|---:|---:|---|---|---:|"]
    for r in rep["results"]:
        label = r["label"] + (" (baseline)" if r.get("baseline") else "")
        if r["mode"] == "hf_generate":
            label += f" ({r.get('cache')} cache)"
        comp = f"{r['warmup_s']:.0f} s" if r.get("compiled") else "–"
        lines.append(f"| {label} | {r['dtype']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_ar']:.2f}x | "
                     f"{r['full_passes_per_token']:.3f} | {r['mean_accepted']:.2f} | {_acc(r)} | "
                     f"{_same(r, rep['prompts'])} | {comp} |")
    return "\n".join(lines)


def summary_table(reports: dict[str, dict]) -> str:
    names = list(reports)
    head = "| mode | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---:|" * len(names)]
    labels = [r["label"] for r in next(iter(reports.values()))["results"]]
    for lab in labels:
        cells = []
        for n in names:
            r = next((x for x in reports[n]["results"] if x["label"] == lab), None)
            cells.append("–" if r is None else f"{r['tokens_per_s']:.0f} ({r['speedup_vs_ar']:.2f}x)")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quality_table(q: dict) -> str:
    a = q["greedy_agreement"]
    return "\n".join([
        "| measure | value |", "|---|---:|",
        f"| held-out tokens scored | {q['tokens']} |",
        f"| perplexity, standard (every token by the full model) | {q['ppl_standard']:.3f} |",
        f"| perplexity, recycle (every second token by the module) | {q['ppl_recycle']:.3f} "
        f"({100 * q['recycle_ppl_increase']:+.1f}%) |",
        f"| module top-1 = full model's top-1 one position later | {q['module_agrees_with_full']:.3f} |",
        f"| greedy `recycle` = greedy `ar`, share of tokens ({a['prompts']} code prompts x {a['max_new_tokens']}) "
        f"| {a['token_agreement']:.3f} |",
        f"| tokens before the first difference, mean | {a['mean_common_prefix']:.1f} |",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="checkpoint (default: the shipped one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--readme", help="replace the results block of this file (between the markers)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="bench dtype (default auto: bf16 on native-bf16 CPUs)")
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--quick", action="store_true", help="4 prompts, 32 tokens, 1 round: a smoke run, not numbers")
    a = ap.parse_args()
    if a.readme and not Path(a.readme).is_file():
        raise SystemExit(f"--readme {a.readme}: no such file")
    set_threads()
    ckpt = a.ckpt or default_ckpt()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    m = RecycleGPT.from_pretrained(ckpt, device=a.device, dtype=a.dtype)
    reports: dict[str, dict] = {}
    for name, pset, kw in configs(a.quick):
        n = kw.pop("num_prompts")
        print(f"== bench {name}", file=sys.stderr)
        rep = run_bench(m.model, m.module, m.tokenizer, load_prompts(pset, n),
                        BenchOptions(progress=sys.stderr.isatty(), **kw), checkpoint=Path(ckpt).name)
        print_table(rep)
        write_json(rep, out / f"bench_{name}.json")
        reports[name] = rep
    write_plot(reports["code_b1_greedy"], out / "bench.png")

    print("== eval (fp32)", file=sys.stderr)
    q = RecycleGPT.from_pretrained(ckpt, device=a.device, dtype="float32")
    files = [str(f) for f in val_sources(ROOT / "runs/shipped", 0.05)]
    tokens = load_eval_tokens(files, q.tokenizer, 8192 if a.quick else a.eval_tokens)
    rep_q = perplexity(q.model, q.module, tokens, 512, progress=sys.stderr.isatty()).to_dict()
    code = load_prompts("code", 4 if a.quick else None)
    agree = greedy_agreement(q.model, q.module, q.encode(code.prompts), 32 if a.quick else 64, q.tokenizer.eos_id)
    rep_q["greedy_agreement"] = {"prompt_set": "code", **agree.to_dict()}
    rep_q.update(checkpoint=Path(ckpt).name, dtype="float32", held_out_files=len(files))
    write_json(rep_q, out / "eval.json")

    head = reports["code_b1_greedy"]
    mach = head["machine"]
    date = datetime.date.today().isoformat()
    md = "\n".join([
        f"Measured {date} by `python benchmarks/readme_results.py` on "
        f"{mach['gpu'] + ' + ' if mach.get('gpu') else ''}{mach['cpu']} ({mach['threads']} threads), "
        f"torch {head['torch']}, transformers {head['transformers']}, device {head['device']}, "
        f"dtype {head['dtype']} (speed) / float32 (quality). Checkpoint `{Path(ckpt).name}` "
        f"({head['params']['model'] / 1e6:.1f}M parameters + {head['params']['module'] / 1e6:.2f}M module)."
        + (" QUICK SMOKE RUN: not for publication." if a.quick else ""),
        "",
        f"**Speed**, batch 1, greedy, {head['prompts']} held-out code prompts x {head['max_new_tokens']} new tokens "
        f"(median of {head['repeats']} interleaved rounds after warm-up; speedup over the fastest `ar` "
        f"(`{head['baseline']}`) with the same weights, dtype and device; \"(compiled)\" lanes run each decode "
        "step as one torch.compile'd graph and are compared with the compiled `ar`):",
        "",
        headline_table(head),
        "",
        "**Speed across settings**, tokens/s (speedup vs `ar`):",
        "",
        summary_table(reports),
        "",
        f"**Quality of `recycle`** (lossy), {rep_q['held_out_files']} held-out stdlib files, float32:",
        "",
        quality_table(rep_q),
        "",
        "![tokens/s by mode and acceptance by draft position](benchmarks/results/bench.png)",
    ])
    (out / "RESULTS.md").write_text(md + "\n")
    print(md)
    if a.readme:
        path = Path(a.readme)
        text = path.read_text()
        if START in text and END in text:
            pre, rest = text.split(START, 1)
            _, post = rest.split(END, 1)
            path.write_text(f"{pre}{START}\n{md}\n{END}{post}")
            print(f"updated {path}", file=sys.stderr)
        else:
            print(f"{path} has no {START} ... {END} block; tables are in {out / 'RESULTS.md'}", file=sys.stderr)
    print(f"done in {time.time() - t0:.0f} s; reports in {out}", file=sys.stderr)
    json.dumps(reports)  # plain JSON throughout


if __name__ == "__main__":
    main()
