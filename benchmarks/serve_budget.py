"""Where a served request's engine time goes: its prefill against its share of the decoding rounds (not a test).

    python benchmarks/serve_budget.py [--ckpt DIR] [--batch 8] [--tokens 128] [--json OUT.json]

The server admits a request by prefilling its prompt alone (one prompt per pass: exactness), then decodes it
in rounds shared by every busy slot. For the shipped code prompts this measures, in one process with the
server's compiled graphs and the machine's threads: each prompt's prefill (ms), and per mode (`ar`, `verify`
k=3) the compiled round at `--batch` busy rows (ms) and the tokens a row gains per round. A request of
`--tokens` tokens then costs prefill + rounds x round / batch of engine time, and the engine's ceiling at
that concurrency is tokens / that cost, before any HTTP, detokenizing or client work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from recyclegpt import RecycleGPT
from recyclegpt.decoding import Engine, GenerationConfig
from recyclegpt.files import atomic_write_text
from recyclegpt.prompts import load_prompts
from recyclegpt.runtime import machine_info, set_threads

SHIPPED = Path(__file__).resolve().parent.parent / "src" / "recyclegpt" / "assets" / "shipped"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(SHIPPED))
    ap.add_argument("--batch", type=int, default=8, help="busy rows in a round (default 8)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per request (default 128)")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds per mode (default 30)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    set_threads()
    m = RecycleGPT.from_pretrained(a.ckpt, "cpu", "auto")
    prompts = [m.tokenizer.encode(p) for p in load_prompts("code").prompts]
    report: dict = {"machine": machine_info(torch.device("cpu")), "batch": a.batch, "tokens": a.tokens, "modes": {}}
    with torch.inference_mode():
        engine = Engine(m.model, m.module, a.batch, compile=True, tokenizer=m.tokenizer, width=3)
        cfg = GenerationConfig(mode="verify", k=3, max_new_tokens=a.tokens, eos_id=None)
        prefill_ms = []
        for i, ids in enumerate(prompts * 2):  # the first pass over the prompts warms the allocator up
            t0 = time.perf_counter()
            engine.admit(0, ids, cfg)
            if i >= len(prompts):
                prefill_ms.append((time.perf_counter() - t0) * 1e3)
            engine.release(0)
        report["prompt_tokens_mean"] = statistics.mean(len(p) for p in prompts)
        report["prefill_ms_mean"] = statistics.mean(prefill_ms)
        print(f"prefill: {report['prefill_ms_mean']:.1f} ms per prompt (mean of {len(prompts)} code prompts, "
              f"{report['prompt_tokens_mean']:.0f} tokens)")
        for mode in ("ar", "verify"):
            cfg = GenerationConfig(mode=mode, k=3, max_new_tokens=10_000, eos_id=None)
            for b in range(a.batch):
                engine.admit(b, prompts[b % len(prompts)], cfg)
            for _ in range(3):
                engine.step()  # compiles the round (or reads it from inductor's cache)
            times, produced = [], sum(engine.request(b).stats.produced for b in range(a.batch))
            for _ in range(a.rounds):
                t0 = time.perf_counter()
                engine.step()
                times.append((time.perf_counter() - t0) * 1e3)
            per_round = (sum(engine.request(b).stats.produced for b in range(a.batch)) - produced) / a.rounds / a.batch
            for b in range(a.batch):
                engine.release(b)
            round_ms = statistics.median(times)
            decode_ms = a.tokens / per_round * round_ms / a.batch
            ceiling = a.tokens / (report["prefill_ms_mean"] + decode_ms) * 1e3  # B requests: B prefills, R rounds
            report["modes"][mode] = dict(round_ms=round_ms, tokens_per_round=per_round, decode_ms=decode_ms,
                                         ceiling_tok_s=ceiling)
            print(f"{mode:6s}: round {round_ms:.2f} ms at batch {a.batch}, {per_round:.2f} tokens per row and round;"
                  f" a {a.tokens}-token request: prefill {report['prefill_ms_mean']:.0f} ms + decoding "
                  f"{decode_ms:.0f} ms of engine time -> at most {ceiling:.0f} tok/s with {a.batch} busy")
    if a.json:
        atomic_write_text(a.json, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
