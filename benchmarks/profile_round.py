"""Where a compiled decoding round spends its time: torch profiler over compiled rounds, per inductor kernel.

    python benchmarks/profile_round.py                       # chain k=3 and tree 6 (depth 4), shipped, bf16
    python benchmarks/profile_round.py --ckpt CKPT --k 4 --tree 8 --steps 30
    python benchmarks/profile_round.py --dtype float32 --ar --k 3 --tree 0   # ar and a 3-chain in fp32

Each configuration decodes one prose prompt in a 1-slot compiled engine; after warm-up, `--steps` rounds run
under the profiler with inductor's kernel profiling on (`cpp.enable_kernel_profile`), and the kernels with the
most self time are printed (names like graph_0_gemm_m7n1024k384_kernel: a GEMM template for 7 rows x 1024
outputs x 384 inputs). Not a test; numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from recyclegpt import RecycleGPT
from recyclegpt.decoding import Engine, GenerationConfig
from recyclegpt.prompts import load_prompts
from recyclegpt.runtime import set_threads

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=str(ROOT / "src/recyclegpt/assets/shipped"))
    p.add_argument("--k", type=int, default=3, help="chain length (default 3)")
    p.add_argument("--tree", type=int, default=6, help="tree nodes, 0 = no tree run (default 6)")
    p.add_argument("--tree-depth", type=int, default=4)
    p.add_argument("--tree-topk", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="profiled rounds per configuration (default 30)")
    p.add_argument("--rows", type=int, default=25, help="kernels listed (default 25)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights (default bfloat16)")
    p.add_argument("--ar", action="store_true", help="profile `ar` rounds (one token a pass) first")
    a = p.parse_args()
    set_threads()
    inductor_config.cpp.enable_kernel_profile = True
    m = RecycleGPT.from_pretrained(a.ckpt, dtype=a.dtype)
    ids = m.encode(load_prompts("prose", 1).prompts)[0]
    configs = ([("ar", dict(mode="ar"))] if a.ar else []) + [("chain", dict(mode="verify", k=a.k))]
    if a.tree:
        configs.append(("tree", dict(mode="verify", k=a.tree_depth, tree=a.tree, tree_topk=a.tree_topk)))
    for name, kw in configs:
        eng = Engine(m.model, m.module, 1, compile=True)
        eng.admit(0, ids, GenerationConfig(max_new_tokens=400, eos_id=None, **kw))
        for _ in range(5):
            eng.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                eng.step()
        print(f"===== {name} {kw}: {a.steps} rounds")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
