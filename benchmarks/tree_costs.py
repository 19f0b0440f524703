"""What a draft tree must accept to beat a chain, and what trees of many shapes do accept.

    python benchmarks/tree_costs.py CKPT [--chains 3 4 5] [--trees 8@4 8@5 12@5 12@5x3] [--prompts prose]
                                         [--temperature 0] [--json OUT.json] [--no-tau | --costs EARLIER.json]

A round of a chain of k drafts costs one full pass over k+1 tokens, k-1 module draft passes and the module's
catch-up; a tree of N nodes, depth D and c children per node (`N@D`, `N@DxC`) one full pass over N+1 tokens,
D-1 module passes over c entries (the nodes it expands) and the catch-up. Here each pass is compiled alone (as
decoding compiles whole rounds, bf16, batch 1, at position 200 of the cache), warmed up, then timed
interleaved with the others (`--repeats` rounds; the minimum, as other processes only ever add time; the
median too). From those costs: a round's cost per shape, and the τ each shape needs to tie the best chain
and to be 1.1x as fast.

Then (unless --no-tau) every shape decodes the prompts (eager bf16, one row at a time, `--max-new-tokens`
each, seeded per prompt) and its τ (tokens per full pass) gives a predicted speed, τ / round cost, as a
multiple of the best chain's. Greedy τ does not depend on the machine, so the sweep says which shapes could
pay at all on a machine with these pass costs; `recyclegpt bench` measures the few that might. Not a test:
pass costs depend on the machine and its load, and the round costs leave out the round's own steps (the
tree's selection, masks, moving the accepted path) and the host's share, so a measured tree falls below
its prediction.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

from recyclegpt import RecycleGPT
from recyclegpt.decoding import GenerationConfig, compiled, generate
from recyclegpt.decoding.auto import DraftShape
from recyclegpt.decoding.tree import tree_candidates
from recyclegpt.files import atomic_write_text
from recyclegpt.prompts import load_prompts
from recyclegpt.runtime import machine_info, set_threads


def label(shape: DraftShape) -> str:
    """chain k=K, or tree N@D (xC with C children per node other than 2)."""
    if not shape.tree:
        return f"chain k={shape.k}"
    return f"tree {shape.tree}@{shape.k}" + (f"x{shape.tree_topk}" if shape.tree_topk != 2 else "")


def verified_tokens(shape: DraftShape) -> int:
    """The full pass's tokens: the pending one and the drafts."""
    return (shape.tree or shape.k) + 1


def tree_shape(s: str) -> DraftShape:
    m = re.fullmatch(r"(\d+)@(\d+)(?:x(\d+))?", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"a tree is NODES@DEPTH or NODES@DEPTHxCHILDREN (12@5, 24@5x3), got {s!r}")
    shape = DraftShape(int(m[2]), int(m[1]), int(m[3] or 2))
    if not shape.k <= shape.tree <= tree_candidates(shape.k, shape.tree_topk):
        raise argparse.ArgumentTypeError(f"tree {s}: {shape.tree} nodes must lie between its depth {shape.k} and "
                                         f"the {tree_candidates(shape.k, shape.tree_topk)} candidates it draws from")
    return shape


def compiled_pass(fn, *args):
    """fn(model, ...) compiled as decoding compiles a round (`compiled.compile_pass`), called once to compile."""
    graph = compiled.compile_pass(fn, args[0])
    graph(*args)
    return lambda: graph(*args)


def full_pass(model, idx, pos):
    return model(idx, pos)


def module_pass(model, module, idx, h, pos):
    return module(model, idx, h, pos)


def pass_costs(model, module, tokens: list[int], entries: list[int], repeats: int) -> tuple[dict, dict]:
    """Fastest and median milliseconds of each pass ("full T", "module E"), timed interleaved."""
    model.setup_caches(1, torch.bfloat16)
    module.setup_caches(1, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    cases = {}
    for T in tokens:
        idx = torch.randint(0, model.cfg.vocab_size, (1, T), generator=g)
        cases[f"full {T}"] = compiled_pass(full_pass, model, idx, (torch.arange(T) + 200)[None])
    for E in entries:  # a chain's draft step (and the catch-up, about the same), a tree's expansion
        idx = torch.randint(0, model.cfg.vocab_size, (1, E), generator=g)
        h = torch.randn(1, E, model.cfg.dim, generator=g).to(torch.bfloat16)
        cases[f"module {E}"] = compiled_pass(module_pass, model, module, idx, h, (torch.arange(E) + 200)[None])
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: min(v) for k, v in times.items()}, {k: statistics.median(v) for k, v in times.items()}


def round_ms(shape: DraftShape, ms: dict[str, float]) -> float:
    """The passes of one round (the module's catch-up costed as a one-entry pass)."""
    full = ms[f"full {verified_tokens(shape)}"]
    if not shape.tree:
        return full + shape.k * ms["module 1"]
    return full + (shape.k - 1) * ms[f"module {shape.tree_topk}"] + ms["module 1"]


def tau_of(m: RecycleGPT, shape: DraftShape, ids: list[list[int]], temperature: float, max_new_tokens: int) -> float:
    produced = passes = 0
    for i, prompt in enumerate(ids):
        gc = shape.apply(GenerationConfig(mode="verify", seed=i, temperature=temperature,
                                          max_new_tokens=max_new_tokens))
        st = generate(m.model, m.module, [prompt], gc).stats
        produced += sum(max(0, t - 1) for t in st.new_tokens)
        passes += sum(st.row_passes)
    return produced / passes


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--chains", type=int, nargs="+", default=[3, 4, 5], metavar="K")
    p.add_argument("--trees", type=tree_shape, nargs="+", default=[tree_shape(s) for s in ("8@4", "8@5", "12@5")],
                   metavar="N@D[xC]", help="trees: nodes @ depth, x children per node (default 2)")
    p.add_argument("--repeats", type=int, default=60, help="interleaved timing rounds of the passes")
    p.add_argument("--prompts", default="prose", help="prompt set or file for τ (default prose)")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-tau", action="store_true", help="pass costs only")
    p.add_argument("--costs", help="reuse the pass costs of an earlier --json report (same machine and model) "
                   "instead of measuring them: a τ sweep in another setting then takes minutes")
    p.add_argument("--json", help="write the costs (and τ) here")
    a = p.parse_args()
    set_threads()
    m = RecycleGPT.from_pretrained(a.ckpt, dtype="bfloat16")
    shapes = [DraftShape(k) for k in a.chains] + list(dict.fromkeys(a.trees))
    tokens = sorted({1} | {verified_tokens(s) for s in shapes})
    entries = sorted({1} | {s.tree_topk for s in shapes if s.tree})
    machine = machine_info(torch.device("cpu"))
    if a.costs:
        try:
            earlier = json.loads(Path(a.costs).read_text())
        except (OSError, ValueError) as e:
            p.error(f"--costs {a.costs}: {e}")
        ms, median = earlier["pass_ms"], earlier["pass_ms_median"]
        missing = [f"full {t}" for t in tokens if f"full {t}" not in ms] + [
            f"module {e}" for e in entries if f"module {e}" not in ms]
        if missing:
            p.error(f"{a.costs} has no {', '.join(missing)}: measure them (leave out --costs)")
        print(f"pass costs from {a.costs} ({earlier['machine']['cpu']}, {earlier['machine']['threads']} threads)")
    else:
        ms, median = pass_costs(m.model, m.module, tokens, entries, a.repeats)
        print(f"{machine['cpu']}, {machine['threads']} threads, bf16, batch 1; fastest of {a.repeats} (median)")
    for name, v in ms.items():
        print(f"  {name:10s} {v:6.2f} ms ({median[name]:.2f})")
    rounds = {s: round_ms(s, ms) for s in shapes}
    taus: dict[DraftShape, float] = {}
    if not a.no_tau:
        ps = load_prompts(a.prompts, limit=a.num_prompts)
        ids = m.tokenizer.encode_batch(ps.prompts)
        for s in shapes:
            taus[s] = tau_of(m, s, ids, a.temperature, a.max_new_tokens)
    chains = [s for s in shapes if not s.tree]
    if taus:  # the best chain by predicted speed; by pass cost alone, the longest
        ref = max(chains, key=lambda s: taus[s] / rounds[s])
    else:
        ref = max(chains, key=lambda s: s.k)
    print(f"\nround cost (passes only); the τ each shape needs to tie {label(ref)} and to be 1.1x as fast"
          + (f"; τ on {len(ps)} {ps.name} prompts at temperature {a.temperature:g} and the predicted speed"
             if taus else "") + ":")
    rows = []
    for s in sorted(shapes, key=lambda s: -(taus[s] / rounds[s]) if taus else rounds[s]):
        need = (taus.get(ref, 1.0) * rounds[s] / rounds[ref])
        what = "tau" if taus else "tau_ratio"  # without τ measured, what it takes is a ratio to the chain's τ
        row = {"shape": label(s), "k": s.k, "nodes": s.tree, "topk": s.tree_topk, "round_ms": rounds[s],
               f"{what}_to_tie": need, f"{what}_for_1_1x": 1.1 * need}
        line = f"  {label(s):14s} {rounds[s]:6.2f} ms"
        if taus:
            row.update(tau=taus[s], tokens_per_s=1e3 * taus[s] / rounds[s],
                       x_best_chain=(taus[s] / rounds[s]) / (taus[ref] / rounds[ref]))
            line += (f"  τ {taus[s]:.2f} (tie {need:.2f}, 1.1x {1.1 * need:.2f})  {row['tokens_per_s']:5.0f} tokens/s"
                     f"  {row['x_best_chain']:.2f}x")
        else:
            line += f"  τ ratio to tie {need:.2f}, for 1.1x {1.1 * need:.2f}"
        rows.append(row)
        print(line)
    if a.json:
        out = {"machine": machine, "torch": torch.__version__, "pass_ms": ms, "pass_ms_median": median,
               "pass_costs_from": a.costs,
               "reference_chain": label(ref), "shapes": rows}
        if taus:
            out.update(prompts=ps.name, num_prompts=len(ps), temperature=a.temperature,
                       max_new_tokens=a.max_new_tokens)
        atomic_write_text(a.json, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
