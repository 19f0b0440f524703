"""Presenting a bench report: a rich table, the JSON file (keys in docs/definitions.md) and a PNG plot;
and the progress bar of long measurements."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any


def progress_bar(enabled: bool):
    """A transient rich progress bar on stderr (a context manager yielding it), or one yielding None."""
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)

# docs/definitions.md "`recyclegpt bench --json`": other tools read these keys; keep them.
TOP_KEYS = ("model", "device", "dtype", "batch_size", "prompts", "max_new_tokens", "results")
RESULT_KEYS = ("mode", "k", "tokens_per_s", "speedup_vs_ar", "full_passes_per_token", "mean_accepted",
               "acceptance_by_position", "identical_to_ar")
MODES = ("ar", "recycle", "verify", "hf_generate", "hf_assisted")


def check_schema(report: dict[str, Any]) -> list[str]:
    """Problems with a report's required keys (docs/definitions.md; empty list: fine)."""
    problems = [f"missing top-level key {k!r}" for k in TOP_KEYS if k not in report]
    for i, r in enumerate(report.get("results", [])):
        problems += [f"results[{i}] lacks {k!r}" for k in RESULT_KEYS if k not in r]
        if r.get("mode") not in MODES:
            problems.append(f"results[{i}] has unknown mode {r.get('mode')!r}")
    return problems


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


_SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def print_table(report: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    temp = report.get("temperature") or 0
    title = (f"{report['model']}: {report['device']} {report['dtype']}, batch {report['batch_size']}, "
             f"{'greedy' if not temp else f'T={temp}'}, {report['prompts']} prompts "
             f"({report.get('prompt_set', '?')}) x {report['max_new_tokens']} new tokens")
    from rich import box

    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, kw in (("mode", {"no_wrap": True, "min_width": 15}), ("dtype", {"min_width": 4}),
                    ("tok/s", {"justify": "right", "min_width": 6}), ("x ar", {"justify": "right", "min_width": 4}),
                    ("decode x ar", {"justify": "right", "min_width": 6}),
                    ("pass/tok", {"justify": "right", "min_width": 8}), ("tau", {"justify": "right", "min_width": 4}),
                    ("accept by pos", {"min_width": 9, "max_width": 14}), ("= ar", {"no_wrap": True, "min_width": 6})):
        t.add_column(col, **kw)
    notes = []
    for r in report["results"]:
        acc = r.get("acceptance_by_position")
        acc_s = " ".join(f"{a:.2f}" for a in acc) if acc else "-"
        same = r.get("identical_to_ar")
        same_s = "-" if same is None else ("[green]yes[/]" if same else
                                          f"[red]no[/] {r.get('prompts_identical_to_ar', '?')}/{report['prompts']}")
        label = r.get("label", r["mode"]).replace(" (compiled)", " (c)") + (" *" if r.get("baseline") else "")
        if r.get("note") and not r.get("compiled"):
            notes.append(f"{r.get('label', r['mode'])}: {r['note']}")
        dt = r.get("dtype", report["dtype"])
        t.add_row(label, _SHORT_DTYPE.get(dt, dt), _fmt(r["tokens_per_s"], ".1f"),
                  _fmt(r["speedup_vs_ar"], ".2f") if r["speedup_vs_ar"] is not None else "-",
                  _fmt(r.get("decode_speedup_vs_ar"), ".2f"),
                  _fmt(r["full_passes_per_token"], ".3f"), _fmt(r["mean_accepted"], ".2f"), acc_s, same_s)
    console.print(t)
    m = report.get("machine", {})
    lines = [f"* baseline: {report.get('baseline')}. speedup = tokens/s / baseline tokens/s with the same weights, "
             f"dtype, device, prompts and batch; median of {report.get('repeats')} interleaved rounds after warm-up. "
             "tok/s counts the prefill; decode x ar: the same speedup over the decoding phase only (prefill left "
             "out of both; it is the same work in every lane).",
             "pass/tok: full-model row-passes per new token (prefill included); tau: new tokens per decoding "
             "pass (prefill excluded); = ar: token-identical to ar's output (greedy only; in bf16 transformers' "
             "kernels round differently from the native ones, so hf_* may drift from ar where fp32 matches)."]
    compiled = [r for r in report["results"] if r.get("compiled")]
    if compiled:
        warm = ", ".join(f"{r['label'].replace(' (compiled)', '')} {r.get('warmup_s', 0):.0f} s" for r in compiled)
        lines.append(f"(c): each decode step one torch.compile'd graph; compared with the compiled ar. Compile time is "
                     f"spent in the warm-up, not in tokens/s: {warm}.")
        if any(r.get("identical_to_ar") is False and r.get("dtype", report["dtype"]) == "bfloat16" for r in compiled):
            lines.append("A compiled bf16 lane that differs from the compiled ar: for a full model over 48 MiB the "
                         "compiled GEMMs (oneDNN's) can round a one-token pass differently from a wider one, so a near "
                         "tie may go the other way. Eager lanes, float32, or RECYCLEGPT_COMPILE_MODE=max-autotune are "
                         "exact (README, \"Exactness in bfloat16\").")
    lines += notes
    floor = report.get("floor")
    if floor:
        shares = ", ".join(f"{r.get('label', r['mode'])} {r['bandwidth_share']:.0%}" for r in report["results"]
                           if r.get("bandwidth_share") is not None)
        lines.append(f"floor: {m.get('cpu_class', '?')} CPU, {floor['memory_bandwidth_gb_s']:.1f} GB/s read here, "
                     f"{floor['weight_bytes'] / 1e6:.1f} MB of full-model weights: ar cannot beat "
                     f"{floor['ar_tokens_per_s']:.0f} tok/s at batch 1. Share of that bandwidth each lane's weight "
                     f"reads use: {shares}.")
    where = f"{m['gpu']}, " if m.get("gpu") else ""
    lines.append(f"torch {report.get('torch')}, transformers {report.get('transformers')}, {where}{m.get('cpu', '')}, "
                 f"{m.get('threads', '?')} threads, {report.get('date', '')}")
    for ln in lines:
        console.print(ln, style="dim", highlight=False)


def write_json(report: dict[str, Any], path: str | Path) -> None:
    from ..files import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def write_plot(report: dict[str, Any], path: str | Path) -> None:
    """Two panels: tokens/s by lane (speedup written on each bar); acceptance by draft position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    res = report["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    labels = [r.get("label", r["mode"]) for r in res]
    vals = [r["tokens_per_s"] for r in res]
    colors = {"ar": "#777777", "recycle": "#d62728", "verify": "#1f77b4", "hf_generate": "#ff7f0e",
              "hf_assisted": "#2ca02c"}
    bars = ax1.bar(range(len(res)), vals, color=[colors.get(r["mode"], "#999999") for r in res],
                   hatch=["//" if r.get("compiled") else "" for r in res], edgecolor="white")
    base = next((r for r in res if r.get("baseline")), None)
    if base is not None:
        ax1.axhline(base["tokens_per_s"], color="#333333", lw=0.8, ls="--",
                    label=f"baseline: {base.get('label', base['mode'])}")
        ax1.legend(fontsize=8, loc="upper left")
    for b, r in zip(bars, res, strict=True):
        if r["speedup_vs_ar"] is not None:
            ax1.annotate(f"{r['speedup_vs_ar']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                         ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(range(len(res)), labels, rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel("tokens/s (median)")
    temp = report.get("temperature") or 0
    ax1.set_title(f"{report['device']} {report['dtype']}, batch {report['batch_size']}, "
                  f"{'greedy' if not temp else f'T={temp}'}, {report['max_new_tokens']} new tokens", fontsize=9)
    ax1.margins(y=0.12)
    plotted = False
    for r in res:
        acc = r.get("acceptance_by_position")
        if acc:
            ax2.plot(range(1, len(acc) + 1), acc, marker="o", label=r.get("label", r["mode"]))
            plotted = True
    ax2.set_xlabel("draft position i")
    ax2.set_ylabel("P(draft i accepted | drafts < i accepted)")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("acceptance by draft position", fontsize=9)
    if plotted:
        ax2.legend(fontsize=8)
        ax2.xaxis.get_major_locator().set_params(integer=True)
    else:
        ax2.text(0.5, 0.5, "no verify lanes", ha="center", va="center", transform=ax2.transAxes)
    name = Path(str(report["model"]))
    name = name.parent.name if name.name == "checkpoint" and name.parent.name else name.name
    fig.suptitle(f"recyclegpt bench: {name}, {report['prompts']} prompts ({report.get('prompt_set', '?')})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
