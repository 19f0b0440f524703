"""Decoding: `ar`, `recycle` (the paper, lossy) and `verify` (lossless draft-and-verify).

Public API
----------
    from recyclegpt.decoding import generate, stream, GenerationConfig

    res = generate(model, module, prompts, GenerationConfig(mode="verify", k=3, max_new_tokens=64),
                   tokenizer=None, stop_fn=None)
    res.tokens            # list[list[int]]: new tokens per row (EOS excluded; a stop string's last
                          #   token included, nothing after it)
    res.finish_reasons    # per row: 'eos' | 'stop' | 'length'
    res.texts             # with a tokenizer: decoded text cut before any stop string, else None
    res.stats             # DecodeStats: full_passes, module_passes, prefill_passes, new_tokens,
                          #   row_passes, tau, acceptance_by_position, k_used, prefill_s, decode_s

    gen = stream(model, module, prompts, config, tokenizer=None, stop_fn=None)
    for event in gen:     # StepEvent(step, tokens, finish_reasons, done); step 0 is the prefill
        ...               # event.tokens[b]: row b's newly accepted ids (feed a StreamDecoder)
    res = gen.result()

- `generate(model, module, prompts, config=None, tokenizer=None, stop_fn=None) -> GenerationResult`
- `stream(...) -> Generation` (iterable of `StepEvent`; `.result()`, `.stats`)
- `Decoder(model, module, config, tokenizer=None, stop_fn=None)`: `.start(prompts)`, `.step()`,
  `.done`, `.result()` -- the loop `stream` drives; one full-model pass per `step()`.
- `GenerationConfig`: mode, max_new_tokens (int or one per row), k, temperature, top_k, top_p,
  seed, eos_id (int or list), stop_strings, drafter ('module' | 'ngram' | 'hybrid' | a
  `HostDrafter`), adaptive_k, k_max, ngram_k, ngram_max_n, ngram_min_n, compile (torch.compile'd
  rounds: `compiled`).
- `HostDrafter` protocol: `propose(row, context, k) -> list[int]`, `reset(row)`; `NgramDrafter`.
- `stop_fn(row, generated_ids) -> bool`: a callback alternative to stop strings.

`model` is a `FullModel`, `module` a `RecyclableModule` (None is fine for `ar` and
`drafter='ngram'`). Caches are set up inside (batch = len(prompts), dtype = the model's weight
dtype) and reused when batch and dtype match. Prompts may have different lengths: they are
right-padded and every row keeps its own positions. Bad arguments raise `RecycleError`.

Semantics (DESIGN.md "Decoding"): `recycle` alternates module token x_{p+1} and full-model token
x_{p+2} per full pass over two tokens (tau = 2); `verify` drafts k tokens (module chain, n-gram
prompt lookup, or per-row hybrid), scores them in one full pass and keeps the longest accepted
prefix plus one token of the full model: greedy output is token-identical to `ar`, sampled output
has `ar`'s distribution (speculative sampling). Layers: `sampling` (logits -> probs, acceptance
rules), `steps` (tensor-only ladder: prefill, decode_one, module_catch_up, draft_chain,
verify_pass, verify_round_module, recycle_round), `engine` (batch loop, stops, counters),
`drafters` (n-gram, adaptive k, hybrid choice), `stops`, `compiled` (each step one compiled graph:
`ar`, `recycle`, and `verify` per k, acceptance inside; `compile=True`). `testing` has small random models and
uncached references for tests; `python -m recyclegpt.decoding.bench_sanity` times the ladder.

Counters: tau = new tokens / full passes during decoding, per row-pass (the prefill's pass and
the token it yields are excluded; bonus tokens count), so `ar` has tau 1 and `recycle` 2.
acceptance_by_position[i] = P(draft i+1 accepted | drafts 1..i accepted), over active rows.
Finished rows stay in the batch as frozen slots until every row is done.
"""

from .drafters import AdaptiveK, HostDrafter, NgramDrafter
from .engine import Decoder, DecodeStats, Generation, GenerationResult, StepEvent, generate, stream
from .options import GenerationConfig
from .sampling import Picker, logits_to_probs, validate_sampling

__all__ = [
    "AdaptiveK",
    "DecodeStats",
    "Decoder",
    "Generation",
    "GenerationConfig",
    "GenerationResult",
    "HostDrafter",
    "NgramDrafter",
    "Picker",
    "StepEvent",
    "generate",
    "logits_to_probs",
    "stream",
    "validate_sampling",
]
