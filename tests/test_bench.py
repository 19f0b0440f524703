"""`recyclegpt bench` / `eval`: JSON schema, identical-to-ar flags, prompt files, greedy agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint

from recyclegpt import cli
from recyclegpt.bench.quality import compare_outputs, greedy_agreement
from recyclegpt.bench.report import RESULT_KEYS, TOP_KEYS, check_schema
from recyclegpt.bench.speed import BenchOptions, run_bench
from recyclegpt.checkpoint import load_checkpoint
from recyclegpt.decoding import GenerationConfig, generate
from recyclegpt.errors import RecycleError
from recyclegpt.prompts import load_prompts, read_prompt_file

PROMPTS = ["def add(a, b):\n    return", "The quick brown fox", "for i in range(10):\n", "In the morning the"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("bench") / "ckpt")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": s}) + "\n" for s in PROMPTS))
    return p


@pytest.fixture(scope="module")
def bench_run(ckpt, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    rc = cli.main(["bench", str(ckpt), "--prompts", str(prompt_file), "--max-new-tokens", "10", "--repeats", "1",
                   "--dtype", "float32", "--device", "cpu", "--no-progress", "--hf-cache", "dynamic",
                   "--compile", "none", "--k", "1", "2", "3", "4", "--adaptive", "--hybrid",
                   "--json", str(out / "b.json"), "--plot", str(out / "b.png")])
    assert rc == 0
    return json.loads((out / "b.json").read_text()), out / "b.png"


def test_bench_json_schema_and_plot(bench_run):
    rep, png = bench_run
    assert check_schema(rep) == []
    for k in TOP_KEYS:
        assert k in rep
    assert (rep["device"], rep["dtype"], rep["batch_size"], rep["prompts"], rep["max_new_tokens"]) == \
        ("cpu", "float32", 1, len(PROMPTS), 10)
    labels = [r["label"] for r in rep["results"]]
    assert labels == ["ar", "recycle", "verify k=1", "verify k=2", "verify k=3", "verify k=4", "verify hybrid",
                      "verify adaptive", "hf_generate", "hf_assisted"]
    for r in rep["results"]:
        assert set(RESULT_KEYS) <= set(r)
        assert r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["tokens_per_s"] > 0
        assert r["new_tokens"] == len(PROMPTS) * 10  # EOS ignored: every lane does the same work
        # the decoding phase alone is faster per token than the whole call, which includes the prefill
        assert r["prefill_s_median"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["decode_tokens_per_s"] * 10 / 9 > r["tokens_per_s"]
    by = {r["label"]: r for r in rep["results"]}
    assert by["ar"]["speedup_vs_ar"] == 1.0 and by["ar"]["baseline"] and rep["baseline"] == "ar"
    assert by["ar"]["decode_speedup_vs_ar"] == 1.0
    assert by["ar"]["full_passes_per_token"] == 1.0 and by["ar"]["mean_accepted"] == 1.0
    assert by["hf_generate"]["full_passes_per_token"] == 1.0 and by["hf_generate"]["cache"] == "dynamic"
    assert by["recycle"]["full_passes_per_token"] < 0.7  # two tokens per pass after the prefill
    assert by["recycle"]["acceptance_by_position"] is None
    for k in (1, 2, 3, 4):
        acc = by[f"verify k={k}"]["acceptance_by_position"]
        assert by[f"verify k={k}"]["k"] == k and 1 <= len(acc) <= k and all(0 <= a <= 1 for a in acc)
    assert by["verify adaptive"]["adaptive_k"] is True
    # the memory floor: ar streams the full model once per token (batch 1), so its share of the bandwidth is
    # its tokens/s over the floor's; verify reads the module per draft too
    floor = rep["floor"]
    assert floor["memory_bandwidth_gb_s"] > 0 and floor["weight_bytes"] > floor["module_weight_bytes"] > 0
    ar = by["ar"]
    assert ar["bandwidth_share"] == pytest.approx(ar["tokens_per_s"] / floor["ar_tokens_per_s"], rel=0.02, abs=1e-4)
    assert by["verify k=3"]["bandwidth_share"] > 0 and by["hf_generate"]["bandwidth_share"] is None
    assert rep["machine"]["cpu_class"] in ("AMX", "AVX-512-BF16", "AVX-512", "AVX2", "other")
    assert by["verify hybrid"]["drafter"] == "hybrid"
    assert json.dumps(rep)  # plain JSON types only
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_to_ar_flags(bench_run, ckpt):
    rep, _ = bench_run
    by = {r["label"]: r for r in rep["results"]}
    for label in ("ar", "verify k=1", "verify k=2", "verify k=3", "verify k=4", "verify hybrid",
                  "verify adaptive", "hf_generate", "hf_assisted"):
        assert by[label]["identical_to_ar"] is True, label  # lossless lanes, fp32
    # recycle is lossy: its flag must match a comparison made here, independently of the bench.
    _, model, module, tok = load_checkpoint(ckpt)
    ids = [tok.encode(p) for p in PROMPTS]
    with torch.inference_mode():
        ar = generate(model, None, ids, GenerationConfig(mode="ar", max_new_tokens=10, eos_id=None)).tokens
        rec = generate(model, module, ids, GenerationConfig(mode="recycle", max_new_tokens=10, eos_id=None)).tokens
    assert by["recycle"]["identical_to_ar"] is (rec == ar)
    assert by["recycle"]["prompts_identical_to_ar"] == sum(a == b for a, b in zip(ar, rec, strict=True))
    assert by["recycle"]["identical_to_ar"] is False  # this random module does disagree: the False path is tested


def test_bench_batch_and_sampling(ckpt, prompt_file):
    _, model, module, tok = load_checkpoint(ckpt)
    opts = BenchOptions(max_new_tokens=6, batch_size=3, temperature=1.0, repeats=2, modes=["ar", "verify",
                        "hf_generate", "hf_assisted"], ks=[2], adaptive=False, hybrid=False, hf_cache="auto",
                        compile="none", progress=False)
    rep = run_bench(model, module, tok, load_prompts(prompt_file), opts)
    assert check_schema(rep) == []
    assert rep["batch_size"] == 3 and rep["temperature"] == 1.0
    by = {r["label"]: r for r in rep["results"]}
    assert set(by) == {"ar", "verify k=2", "hf_generate", "hf_assisted"}
    assert all(r["identical_to_ar"] is None for r in rep["results"])  # sampled: not comparable token by token
    assert by["hf_generate"]["cache"] in ("static", "dynamic")
    assert set(by["hf_generate"]["cache_probe_tokens_per_s"]) == {"static", "dynamic"}
    assert "batch 1 per row" in by["hf_assisted"]["note"]
    assert len(by["ar"]["tokens_per_s_rounds"]) == 2


def test_bench_greedy_batch_matches_ar(ckpt, prompt_file):
    _, model, module, tok = load_checkpoint(ckpt)
    opts = BenchOptions(max_new_tokens=8, batch_size=4, repeats=1, modes=["ar", "verify", "hf_generate"],
                        ks=[3], adaptive=False, hf_cache="static", compile="none", progress=False)
    rep = run_bench(model, module, tok, load_prompts(prompt_file), opts)
    for r in rep["results"]:
        assert r["identical_to_ar"] is True, r["label"]  # left-padded HF batch and padded native batch agree


def test_compiled_lanes_and_baseline(ckpt, prompt_file, monkeypatch):
    """The compiled lanes' plumbing, with the round function run uncompiled (no compile wait)."""
    import functools

    from recyclegpt.decoding import compiled
    from recyclegpt.decoding.rounds import decode_round

    def uncompiled(model, module, shape, batch):
        fn = functools.partial(decode_round, model, module, shape)
        fn.first = False  # as a compiled round after its first call
        return fn

    monkeypatch.setattr(compiled, "compiled_round", uncompiled)
    _, model, module, tok = load_checkpoint(ckpt)
    opts = BenchOptions(max_new_tokens=6, batch_size=3, repeats=2, modes=["ar", "recycle", "verify"], ks=[2],
                        adaptive=False, compile="all", progress=False)
    rep = run_bench(model, module, tok, load_prompts(prompt_file), opts)
    by = {r["label"]: r for r in rep["results"]}
    assert list(by) == ["ar", "ar (compiled)", "recycle", "recycle (compiled)", "verify k=2",
                        "verify k=2 (compiled)", "verify hybrid", "verify hybrid (compiled)"]
    ar_lanes = [by["ar"], by["ar (compiled)"]]
    best = max(ar_lanes, key=lambda r: r["tokens_per_s"])
    assert rep["baseline"] == best["label"] and best["baseline"] and best["speedup_vs_ar"] == 1.0
    for r in rep["results"]:  # every speedup is over the fastest ar lane
        assert r["speedup_vs_ar"] == pytest.approx(r["tokens_per_s"] / best["tokens_per_s"], rel=1e-3)
        assert r["identical_reference"] == ("ar (compiled)" if r.get("compiled") else "ar")
        assert "warmup_s" in r
    assert by["verify k=2 (compiled)"]["identical_to_ar"] is True and by["ar (compiled)"]["identical_to_ar"] is True
    assert by["recycle (compiled)"]["full_passes_per_token"] < 0.75


@pytest.mark.parametrize("content, name, message", [
    (None, "missing.txt", "prompt file not found"),
    ("", "empty.txt", "holds no prompts"),
    ("\n  \n", "blank.txt", "holds no prompts"),
    ('{"prompt": "ok"}\n{"prompt": broken\n', "bad.jsonl", "bad.jsonl:2: invalid JSON"),
    ('{"prompt": "ok"}\n{"question": "x"}\n', "nofield.jsonl", "nofield.jsonl:2: the record has no \"prompt\""),
    ('{"prompt": 3}\n', "notstr.jsonl", "must be a string"),
    ('{"prompt": "  "}\n', "emptyrec.jsonl", "emptyrec.jsonl:1: the prompt is empty"),
    (b"\x00\x01binary", "bin.txt", "looks binary"),
    (b"caf\xe9\n", "latin1.txt", "is not UTF-8"),
])
def test_bad_prompts_file_clear_error(tmp_path, capsys, content, name, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(RecycleError, match=message.replace("(", r"\(")):
        read_prompt_file(path)
    # the command line: one line on stderr, exit 2, before any model is loaded
    rc = cli.main(["bench", str(tmp_path / "no-such-ckpt"), "--prompts", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_prompts_directory_is_an_error(tmp_path):
    with pytest.raises(RecycleError, match="got a directory"):
        read_prompt_file(tmp_path)


def test_prompt_file_formats(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("first prompt\n\n  second prompt\n\"quoted\" but plain\n")
    ps = read_prompt_file(plain)
    assert ps.prompts == ["first prompt", "  second prompt", "\"quoted\" but plain"]
    assert ps.ids == ["p.txt:1", "p.txt:3", "p.txt:4"]
    jl = tmp_path / "p.data"  # JSONL detected by content too
    jl.write_text('"a string\\n  with a newline"\n{"text": "t", "id": "x1"}\n')
    ps = read_prompt_file(jl)
    assert ps.prompts == ["a string\n  with a newline", "t"] and ps.ids == ["p.data:1", "x1"]


def test_shipped_prompt_sets():
    code, prose = load_prompts("code"), load_prompts("prose")
    assert len(code) == 16 and len(prose) == 16
    assert all(p.strip() for p in code.prompts + prose.prompts)
    assert all(":" in i for i in code.ids)  # source file:line of the held-out function
    assert len(load_prompts("all")) == 32 and len(load_prompts("code", limit=3)) == 3


def test_compare_outputs():
    rep = compare_outputs([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6]], 4)
    assert rep.token_agreement == 5 / 6
    assert rep.mean_common_prefix == 2.0 and rep.prefix_agreement == 4 / 6 and rep.identical_prompts == 1
    short = compare_outputs([[1, 2, 3]], [[1]], 3)  # an early stop counts the missing positions as different
    assert short.token_agreement == 1 / 3


def test_greedy_agreement_matches_direct_comparison(ckpt):
    _, model, module, tok = load_checkpoint(ckpt)
    ids = [tok.encode(p) for p in PROMPTS]
    rep = greedy_agreement(model, module, ids, max_new_tokens=8, eos_id=None, batch_size=2)
    with torch.inference_mode():
        ar = generate(model, None, ids, GenerationConfig(mode="ar", max_new_tokens=8)).tokens
        rec = generate(model, module, ids, GenerationConfig(mode="recycle", max_new_tokens=8)).tokens
    assert rep.to_dict() == compare_outputs(ar, rec, 8).to_dict()


def test_eval_cli_reports_agreement(ckpt, prompt_file, text_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    rc = cli.main(["eval", str(ckpt), "--data", str(text_dir), "--max-tokens", "600", "--seq-len", "64",
                   "--prompts", str(prompt_file), "--agreement-tokens", "6", "--json", str(out)])
    assert rc == 0
    assert "greedy recycle = ar" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["ppl_standard"] > 0 and rep["greedy_agreement"]["prompts"] == len(PROMPTS)
    assert 0 <= rep["greedy_agreement"]["token_agreement"] <= 1
    top = [rep["module_agrees_with_full"], rep["module_top2_has_full"], rep["module_top3_has_full"]]
    assert 0 <= top[0] <= top[1] <= top[2] <= 1  # a wider top-k holds at least as much


def test_top_k_agreement_matches_a_direct_count(ckpt, text_dir):
    from recyclegpt.bench.quality import load_eval_tokens, perplexity

    _, model, module, tok = load_checkpoint(ckpt)
    tokens = load_eval_tokens([str(text_dir)], tok, 200)
    rep = perplexity(model, module, tokens, seq_len=64, progress=False)
    x = torch.from_numpy(tokens[:3 * 64]).view(3, 64)
    with torch.inference_mode():
        logits, h = model(x)
        mlogits, _ = module(model, x[:, 1:], h[:, :-1])
    full_next = logits.argmax(-1)[:, 1:-1]  # the full model's choice at t+1, which the module at t predicts
    ranked = mlogits[:, :-1].argsort(-1, descending=True)
    for k, got in ((1, rep.module_agrees_with_full), (2, rep.module_top2_has_full), (3, rep.module_top3_has_full)):
        want = (ranked[..., :k] == full_next[..., None]).any(-1).float().mean().item()
        assert got == pytest.approx(want)


def test_bench_auto_lane_is_identical_to_ar(ckpt, prompt_file, monkeypatch, tmp_path):
    from recyclegpt.decoding import auto
    from recyclegpt.decoding.auto import DraftShape

    monkeypatch.setenv("RECYCLEGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(auto, "CANDIDATES", (DraftShape(2), DraftShape(3, 5)))
    _, model, module, tok = load_checkpoint(ckpt)
    opts = BenchOptions(max_new_tokens=8, repeats=1, modes=["ar", "verify"], ks=[2], adaptive=False, hybrid=False,
                        auto=True, compile="none", progress=False)
    rep = run_bench(model, module, tok, load_prompts(prompt_file), opts)
    (lane,) = [r for r in rep["results"] if r["label"].startswith("verify auto")]
    assert lane["identical_to_ar"] is True
    assert {t["draft"] for t in lane["auto_trials"]} == {"chain k=2", "tree 5 (depth 3)"}
    assert lane["label"] == f"verify auto ({lane['auto']})"
    assert not (tmp_path / "auto.json").exists()  # the bench measures afresh and leaves the cache alone


def _compiled_report(identical: bool) -> dict:
    lane = dict(mode="ar", label="ar (compiled)", tokens_per_s=10.0, speedup_vs_ar=1.0, full_passes_per_token=1.0,
                mean_accepted=1.0, compiled=True, baseline=True, dtype="bfloat16", identical_to_ar=True)
    verify = dict(lane, mode="verify", label="verify k=3 (compiled)", baseline=False, identical_to_ar=identical,
                  prompts_identical_to_ar=3)
    return dict(results=[lane, verify], prompts=4, dtype="bfloat16", baseline="ar (compiled)", repeats=1, model="m",
                device="cpu", batch_size=1, max_new_tokens=8,
                machine={"cpu": "x", "threads": 1})


@pytest.mark.parametrize("identical", [True, False])
def test_bench_table_explains_a_compiled_bf16_difference(identical):
    from rich.console import Console

    from recyclegpt.bench.report import print_table

    console = Console(record=True, width=200)
    print_table(_compiled_report(identical), console=console)
    text = console.export_text()
    assert ("Exactness in bfloat16" in text) is (not identical)
