"""GenerationConfig(compile=True): the round function through torch.compile against eager decoding.

Compiling is slow (a cold inductor graph of the tiny model takes seconds to tens of seconds on a
loaded 2-core machine), so one test runs inductor itself on each kind of round (fp32, one layer,
without max-autotune): compiled `verify` (module drafts and host drafts) == compiled `ar` == eager
`ar` token for token, and compiled `recycle` == eager `recycle`. The others check the round logic
through dynamo + the `eager` backend (the same dynamo-captured graphs, executed op by op).
"""

from __future__ import annotations

import pytest
import torch

from recyclegpt.decoding import GenerationConfig, compiled, generate
from recyclegpt.decoding.rounds import RoundShape
from recyclegpt.decoding.sampling import accept, race
from recyclegpt.decoding.testing import copy_models, random_models
from recyclegpt.errors import RecycleError

torch.set_num_threads(1)

PROMPT = [1, 2, 3, 4, 5]


@pytest.fixture
def light_backend(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "eager")


@pytest.fixture(scope="module")
def pair():
    return copy_models(seed=0, context=4.0)  # drafts partly right: acceptance ~0.6 per position


@pytest.fixture(scope="module")
def small_pair():
    return copy_models(seed=0, context=8.0, n_layer=1)  # one layer: less code for inductor; acceptance ~0.6


def _gen(model, module, prompts, **kw):
    return generate(model, module, prompts, GenerationConfig(**kw))


@pytest.mark.slow
def test_inductor_verify_equals_ar_fp32(small_pair, monkeypatch):
    # No autotuning (minutes per graph); the C++ wrapper: one g++ run per graph instead of one per kernel.
    monkeypatch.setitem(compiled.INDUCTOR_OPTIONS, "max_autotune", False)
    monkeypatch.setitem(compiled.INDUCTOR_OPTIONS, "cpp_wrapper", True)
    model, module = small_pair
    eager_ar = _gen(model, module, [PROMPT], mode="ar", max_new_tokens=24)
    ar = _gen(model, module, [PROMPT], mode="ar", max_new_tokens=24, compile=True)
    ver = _gen(model, module, [PROMPT], mode="verify", k=2, max_new_tokens=24, compile=True)
    assert ver.tokens == ar.tokens  # lossless within the compiled path
    assert ar.tokens == eager_ar.tokens  # fp32, peaked logits: compiled rounding does not flip a choice
    assert 1 < ver.stats.tau < 3 and ver.stats.full_passes < ar.stats.full_passes
    assert any(k.startswith("verify k=2 B=1 float32") for k in compiled.COMPILE_STATS.seconds)
    rec = _gen(model, module, [PROMPT], mode="recycle", max_new_tokens=24, compile=True)
    assert rec.tokens == _gen(model, module, [PROMPT], mode="recycle", max_new_tokens=24).tokens
    rep = PROMPT * 3  # prompt lookup finds matches
    host = _gen(model, module, [rep], mode="verify", drafter="ngram", k=3, max_new_tokens=24, compile=True)
    assert host.tokens == _gen(model, module, [rep], mode="ar", max_new_tokens=24).tokens
    assert host.stats.drafter_rounds.get("ngram", 0) > 0
    # Another batch size makes new caches; the frozen B=1 graphs must come back to their own caches
    # (no recompile, same output).
    _gen(model, module, [PROMPT, [7, 8]], mode="verify", k=2, max_new_tokens=8)
    compiles = dict(compiled.COMPILE_STATS.seconds)
    again = _gen(model, module, [PROMPT], mode="verify", k=2, max_new_tokens=24, compile=True)
    assert again.tokens == ar.tokens and compiled.COMPILE_STATS.seconds == compiles


def test_rounds_match_eager_and_do_not_recompile(pair, light_backend, monkeypatch):
    """Every mode through the compiled rounds, batch of unequal prompts with EOS: equal to eager, and
    dynamo sees each round exactly once (static shapes; strides of carried tensors stable)."""
    monkeypatch.setattr(compiled, "SKIP_GUARDS", False)  # evaluate guards so a recompile would show
    model, module = pair
    prompts = [PROMPT, [7, 8], [9, 10, 11, 12, 13, 14, 15, 16], [100]]
    counters = torch._dynamo.utils.counters["stats"]
    for kw in (dict(mode="ar"), dict(mode="recycle"), dict(mode="verify", k=2), dict(mode="verify", k=3)):
        cfg = dict(max_new_tokens=[20, 9, 14, 3], eos_id=[17], **kw)
        before = counters["unique_graphs"]
        comp = _gen(model, module, prompts, compile=True, **cfg)
        assert counters["unique_graphs"] - before == 1, kw
        eager = _gen(model, module, prompts, **cfg)
        assert comp.tokens == eager.tokens, kw
        assert comp.finish_reasons == eager.finish_reasons
        if kw["mode"] == "verify":
            ref = _gen(model, module, prompts, mode="ar", max_new_tokens=[20, 9, 14, 3], eos_id=[17])
            assert comp.tokens == ref.tokens
            assert comp.stats.module_passes == kw["k"] * comp.stats.full_passes


def test_compiled_round_is_cached_and_weight_changes_recompile(light_backend):
    model, module = random_models(seed=3)
    ar = RoundShape(0, 0, False, False)
    a = compiled.compiled_round(model, module, ar, 1)
    assert compiled.compiled_round(model, module, ar, 1) is a
    assert compiled.compiled_round(model, module, ar, 2) is not a  # batch is part of the key
    assert compiled.compiled_round(model, module, RoundShape(0, 0, False, True), 1) is not a
    with torch.no_grad():
        model.norm.weight.mul_(2.0)  # in-place change: frozen constants would be stale
    b = compiled.compiled_round(model, module, ar, 1)
    assert b is not a
    model.norm.weight = torch.nn.Parameter(model.norm.weight.detach().clone())  # replaced, not changed
    assert compiled.compiled_round(model, module, ar, 1) is not b
    compiled.clear_cache(model)


def test_verify_near_max_seq_len_stays_in_one_graph(light_backend):
    """Near the end of the context a row drafts fewer tokens in the same graph (padding lands on the
    junk position): no other graph, output identical to `ar`."""
    model, module = copy_models(seed=1, context=4.0, max_seq_len=24)
    prompt = list(range(1, 15))
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    comp = _gen(model, module, [prompt], mode="verify", k=3, max_new_tokens=50, compile=True)
    assert counters["unique_graphs"] - before == 1
    ref = _gen(model, module, [prompt], mode="ar", max_new_tokens=50)
    assert comp.tokens == ref.tokens and len(comp.tokens[0]) == 24 - len(prompt)


def test_sampled_compiled_rounds(pair, light_backend):
    model, module = pair
    for kw in (dict(mode="ar"), dict(mode="recycle"), dict(mode="verify", k=2)):
        a = _gen(model, module, [PROMPT, [7, 8]], compile=True, temperature=1.0, top_k=20, seed=5,
                 max_new_tokens=12, **kw)
        b = _gen(model, module, [PROMPT, [7, 8]], compile=True, temperature=1.0, top_k=20, seed=5,
                 max_new_tokens=12, **kw)
        assert a.tokens == b.tokens and all(len(t) == 12 for t in a.tokens), kw  # reproducible per seed
        eager = _gen(model, module, [PROMPT, [7, 8]], temperature=1.0, top_k=20, seed=5, max_new_tokens=12, **kw)
        assert eager.tokens == a.tokens, kw  # the same random stream eagerly and compiled
    # A near-zero temperature makes every distribution one-hot: the speculative rule must then
    # reproduce greedy `ar` exactly (draft q, acceptance u, residual draw all take part).
    cold = _gen(model, module, [PROMPT], mode="verify", k=2, compile=True, temperature=1e-4, max_new_tokens=20)
    assert cold.tokens == _gen(model, module, [PROMPT], mode="ar", max_new_tokens=20).tokens
    assert cold.stats.tau > 1


def test_exponential_race_and_speculative_rule_distributions():
    """The graph-side samplers: argmax(p / E) draws from p; the speculative rule with caller noise keeps p."""
    g = torch.Generator().manual_seed(0)
    n, V = 40000, 4
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    draws = race(p.expand(n, V), torch.empty(n, V).exponential_(generator=g))
    freq = torch.bincount(draws, minlength=V).float() / n
    assert (freq - p).abs().max() < 0.015
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])  # a bad drafter
    drafts = race(q.expand(n, V), torch.empty(n, V).exponential_(generator=g))[:, None]
    P = torch.stack([p, torch.full((V,), 0.25)]).expand(n, 2, V)
    settings = (torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n))
    acc, nxt = accept(P.log(), drafts, torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool), True,
                      settings, q.expand(n, 1, V), torch.rand(n, 1, generator=g),
                      torch.empty(n, V).exponential_(generator=g))
    first = torch.where(acc == 1, drafts[:, 0], nxt)  # the token emitted at the first position
    freq = torch.bincount(first, minlength=V).float() / n
    assert (freq - p).abs().max() < 0.015


@pytest.mark.slow
def test_compiled_host_drafters_equal_ar(light_backend, monkeypatch):
    """ngram and hybrid drafters through compiled rounds with host drafts: identical to `ar` greedy, on
    text with repeats (so prompt lookup has matches), at batch 1 and with a batch of unequal rows.
    The hybrid is made to take every n-gram match, so it switches between the module's graph and the
    wider host-draft graph (whose module catch-up must keep the next module round right)."""
    from recyclegpt.decoding import engine

    monkeypatch.setattr(engine, "prefer_ngram", lambda mt, k, nt, n: n > 0)
    model, module = copy_models(seed=2, context=4.0)
    rep = [5, 6, 7, 8, 9, 10, 11, 12] * 3
    prompts = [rep, [3, 4] + rep[:10], [100, 101]]
    budgets = [30, 17, 9]
    ref = _gen(model, module, prompts, mode="ar", max_new_tokens=budgets, eos_id=[17]).tokens
    for drafter in ("ngram", "hybrid"):
        for rows in ([0], [0, 1, 2]):
            comp = _gen(model, module, [prompts[r] for r in rows], mode="verify", drafter=drafter, k=2, ngram_k=5,
                        ngram_max_n=3, max_new_tokens=[budgets[r] for r in rows], eos_id=[17], compile=True)
            assert comp.tokens == [ref[r] for r in rows], (drafter, rows)
            rounds = comp.stats.drafter_rounds
            assert rounds.get("ngram", 0) > 0, (drafter, rows)  # host rounds did run
            if drafter == "hybrid":
                assert rounds.get("module", 0) > 0, rows  # and module rounds between them
    # sampled: reproducible per seed; near-zero temperature reproduces greedy
    kw = dict(mode="verify", drafter="hybrid", k=2, ngram_k=5, max_new_tokens=20, compile=True)
    a = _gen(model, module, [rep], temperature=1.0, seed=3, **kw)
    assert a.tokens == _gen(model, module, [rep], temperature=1.0, seed=3, **kw).tokens
    cold = _gen(model, module, [rep], temperature=1e-4, **kw)
    assert cold.tokens == _gen(model, module, [rep], mode="ar", max_new_tokens=20).tokens


def test_compile_option_validation():
    with pytest.raises(RecycleError, match="compile must be"):
        GenerationConfig(compile="yes").validate()
    GenerationConfig(mode="verify", compile=True).validate()
    GenerationConfig(mode="verify", drafter="ngram", compile=True).validate()
