"""Decoding: `ar`, `recycle` (the paper, lossy) and `verify` (lossless draft-and-verify).

Public API
----------
    from recyclegpt.decoding import generate, stream, Engine, GenerationConfig

    res = generate(model, module, prompts, GenerationConfig(mode="verify", k=3, max_new_tokens=64),
                   tokenizer=None, stop_fn=None)
    res.tokens            # list[list[int]]: new tokens per row (EOS excluded; a stop string's last
                          #   token included, nothing after it)
    res.finish_reasons    # per row: 'eos' | 'stop' | 'length'
    res.texts             # with a tokenizer: decoded text cut before any stop string, else None
    res.stats             # DecodeStats: full_passes, module_passes, prefill_passes, new_tokens,
                          #   row_passes, tau, acceptance_by_position, k_used, prefill_s, decode_s

    gen = stream(model, module, prompts, config)
    for event in gen:     # StepEvent(step, tokens, finish_reasons, done); step 0 is the prefill
        ...               # event.tokens[b]: row b's newly accepted ids
    res = gen.result()

    engine = Engine(model, module, slots=8, compile=False, tokenizer=None)   # continuous batching
    out = engine.admit(slot, prompt_ids, GenerationConfig(...))  # SlotOutput(tokens, finish)
    outs = engine.step()                                          # per slot: SlotOutput | None
    engine.release(slot)

- `GenerationConfig` (one request's settings, or a whole batch's for `generate`): mode, max_new_tokens,
  k, temperature, top_k, top_p, seed, eos_id, stop_strings, drafter ('module' | 'ngram' | 'hybrid' |
  a `HostDrafter`), adaptive_k, k_max, ngram_k, ngram_max_n, ngram_min_n, compile.
- `HostDrafter` protocol: `propose(row, context, k) -> list[int]`, `reset(row)`; `NgramDrafter`.
- `stop_fn(row, generated_ids) -> bool`: a callback alternative to stop strings.

What a request may ask for (ranges, text) is one table, `limits.SETTINGS`, shared by the API, the
command line and the server.

`model` is a `FullModel` (or the generic transformers backend), `module` a `RecyclableModule` (None is
fine for `ar` and `drafter='ngram'`). Bad arguments raise `RecycleError`.

Layers, in the order a token flows through them:
- `engine`: slots, admission, the host side of a round (plans, noise, stops, counters);
- `prefill`: prompts into their slots' cache rows, first token, the module's first state;
- `rounds`: the one round function of every mode (`decode_round`) and its per-slot state;
- `sampling`: logits -> probabilities with per-row settings, the exponential race, acceptance;
- `compiled`: `decode_round` through torch.compile, cached per round shape and batch size;
- `generation`: `generate` / `stream` over an engine; `drafters`, `stops`, `options`, `limits`.
`testing` has small random models and uncached references for tests. Definitions of τ, acceptance
by position and lossless: docs/definitions.md.
"""

from .drafters import AdaptiveK, HostDrafter, NgramDrafter
from .engine import Engine, SlotOutput
from .generation import DecodeStats, Generation, GenerationResult, StepEvent, generate, stream
from .options import GenerationConfig
from .sampling import logits_to_probs

__all__ = [
    "AdaptiveK",
    "DecodeStats",
    "Engine",
    "Generation",
    "GenerationConfig",
    "GenerationResult",
    "HostDrafter",
    "NgramDrafter",
    "SlotOutput",
    "StepEvent",
    "generate",
    "logits_to_probs",
    "stream",
]
