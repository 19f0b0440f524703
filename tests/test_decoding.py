"""Decoding loop: ar and recycle against uncached references, batches, stops, streaming, counters."""

from __future__ import annotations

import math

import pytest
import torch

from recyclegpt.decoding import Generation, GenerationConfig, StepEvent, generate, stream
from recyclegpt.decoding.prefill import prefill
from recyclegpt.decoding.testing import cache_prefix, random_models, reference_greedy, uncached_logits
from recyclegpt.errors import RecycleError

torch.set_num_threads(1)

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [100]]


class CharTokenizer:
    """Token i decodes to one letter; enough to exercise stop strings."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def models():
    return random_models(seed=0)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS])
def test_ar_matches_uncached_recompute(models, prompts):
    model, _ = models
    res = generate(model, None, prompts, GenerationConfig(mode="ar", max_new_tokens=16))
    assert res.tokens == [reference_greedy(model, p, 16) for p in prompts]
    assert res.finish_reasons == ["length"] * len(prompts)
    assert res.stats.full_passes == 15
    assert res.stats.prefill_passes == len(prompts)  # one pass per prompt
    assert res.stats.tau == 1.0 and res.stats.module_passes == 0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS])
def test_recycle_matches_uncached_reference(seed, prompts):
    """Even outputs come from the full model, odd ones from the module over the true (h, x)."""
    model, module = random_models(seed=seed)
    n = 17
    res = generate(model, module, prompts, GenerationConfig(mode="recycle", max_new_tokens=n))
    for prompt, out in zip(prompts, res.tokens, strict=True):
        assert len(out) == n
        seq = prompt + out
        full, mod = uncached_logits(model, module, seq)
        for j, tok in enumerate(out):
            p = len(prompt) + j  # position of this token
            ref = full[p - 1] if j % 2 == 0 else mod[p - 2]
            assert tok == int(ref.argmax()), (j, tok)
    st = res.stats
    assert st.full_passes == math.ceil((n - 1) / 2) == st.module_passes
    assert st.tau == pytest.approx(2.0)


def test_recycle_and_ar_share_first_token(models):
    model, module = models
    a = generate(model, module, PROMPTS, GenerationConfig(mode="ar", max_new_tokens=1))
    r = generate(model, module, PROMPTS, GenerationConfig(mode="recycle", max_new_tokens=1))
    assert a.tokens == r.tokens and all(len(t) == 1 for t in a.tokens)
    assert a.stats.full_passes == 0 and math.isnan(a.stats.tau)


def test_batch_rows_equal_batch_one(models):
    model, module = models
    for mode in ("ar", "recycle", "verify"):
        cfg = GenerationConfig(mode=mode, max_new_tokens=12, k=2)
        batch = generate(model, module, PROMPTS, cfg).tokens
        single = [generate(model, module, [p], cfg).tokens[0] for p in PROMPTS]
        assert batch == single, mode


def test_per_row_budgets_eos_and_finish_reasons(models):
    model, module = models
    budgets = [3, 12, 1, 7]
    for mode in ("ar", "recycle", "verify"):
        free = generate(model, module, PROMPTS, GenerationConfig(mode=mode, max_new_tokens=12, k=3)).tokens
        for j in (4, 5):  # in recycle, odd j is a module token, even j a full-model token
            eos = free[1][j]
            cut = free[1].index(eos)
            res = generate(model, module, PROMPTS,
                           GenerationConfig(mode=mode, max_new_tokens=budgets, eos_id=eos, k=3))
            assert res.tokens[1] == free[1][:cut], (mode, j)
            assert res.finish_reasons[1] == "eos"
            assert res.stats.new_tokens[1] == cut + 1  # the EOS itself was produced
            for b in (0, 2, 3):
                want = free[b][:budgets[b]]
                reason = "length"
                if eos in want:
                    want, reason = want[:want.index(eos)], "eos"
                assert res.tokens[b] == want and res.finish_reasons[b] == reason, (mode, b)


def test_stop_strings_and_callback(models):
    model, _ = models
    tok = CharTokenizer()
    ref = reference_greedy(model, PROMPTS[0], 20)
    text = tok.decode(ref)
    stop = text[6:8]  # ends at the token with index 7 (or earlier if it occurs before)
    end = text.find(stop) + len(stop)
    cfg = GenerationConfig(mode="ar", max_new_tokens=20, stop_strings=[stop])
    res = generate(model, None, PROMPTS[:1], cfg, tokenizer=tok)
    assert res.tokens[0] == ref[:end] and res.finish_reasons == ["stop"]
    assert res.texts == [text[:end - len(stop)]]
    calls = generate(model, None, PROMPTS[:1], GenerationConfig(mode="ar", max_new_tokens=20),
                     stop_fn=lambda row, ids: len(ids) == 4)
    assert calls.tokens[0] == ref[:4] and calls.finish_reasons == ["stop"]
    with pytest.raises(RecycleError, match="tokenizer"):
        generate(model, None, PROMPTS[:1], GenerationConfig(mode="ar", stop_strings=["x"]))


def test_stream_events_add_up(models):
    model, module = models
    cfg = GenerationConfig(mode="verify", max_new_tokens=10, k=2)
    gen = stream(model, module, PROMPTS, cfg)
    events = list(gen)
    assert all(isinstance(e, StepEvent) for e in events)
    assert events[0].step == 0 and all(len(t) == 1 for t in events[0].tokens)
    assert events[-1].done and not any(e.done for e in events[:-1])
    joined = [sum((e.tokens[b] for e in events), []) for b in range(len(PROMPTS))]
    res = gen.result()
    assert joined == res.tokens == generate(model, module, PROMPTS, cfg).tokens
    assert gen.stats.full_passes == len(events) - 1


def test_decoder_step_api_and_cache_reuse(models):
    model, module = models
    cfg = GenerationConfig(mode="recycle", max_new_tokens=6)
    dec = Generation(model, module, PROMPTS, cfg)
    dec.start()
    caches = model.caches[0].k_cache
    while not dec.done:
        dec.step()
    first = dec.result().tokens
    again = generate(model, module, PROMPTS, cfg)
    assert model.caches[0].k_cache is caches  # same batch and dtype: caches reused
    assert again.tokens == first
    generate(model, module, PROMPTS[:2], cfg)
    assert model.caches[0].k_cache.shape[0] == 2


def test_sequence_limit(models):
    model, module = models
    S = model.cfg.max_seq_len
    prompt = list(range(1, S - 4))  # S - 5 tokens: room for 5 more
    ref = reference_greedy(model, prompt, 5)
    runs = [dict(mode="ar"), dict(mode="recycle"), dict(mode="verify", k=4),
            dict(mode="verify", k=4, drafter="ngram", adaptive_k=True),
            dict(mode="verify", k=2, drafter="hybrid", ngram_k=12)]
    for kw in runs:
        res = generate(model, module, [prompt, [3, 4], prompt[:30] * 2], GenerationConfig(max_new_tokens=50, **kw))
        assert [len(t) for t in res.tokens] == [5, 50, 50] and res.finish_reasons == ["length"] * 3
        if kw["mode"] != "recycle":
            assert res.tokens[0] == ref
    with pytest.raises(RecycleError, match="limit"):
        generate(model, None, [list(range(S))], GenerationConfig(mode="ar"))


def test_zero_new_tokens_and_bad_inputs(models):
    model, module = models
    res = generate(model, module, PROMPTS, GenerationConfig(max_new_tokens=0))
    assert res.tokens == [[]] * len(PROMPTS) and res.stats.prefill_passes == 0
    bad = [
        (dict(mode="fast"), "mode"),
        (dict(k=0), "k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(drafter="magic"), "drafter"),
        (dict(eos_id="x"), "eos_id"),
        (dict(stop_strings="abc"), "stop_strings"),
    ]
    for kw, msg in bad:
        with pytest.raises(RecycleError, match=msg):
            generate(model, module, PROMPTS, GenerationConfig(**kw))
    with pytest.raises(RecycleError, match="empty"):
        generate(model, module, [[]], GenerationConfig())
    with pytest.raises(RecycleError, match="outside"):
        generate(model, module, [[model.cfg.vocab_size]], GenerationConfig())
    with pytest.raises(RecycleError, match="module"):
        generate(model, None, PROMPTS, GenerationConfig(mode="recycle"))
    with pytest.raises(RecycleError, match="entries"):
        generate(model, module, PROMPTS, GenerationConfig(max_new_tokens=[1, 2]))


def test_prefill_fills_caches_as_a_cached_pass_does(models):
    """The prefill (causal over each prompt) leaves the full model's and the module's caches and
    the last logits as a pass through the static caches over the right-padded batch does."""
    model, module = models
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [12, 13, 14, 15], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    B, T = len(prompts), max(map(len, prompts))
    lens = torch.tensor([len(p) for p in prompts])
    with torch.no_grad():
        for net in (model, module):
            net.setup_caches(B)
        seen = []

        def choose(slot, logits):  # the first new token: the full model's argmax
            seen.append((slot, logits))
            return logits.argmax(-1)

        first, g, _, passes = prefill(model, module, prompts, list(range(B)), choose)
        logits = torch.zeros(B, model.cfg.vocab_size)
        for slot, lg in seen:
            logits[slot] = lg[0]
        got = [cache_prefix(net, b, len(p)) for net in (model, module) for b, p in enumerate(prompts)]
        idx = torch.zeros(B, T, dtype=torch.long)
        for b, p in enumerate(prompts):
            idx[b, :len(p)] = torch.tensor(p)
        pos = torch.arange(T).expand(B, T)
        for net in (model, module):
            net.setup_caches(B)
        ref_logits, ref_h = model(idx, pos)
        rows = torch.arange(B)
        nxt = torch.cat([idx[:, 1:], idx[:, :1]], 1)
        nxt[rows, lens - 1] = ref_logits[rows, lens - 1].argmax(-1)  # the first new token after each prompt
        _, ref_g = module(model, nxt, ref_h, pos, logits=False)
        ref = [cache_prefix(net, b, len(p)) for net in (model, module) for b, p in enumerate(prompts)]
    assert passes == len(prompts)
    torch.testing.assert_close(logits, ref_logits[rows, lens - 1], atol=1e-5, rtol=1e-4)
    assert torch.equal(first, ref_logits[rows, lens - 1].argmax(-1))
    torch.testing.assert_close(g, ref_g[rows, lens - 1], atol=1e-5, rtol=1e-4)
    for g_layers, r_layers in zip(got, ref, strict=True):
        for (gk, gv), (rk, rv) in zip(g_layers, r_layers, strict=True):
            torch.testing.assert_close(gk, rk, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(gv, rv, atol=1e-5, rtol=1e-4)
