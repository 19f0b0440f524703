"""Engine steps on the main thread against steps on a second thread (not a test).

    python benchmarks/thread_teams.py [--ckpt DIR] [--mode verify] [--tokens 64] [--json OUT.json]

The server decodes on an engine thread while its main thread serves HTTP. OpenMP (libgomp, torch's)
gives every thread that runs a parallel op a team of workers for that thread's life; once the teams'
threads outnumber the cores it stops spinning between parallel regions, so the engine's workers sleep
and wake on every op. Each lane runs in a fresh process (a team, once made, stays):

- main:          the steps on the main thread;
- thread:        the main thread runs a parallel op first (it loads the model), the steps on a second thread;
- thread-serial: the main thread is made serial first (`runtime.serial_here`, what `recyclegpt serve`
                 does), the steps on a second thread with the main thread's former thread count.

Reports the mean engine step (ms) per lane over the shipped code prompts, eager, batch 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

LANES = ("main", "thread", "thread-serial")


def run_lane(lane: str, ckpt: str, mode: str, tokens: int) -> float:
    import torch

    from recyclegpt.api import RecycleGPT
    from recyclegpt.decoding import Engine, GenerationConfig
    from recyclegpt.prompts import load_prompts
    from recyclegpt.runtime import serial_here, set_threads

    set_threads()
    threads = serial_here() if lane == "thread-serial" else torch.get_num_threads()
    rg = RecycleGPT.from_pretrained(ckpt)  # on the main thread: a team there unless it is serial
    prompts = [rg.tokenizer.encode(p) for p in load_prompts("code").prompts]
    out: list[float] = []

    def steps() -> None:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            engine = Engine(rg.model, rg.module, 1, width=3)
            cfg = GenerationConfig(mode=mode, k=3, max_new_tokens=tokens)
            n, spent = 0, 0.0
            for p in prompts:
                engine.admit(0, p, cfg)
                while engine.decoding():
                    t0 = time.perf_counter()
                    engine.step()
                    spent += time.perf_counter() - t0
                    n += 1
                engine.release(0)
            out.append(1e3 * spent / n)

    if lane == "main":
        steps()
    else:
        worker = threading.Thread(target=steps)
        worker.start()
        worker.join()
    return out[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=str(Path(__file__).resolve().parents[1] / "src/recyclegpt/assets/shipped"))
    ap.add_argument("--mode", choices=("ar", "verify"), default="verify")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--lane", choices=LANES, help=argparse.SUPPRESS)  # one lane, in this process
    a = ap.parse_args()
    if a.lane:
        print(json.dumps({"step_ms": run_lane(a.lane, a.ckpt, a.mode, a.tokens)}))
        return
    import torch

    from recyclegpt.files import atomic_write_text
    from recyclegpt.runtime import machine_info

    results = {}
    for lane in LANES:
        cmd = [sys.executable, __file__, "--lane", lane, "--ckpt", a.ckpt, "--mode", a.mode, "--tokens", str(a.tokens)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[lane] = json.loads(line)["step_ms"]
        print(f"{lane:14s} {results[lane]:6.2f} ms per step  ({results[lane] / results['main']:.2f}x main)",
              flush=True)
    if a.json:
        report = {"mode": a.mode, "tokens": a.tokens, "step_ms": results,
                  "machine": machine_info(torch.device("cpu"))}
        atomic_write_text(a.json, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
