"""What a draft tree must accept to beat a chain: compiled pass costs by token count, and the τ each tree needs.

    python benchmarks/tree_costs.py CKPT [--tokens 1 4 5 6 9 13 17] [--json OUT.json]

A round of a chain of k drafts costs one full pass over k+1 tokens, k-1 module draft passes and the module's
catch-up; a tree of N nodes and depth D one full pass over N+1 tokens, D-1 module passes (over the nodes it
expands) and the catch-up. Here each pass is compiled alone (as decoding compiles whole rounds, bf16, batch 1,
at position 200 of the cache), warmed up, then timed interleaved with the others (`--repeats` rounds; the
minimum, as other processes only ever add time; the median too). From those costs: a round's cost per shape,
and the τ ratio a tree needs over a chain to be as fast (1.0x) and 1.1x as fast. Not a test: pass costs
depend on the machine and its load; the round costs leave out the round's own steps (the tree's selection,
masks, moving the accepted path) and the host's share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from recyclegpt import RecycleGPT
from recyclegpt.checkpoint import atomic_write_text
from recyclegpt.decoding import compiled
from recyclegpt.runtime import machine_info, set_threads

CHAINS = (3, 4, 5)
TREES = ((8, 4), (8, 5), (12, 5))  # (nodes, depth)


def compiled_pass(fn, *args):
    """fn(model, ...) compiled as decoding compiles a round (its inductor options), called once to compile."""
    opts = compiled.inductor_options(1, args[0])
    graph = torch.compile(compiled._fresh_function(fn), fullgraph=True, dynamic=False, options=opts)
    with torch._inductor.config.patch(opts):
        graph(*args)
    return lambda: graph(*args)


def full_pass(model, idx, pos):
    return model(idx, pos)


def module_pass(model, module, idx, h, pos):
    return module(model, idx, h, pos)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 5, 6, 9, 13, 17])
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--json", help="write the costs here")
    a = p.parse_args()
    set_threads()
    m = RecycleGPT.from_pretrained(a.ckpt, dtype="bfloat16")
    model, module = m.model, m.module
    model.setup_caches(1, torch.bfloat16)
    module.setup_caches(1, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    cases = {}
    for T in a.tokens:
        idx = torch.randint(0, model.cfg.vocab_size, (1, T), generator=g)
        pos = (torch.arange(T) + 200)[None]
        cases[f"full {T}"] = compiled_pass(full_pass, model, idx, pos)
    for T in (1, 2):  # a chain's draft step, a top-2 tree's expansion (and the catch-up, about the same)
        idx = torch.randint(0, model.cfg.vocab_size, (1, T), generator=g)
        h = torch.randn(1, T, model.cfg.dim, generator=g).to(torch.bfloat16)
        cases[f"module {T}"] = compiled_pass(module_pass, model, module, idx, h, (torch.arange(T) + 200)[None])
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(a.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    ms = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    machine = machine_info(torch.device("cpu"))
    print(f"{machine['cpu']}, {machine['threads']} threads, bf16, batch 1; fastest of {a.repeats} (median)")
    for name, v in ms.items():
        print(f"  {name:10s} {v:6.2f} ms ({median[name]:.2f})")

    def full(n: int) -> float:  # the nearest measured token count at or above n
        return ms[f"full {min(t for t in a.tokens if t >= n)}"]

    rounds = {f"chain k={k}": full(k + 1) + k * ms["module 1"] for k in CHAINS if k + 1 <= max(a.tokens)}
    rounds.update({f"tree {n}@{d}": full(n + 1) + (d - 1) * ms["module 2"] + ms["module 1"]
                   for n, d in TREES if n + 1 <= max(a.tokens)})
    print("round cost (passes only) and the tau ratio a tree needs over each chain for 1.0x / 1.1x its speed:")
    for name, cost in rounds.items():
        need = "  ".join(f"vs {c}: {cost / rounds[c]:.2f} / {1.1 * cost / rounds[c]:.2f}"
                         for c in rounds if c.startswith("chain")) if name.startswith("tree") else ""
        print(f"  {name:12s} {cost:6.2f} ms  {need}")
    if a.json:
        atomic_write_text(a.json, json.dumps({"machine": machine, "pass_ms": ms, "pass_ms_median": median,
                                                     "round_ms": rounds}, indent=1))


if __name__ == "__main__":
    main()
