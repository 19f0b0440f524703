"""Prefill time: the per-prompt causal prefill (`decoding.prefill.prefill`, what admission runs) against one
right-padded pass through the static caches, for a batch of prompts of different lengths.

    python benchmarks/prefill_speed.py                         # shipped checkpoint, 8 code prompts, bf16
    python benchmarks/prefill_speed.py --ckpt CKPT --batch-size 4 --dtype float32

Both fill the full model's and the module's caches for every row; the median of --repeats timed calls
after one warm-up call is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import recyclegpt
from recyclegpt import RecycleGPT
from recyclegpt.decoding.prefill import prefill
from recyclegpt.prompts import load_prompts


def padded_cached_pass(m: RecycleGPT, prompts: list[list[int]]) -> None:
    """One right-padded [B, T] pass attending over the whole static cache, then the module's."""
    B, T = len(prompts), max(map(len, prompts))
    idx = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p)
    pos = torch.arange(T).expand(B, T)
    _, h = m.model(idx, pos, logits=False)
    m.module(m.model, idx[:, 1:], h[:, :-1], pos[:, :-1], logits=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(Path(recyclegpt.__file__).parent / "assets" / "shipped"))
    ap.add_argument("--prompts", default="code")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    m = RecycleGPT.from_pretrained(a.ckpt, device="cpu", dtype=a.dtype)
    prompts = m.encode(load_prompts(a.prompts, a.batch_size).prompts)
    lens = [len(p) for p in prompts]
    for net in (m.model, m.module):
        net.setup_caches(len(prompts), m.dtype)
    lanes = {"right-padded pass over the static cache": lambda: padded_cached_pass(m, prompts),
             "causal prefill per prompt (decoding.prefill)": lambda: prefill(
                 m.model, m.module, prompts, list(range(len(prompts))), lambda slot, logits: logits.argmax(-1))}
    print(f"{a.ckpt}, {a.dtype}, {torch.get_num_threads()} thread(s), prompt lengths {lens}")
    with torch.inference_mode():
        for name, fn in lanes.items():
            fn()
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            print(f"{name}: {statistics.median(times) * 1e3:.0f} ms (median of {a.repeats})")


if __name__ == "__main__":
    main()
