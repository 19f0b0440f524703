"""Compiled rounds under several inductor option sets, timed in one process, interleaved.

    python benchmarks/inductor_options.py                                  # ar, float32, the built-in variants
    python benchmarks/inductor_options.py --mode verify --dtype bfloat16 --variant wrap='{"cpp_wrapper": true}'
    python benchmarks/inductor_options.py --json benchmarks/results/inductor_options_avx512_fp32.json

A shared VM's speed drifts by tens of percent within minutes, so comparing option sets across processes or
runs says little: here every variant compiles its own graph of the same round (shipped checkpoint, one code
prompt, one slot), then the variants take turns, `--turns` times `--rounds` rounds each, and each variant's
median and best milliseconds per round are reported, with the ratio to the first variant. A variant is a
name and a JSON object of inductor options laid over the defaults (`decoding.compiled.INDUCTOR_OPTIONS`);
`"kernels": false` turns recyclegpt's CPU kernels off (`recyclegpt.kernels`: torch's ops then, as inductor
picks them); `"max_autotune": true` also lifts the defaults' limits on batch and weight size
(AUTOTUNE_MAX_*), so the C++ GEMM templates are tried whatever the model's size. Not a test: numbers depend on
the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "default": {},
    "torch-gemms": {"kernels": False},
    "cpp-wrapper": {"cpp_wrapper": True},
    "max-autotune": {"max_autotune": True},
    "no-concat-linear": {"cpp.enable_concat_linear": False},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--ckpt", default=str(ROOT / "src/recyclegpt/assets/shipped"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mode", default="ar", choices=["ar", "verify"], help="ar, or verify with a k=3 chain")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help="an option set (repeatable; default: " + ", ".join(VARIANTS) + ")")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--rounds", type=int, default=20, choices=range(1, 61), metavar="1..60",
                   help="rounds per turn (default 20)")
    p.add_argument("--json", type=Path, help="write the report here")
    a = p.parse_args(argv)
    variants = dict(VARIANTS)
    if a.variant:
        variants = {}
        for v in a.variant:
            name, _, text = v.partition("=")
            try:
                variants[name] = json.loads(text)
            except json.JSONDecodeError as e:
                p.error(f"--variant {name}: not a JSON object ({e.msg}); write NAME='{{\"cpp_wrapper\": true}}'")

    import torch

    from recyclegpt import RecycleGPT, kernels
    from recyclegpt.bench.report import write_json
    from recyclegpt.decoding import Engine, GenerationConfig, compiled
    from recyclegpt.prompts import load_prompts
    from recyclegpt.runtime import machine_info, set_threads

    set_threads()
    m = RecycleGPT.from_pretrained(a.ckpt, dtype=a.dtype)
    prompt = m.encode(load_prompts("code", 1).prompts)[0]
    kw = dict(mode="ar") if a.mode == "ar" else dict(mode="verify", k=3)
    defaults = (dict(compiled.INDUCTOR_OPTIONS), compiled.AUTOTUNE_MAX_BATCH, compiled.AUTOTUNE_MAX_WEIGHT_BYTES)
    # Each turn starts the request afresh (untimed prefill), with tokens enough for its rounds.
    config = GenerationConfig(max_new_tokens=(a.rounds + 5) * 4 + 1, eos_id=None, **kw)

    engines, compile_s = {}, {}
    for name, variant in variants.items():
        opts = {k: v for k, v in variant.items() if k != "kernels"}
        kernels.set_enabled(variant.get("kernels", True))
        compiled.INDUCTOR_OPTIONS = {**defaults[0], **opts}
        if opts.get("max_autotune"):
            compiled.AUTOTUNE_MAX_BATCH = compiled.AUTOTUNE_MAX_WEIGHT_BYTES = 1 << 62
        eng = Engine(m.model, m.module, 1, compile=True)
        t0 = time.perf_counter()
        eng.admit(0, prompt, config)
        for _ in range(5):
            eng.step()
        compile_s[name] = round(time.perf_counter() - t0, 1)
        compiled.INDUCTOR_OPTIONS, compiled.AUTOTUNE_MAX_BATCH, compiled.AUTOTUNE_MAX_WEIGHT_BYTES = defaults
        engines[name] = eng
        print(f"{name}: compiled in {compile_s[name]} s", flush=True)
    ms: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(a.turns):
        for name, eng in engines.items():
            kernels.set_enabled(variants[name].get("kernels", True))  # the compile key holds it: its own graph
            eng.release(0)
            eng.admit(0, prompt, config)
            t0 = time.perf_counter()
            for _ in range(a.rounds):
                eng.step()
            ms[name].append((time.perf_counter() - t0) / a.rounds * 1e3)
    first = statistics.median(ms[next(iter(variants))])
    rows = []
    print(f"\n{'variant':24s} {'median ms/round':>16s} {'best':>8s} {'x first':>8s}")
    for name in variants:
        med = statistics.median(ms[name])
        rows.append({"variant": name, "options": variants[name], "median_ms": round(med, 3),
                     "best_ms": round(min(ms[name]), 3), "ratio_to_first": round(med / first, 3),
                     "compile_s": compile_s[name], "turns_ms": [round(x, 3) for x in ms[name]]})
        print(f"{name:24s} {med:16.2f} {min(ms[name]):8.2f} {med / first:8.2f}")
    if a.json:
        write_json({"checkpoint": a.ckpt, "dtype": a.dtype, "mode": a.mode, "rounds": a.rounds, "turns": a.turns,
                    "machine": machine_info(torch.device("cpu")), "variants": rows}, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
