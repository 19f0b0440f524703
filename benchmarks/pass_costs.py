"""Sanity benchmark of the decoding ladder (not a test): random weights, batch 1, eager.

    python benchmarks/pass_costs.py [--preset small] [--dtype bf16] [--threads 2]

Random weights draft badly (verify's tau stays near 1), so besides end-to-end tokens/s it reports
what decides the speedup: ms per full pass over 1/2/3/4 tokens, ms per module pass, ms per
decoding step of each mode (pass costs plus the loop's own overhead), and the speedup of `verify`
those costs predict at a given acceptance rate. Cases are interleaved; per-call costs are the
minimum over repeats (other processes only ever add time), end-to-end rates the median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from recyclegpt.decoding import Engine, GenerationConfig, generate
from recyclegpt.decoding.testing import random_models

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _min_ms(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


@torch.inference_mode()
def pass_costs(model, module, prompt_len: int, reps: int) -> dict[str, float]:
    model.setup_caches(1, model.tok_embeddings.weight.dtype)
    module.setup_caches(1, model.tok_embeddings.weight.dtype)
    d = model.cfg.dim
    x = torch.randint(0, model.cfg.vocab_size, (1, prompt_len))
    model(x, torch.arange(prompt_len)[None])
    out: dict[str, float] = {}
    h = torch.randn(1, 4, d, dtype=model.tok_embeddings.weight.dtype)
    rows = torch.arange(1)

    def full(T: int, all_logits: bool):
        tok, pos = x[:, :T], torch.arange(prompt_len, prompt_len + T)[None]

        def run():
            if all_logits:
                model(tok, pos)
            else:
                _, hh = model(tok, pos, logits=False)
                model.lm_head(hh[:, -1])
        return run

    def mod(T: int):
        tok, pos, hh = x[:, :T], torch.arange(prompt_len, prompt_len + T)[None], h[:, :T]
        last = torch.tensor([T - 1])

        def run():
            _, g = module(model, tok, hh, pos, logits=False)
            model.lm_head(g[rows, last])
        return run

    cases = {f"full pass, {T} tok, logits all": full(T, True) for T in (1, 2, 3, 4)}
    cases["full pass, 2 tok, logits last"] = full(2, False)
    cases.update({f"module pass, {T} entr, head 1": mod(T) for T in (1, 2, 3, 4)})
    for fn in cases.values():  # warm up
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):  # interleave
        for name, fn in cases.items():
            samples[name].append(_min_ms(fn, 5))
    for name, s in samples.items():
        out[name] = min(s)
    return out


def step_costs(model, module, prompt_len: int, reps: int) -> dict[str, float]:
    """Minimum ms of one Engine.step() per mode (a full round, host sync and bookkeeping included)."""
    prompt = list(range(1, prompt_len + 1))
    runs = {"ar step": dict(mode="ar"), "recycle round": dict(mode="recycle"),
            "verify k=2 round": dict(mode="verify", k=2), "verify k=3 round": dict(mode="verify", k=3)}
    best = {k: float("inf") for k in runs}
    for _ in range(reps):
        for name, kw in runs.items():
            engine = Engine(model, module, 1)
            engine.admit(0, prompt, GenerationConfig(max_new_tokens=40, **kw))
            for _ in range(8):
                best[name] = min(best[name], _min_ms(engine.step, 1))
    return best


def end_to_end(model, module, prompt_len: int, new: int, reps: int) -> dict[str, tuple[float, float]]:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=g).tolist()
    runs = {"ar": dict(mode="ar"), "recycle": dict(mode="recycle"),
            "verify k=2": dict(mode="verify", k=2), "verify k=3": dict(mode="verify", k=3)}
    samples: dict[str, list[float]] = {k: [] for k in runs}
    taus: dict[str, float] = {}
    for kw in runs.values():  # warm up
        generate(model, module, [prompt], GenerationConfig(max_new_tokens=16, **kw))
    for _ in range(reps):
        for name, kw in runs.items():
            res = generate(model, module, [prompt], GenerationConfig(max_new_tokens=new, **kw))
            st = res.stats
            samples[name].append(st.total_new_tokens / (st.prefill_s + st.decode_s))
            taus[name] = st.tau
    return {k: (statistics.median(v), taus[k]) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    model, module = random_models(seed=0, preset_name=args.preset, scale=1.0, dtype=dtype, tie_embeddings=True)
    n_model = sum(p.numel() for p in model.parameters())
    n_mod = sum(p.numel() for p in module.parameters())
    print(f"preset={args.preset} dtype={args.dtype} threads={args.threads} batch=1 eager; "
          f"model {n_model / 1e6:.1f}M params, module {n_mod / 1e6:.2f}M; prompt {args.prompt_len} tokens")
    costs = pass_costs(model, module, args.prompt_len, args.reps)
    one = costs["full pass, 1 tok, logits all"]
    for name, ms in costs.items():
        print(f"  {name:32s} {ms:7.2f} ms   ({ms / one:.2f}x one-token pass)")
    m1 = costs["module pass, 1 entr, head 1"]
    print("  predicted verify speedup over ar (per-pass costs only, no loop overhead):")
    for k in (2, 3):
        round_ms = costs[f"module pass, {k + 1} entr, head 1"] + (k - 1) * m1 + costs[
            f"full pass, {k + 1} tok, logits all"]
        line = []
        for alpha in (0.6, 0.7, 0.8):
            tau = (1 - alpha ** (k + 1)) / (1 - alpha)
            line.append(f"acc {alpha}: {tau * one / round_ms:.2f}x (tau {tau:.2f})")
        print(f"    k={k}: round {round_ms:.2f} ms; " + "; ".join(line))
    rec = costs["module pass, 2 entr, head 1"] + costs["full pass, 2 tok, logits last"]
    print(f"    recycle: round {rec:.2f} ms -> {2 * one / rec:.2f}x (tau 2)")
    for name, ms in step_costs(model, module, args.prompt_len, args.reps).items():
        print(f"  {name:32s} {ms:7.2f} ms   ({ms / one:.2f}x one-token pass)")
    e2e = end_to_end(model, module, args.prompt_len, args.new, args.reps)
    ar = e2e["ar"][0]
    print(f"  end to end, {args.new} new tokens (random module: verify drafts are rejected):")
    for name, (tps, tau) in e2e.items():
        print(f"    {name:11s} {tps:7.1f} tok/s  {tps / ar:.2f}x ar   tau {tau:.2f}")


if __name__ == "__main__":
    main()
