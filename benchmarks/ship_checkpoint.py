"""Copy a trained run's checkpoint into the package as the shipped checkpoint, with its model card.

    python benchmarks/ship_checkpoint.py runs/shipped [--distill-run runs/shipped-distill runs/shipped-soft]
    python benchmarks/ship_checkpoint.py --module-run runs/shipped-kl --title "..." --command "..."

The second form replaces only the shipped module by a later module-only run's (`recyclegpt attach
src/recyclegpt/assets/shipped --init-from-checkpoint ...`) and appends that phase to the model card.

Weights are stored in bf16 (half the bytes; the shipped model *is* the bf16-rounded one) and the
model card is written from the run's own records (run.json, metrics.jsonl), so every number in
it was produced by the training command it names.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from recyclegpt.checkpoint import load_checkpoint, save_checkpoint
from recyclegpt.demo import SHIPPED_DISTILL_ARGS, SHIPPED_SOFT_ARGS, SHIPPED_TRAIN_ARGS
from recyclegpt.files import link_or_copy
from recyclegpt.training.loop import read_metrics

DEST = Path(__file__).resolve().parents[1] / "src" / "recyclegpt" / "assets" / "shipped"


def _fmt(v) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in v) + "]" if isinstance(v, list) else f"{v:.3f}"


def card(run: Path, distill: list[Path], n_full: int, n_mod: int, note: str | None = None) -> str:
    start = read_metrics(run, "start")[0]
    evals = read_metrics(run, "eval")
    end = read_metrics(run, "end")[-1]
    # A resumed run logs minutes per segment (each segment starts with a "start" event): add them up.
    wall, seg = 0.0, 0.0
    for rec in read_metrics(run):
        if rec.get("event") == "start":
            wall, seg = wall + seg, 0.0
        seg = max(seg, rec.get("minutes", 0.0))
    wall += seg
    last = evals[-1]
    lines = [
        "# Shipped RecycleGPT checkpoint",
        "",
        "Trained on this project's CPU machine (2 cores) on the Python standard library's own `.py` sources",
        "(`--data stdlib`: Lib/ without tests, idlelib, lib2to3, turtledemo and site-packages),",
        f"Python {platform.python_version()}, torch {torch.__version__}.",
        "",
        "## Command",
        "```",
        "recyclegpt train " + " ".join(SHIPPED_TRAIN_ARGS) + " --out runs/shipped",
        "recyclegpt attach runs/shipped " + " ".join(SHIPPED_DISTILL_ARGS) + " --out runs/shipped-distill",
        "recyclegpt attach runs/shipped --init-from-checkpoint runs/shipped-distill/checkpoint "
        + " ".join(SHIPPED_SOFT_ARGS) + " --out runs/shipped-soft",
        "```",
        "(`recyclegpt demo --train` runs the same three commands into the cache directory.)",
        "",
        "## Model",
        f"- full model: {n_full / 1e6:.2f}M parameters; recyclable module: {n_mod / 1e6:.2f}M "
        f"({100 * n_mod / (n_full + n_mod):.1f}% of the total)",
        "- config: see config.json; weights stored in bf16",
        "",
        "## Training",
        f"- tokens: {start['train_tokens']:,} train / {start['val_tokens']:,} validation (document-level split)",
        f"- steps: {end['step']}, tokens seen: {end['tokens_seen']:,}, wall time: {wall:.1f} min "
        "(the machine was shared with other work)",
        "",
        "## Validation (held-out stdlib files, teacher-forced)",
        "| step | CE full | CE module step 1 | CE module step 2 | module top-1 = full top-1 (step 1 / 2) |",
        "|---|---|---|---|---|",
    ]
    for e in evals[:: max(1, len(evals) // 8)] + ([last] if evals[-1] not in evals[:: max(1, len(evals) // 8)] else []):
        lines.append(f"| {e['step']} | {e['val_ce_full']:.3f} | {e['val_ce_module_1']:.3f} | "
                     f"{e.get('val_ce_module_2', float('nan')):.3f} | {e['val_agree_full_1']:.3f} / "
                     f"{e.get('val_agree_full_2', float('nan')):.3f} |")
    titles = ["targets = its own greedy predictions",
              "targets = 0.2 x its greedy prediction + 0.8 x its distribution, from the module above"]
    for i, d in enumerate(distill):
        d_evals = read_metrics(d, "eval")
        d_end = read_metrics(d, "end")[-1] if read_metrics(d, "end") else {}
        lines += ["", f"## Module-only self-distillation, phase {i + 1} (frozen full model, "
                  f"{titles[min(i, len(titles) - 1)]})"]
        if d_evals:
            e = d_evals[-1]
            lines.append(f"- after {e['step']} steps ({d_end.get('minutes', float('nan')):.1f} min): " +
                         ", ".join(f"{k} {_fmt(v)}" for k, v in e.items() if k.startswith("val_")))
    if note:
        lines += ["", "## Notes", note]
    return "\n".join(lines) + "\n"


def module_phase(run: Path, title: str, command: str) -> str:
    """The model card's section for a module-only run: what it ran and its last validation."""
    e = read_metrics(run, "eval")[-1]
    end = read_metrics(run, "end")[-1]
    return "\n".join([
        "", f"## Module-only self-distillation, {title}", "```", command, "```",
        f"- after {e['step']} steps ({end.get('minutes', float('nan')):.1f} min): "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in e.items() if k.startswith("val_")), ""])


def ship_module(run: Path, title: str, command: str) -> None:
    cfg, _, _, tok = load_checkpoint(DEST)
    _, _, module, _ = load_checkpoint(run / "checkpoint")
    module.to(torch.bfloat16)
    text = (DEST / "MODEL_CARD.md").read_text()
    notes = text.find("\n## Notes")  # phases go before the notes
    phase = module_phase(run, title, command)
    text = text + phase if notes < 0 else text[:notes] + phase + text[notes:]

    def extra(d: Path) -> None:
        link_or_copy(DEST / "model.safetensors", d / "model.safetensors")  # the full model is unchanged
        (d / "MODEL_CARD.md").write_text(text)

    save_checkpoint(DEST, cfg, None, module, tok, write_extra=extra)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?", help="the joint-training run directory")
    ap.add_argument("--module-run", type=Path, help="ship only this module-only run's module (see above)")
    ap.add_argument("--title", default="a later phase", help="--module-run: the card section's title")
    ap.add_argument("--command", default="", help="--module-run: the command that ran it (for the card)")
    ap.add_argument("--distill-run", type=Path, nargs="*", default=[],
                    help="module-only runs in order; the last one's checkpoint supersedes the module")
    ap.add_argument("--note", help="history the run records do not show (appended to the card)")
    a = ap.parse_args()
    if a.module_run is not None:
        ship_module(a.module_run, a.title, a.command)
        print(f"wrote {DEST} (module from {a.module_run})")
        return 0
    if a.run is None:
        ap.error("give the joint-training RUN directory, or --module-run")
    src = a.distill_run[-1] if a.distill_run else a.run
    cfg, model, module, tok = load_checkpoint(src / "checkpoint" if (src / "checkpoint").is_dir() else src)
    model.to(torch.bfloat16)
    module.to(torch.bfloat16)
    text = card(a.run, a.distill_run, model.num_params(), module.num_params(), a.note)
    save_checkpoint(DEST, cfg, model, module, tok, write_extra=lambda d: (d / "MODEL_CARD.md").write_text(text))
    size = sum(p.stat().st_size for p in DEST.iterdir())
    print(f"wrote {DEST} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
