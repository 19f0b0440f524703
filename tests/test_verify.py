"""verify mode: lossless against ar (greedy), acceptance paths, stops inside drafts, rollback."""

from __future__ import annotations

import copy

import pytest
import torch

from recyclegpt.decoding import Engine, GenerationConfig, NgramDrafter, generate
from recyclegpt.decoding.drafters import AcceptanceTracker, AdaptiveK
from recyclegpt.decoding.testing import cache_prefix, copy_models, random_models

torch.set_num_threads(1)

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [100]]
N = 24


class CharTokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


class Oracle:
    """Host drafter that proposes the known ar continuation, wrong where told to be."""

    def __init__(self, prompts, truth, wrong_at=(), vocab=512):
        self.prompts, self.truth, self.wrong_at, self.vocab = prompts, truth, set(wrong_at), vocab

    def reset(self, row: int) -> None:
        pass

    def propose(self, row, context, k):
        g = len(context) - len(self.prompts[row])  # tokens generated so far
        out = self.truth[row][g:g + k]
        return [(t + 1) % self.vocab if g + i in self.wrong_at else t for i, t in enumerate(out)]


def ar_tokens(model, prompts, n=N, **kw):
    return generate(model, None, prompts, GenerationConfig(mode="ar", max_new_tokens=n, **kw)).tokens


@pytest.fixture(scope="module")
def seeded():
    out = {}
    for seed in (0, 1, 2):
        model, module = random_models(seed=seed)
        out[seed] = (model, module, ar_tokens(model, PROMPTS))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_verify_module_drafter_equals_ar(seeded, seed, k):
    model, module, ref = seeded[seed]
    for prompts, want in ((PROMPTS[:1], ref[:1]), (PROMPTS, ref)):
        res = generate(model, module, prompts, GenerationConfig(mode="verify", k=k, max_new_tokens=N))
        assert res.tokens == want
        st = res.stats
        assert st.module_passes == st.full_passes * k  # catch-up + k-1 chain steps per round
        assert st.k_used == [k] * sum(st.row_passes)  # one entry per row-round


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("drafter", ["ngram", "hybrid"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_verify_other_drafters_equal_ar(seeded, seed, drafter, adaptive):
    model, module, ref = seeded[seed]
    for k in (2, 4):
        cfg = GenerationConfig(mode="verify", k=k, max_new_tokens=N, drafter=drafter, adaptive_k=adaptive)
        assert generate(model, module, PROMPTS, cfg).tokens == ref
        assert generate(model, module, PROMPTS[2:3], cfg).tokens == ref[2:3]


def test_hybrid_uses_both_drafters(seeded):
    model, module, ref = seeded[1]
    res = generate(model, module, PROMPTS, GenerationConfig(mode="verify", k=3, drafter="hybrid", max_new_tokens=N))
    assert res.tokens == ref
    rounds = res.stats.drafter_rounds
    assert rounds.get("module", 0) > 0 and rounds.get("ngram", 0) > 0


def test_ngram_needs_no_module(seeded):
    model, _, ref = seeded[0]
    cfg = GenerationConfig(mode="verify", k=3, drafter="ngram", max_new_tokens=N)
    res = generate(model, None, PROMPTS, cfg)
    assert res.tokens == ref and res.stats.module_passes == 0


@pytest.mark.parametrize("adaptive", [False, True])
def test_verify_adaptive_module_equals_ar(seeded, adaptive):
    model, module, ref = seeded[1]
    cfg = GenerationConfig(mode="verify", k=3, max_new_tokens=N, adaptive_k=adaptive)
    res = generate(model, module, PROMPTS, cfg)
    assert res.tokens == ref
    if adaptive:  # random module: nothing is accepted, k shrinks to 1
        assert res.stats.k_used[-1] == 1


@pytest.mark.parametrize("k", [1, 3, 5])
def test_correct_drafts_are_all_accepted(k):
    model, module = copy_models(seed=0, context=0.0)
    n = 40
    ref = ar_tokens(model, PROMPTS, n)
    res = generate(model, module, PROMPTS, GenerationConfig(mode="verify", k=k, max_new_tokens=n))
    assert res.tokens == ref
    assert res.stats.acceptance_by_position == [1.0] * k
    assert res.stats.tau > k  # k accepted + bonus per round, short rounds only at the budget's end


@pytest.mark.parametrize("k", [2, 4])
def test_partially_correct_drafts(k):
    model, module = copy_models(seed=0, context=3.0)
    n = 40
    ref = ar_tokens(model, PROMPTS, n)
    for prompts, want in ((PROMPTS[:1], ref[:1]), (PROMPTS, ref)):
        res = generate(model, module, prompts, GenerationConfig(mode="verify", k=k, max_new_tokens=n))
        assert res.tokens == want
        st = res.stats
        acc = st.acceptance_by_position
        assert len(acc) == k and all(0 < a < 1 for a in acc[:2])
        assert 1.5 < st.tau < k + 1
        # every row-round drafted, except a last round with room for one token only
        assert sum(st.row_passes) - len(prompts) <= st.proposed_by_position[0] <= sum(st.row_passes)
        # each row-round yields accepted + 1 tokens, and drafts never exceed what the budget keeps
        produced = sum(st.new_tokens) - len(prompts)
        assert produced == sum(st.row_passes) + sum(st.accepted_by_position)


def test_adaptive_k_grows_when_everything_is_accepted():
    model, module = copy_models(seed=1, context=0.0)
    res = generate(model, module, PROMPTS[:1],
                   GenerationConfig(mode="verify", k=2, k_max=6, adaptive_k=True, max_new_tokens=80))
    assert res.tokens == ar_tokens(model, PROMPTS[:1], 80)
    assert res.stats.k_used[0] == 2 and max(res.stats.k_used) == 6


def test_oracle_drafts_multi_token_acceptance_and_counts(seeded):
    model, _, ref = seeded[0]
    # generated index g drafts truth[g:g+4]: g=1 a=4 | g=6 (6 wrong) a=0 | g=7 a=4 | g=12 (13 wrong) a=1 |
    # g=14 a=4 | g=19 a=4 -> 24 tokens in 6 rounds per row
    oracle = Oracle(PROMPTS, ref, wrong_at={6, 13})
    cfg = GenerationConfig(mode="verify", k=4, drafter=oracle, max_new_tokens=N)
    res = generate(model, None, PROMPTS, cfg)
    assert res.tokens == ref
    st = res.stats
    assert st.acceptance_by_position == pytest.approx([5 / 6, 4 / 5, 1.0, 1.0])
    assert st.tau == pytest.approx(23 / 6) and st.full_passes == 6
    assert res.stats.drafter_rounds == {"host": sum(res.stats.row_passes)}


@pytest.mark.parametrize("j", [2, 3, 4, 6, 7, 9])
def test_eos_inside_accepted_draft(seeded, j):
    model, _, ref = seeded[0]
    eos = ref[0][j]
    cut = ref[0].index(eos)
    oracle = Oracle(PROMPTS, ref)
    for k in (3, 5):
        res = generate(model, None, PROMPTS[:1],
                       GenerationConfig(mode="verify", k=k, drafter=oracle, eos_id=eos, max_new_tokens=N))
        assert res.tokens == [ref[0][:cut]] and res.finish_reasons == ["eos"]
        assert res.stats.new_tokens == [cut + 1]
    # and with the module drafter, batch of 4 (rows end at different rounds)
    model2, module2 = copy_models(seed=0, context=0.0)
    ref2 = ar_tokens(model2, PROMPTS)
    eos2 = ref2[0][j]
    cfg = GenerationConfig(mode="verify", k=4, eos_id=eos2, max_new_tokens=N)
    res = generate(model2, module2, PROMPTS, cfg)
    for b in range(len(PROMPTS)):
        want = ref2[b][:ref2[b].index(eos2)] if eos2 in ref2[b] else ref2[b]
        assert res.tokens[b] == want


@pytest.mark.parametrize("j", [3, 5, 8])
def test_stop_string_inside_accepted_draft(seeded, j):
    model, _, ref = seeded[0]
    tok = CharTokenizer()
    text = tok.decode(ref[0])
    stop = text[j - 1:j + 1]
    end = text.find(stop) + len(stop)
    oracle = Oracle(PROMPTS, ref)
    for drafter in (oracle, "ngram"):
        cfg = GenerationConfig(mode="verify", k=4, drafter=drafter, stop_strings=[stop], max_new_tokens=N)
        res = generate(model, None, PROMPTS[:1], cfg, tokenizer=tok)
        assert res.tokens == [ref[0][:end]] and res.finish_reasons == ["stop"]
        assert res.texts == [text[:end - len(stop)]]


def _assert_caches_match_fresh_prefill(model, module, engine):
    """Full-model and module cache rows at positions < n equal a fresh prefill of the same tokens: the
    round's catch-up has already given the module the true states of the accepted positions."""
    for b in engine.decoding():
        seq = engine.request(b).ctx  # x_0..x_n, the last one pending
        n = len(seq) - 1
        row = engine.row(b)
        got_full, got_mod = cache_prefix(model, row, n), cache_prefix(module, row, n)
        ref_model, ref_module = copy.deepcopy(model), copy.deepcopy(module)
        ref_model.setup_caches(1)
        ref_module.setup_caches(1)
        pos = torch.arange(n)[None]
        _, h = ref_model(torch.tensor([seq[:-1]]), pos, logits=False)
        ref_module(ref_model, torch.tensor([seq[1:]]), h, pos, logits=False)
        refs = (cache_prefix(ref_model, 0, n), cache_prefix(ref_module, 0, n))
        for got, ref in zip((got_full, got_mod), refs, strict=True):
            for (gk, gv), (rk, rv) in zip(got, ref, strict=True):
                torch.testing.assert_close(gk, rk, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(gv, rv, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("drafter", ["module", "hybrid"])
def test_rollback_caches_equal_fresh_prefill(drafter):
    model, module = copy_models(seed=2, context=3.0)
    prompts = [PROMPTS[0], PROMPTS[2]]
    n_new = 30
    engine = Engine(model, module, 3)  # slot 1 stays free
    cfg = GenerationConfig(mode="verify", k=4, max_new_tokens=n_new, drafter=drafter)
    engine.admit_many([(0, prompts[0], cfg), (2, prompts[1], cfg)])
    partial = 0
    with torch.inference_mode():
        while engine.decoding():
            before = {b: list(engine.request(b).stats.accepted_by_position) for b in engine.decoding()}
            outs = engine.step()
            # a row that accepted 0 < a < its drafts rolled the rest back
            for b, acc in before.items():
                st = engine.request(b).stats
                a = sum(st.accepted_by_position) - sum(acc)
                partial += 0 < a < 4 and outs[b].finish is None
            _assert_caches_match_fresh_prefill(model, module, engine)
    assert partial  # some round accepted part of its drafts and rolled back the rest
    assert [engine.request(b).generated for b in (0, 2)] == ar_tokens(model, prompts, n_new)


def test_ngram_drafter_lookup():
    d = NgramDrafter(max_n=3)
    ctx = [5, 6, 7, 8, 9, 5, 6, 7]
    assert d.propose(0, ctx, 3) == [8, 9, 5]
    assert d.propose(0, ctx + [1], 2) == []  # 1 never seen before
    assert d.propose(0, ctx + [1, 9], 4) == [5, 6, 7, 1]  # falls back to the 1-gram "9"
    assert d.propose(1, [4, 4, 4], 5) == [4]  # latest earlier match; continuation runs into the end
    d.reset(0)
    assert d.propose(0, [1, 2, 3, 1, 2], 2) == [3, 1]


def test_adaptive_controller_and_tracker():
    t = AcceptanceTracker(8, prior=0.6)
    ctl = AdaptiveK(3, 1, 8, cost=0.25, tracker=t)
    for _ in range(40):
        t.update(ctl.k, ctl.k)
        ctl.next_k()
    assert ctl.k == 8
    for _ in range(60):
        t.update(ctl.k, 0)
        ctl.next_k()
    assert ctl.k == 1
    assert 0 <= t.expected_accepted(4) < 0.1
