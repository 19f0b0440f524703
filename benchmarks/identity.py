"""Is greedy `verify` token-identical to `ar` on real prompts? Every code and prose prompt, per lane.

    python benchmarks/identity.py CKPT [--dtype bfloat16] [--compile] [--max-new-tokens 128] [--json OUT]

Decodes each of the 32 shipped prompts (16 code, 16 prose) alone with greedy `ar`, `verify` k=3, k=5 and a
tree of 12 nodes 5 deep (all compiled with --compile, all eager without), EOS ignored, and counts the
prompts whose output equals `ar`'s, with the first differing token of the others. The tests check identity
in float32 on tiny models; this checks a real checkpoint in the dtype you serve. In bfloat16 a difference
means the passes of different widths rounded a logit differently and a near tie went the other way
(docs/results.md, "Exactness in bfloat16"). `RECYCLEGPT_COMPILE_MODE` chooses the compiled GEMMs (decoding/compiled.py).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from recyclegpt import RecycleGPT
from recyclegpt.decoding import GenerationConfig, generate
from recyclegpt.files import atomic_write_text
from recyclegpt.prompts import load_prompts
from recyclegpt.runtime import machine_info, set_threads

LANES = {"verify k=3": dict(mode="verify", k=3), "verify k=5": dict(mode="verify", k=5),
         "verify tree 12@5": dict(mode="verify", k=5, tree=12)}


@torch.inference_mode()
def logits_at(m: RecycleGPT, context: list[int], ar_token: int, verify_token: int) -> dict:
    """The two tokens' logits after `context`, from one eager pass over it without the KV cache: how near
    the tie was that the two decodings broke differently."""
    logits = m.model(torch.tensor([context], device=m.device))[0][0, -1].float()
    return dict(ar_token=ar_token, verify_token=verify_token, ar_logit=logits[ar_token].item(),
                verify_logit=logits[verify_token].item())


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where a and b differ (the shorter length if one is a prefix of the other), or None."""
    diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    return diff if diff is not None or len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--compile", action="store_true", help="compiled rounds (default: eager)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--json", help="write the counts and first differences here")
    a = p.parse_args()
    set_threads()
    m = RecycleGPT.from_pretrained(a.ckpt, dtype=a.dtype)
    ids = m.tokenizer.encode_batch(load_prompts("code").prompts + load_prompts("prose").prompts)

    def decode(kw: dict) -> list[list[int]]:
        cfg = dict(max_new_tokens=a.max_new_tokens, eos_id=None, compile=a.compile, **kw)
        return [generate(m.model, m.module, [prompt], GenerationConfig(**cfg)).tokens[0] for prompt in ids]

    ref = decode(dict(mode="ar"))
    mode = os.environ.get("RECYCLEGPT_COMPILE_MODE", "auto")
    kind = f"{a.dtype}, {'compiled' if a.compile else 'eager'}, compile mode {mode}"
    print(f"{a.ckpt}: {kind}; {len(ids)} prompts x {a.max_new_tokens} tokens; identical to ar:")
    lanes, ties = {}, {}
    for label, kw in LANES.items():
        outs = decode(kw)
        diffs = [first_difference(r, o) for r, o in zip(ref, outs, strict=True)]
        same = sum(d is None for d in diffs)
        differ = {i: d for i, d in enumerate(diffs) if d is not None}
        lanes[label] = dict(identical=same, first_difference=differ)
        print(f"  {label:18s} {same}/{len(ids)}" + (f"  (prompt: first differing token {differ})" if differ else ""))
        for i, d in differ.items():
            if i not in ties and d < min(len(ref[i]), len(outs[i])):
                ties[i] = logits_at(m, ids[i] + ref[i][:d], ref[i][d], outs[i][d]) | {"token": d}
    for i, t in sorted(ties.items()):
        print(f"  prompt {i} at token {t['token']}: one uncached eager pass gives ar's token {t['ar_token']} the logit "
              f"{t['ar_logit']:.4f}, verify's {t['verify_token']} {t['verify_logit']:.4f}")
    if a.json:
        atomic_write_text(a.json, json.dumps({"checkpoint": a.ckpt, "dtype": a.dtype, "compile": a.compile,
                                              "compile_mode": mode,
                                              "prompts": len(ids), "max_new_tokens": a.max_new_tokens,
                                              "machine": machine_info(torch.device("cpu")),
                                              "torch": torch.__version__, "lanes": lanes,
                                              "logits_at_first_difference": ties}, indent=1))


if __name__ == "__main__":
    main()
