"""tree="auto": the fastest measured draft is chosen, cached per weights/machine/setting, read back,
refreshed on request, and decoding with it stays identical to `ar`; bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch

from recyclegpt.decoding import Engine, GenerationConfig, generate
from recyclegpt.decoding import auto as auto_mod
from recyclegpt.decoding.auto import CANDIDATES, DraftShape, Trial, choose_draft, resolve_draft, weights_hash
from recyclegpt.decoding.testing import copy_models, random_models
from recyclegpt.errors import RecycleError

torch.set_num_threads(1)

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 10]]
SMALL = (DraftShape(2), DraftShape(3, 4))  # a chain and a tree: enough to exercise both kinds


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RECYCLEGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def models():
    return copy_models(context=0.3)


def fake_measure(speeds: dict[DraftShape, float], calls: list[DraftShape]):
    def measure(model, module, batches, config, shape, max_new_tokens):
        calls.append(shape)
        return Trial(shape, 2.0, 1.0, speeds[shape])
    return measure


def test_the_fastest_candidate_wins_and_is_cached(models, monkeypatch, cache_home):
    model, module = models
    speeds = {DraftShape(2): 100.0, DraftShape(3, 4): 150.0}
    calls: list[DraftShape] = []
    monkeypatch.setattr(auto_mod, "measure", fake_measure(speeds, calls))
    choice = choose_draft(model, module, PROMPTS, candidates=SMALL, repeats=2)
    assert choice.best == DraftShape(3, 4) and not choice.cached
    assert len(calls) == 3 * len(SMALL)  # a warm-up and two timed runs each
    record = json.loads((cache_home / "auto.json").read_text())
    (entry,) = record.values()
    assert entry["best"] == {"k": 3, "tree": 4, "tree_topk": 2} and entry["key"]["batch"] == 2

    calls.clear()
    again = choose_draft(model, module, PROMPTS, candidates=SMALL)
    assert again.cached and again.best == DraftShape(3, 4) and calls == []
    assert "cached" in again.describe() and "the best chain, chain k=2:" in again.describe()

    speeds[DraftShape(2)] = 200.0  # the machine changed its mind: refresh measures again
    assert choose_draft(model, module, PROMPTS, candidates=SMALL, refresh=True).best == DraftShape(2)
    assert calls


def test_the_cache_is_per_setting_and_per_weights(models, monkeypatch):
    model, module = models
    calls: list[DraftShape] = []
    monkeypatch.setattr(auto_mod, "measure", fake_measure({s: 1.0 for s in SMALL}, calls))
    choose_draft(model, module, PROMPTS, candidates=SMALL)
    n = len(calls)
    choose_draft(model, module, PROMPTS, GenerationConfig(temperature=1.0), candidates=SMALL)  # new setting
    assert len(calls) == 2 * n
    choose_draft(model, module, PROMPTS, candidates=SMALL, batch_size=1)  # another batch size
    assert len(calls) == 3 * n
    other, other_module = random_models(seed=3)
    assert weights_hash(other, other_module) != weights_hash(model, module)
    choose_draft(other, other_module, PROMPTS, candidates=SMALL)  # other weights
    assert len(calls) == 4 * n


def test_a_corrupt_cache_is_measured_over(models, monkeypatch, cache_home):
    model, module = models
    cache_home.mkdir(parents=True)
    (cache_home / "auto.json").write_text("{not json")
    monkeypatch.setattr(auto_mod, "measure", fake_measure({s: 1.0 for s in SMALL}, []))
    assert not choose_draft(model, module, PROMPTS, candidates=SMALL).cached
    assert json.loads((cache_home / "auto.json").read_text())  # rewritten whole


def test_real_measurement_and_auto_generation_equal_ar(models):
    model, module = models
    choice = choose_draft(model, module, PROMPTS, candidates=SMALL, max_new_tokens=12, repeats=1)
    assert {t.shape for t in choice.trials} == set(SMALL)
    assert all(t.tau >= 1 and t.round_ms > 0 and t.tokens_per_s > 0 for t in choice.trials)
    ar = generate(model, None, PROMPTS, GenerationConfig(mode="ar", max_new_tokens=16)).tokens
    gen_cfg = GenerationConfig(tree="auto", max_new_tokens=16)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(auto_mod, "CANDIDATES", SMALL)  # generate's auto uses the default candidate list
    try:
        with pytest.raises(RecycleError, match="resolve_draft"):  # decoding itself never measures
            generate(model, module, PROMPTS, gen_cfg)
        cfg, choice = resolve_draft(model, module, PROMPTS, gen_cfg)
        assert choice is not None and cfg.tree == choice.best.tree and cfg.k == choice.best.k
        assert generate(model, module, PROMPTS, cfg).tokens == ar
        assert resolve_draft(model, module, PROMPTS, cfg) == (cfg, None)  # nothing to resolve
    finally:
        monkey.undo()


def test_default_candidates_are_valid_trees():
    for s in CANDIDATES:
        GenerationConfig(k=s.k, tree=s.tree, tree_topk=s.tree_topk).validate()


@pytest.mark.parametrize("kw,msg", [
    (dict(tree="bushy"), r"tree must be an integer in \[0, 256\] or 'auto'"),
    (dict(tree="auto", mode="ar"), "draft trees need mode 'verify'"),
    (dict(tree="auto", adaptive_k=True), "fixed depth"),
])
def test_bad_auto_settings_raise(kw, msg):
    with pytest.raises(RecycleError, match=msg):
        GenerationConfig(**kw).validate()


def test_engine_and_choice_refuse_what_they_cannot_measure(models):
    model, module = models
    with pytest.raises(RecycleError, match="resolve tree='auto' first"):
        Engine(model, module, slots=1).admit(0, PROMPTS[0], GenerationConfig(tree="auto"))
    with pytest.raises(RecycleError, match="needs the recyclable module"):
        choose_draft(model, None, PROMPTS)
    with pytest.raises(RecycleError, match="at least one calibration prompt"):
        choose_draft(model, module, [])
    with pytest.raises(RecycleError, match="fewer than 8 tokens"):
        choose_draft(model, module, [[1] * (model.cfg.max_seq_len - 4)])


def test_serve_tree_auto_sets_width_and_tree_from_the_choice():
    from recyclegpt.decoding.auto import AutoChoice
    from recyclegpt.serve.options import ServeOptions
    from recyclegpt.serve.worker import choose_server_draft

    asked = {}

    class Bundle:
        def choose_draft(self, prompts, batch_size, compile):
            asked.update(n=len(prompts), batch_size=batch_size, compile=compile)
            best = DraftShape(5, 12)
            return AutoChoice(best, [Trial(best, 3.0, 2.0, 100.0)], False, "2026-12-03")

    opts = ServeOptions(slots=3, compile=False, width=3, default_k=3, tree="auto")
    choose_server_draft(Bundle(), opts)
    assert asked == {"n": 3, "batch_size": 3, "compile": False}  # every slot busy, as the server runs
    assert (opts.width, opts.tree, opts.tree_topk, opts.default_k) == (5, 12, 2, 3)


def test_weights_hash_follows_in_place_changes():
    model, module = random_models(seed=5)
    before = weights_hash(model, module)
    assert weights_hash(model, module) == before  # read back
    saved = module.fc.weight.detach().clone()
    with torch.no_grad():
        module.fc.weight[0, 0] += 1.0  # an in-place change bumps the version counter
    after = weights_hash(model, module)
    assert after != before
    with torch.no_grad():
        module.fc.weight.copy_(saved)
    assert weights_hash(model, module) == before  # the same bytes hash the same
