"""benchmarks/continuous_batching.py: its request loop on a tiny random model (eager, no checkpoint)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from recyclegpt.decoding.testing import random_models

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "continuous_batching.py"


@pytest.fixture(scope="module")
def cb():
    spec = importlib.util.spec_from_file_location("continuous_batching", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_stream_is_deterministic_and_cycles_prompts(cb):
    prompts = [[1, 2], [3], [4, 5, 6]]
    a = cb.make_stream(prompts, 7, 2, 9, seed=1)
    assert [r.prompt for r in a] == [prompts[i % 3] for i in range(7)]
    assert all(2 <= r.budget <= 9 for r in a)
    assert [r.budget for r in a] == [r.budget for r in cb.make_stream(prompts, 7, 2, 9, seed=1)]
    assert len({r.budget for r in a}) > 1


def test_benchmark_plumbing_and_identity(cb):
    torch.set_num_threads(1)
    model, module = random_models(seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 7)]
    settings = cb.Settings(slots=2, requests=5, min_tokens=3, max_tokens=12, k=2, compile=False, repeats=1,
                           warmup_tokens=4)
    report = cb.benchmark(model, module, prompts, settings)

    assert report["identical"], report["first_mismatch"]
    budgets = report["budgets"]
    assert len(budgets) == 5 and len(set(budgets)) > 1
    for lane in cb.LANES:
        r = report["lanes"][lane]
        outs = report["outputs"][lane]
        assert [len(o) for o in outs] == budgets  # EOS ignored: every request gets its whole budget
        assert r["tokens"] == sum(budgets)
        assert 0 < r["occupancy"] <= settings.slots
        assert r["tokens_per_s"] > 0 and r["steps"] > 0
    ar, verify = report["lanes"]["ar"], report["lanes"]["verify"]
    assert ar["tau"] == 1.0 and ar["module_passes"] == 0
    # ar: one step per token after the first; requests share steps, more than one slot's worth are queued
    assert ar["row_rounds"] == sum(budgets) - 5
    assert ar["steps"] >= max(budgets) - 1 and ar["steps"] < ar["row_rounds"]
    assert verify["tau"] >= 1.0 and verify["module_passes"] > 0
    assert report["speedup"] > 0


def test_engine_releases_slots_between_requests(cb):
    from recyclegpt.decoding import Engine

    torch.set_num_threads(1)
    model, module = random_models(seed=1)
    settings = cb.Settings(slots=2, k=2, compile=False)
    stream = [cb.Request([1, 2, 3], b) for b in (2, 6, 3, 1)]
    engine = Engine(model, module, 2)
    run = cb.run_stream(engine, stream, lambda b: settings.lane_config("verify", b))
    assert [len(o) for o in run.outputs] == [2, 6, 3, 1]
    assert engine.free_slots() == [0, 1]
    run2 = cb.run_stream(engine, stream, lambda b: settings.lane_config("verify", b))  # an engine is reusable
    assert run2.outputs == run.outputs and run2.steps == run.steps


def test_cli_help_and_bad_range(cb, capsys):
    with pytest.raises(SystemExit) as e:
        cb.main(["--help"])
    assert e.value.code == 0
    assert "--no-compile" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cb.main(["--min-tokens", "50", "--max-tokens", "10"])
    assert e.value.code == 2
