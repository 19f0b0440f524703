"""Do the compiled GEMMs round a token's row the same way in a 1-token and a 4-token pass?

    python benchmarks/row_invariance.py CKPT [--layers 0] [--prompt 3] [--json OUT]

Greedy `verify` equals `ar` bit for bit only if every kernel computes a token's row the same way
whatever the pass's width (docs/results.md, "Exactness in bfloat16"). This takes each linear layer of the
chosen blocks of the full model (and the LM head), compiled as decoding compiles a round (bf16,
`decoding.compiled.compile_pass`), and feeds it the real
inputs it sees on one code prompt (captured from an eager pass): at every position t, one call over
row t alone and one over rows t..t+3; it counts the positions where row t's outputs differ, and the
elements. `RECYCLEGPT_COMPILE_MODE` chooses the GEMMs as in decoding.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn

from recyclegpt import RecycleGPT
from recyclegpt.decoding import compiled
from recyclegpt.files import atomic_write_text
from recyclegpt.prompts import load_prompts
from recyclegpt.runtime import machine_info, set_threads


def linear_call(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return lin(x)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--layers", type=int, nargs="+", default=[0], help="blocks of the full model (default 0)")
    p.add_argument("--prompt", type=int, default=3, help="which code prompt feeds the layers (default 3)")
    p.add_argument("--json", help="write the counts here")
    a = p.parse_args()
    set_threads()
    m = RecycleGPT.from_pretrained(a.ckpt, dtype="bfloat16")
    model = m.model
    linears = {f"layers.{i}.{name}": mod for i in a.layers for name, mod in model.layers[i].named_modules()
               if isinstance(mod, nn.Linear)}
    linears["output"] = model.output
    inputs: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, args[0]))
             for name, mod in linears.items()]
    ids = m.tokenizer.encode_batch([load_prompts("code").prompts[a.prompt]])[0]
    model(torch.tensor([ids]))  # one eager causal pass: each linear's input [1, T, in]
    for h in hooks:
        h.remove()
    opts = compiled.inductor_options(1, model)
    mode = os.environ.get("RECYCLEGPT_COMPILE_MODE", "auto")
    print(f"{a.ckpt}: bf16, compile mode {mode} (max_autotune {opts['max_autotune']}), code prompt {a.prompt}, "
          f"{len(ids)} tokens; row t alone against row t of rows t..t+3:")
    results = {}
    for name, lin in linears.items():
        x = inputs[name]
        one, four = (compiled.compile_pass(linear_call, model) for _ in range(2))
        positions, elements = [], 0
        for t in range(x.shape[1] - 3):
            a1, a4 = one(lin, x[:, t:t + 1]), four(lin, x[:, t:t + 4])
            differ = int((a1[0, 0] != a4[0, 0]).sum())
            if differ:
                positions.append(t)
                elements += differ
        results[name] = dict(shape=list(lin.weight.shape), positions=x.shape[1] - 3, differing_positions=positions,
                             differing_elements=elements)
        print(f"  {name:28s} {lin.in_features:5d} -> {lin.out_features:5d}: {len(positions):3d} of "
              f"{x.shape[1] - 3} positions differ ({elements} elements)")
    if a.json:
        atomic_write_text(a.json, json.dumps({"checkpoint": a.ckpt, "compile_mode": mode, "prompt": a.prompt,
                                              "machine": machine_info(torch.device("cpu")),
                                              "torch": torch.__version__, "linears": results}, indent=1))


if __name__ == "__main__":
    main()
