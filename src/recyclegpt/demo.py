"""`recyclegpt demo`: the shipped checkpoint continues code prompts in `ar`, `recycle` and `verify`.

The shipped checkpoint lives in `recyclegpt/assets/shipped/` with a MODEL_CARD.md that records
the command which trained it; `recyclegpt demo --train` runs that same command.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import RecycleError
from .runtime import cache_dir

# The recorded commands that produced the shipped checkpoint (MODEL_CARD.md repeats them): joint
# training, then module-only self-distillation on the frozen full model (3 unrolled draft steps).
SHIPPED_TRAIN_ARGS = ["--data", "stdlib", "--preset", "small", "--batch-size", "8", "--max-steps", "900"]
SHIPPED_DISTILL_ARGS = ["--init-from-checkpoint", "--data", "stdlib", "--unroll-steps", "3", "--max-steps", "400",
                        "--max-minutes", "12", "--eval-every", "100", "--save-every", "100"]
# Third phase: soft targets (0.2 * the model's greedy token + 0.8 * its distribution), starting from the
# distilled module. Hard targets alone made the module overconfident: when sampling at T=1 far fewer of
# its drafts were accepted than with these targets, while greedy acceptance did not drop (the numbers are
# in docs/results.md, "Notes on the results", and the shipped MODEL_CARD.md).
SHIPPED_SOFT_ARGS = ["--data", "stdlib", "--unroll-steps", "3", "--distill-kl", "0.8", "--max-steps", "300",
                     "--max-minutes", "14", "--eval-every", "100", "--save-every", "50"]

DEMO_PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]


def shipped_checkpoint() -> Path:
    path = Path(str(resources.files("recyclegpt") / "assets" / "shipped"))
    if not (path / "config.json").is_file():
        raise RecycleError(f"the shipped checkpoint is missing from {path}; reinstall recyclegpt or pass --ckpt")
    return path


def train_shipped(out: str | None) -> int:
    """Reproduce the shipped checkpoint: joint training, then two phases of module self-distillation."""
    root = Path(out) if out else cache_dir() / "demo-run"
    joint, distill, soft = root / "joint", root / "distill", root / "soft"

    def resume(d: Path) -> list[str]:
        return ["--resume"] if (d / "run.json").is_file() else []

    steps = [
        ["train", *SHIPPED_TRAIN_ARGS, "--out", str(joint), *resume(joint)],
        ["attach", str(joint), *SHIPPED_DISTILL_ARGS, "--out", str(distill), *resume(distill)],
        ["attach", str(joint), "--init-from-checkpoint", str(distill / "checkpoint"), *SHIPPED_SOFT_ARGS,
         "--out", str(soft), *resume(soft)],
    ]
    for args in steps:
        print("running: recyclegpt " + " ".join(args), flush=True)
        rc = subprocess.call([sys.executable, "-m", "recyclegpt.cli", *args])
        if rc != 0:
            return rc
    print(f"done: recyclegpt demo --ckpt {soft}")
    return 0


def demo(ckpt: str | None, max_new_tokens: int, device: str = "auto", dtype: str = "auto") -> int:
    from .api import RecycleGPT
    from .runtime import set_threads

    set_threads()
    console = Console()
    path = Path(ckpt) if ckpt else shipped_checkpoint()
    m = RecycleGPT.from_pretrained(path, device=device, dtype=dtype)
    n_full, n_mod = m.model.num_params(), m.module.num_params()
    console.print(f"[bold]RecycleGPT demo[/bold]: {path}  full model {n_full / 1e6:.1f}M + recyclable module "
                  f"{n_mod / 1e6:.1f}M params ({100 * n_mod / (n_full + n_mod):.0f}%), "
                  f"{str(m.dtype).removeprefix('torch.')} on {m.device}")
    modes = [("ar", {}), ("recycle", {}), ("verify", {"k": 3})]
    for mode, kw in modes:  # warm-up: first calls pay for allocation and kernel selection
        m.generate_with_stats(DEMO_PROMPTS[0], mode=mode, max_new_tokens=8, **kw)
    texts: dict[str, list[str]] = {mode: [] for mode, _ in modes}
    times: dict[str, list[float]] = {mode: [] for mode, _ in modes}
    tokens: dict[str, int] = {mode: 0 for mode, _ in modes}
    passes: dict[str, int] = {mode: 0 for mode, _ in modes}
    for prompt in DEMO_PROMPTS:
        for mode, kw in modes:  # interleaved, so drift in machine load hits every mode alike
            t0 = time.perf_counter()
            res = m.generate_with_stats(prompt, mode=mode, max_new_tokens=max_new_tokens, **kw)
            times[mode].append(time.perf_counter() - t0)
            texts[mode].append(res.texts[0] if res.texts else m.tokenizer.decode(res.tokens[0]))
            tokens[mode] += res.stats.total_new_tokens
            passes[mode] += res.stats.full_passes + res.stats.prefill_passes

    for i, prompt in enumerate(DEMO_PROMPTS):
        t = Table(title=f"prompt {i + 1}", show_lines=True, expand=True)
        t.add_column("prompt", style="dim", ratio=1)
        t.add_column("ar (plain)", ratio=2)
        t.add_column("recycle (paper, lossy)", ratio=2)
        t.add_row(prompt, texts["ar"][i], texts["recycle"][i])
        console.print(t)
    summary = Table(title="speed (batch 1, same weights, same prompts)")
    for col in ("mode", "tokens/s", "full passes/token", "speedup vs ar", "identical to ar"):
        summary.add_column(col, justify="right" if col != "mode" else "left")
    ar_tps = tokens["ar"] / sum(times["ar"])
    for mode, _ in modes:
        tps = tokens[mode] / sum(times[mode])
        same = all(a == b for a, b in zip(texts[mode], texts["ar"], strict=True))
        summary.add_row(mode, f"{tps:.1f}", f"{passes[mode] / max(1, tokens[mode]):.2f}", f"{tps / ar_tps:.2f}x",
                        "yes" if same else "no")
    console.print(summary)
    console.print("median time per prompt: " + ", ".join(
        f"{mode} {statistics.median(times[mode]):.2f}s" for mode, _ in modes))
    console.print("recycle is the paper's lossy mode (its text may differ from ar); verify is lossless. "
                  "Full benchmark: recyclegpt bench")
    return 0
