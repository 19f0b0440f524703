"""Reproduce every number in docs/results.md (the README quotes its headline).

    python benchmarks/readme_results.py [--ckpt DIR] [--size-ckpt DIR ...] [--only S1,S2] [--render]
                                        [--out benchmarks/results] [--readme docs/results.md] [--quick]

Sections (each writes OUT/<section>.json, the raw report, and can run on its own with --only, so a
long measurement is done in pieces and a stopped run loses one section at most):
  code_b1_greedy   `recyclegpt bench` on the shipped code prompts, batch 1, greedy, every mode, with
                   compiled lanes for every mode (the headline; its plot is OUT/bench.png)
  prose_b1_greedy  the same on the prose prompts (compiled `ar` only)
  code_b8_greedy   code prompts at batch 8, greedy
  code_b1_t1       code prompts at batch 1, temperature 1
  eval             quality (`recyclegpt eval` in fp32): held-out perplexity standard vs recycle, module
                   top-1 agreement, greedy agreement of `recycle` with `ar` on the code prompts
  sizes            the same bench (ar, verify; compiled `ar` and verify) on every --size-ckpt, for the
                   table of speedup across model sizes
Then OUT/RESULTS.md is rendered from every section's JSON present (with machine, torch version,
dtype and date), and with --readme the part of that file between `<!-- results:start -->` and
`<!-- results:end -->` is replaced by the same text. --render only renders.

Run it on a quiet machine: the timings are only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from build_prompts import val_sources  # noqa: E402

from recyclegpt.api import RecycleGPT  # noqa: E402
from recyclegpt.bench.quality import greedy_agreement, load_eval_tokens, perplexity  # noqa: E402
from recyclegpt.bench.report import print_table, write_json, write_plot  # noqa: E402
from recyclegpt.bench.speed import BenchOptions, run_bench  # noqa: E402
from recyclegpt.prompts import load_prompts  # noqa: E402
from recyclegpt.runtime import set_threads  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"
PLOT = "bench.png"  # the headline plot, in OUT; a --readme file elsewhere links it by its path from there


def default_ckpt() -> str:
    for c in (ROOT / "src/recyclegpt/assets/shipped", ROOT / "runs/shipped/checkpoint"):
        if (c / "config.json").is_file():
            return str(c)
    raise SystemExit("no shipped checkpoint found; pass --ckpt DIR")


BENCH_SECTIONS = ("code_b1_greedy", "prose_b1_greedy", "code_b8_greedy", "code_b1_t1")
SECTIONS = (*BENCH_SECTIONS, "eval", "sizes")


def bench_config(name: str, quick: bool) -> tuple[str, dict]:
    """(prompt set, BenchOptions keywords + num_prompts) of a bench section."""
    base = dict(max_new_tokens=32 if quick else 128, repeats=1 if quick else 3, num_prompts=4 if quick else 8)
    # Every run carries compiled lanes: the compiled `ar` is the baseline wherever it is faster, so
    # `verify` has to be compiled too to be compared fairly. Each graph (batch size, k, greedy or
    # sampled) costs 30-60 s of compile time on a 2-core CPU, once per process: batch 8 and the
    # sampled run use k = 2, 3 only. The prose run reuses the headline's graphs (same model object).
    return {
        "code_b1_greedy": ("code", dict(base, batch_size=1, compile="all")),
        "prose_b1_greedy": ("prose", dict(base, batch_size=1, compile="all")),
        "code_b8_greedy": ("code", dict(base, batch_size=8, compile="all", ks=[2, 3])),
        "code_b1_t1": ("code", dict(base, batch_size=1, temperature=1.0, compile="all", ks=[2, 3])),
        # sizes: what decides the speedup across sizes (no transformers lanes, no recycle)
        "sizes": ("code", dict(base, batch_size=1, compile="all", modes=["ar", "verify"], ks=[3],
                               adaptive=False, hybrid=False)),
    }[name]


def _acc(r: dict) -> str:
    a = r.get("acceptance_by_position")
    return " / ".join(f"{x:.2f}" for x in a) if a else "–"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def _same(r: dict, n: int) -> str:
    v = r.get("identical_to_ar")
    if v is None:
        return "n/a (sampled)"
    return "yes" if v else f"no ({r.get('prompts_identical_to_ar', '?')}/{n} prompts)"


def headline_table(rep: dict) -> str:
    lines = ["| mode | dtype | tokens/s | speedup vs ar | decode speedup | full passes / token | τ | "
             "acceptance by position | identical to ar | compile time |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rep["results"]:
        label = r["label"] + (" (baseline)" if r.get("baseline") else "")
        if r["mode"] == "hf_generate":
            label += f" ({r.get('cache')} cache)"
        comp = f"{r['warmup_s']:.0f} s" if r.get("compiled") else "–"
        lines.append(f"| {label} | {r['dtype']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_ar']:.2f}x | "
                     f"{_x(r.get('decode_speedup_vs_ar'))} | {r['full_passes_per_token']:.3f} | "
                     f"{r['mean_accepted']:.2f} | {_acc(r)} | "
                     f"{_same(r, rep['prompts'])} | {comp} |")
    return "\n".join(lines)


def _speed_cell(r: dict) -> str:
    return f"{r['tokens_per_s']:.0f} ({r['speedup_vs_ar']:.2f}x; decode {_x(r.get('decode_speedup_vs_ar'))})"


def summary_table(reports: dict[str, dict], cell=_speed_cell, first: str = "mode") -> str:
    """One row per lane, one column per report; `cell` renders a lane's result."""
    names = list(reports)
    head = f"| {first} | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---:|" * len(names)]
    labels = [r["label"] for r in next(iter(reports.values()))["results"]]
    for lab in labels:
        cells = []
        for n in names:
            r = next((x for x in reports[n]["results"] if x["label"] == lab), None)
            cells.append("–" if r is None else cell(r))
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quality_table(evals: list[dict]) -> str:
    """One column per evaluated checkpoint (the shipped one first)."""
    rows = [
        ("measured", lambda q: q.get("date", "?")),
        ("held-out files / tokens scored", lambda q: f"{q.get('held_out_files', '?')} / {q['tokens']}"),
        ("perplexity, standard (every token by the full model)", lambda q: f"{q['ppl_standard']:.2f}"),
        ("perplexity, recycle (every second token by the module)",
         lambda q: f"{q['ppl_recycle']:.2f} ({100 * q['recycle_ppl_increase']:+.1f}%)"),
        ("top-1 accuracy, full model / module (its token, one further)",
         lambda q: f"{q['full_top1_accuracy']:.3f} / {q['module_top1_accuracy']:.3f}"),
        ("module top-1 = full model's top-1 one position later", lambda q: f"{q['module_agrees_with_full']:.3f}"),
        ("full model's top-1 among the module's top 2 / top 3", lambda q: "–" if "module_top2_has_full" not in q else
         f"{q['module_top2_has_full']:.3f} / {q['module_top3_has_full']:.3f}"),
        ("greedy `recycle` = greedy `ar`, share of tokens", lambda q: "–" if not q.get("greedy_agreement") else
         f"{q['greedy_agreement']['token_agreement']:.3f} ({q['greedy_agreement']['prompts']} code prompts x "
         f"{q['greedy_agreement']['max_new_tokens']})"),
        ("tokens before the first difference, mean", lambda q: "–" if not q.get("greedy_agreement") else
         f"{q['greedy_agreement']['mean_common_prefix']:.1f}"),
    ]
    lines = ["| measure | " + " | ".join(f"`{q.get('checkpoint', '?')}`" for q in evals) + " |",
             "|---|" + "---:|" * len(evals)]
    lines += [f"| {name} | " + " | ".join(f(q) for q in evals) + " |" for name, f in rows]
    return "\n".join(lines)


def size_table(reports: list[dict]) -> str:
    lines = ["| checkpoint | full model | module | ar | ar (compiled) | best eager verify | best compiled verify "
             "| eager verify ÷ eager ar | compiled verify ÷ compiled ar | compiled round cost in `ar` passes |",
             "|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for rep in sorted(reports, key=lambda r: r["params"]["model"]):
        by = {r["label"]: r for r in rep["results"]}
        ar, arc = by.get("ar"), by.get("ar (compiled)")
        eager = [r for r in rep["results"] if r["mode"] == "verify" and not r.get("compiled")]
        comp = [r for r in rep["results"] if r["mode"] == "verify" and r.get("compiled")]
        be = max(eager, key=lambda r: r["tokens_per_s"]) if eager else None
        bc = max(comp, key=lambda r: r["tokens_per_s"]) if comp else None

        def cell(r):
            return "–" if r is None else f"{r['tokens_per_s']:.1f} ({r['label']}, τ {r['mean_accepted']:.2f})"

        def ratio(a, b):
            return "–" if a is None or b is None else f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x"

        # A verify round yields τ tokens in the time of τ ÷ speedup `ar` passes: the round's cost, apart
        # from how well the module drafts (τ depends on training; the cost on sizes).
        cost = "–" if bc is None or arc is None else \
            f"{bc['mean_accepted'] * arc['tokens_per_s'] / bc['tokens_per_s']:.2f}"
        lines.append(f"| `{rep['model']}` | {rep['params']['model'] / 1e6:.1f}M | {rep['params']['module'] / 1e6:.2f}M "
                     f"| {ar['tokens_per_s']:.1f} | {arc['tokens_per_s']:.1f} | {cell(be)} | {cell(bc)} "
                     f"| {ratio(be, ar)} | {ratio(bc, arc)} | {cost} |")
    return "\n".join(lines)


def run_section(name: str, a: argparse.Namespace, ckpt: str, out: Path) -> None:
    print(f"== {name}", file=sys.stderr)
    if name == "eval":
        files = [str(f) for f in val_sources(ROOT / "runs/shipped", 0.05)]
        code = load_prompts("code", 4 if a.quick else None)
        for i, c in enumerate([ckpt, *a.eval_ckpt]):
            q = RecycleGPT.from_pretrained(c, device=a.device, dtype="float32")
            # tokenized per checkpoint: another checkpoint may bring another tokenizer
            tokens = load_eval_tokens(files, q.tokenizer, 8192 if a.quick else a.eval_tokens)
            rep_q = perplexity(q.model, q.module, tokens, 512, progress=sys.stderr.isatty()).to_dict()
            agree = greedy_agreement(q.model, q.module, q.encode(code.prompts), 32 if a.quick else 64,
                                     q.tokenizer.eos_id)
            rep_q["greedy_agreement"] = {"prompt_set": "code", **agree.to_dict()}
            rep_q.update(checkpoint=_name(c), dtype="float32", held_out_files=len(files),
                         date=datetime.date.today().isoformat())
            write_json(rep_q, out / ("eval.json" if i == 0 else f"eval_{i}.json"))
        return
    ckpts = a.size_ckpt if name == "sizes" else [ckpt]
    if name == "sizes" and not ckpts:
        print("sizes: no --size-ckpt given; skipped", file=sys.stderr)
        return
    pset, kw = bench_config(name, a.quick)
    n = kw.pop("num_prompts")
    reports = []
    for c in ckpts:
        m = _model(c, a.device, a.dtype)
        rep = run_bench(m.model, m.module, m.tokenizer, load_prompts(pset, n),
                        BenchOptions(progress=sys.stderr.isatty(), **kw), checkpoint=_name(c))
        print_table(rep)
        reports.append(rep)
    if name == "sizes":
        write_json({"reports": reports}, out / "sizes.json")
    else:
        write_json(reports[0], out / f"{name}.json")
        if name == "code_b1_greedy":
            write_plot(reports[0], out / "bench.png")


_MODELS: dict[tuple[str, str, str], RecycleGPT] = {}


def _model(ckpt: str, device: str, dtype: str) -> RecycleGPT:
    """One model object per checkpoint for the whole run: compiled graphs are cached per model object."""
    key = (str(Path(ckpt).resolve()), device, dtype)
    if key not in _MODELS:
        _MODELS[key] = RecycleGPT.from_pretrained(ckpt, device=device, dtype=dtype)
    return _MODELS[key]


def _name(ckpt: str) -> str:
    p = Path(ckpt).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return p.name


def _cpu(rep: dict) -> str:
    mach = rep["machine"]
    return f"{mach['gpu'] + ' + ' if mach.get('gpu') else ''}{mach['cpu']}"


def render(out: Path, quick: bool) -> str:
    def load(name: str) -> dict | None:
        f = out / f"{name}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    reports = {n: r for n in BENCH_SECTIONS if (r := load(n)) is not None}
    parts: list[str] = []
    head = reports.get("code_b1_greedy")

    def when(rep: dict) -> str:
        """A report's date, and its machine where it is not the headline's (ratios move with the CPU)."""
        other = head is not None and _cpu(rep) != _cpu(head)
        return rep["date"][:10] + (f" on {_cpu(rep)}" if other else "")

    if head is not None:
        parts += [
            f"Measured by `python benchmarks/readme_results.py` on "
            f"{_cpu(head)} (torch threads: {head['machine']['threads']}), "
            f"torch {head['torch']}, transformers {head['transformers']}, device {head['device']}, "
            f"dtype {head['dtype']} (speed) / float32 (quality); headline run {head['date'][:10]}. Checkpoint "
            f"`{head['model']}` ({head['params']['model'] / 1e6:.1f}M parameters + "
            f"{head['params']['module'] / 1e6:.2f}M module)."
            + (" QUICK SMOKE RUN: not for publication." if quick else ""),
            "",
            f"**Speed**, batch 1, greedy, {head['prompts']} held-out code prompts x {head['max_new_tokens']} new "
            f"tokens (median of {head['repeats']} interleaved rounds after warm-up; speedup over the fastest `ar` "
            f"(`{head['baseline']}`) with the same weights, dtype and device; \"(compiled)\" lanes run each decode "
            "round as one torch.compile'd graph and their identity is checked against the compiled `ar`; "
            "their compile time is in the last column, spent once per process; tokens/s counts the prefill, "
            "\"decode speedup\" is the same ratio over the decoding phase alone, prefill left out of both):",
            "",
            headline_table(head),
            "",
            f"![tokens/s by mode and acceptance by draft position]({PLOT})",  # relative to OUT (RESULTS.md)
            "",
        ]
    if reports:
        parts += ["**Speed across settings**, tokens/s (speedup vs the fastest `ar` of the same run, prefill "
                  "included; then over the decoding phase alone; "
                  + ", ".join(f"{n}: {when(r)}" for n, r in reports.items()) + "):", "",
                  summary_table(reports), ""]
    sizes = load("sizes")
    if sizes is not None:
        parts += ["**Across model sizes**, code prompts, batch 1, greedy (each checkpoint's own `ar` lanes as "
                  f"baseline; {when(sizes['reports'][0])}):", "", size_table(sizes["reports"]), ""]
    evals = [q for q in [load("eval"), *(load(f"eval_{i}") for i in range(1, 10))] if q is not None]
    if evals:
        parts += ["**Quality of `recycle`** (lossy), on the stdlib files held out from the full model's training "
                  "(the `code` prompts come from them too), float32:", "", quality_table(evals), ""]
    return "\n".join(parts).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="checkpoint (default: the shipped one)")
    ap.add_argument("--size-ckpt", nargs="*", default=[], metavar="DIR",
                    help="checkpoints for the size table (the shipped one is added)")
    ap.add_argument("--eval-ckpt", nargs="*", default=[], metavar="DIR",
                    help="more checkpoints for the quality table (e.g. the joint-only run before distillation)")
    ap.add_argument("--only", help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    ap.add_argument("--render", action="store_true", help="run nothing: render RESULTS.md (and --readme) only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--readme", help="replace the results block of this file (between the markers)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="bench dtype (default auto: bf16 on native-bf16 CPUs)")
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--quick", action="store_true", help="4 prompts, 32 tokens, 1 round: a smoke run, not numbers")
    a = ap.parse_args()
    if a.readme and not Path(a.readme).is_file():
        raise SystemExit(f"--readme {a.readme}: no such file")
    only = SECTIONS if not a.only else tuple(x.strip() for x in a.only.split(",") if x.strip())
    bad = [x for x in only if x not in SECTIONS]
    if bad:
        raise SystemExit(f"--only: unknown section(s) {bad}; choose from {','.join(SECTIONS)}")
    set_threads()
    ckpt = a.ckpt or default_ckpt()
    if a.size_ckpt:
        a.size_ckpt = [ckpt, *a.size_ckpt]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not a.render:
        for name in only:
            run_section(name, a, ckpt, out)
    md = render(out, a.quick)
    (out / "RESULTS.md").write_text(md)
    print(md)
    if a.readme:
        path = Path(a.readme)
        text = path.read_text()
        if START in text and END in text:
            pre, rest = text.split(START, 1)
            _, post = rest.split(END, 1)
            plot = Path(os.path.relpath(out / PLOT, path.resolve().parent)).as_posix()
            block = md.replace(f"]({PLOT})", f"]({plot})")
            path.write_text(f"{pre}{START}\n{block}{END}{post}")
            print(f"updated {path}", file=sys.stderr)
        else:
            print(f"{path} has no {START} ... {END} block; tables are in {out / 'RESULTS.md'}", file=sys.stderr)
    print(f"done in {time.time() - t0:.0f} s; reports in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
