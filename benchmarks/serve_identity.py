"""Check that a `recyclegpt bench serve --save-texts --json R.json` run against `recyclegpt serve` returned,
for every greedy request, exactly the text of the same prompt decoded alone offline with `mode="ar"`.

    python benchmarks/serve_identity.py benchmarks/results/serve_verify.json [--ckpt CKPT] [--dtype auto]

The offline decoding uses the checkpoint the server ran (default: the shipped one) in the same dtype
(auto: the server's default) with the report's max_tokens and EOS setting; each distinct prompt is
decoded once, alone, with `ar`, through a decoding engine with the server's kernels: the same number of
slots and compiled rounds by default (`--slots 8 --compile`, as `recyclegpt serve` runs), or eagerly
at batch 1 (`--slots 1 --no-compile`, the plain `generate` path). In bf16 the two offline references can
differ from each other (compiled and eager kernels, 8-row and 1-row GEMMs round differently); the
server must equal the one with its own kernels. Prints the number of identical responses per load
level and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import recyclegpt
from recyclegpt import RecycleGPT
from recyclegpt.decoding import Engine, GenerationConfig
from recyclegpt.prompts import load_prompts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="JSON written by `recyclegpt bench serve --save-texts --json`")
    ap.add_argument("--ckpt", default=str(Path(recyclegpt.__file__).parent / "assets" / "shipped"))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--slots", type=int, default=8, help="the server's --slots (default 8)")
    ap.add_argument("--max-k", type=int, default=3, help="the server's --max-k (default 3)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="compiled rounds, as the server by default (default on)")
    a = ap.parse_args()
    rep = json.loads(Path(a.report).read_text())
    s = rep["settings"]
    if s.get("temperature", 0) != 0:
        print("the report is not greedy: nothing to compare", file=sys.stderr)
        return 2
    m = RecycleGPT.from_pretrained(a.ckpt, device="cpu", dtype=a.dtype)
    prompts = load_prompts(s["prompt_set"])
    by_id = dict(zip(prompts.ids, prompts.prompts, strict=True))
    eos = None if s.get("ignore_eos", True) else m.tokenizer.eos_id
    offline: dict[str, str] = {}
    engine = Engine(m.model, None, a.slots, compile=a.compile, tokenizer=m.tokenizer, width=a.max_k)
    cfg = GenerationConfig(mode="ar", max_new_tokens=s["max_tokens"], eos_id=eos)
    with torch.inference_mode():
        for pid in sorted({r["prompt_id"] for lv in rep["levels"] for r in lv["requests"]}):
            engine.admit(0, m.tokenizer.encode(by_id[pid]), cfg)
            while engine.decoding():
                engine.step()
            offline[pid] = m.tokenizer.decode(engine.request(0).generated)
            engine.release(0)
    bad = 0
    for lv in rep["levels"]:
        reqs = [r for r in lv["requests"] if r.get("ok")]
        same = sum(r["text"] == offline[r["prompt_id"]] for r in reqs)
        bad += len(reqs) - same
        print(f"{lv.get('label', lv.get('concurrency'))}: {same}/{len(reqs)} responses identical to offline ar "
              f"({a.slots} slots, {'compiled' if a.compile else 'eager'})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
