"""The slot engine: requests join and leave a running batch, each with its own settings.

Greedy tokens of every request equal the same request decoded alone with `ar`, whatever else is in
the batch and whenever it was admitted; sampled requests keep the exact distribution and their seed's
text; admitting, releasing and changing settings compile nothing new; bad calls raise one-line
errors and leave the other slots decoding. fp32, tiny models. "Compiled" here is dynamo with the
`eager` backend (the same captured graphs, run op by op); test_compile runs inductor itself.
"""

from __future__ import annotations

import copy

import pytest
import torch

from recyclegpt.decoding import Engine, GenerationConfig, compiled, generate
from recyclegpt.decoding.testing import cache_prefix, copy_models, random_models
from recyclegpt.errors import RecycleError

torch.set_num_threads(1)

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [100], [5, 6, 7, 8] * 3]


@pytest.fixture
def light_backend(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    monkeypatch.setattr(compiled, "SKIP_GUARDS", False)  # evaluate guards, so a recompile would show


@pytest.fixture(scope="module")
def pair():
    return copy_models(seed=0, context=3.0)  # drafts partly right


def alone(model, module, prompt, **kw) -> list[int]:
    return generate(model, module, [prompt], GenerationConfig(**kw)).tokens[0]


def assert_caches_match_fresh_prefill(model, module, engine):
    """Every decoding slot's cache rows at positions < n equal a fresh prefill of its tokens."""
    for b in engine.decoding():
        seq = engine.request(b).ctx  # x_0..x_n, the last one pending
        n = len(seq) - 1
        ref_model = copy.deepcopy(model)
        ref_model.setup_caches(1)
        pos = torch.arange(n)[None]
        _, h = ref_model(torch.tensor([seq[:-1]]), pos, logits=False)
        row = engine.row(b)
        pairs = [(cache_prefix(model, row, n), cache_prefix(ref_model, 0, n))]
        if module is not None and engine.request(b).uses_module:
            ref_module = copy.deepcopy(module)
            ref_module.setup_caches(1)
            ref_module(ref_model, torch.tensor([seq[1:]]), h, pos, logits=False)
            pairs.append((cache_prefix(module, row, n), cache_prefix(ref_module, 0, n)))
        for got, ref in pairs:
            for (gk, gv), (rk, rv) in zip(got, ref, strict=True):
                torch.testing.assert_close(gk, rk, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(gv, rv, atol=1e-5, rtol=1e-4)


KINDS = [dict(mode="ar"), dict(mode="recycle"), dict(mode="verify", k=3), dict(mode="verify", k=2, drafter="ngram"),
         dict(mode="verify", k=2, drafter="hybrid", ngram_k=4)]


@pytest.mark.parametrize("batches", [None, (1, 2)], ids=["all-slots", "ladder"])
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("kind", KINDS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_requests_joining_and_leaving_equal_their_solo_runs(pair, kind, compile, batches, request):
    """Slots admitted mid-run at different positions and others released early: every request's tokens
    equal its run alone (for the lossless modes: `ar`), and caches equal a fresh prefill after each step.
    With a batch ladder, rounds run over 1, 2 or 3 rows as requests come and go, and a leaving request's
    row is taken by the last busy one (its caches moved): nothing of that shows in any request's tokens."""
    if compile:
        request.getfixturevalue("light_backend")
    model, module = pair
    budgets = [14, 6, 20, 9, 12]
    engine = Engine(model, module, 3, compile=compile, batches=batches)
    queue = list(range(len(PROMPTS)))
    got: dict[int, list[int]] = {}
    owner: dict[int, int] = {}
    released_early = None
    steps = 0
    while queue or engine.decoding():
        for slot in engine.free_slots():
            if queue and (steps > 0 or slot < 2):  # slot 2 joins after the first step
                r = queue.pop(0)
                engine.admit(slot, PROMPTS[r], GenerationConfig(max_new_tokens=budgets[r], **kind))
                owner[slot] = r
        engine.step()
        steps += 1
        assert_caches_match_fresh_prefill(model, module, engine)
        if steps == 2 and released_early is None:  # drop a running request: its slot is reused
            slot = engine.decoding()[0]
            released_early = owner.pop(slot)
            engine.release(slot)
            queue.append(released_early)  # and run it again from the start later
        for slot in [s for s in owner if engine.request(s).finish is not None]:
            got[owner.pop(slot)] = list(engine.request(slot).generated)
            engine.release(slot)
    lossless = kind["mode"] != "recycle"
    for r, prompt in enumerate(PROMPTS):
        ref = alone(model, module, prompt, max_new_tokens=budgets[r], **(dict(mode="ar") if lossless else kind))
        assert got[r] == ref, r
    assert sorted(engine.stats.batches) == ([1, 2, 3] if batches else [3])


def test_ar_and_verify_rows_share_a_batch_with_different_k(pair):
    model, module = pair
    engine = Engine(model, module, 4, width=4)
    cfgs = [dict(mode="ar"), dict(mode="verify", k=1), dict(mode="verify", k=4), dict(mode="recycle")]
    for b, kw in enumerate(cfgs):
        engine.admit(b, PROMPTS[b], GenerationConfig(max_new_tokens=15, **kw))
    while engine.decoding():
        engine.step()
    for b, kw in enumerate(cfgs):
        mode_ref = dict(mode="recycle") if kw["mode"] == "recycle" else dict(mode="ar")
        assert engine.request(b).generated == alone(model, module, PROMPTS[b], max_new_tokens=15, **mode_ref), b
    assert len(engine.request(1).stats.proposed_by_position) == 1  # k=1 drafted one token per round
    assert len(engine.request(2).stats.proposed_by_position) == 4


# ------------------------------------------------------------------ sampling and seeds
V, S = 16, 16
SPROMPT = [1, 2, 3, 1, 2, 3, 1]


@pytest.fixture(scope="module")
def tiny_vocab():
    return random_models(seed=0, vocab_size=V, max_seq_len=S)


@pytest.mark.parametrize("compile", [False, True])
def test_greedy_and_sampled_rows_in_one_batch(tiny_vocab, compile, request):
    """Greedy rows equal `ar` alone; sampled rows (each its own seed) have the exact distribution."""
    from test_sampling import chi2_pvalue, exact_distributions

    if compile:
        request.getfixturevalue("light_backend")
    model, module = tiny_vocab
    R, G = 1200, 3
    engine = Engine(model, module, R + G, compile=compile)
    reqs = [(b, SPROMPT, GenerationConfig(mode="verify", k=2, temperature=1.0, top_k=6, seed=b, max_new_tokens=3))
            for b in range(R)]
    reqs += [(R + g, SPROMPT, GenerationConfig(mode=m, k=2, max_new_tokens=3)) for g, m in enumerate(["ar", "verify",
                                                                                                       "recycle"])]
    engine.admit_many(reqs)
    while engine.decoding():
        engine.step()
    toks = torch.tensor([engine.request(b).generated for b in range(R)])
    p1, p2, _, _ = exact_distributions(model, 1.0, 6, 1.0)
    assert chi2_pvalue(torch.bincount(toks[:, 0], minlength=V), p1) > 1e-3
    assert chi2_pvalue(torch.bincount(toks[:, 1], minlength=V), p2) > 1e-3
    greedy = alone(model, module, SPROMPT, mode="ar", max_new_tokens=3)
    assert engine.request(R).generated == greedy and engine.request(R + 1).generated == greedy
    assert engine.request(R + 2).generated == alone(model, module, SPROMPT, mode="recycle", max_new_tokens=3)


@pytest.mark.parametrize("batches", [None, (1, 2)], ids=["all-slots", "ladder"])
@pytest.mark.parametrize("top_p", [0.9, 1.0])  # 1.0: alone it runs the graph without the top-k/top-p sort
@pytest.mark.parametrize("compile", [False, True])
def test_a_seeded_request_gives_the_same_text_alone_and_in_a_busy_batch(pair, compile, top_p, batches, request):
    if compile:
        request.getfixturevalue("light_backend")
    model, module = pair
    mine = GenerationConfig(mode="verify", k=2, temperature=0.9, top_p=top_p, seed=1234, max_new_tokens=20)
    solo = Engine(model, module, 1, compile=compile)
    solo.admit(0, PROMPTS[0], mine)
    while solo.decoding():
        solo.step()
    busy = Engine(model, module, 4, compile=compile, batches=batches)
    busy.admit(0, PROMPTS[2], GenerationConfig(mode="verify", k=3, temperature=1.0, max_new_tokens=30))
    busy.admit(1, PROMPTS[1], GenerationConfig(mode="ar", max_new_tokens=5))
    busy.step()
    busy.admit(3, PROMPTS[0], mine)  # joins later, at other positions, next to rows of other modes and k
    busy.admit(2, PROMPTS[3], GenerationConfig(mode="verify", k=2, temperature=1.3, top_k=3, max_new_tokens=25))
    while busy.decoding():
        busy.step()
        for slot in (0, 1, 2):  # the others leave as they finish: with a ladder, mine moves rows and batches
            if busy._slots[slot] is not None and busy.request(slot).finish is not None:
                busy.release(slot)
    assert busy.request(3).generated == solo.request(0).generated
    if batches:
        assert len(busy.stats.batches) > 1
    # no seed: fresh randomness every time
    free = GenerationConfig(mode="ar", temperature=1.0, max_new_tokens=20)
    assert alone(model, module, PROMPTS[0], **vars(free)) != alone(model, module, PROMPTS[0], **vars(free))


# ------------------------------------------------------------------ no recompiles
def test_admit_release_and_settings_compile_nothing_after_warm_up(pair, light_backend):
    model, module = pair
    engine = Engine(model, module, 3, compile=True, width=3)
    for cfg in (GenerationConfig(mode="ar"), GenerationConfig(mode="verify", k=3),
                GenerationConfig(mode="ar", temperature=1.0), GenerationConfig(mode="verify", k=3, temperature=1.0),
                GenerationConfig(mode="ar", temperature=1.0, top_p=0.9),
                GenerationConfig(mode="verify", k=3, temperature=1.0, top_p=0.9)):
        for shape in engine.shapes_for(cfg):
            engine.warm_up(shape)
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    mixes = [
        [dict(mode="verify", k=3), dict(mode="ar", temperature=0.7, top_k=4),
         dict(mode="verify", k=1, temperature=1.0)],
        [dict(mode="recycle"), dict(mode="verify", k=2, top_p=0.5, temperature=1.2)],
        [dict(mode="ar")],
        [dict(mode="ar", temperature=2.0), dict(mode="verify", k=3, temperature=0.5, top_k=2, top_p=0.8, seed=3)],
        [dict(mode="verify", k=2, temperature=1.0), dict(mode="ar", temperature=0.5)],
    ]
    for mix in mixes:
        for i, kw in enumerate(mix):
            engine.admit(engine.free_slots()[0], PROMPTS[i], GenerationConfig(max_new_tokens=6 + 3 * i, **kw))
        for _ in range(3):
            if engine.decoding():
                engine.step()
        for slot in range(3):
            if engine._slots[slot] is not None:
                engine.release(slot)
    assert counters["unique_graphs"] == before


def test_a_batch_ladder_compiles_each_batch_once_and_uses_the_smallest_compiled(pair, light_backend):
    """Rounds run at the smallest batch that holds the busy slots and has a graph; a batch without one is
    skipped for a wider compiled one (nothing compiles mid-run), and warming a batch makes it used."""
    model, module = pair
    compiled.clear_cache(model, module)  # graphs of earlier tests would hide what this one compiles
    engine = Engine(model, module, 4, compile=True, batches=(1, 2))
    assert engine.batches == [1, 2, 4]
    ar = GenerationConfig(mode="ar", max_new_tokens=30)
    (shape,) = engine.shapes_for(ar)
    engine.warm_up(shape)  # the widest only
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    engine.admit(0, PROMPTS[0], ar)
    engine.step()
    assert engine.last_batch == 4 and counters["unique_graphs"] == before
    engine.warm_up(shape, 1)
    assert counters["unique_graphs"] == before + 1
    engine.step()
    assert engine.last_batch == 1
    engine.admit(1, PROMPTS[1], ar)
    engine.step()
    assert engine.last_batch == 4  # two busy: batch 2 has no graph
    assert engine.compiled_batches() == {"ar": [1, 4]}
    with pytest.raises(RecycleError, match="not one of this engine's batches"):
        engine.warm_up(shape, 3)


def test_acceptance_rates_start_from_the_data_and_fade():
    from recyclegpt.decoding.drafters import AcceptanceRates

    rates = AcceptanceRates(decay=0.5)
    assert rates.expected_accepted(3) == 0.0  # nothing seen: no drafts expected
    rates.update(3, 3)
    assert rates.expected_accepted(3) == 3.0  # the first observation is the estimate, no prior to unlearn
    rates.update(3, 0)  # position 1 rejected: positions 2 and 3 not tried this time
    assert rates.expected_accepted(3) == 0.5 + 0.5 + 0.5
    assert rates.expected_accepted(4) == 2.0  # position 4 never tried: the nearest tried one's rate
    rates.fade()
    rates.update(1, 1)  # newer rows weigh more: (0.5 + 1) / (1 + 1)
    assert rates.expected_accepted(1) == 0.75


def test_load_aware_drafting_follows_the_measured_costs_and_keeps_the_text(pair):
    """`load_aware`: a greedy verify round runs without drafts (one token per row, the module's catch-up
    kept) when, by the rounds' measured seconds and the live acceptance, that gives more tokens per second;
    an undrafted round is tried once to measure it; after REFRESH_ROUNDS undrafted rounds a drafted one
    refreshes the acceptance; sampled rounds always draft. The greedy text equals `ar` whatever ran."""
    from recyclegpt.decoding import engine as engine_module

    model, module = pair
    engine = Engine(model, module, 2, width=3, load_aware=True)
    verify = GenerationConfig(mode="verify", k=3, max_new_tokens=80)
    engine.admit(0, PROMPTS[0], verify)
    drafted, undrafted = engine.shapes_for(verify)[0], Engine.undrafted_shape(engine.shapes_for(verify)[0])
    assert (undrafted.width, undrafted.chain, undrafted.module, undrafted.sampled) == (0, 0, True, False)
    engine.step()
    engine.step()
    # nothing measured: drafted; the first round of a shape is not timed (one-off setup), the second is
    assert engine.last_shape == drafted and list(engine.costs) == [(drafted, 2)]
    engine.step()
    assert engine.last_shape == undrafted and engine.stats.undrafted == 1  # the undrafted round, tried to measure it
    shapes = []
    for drafted_s, undrafted_s in [(1e-3, 1.0)] * 3 + [(1.0, 1e-6)] * (engine_module.REFRESH_ROUNDS + 2):
        engine.costs[(drafted, 2)], engine.costs[(undrafted, 2)] = drafted_s, undrafted_s
        engine.step()
        shapes.append(engine.last_shape)
    R = engine_module.REFRESH_ROUNDS
    assert shapes[:3] == [drafted] * 3  # drafts pay: drafted
    assert shapes[3:3 + R] == [undrafted] * R and shapes[3 + R] == drafted  # then undrafted, one refresh
    while engine.decoding():
        engine.step()
    assert engine.request(0).generated == alone(model, module, PROMPTS[0], mode="ar", max_new_tokens=80)
    assert engine.request(0).stats.k_used.count(0) == engine.stats.undrafted

    sampled = Engine(model, module, 2, width=3, load_aware=True)
    sampled.admit(0, PROMPTS[1], GenerationConfig(mode="verify", k=3, max_new_tokens=20, temperature=1.0, seed=1))
    (shape,) = sampled.shapes_for(sampled.request(0).cfg)
    sampled.costs[(shape, 2)], sampled.costs[(Engine.undrafted_shape(shape), 2)] = 1.0, 1e-6
    while sampled.decoding():
        sampled.step()
        assert sampled.last_shape.sampled and sampled.last_shape.width == 3
    assert sampled.stats.undrafted == 0


def test_batch_ladders_are_checked(pair):
    model, module = pair
    assert Engine(model, module, 8, batches=(4, 1, 2)).batches == [1, 2, 4, 8]
    for bad in ((0, 2), (9,), ("a",), (1.5,), (True,)):
        with pytest.raises(RecycleError, match="batches must be integers in 1..8"):
            Engine(model, module, 8, batches=bad)


# ------------------------------------------------------------------ bad input
def test_bad_calls_raise_one_line_errors_and_others_keep_decoding(pair):
    model, module = pair
    engine = Engine(model, module, 2, width=3)
    cfg = GenerationConfig(mode="verify", k=3, max_new_tokens=12)
    engine.admit(0, PROMPTS[0], cfg)
    engine.step()
    S = model.cfg.max_seq_len
    bad = [
        (lambda: engine.admit(0, PROMPTS[1], cfg), "busy"),
        (lambda: engine.admit(2, PROMPTS[1], cfg), "slot must be"),
        (lambda: engine.admit(1, list(range(S)), cfg), "limit"),
        (lambda: engine.admit(1, [], cfg), "empty"),
        (lambda: engine.admit(1, [model.cfg.vocab_size], cfg), "outside"),
        (lambda: engine.admit(1, ["a"], cfg), "token ids"),
        (lambda: engine.admit(1, PROMPTS[1], GenerationConfig(k=0)), "k must be"),
        (lambda: engine.admit(1, PROMPTS[1], GenerationConfig(k=5)), "lower k"),
        (lambda: engine.admit(1, PROMPTS[1], GenerationConfig(temperature=-1)), "temperature"),
        (lambda: engine.admit(1, PROMPTS[1], GenerationConfig(top_p=2)), "top_p"),
        (lambda: engine.admit(1, PROMPTS[1], GenerationConfig(max_new_tokens=[3])), "one integer"),
        (lambda: engine.admit(1, PROMPTS[1], {"k": 2}), "GenerationConfig"),
        (lambda: engine.release(1), "already free"),
        (lambda: Engine(model, None, 1).admit(0, PROMPTS[1], cfg), "needs a recyclable module"),
        (lambda: Engine(model, module, 0), "slots must be"),
    ]
    for call, msg in bad:
        with pytest.raises(RecycleError, match=msg) as err:
            call()
        assert "\n" not in str(err.value)
    assert engine.free_slots() == [1]
    while engine.decoding():
        engine.step()
    assert engine.request(0).generated == alone(model, module, PROMPTS[0], mode="ar", max_new_tokens=12)
    with pytest.raises(RecycleError, match="no request is decoding"):
        engine.step()


# ------------------------------------------------------------------ the generic (transformers) backend
def test_generic_backend_skips_idle_slots():
    """Finished and free slots cost the generic backend no pass; admitted rows still equal `ar` alone."""
    pytest.importorskip("transformers")
    from test_generic import tiny_gpt2

    from recyclegpt.config import ModuleConfig
    from recyclegpt.hf.generic import GenericCausalLM, module_model_config
    from recyclegpt.module import RecyclableModule

    hf = tiny_gpt2()
    cfg = module_model_config(hf.config, 300, 64)
    model = GenericCausalLM(hf, cfg, source="tiny-gpt2")
    torch.manual_seed(0)
    module = RecyclableModule(cfg, ModuleConfig(n_layer=1)).eval()
    calls = []
    hook = hf.base_model.register_forward_pre_hook(lambda *_: calls.append(1))
    engine = Engine(model, module, 3, batches=(1, 2))
    assert engine.batches == [3]  # its per-row caches do not move between rows; idle rows cost it nothing anyway
    engine.admit(0, PROMPTS[0], GenerationConfig(mode="verify", k=2, max_new_tokens=3))
    engine.admit(2, PROMPTS[2], GenerationConfig(mode="ar", max_new_tokens=12))
    while engine.decoding():
        n = len(engine.decoding())
        calls.clear()
        engine.step()
        assert len(calls) == n  # one pass per decoding row, none for the free or finished ones
        if engine._slots[0] is not None and engine.request(0).finish is not None:
            engine.release(0)
    hook.remove()
    ref = generate(model, None, [PROMPTS[2]], GenerationConfig(mode="ar", max_new_tokens=12)).tokens[0]
    assert engine.request(2).generated == ref
