"""Tokens/s of eager and compiled decoding (GenerationConfig(compile=True)) at batch 1, and compile start-up.

    python benchmarks/compiled_speed.py --ckpt runs/shipped/checkpoint --dtype float32 bfloat16
    python benchmarks/compiled_speed.py --preset small --dtype float32     # random weights (pass costs only)

Per dtype: every lane is warmed up (its first call compiles; the seconds are printed as start-up cost,
cold or warm depending on inductor's on-disk cache, TORCHINDUCTOR_CACHE_DIR), then `--repeats` rounds
each run every lane over every prompt (lane order rotated per round); a lane's tokens/s is the median
over rounds of new tokens / wall seconds of its generate calls (prefill included). EOS does not stop
rows, so every lane makes exactly --max-new-tokens per prompt. `same` says whether the greedy output
equals the compiled `ar` output of the same dtype token for token.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch

from recyclegpt.decoding import GenerationConfig, generate
from recyclegpt.decoding.compiled import COMPILE_STATS

PROMPTS = [
    "def add(a, b):\n",
    "import os\nimport sys\n\n\ndef main(",
    "class Foo:\n    def __init__(self",
    "for i in range(10):\n",
]

LANES = {
    "ar": dict(mode="ar"),
    "ar compiled": dict(mode="ar", compile=True),
    "recycle": dict(mode="recycle"),
    "recycle compiled": dict(mode="recycle", compile=True),
    "verify k=2": dict(mode="verify", k=2),
    "verify k=3": dict(mode="verify", k=3),
    "verify k=2 compiled": dict(mode="verify", k=2, compile=True),
    "verify k=3 compiled": dict(mode="verify", k=3, compile=True),
}


def load(args, dtype):
    if args.ckpt:
        from recyclegpt.checkpoint import load_checkpoint

        _, model, module, tok = load_checkpoint(args.ckpt, "cpu", dtype)
        return model.eval(), module.eval(), [tok.encode(p) for p in PROMPTS]
    from recyclegpt.decoding.testing import random_models

    model, module = random_models(seed=0, preset_name=args.preset, scale=1.0, dtype=dtype, tie_embeddings=True)
    g = torch.Generator().manual_seed(0)
    return model, module, [torch.randint(0, model.cfg.vocab_size, (12,), generator=g).tolist() for _ in PROMPTS]


def run_lane(model, module, prompts, lane: str, n: int) -> tuple[list[list[int]], float, float]:
    """Every prompt at batch 1: (outputs, new tokens / wall seconds, mean tau)."""
    outs, new, t0, tau = [], 0, time.perf_counter(), []
    for p in prompts:
        r = generate(model, module, [p], GenerationConfig(max_new_tokens=n, **LANES[lane]))
        outs.append(r.tokens[0])
        new += r.stats.total_new_tokens
        tau.append(r.stats.tau)
    return outs, new / (time.perf_counter() - t0), statistics.mean(tau)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--lanes", nargs="+", default=list(LANES))
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens, "batch_size": 1,
              "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"), "dtypes": {}}
    print(f"threads {torch.get_num_threads()}, max_new_tokens {args.max_new_tokens}, prompts {len(PROMPTS)}, "
          f"weights {'checkpoint ' + args.ckpt if args.ckpt else 'random ' + args.preset}")
    for dname in args.dtype:
        dtype = getattr(torch, dname)
        model, module, prompts = load(args, dtype)

        run = functools.partial(run_lane, model, module, prompts)
        startup = {}
        for lane in args.lanes:
            before = COMPILE_STATS.total
            t0 = time.perf_counter()
            run(lane, 8)
            startup[lane] = (time.perf_counter() - t0, COMPILE_STATS.total - before)
        speeds: dict[str, list[float]] = {lane: [] for lane in args.lanes}
        outs, taus = {}, {}
        for r in range(args.repeats):
            order = args.lanes[r % len(args.lanes):] + args.lanes[:r % len(args.lanes)]
            for lane in order:
                outs[lane], tps, taus[lane] = run(lane, args.max_new_tokens)
                speeds[lane].append(tps)
        ref = outs.get("ar compiled", outs.get("ar"))
        base = max(statistics.median(speeds[x]) for x in ("ar", "ar compiled") if x in speeds)
        print(f"\n{dname}: lane, tokens/s median [min..max], speedup vs fastest ar, tau, same as compiled ar, "
              "first-call seconds (compile share)")
        rows = []
        for lane in args.lanes:
            med = statistics.median(speeds[lane])
            same = outs[lane] == ref
            print(f"  {lane:22s} {med:7.1f} [{min(speeds[lane]):6.1f}..{max(speeds[lane]):6.1f}]  "
                  f"{med / base:5.2f}x  tau {taus[lane]:4.2f}  same {str(same):5s}  "
                  f"first call {startup[lane][0]:6.1f}s (compile {startup[lane][1]:5.1f}s)")
            rows.append(dict(lane=lane, tokens_per_s=med, runs=speeds[lane], speedup_vs_fastest_ar=med / base,
                             tau=taus[lane], identical_to_compiled_ar=same, first_call_s=startup[lane][0],
                             compile_s=startup[lane][1]))
        report["dtypes"][dname] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
