"""lm-eval adapter: scoring per mode checked by hand, windows, generation, and the local task end to end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("CI"):
    import lm_eval  # CI installs the dev extra, which includes lm-eval: never skip there
else:
    lm_eval = pytest.importorskip("lm_eval")

from conftest import make_checkpoint  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from recyclegpt import cli  # noqa: E402
from recyclegpt.api import RecycleGPT  # noqa: E402
from recyclegpt.decoding.testing import uncached_logits  # noqa: E402
from recyclegpt.errors import RecycleError  # noqa: E402
from recyclegpt.lm_eval_adapter import RecycleGPTLM  # noqa: E402

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_task"


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("lmeval") / "ckpt")


def _req(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _by_hand(lm: RecycleGPTLM, ctx: list[int], cont: list[int], mode: str) -> tuple[float, bool]:
    """Log-prob of `cont` after `ctx`: full model for new tokens 1, 3, ...; in recycle the module for 2, 4, ..."""
    seq = ctx + cont
    with torch.no_grad():
        logits, mlogits = uncached_logits(lm.model, lm.module, seq)
    total, greedy = 0.0, True
    for j, m in enumerate(range(len(ctx), len(seq)), 1):
        row = mlogits[m - 2] if (mode == "recycle" and j % 2 == 0) else logits[m - 1]
        lp = F.log_softmax(row.float(), -1)
        total += lp[seq[m]].item()
        greedy &= int(lp.argmax()) == seq[m]
    return total, greedy


@pytest.mark.parametrize("mode", ["std", "recycle"])
def test_loglikelihood_scores_as_the_mode_decodes(ckpt, mode):
    lm = RecycleGPTLM(pretrained=str(ckpt), mode=mode, device="cpu", batch_size=2)
    pairs = [("def add(a, b):", "\n    return a + b"), ("The quick brown", " fox jumps over"), ("", "for i in x")]
    got = lm.loglikelihood([_req("loglikelihood", p) for p in pairs], disable_tqdm=True)
    for (c, x), (lp, greedy) in zip(pairs, got, strict=True):
        ctx, cont = lm._encode_pair(c, x)
        assert len(cont) >= 3
        want_lp, want_greedy = _by_hand(lm, ctx, cont, mode)
        assert lp == pytest.approx(want_lp, abs=1e-3)
        assert greedy == want_greedy
    if mode == "recycle":  # the module really is used: the scores differ from std's
        std = RecycleGPTLM(pretrained=str(ckpt), mode="std", device="cpu")
        ref = std.loglikelihood([_req("loglikelihood", p) for p in pairs], disable_tqdm=True)
        assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(got, ref, strict=True))


@pytest.mark.parametrize("mode", ["std", "recycle"])
def test_rolling_loglikelihood(ckpt, mode):
    text = "for i in range(10):\n    print(i * i)\n" * 3
    lm = RecycleGPTLM(pretrained=str(ckpt), mode=mode, device="cpu")
    (whole,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))], disable_tqdm=True)
    toks = lm.tok_encode(text)
    assert len(toks) + 1 <= lm.max_length
    want, _ = _by_hand(lm, [lm.prefix_token_id], toks, mode)  # one window: the whole text after EOS
    assert whole == pytest.approx(want, abs=1e-3)
    # a short window: every token scored exactly once, each window with >= 2 tokens of context after the first
    lm.max_length = 8
    full = [lm.prefix_token_id] + toks
    wins = lm._rolling_windows(full)
    scored = []
    for i, (w, start, j0) in enumerate(wins):
        assert len(w) <= lm.max_length + 1 and (i == 0 or start >= 2)
        assert w[start:] == full[j0:j0 + len(w) - start]
        scored += list(range(j0, j0 + len(w) - start))
    assert scored == list(range(1, len(full)))
    (windowed,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))], disable_tqdm=True)
    assert windowed < 0 and windowed != pytest.approx(whole, abs=1e-6)  # less context, different score


def test_long_continuation_keeps_context_for_the_module(ckpt):
    lm = RecycleGPTLM(pretrained=str(ckpt), mode="recycle", device="cpu", max_length=6)
    full, start, j0 = lm._window([1, 2, 3], list(range(10, 20)))
    assert len(full) == 7 and start == 2 and full[start:] == list(range(15, 20)) and j0 == 6


@pytest.mark.parametrize("mode, gen_mode", [("std", None), ("recycle", None), ("std", "verify")])
def test_generate_until_matches_the_decoder(ckpt, mode, gen_mode):
    lm = RecycleGPTLM(pretrained=str(ckpt), mode=mode, gen_mode=gen_mode, device="cpu", batch_size=2)
    reqs = [_req("generate_until", ("def add(a, b):", {"until": ["\n\n"], "max_gen_toks": 12})),
            _req("generate_until", ("The quick brown", {"until": ["fox"], "max_gen_toks": 9})),
            _req("generate_until", ("In the morning", {"until": ["\n\n"], "max_gen_toks": 12}))]
    got = lm.generate_until(reqs, disable_tqdm=True)
    rg = RecycleGPT.from_pretrained(ckpt, device="cpu", dtype="float32")
    dec_mode = gen_mode or ("recycle" if mode == "recycle" else "ar")
    for r, text in zip(reqs, got, strict=True):
        ctx, kw = r.args
        want = rg.generate([ctx], mode=dec_mode, max_new_tokens=kw["max_gen_toks"], stop=kw["until"])[0]
        assert text == want
        assert not any(u in text for u in kw["until"])


def test_bad_model_args(ckpt):
    with pytest.raises(RecycleError, match="mode must be"):
        RecycleGPTLM(pretrained=str(ckpt), mode="fast")
    with pytest.raises(RecycleError, match="pretrained"):
        RecycleGPTLM(mode="std")


def test_simple_evaluate_with_the_class(ckpt):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)  # skip indexing thousands of YAMLs
    out = {}
    for mode in ("std", "recycle"):
        res = lm_eval.simple_evaluate(model=RecycleGPTLM(pretrained=str(ckpt), mode=mode, device="cpu"),
                                      tasks=["recycle_tiny"], task_manager=tm)
        r = res["results"]
        assert 0 <= r["recycle_tiny_mc"]["acc,none"] <= 1
        assert 0 <= r["recycle_tiny_gen"]["exact_match,none"] <= 1
        out[mode] = r["recycle_tiny_ppl"]["word_perplexity,none"]
        assert out[mode] > 1
    assert out["std"] != pytest.approx(out["recycle"])  # recycle scores every second token by the module
    # by registered name and argument string, as lm-eval's command line does
    res = lm_eval.simple_evaluate(model="recyclegpt", model_args=f"pretrained={ckpt},mode=recycle,device=cpu",
                                  tasks=["recycle_tiny_ppl"], task_manager=tm)
    assert res["results"]["recycle_tiny_ppl"]["word_perplexity,none"] == pytest.approx(out["recycle"])


@pytest.mark.slow
def test_lm_eval_command_line(ckpt, capsys, tmp_path):
    rc = cli.main(["lm-eval", "--model", "recyclegpt", "--model_args", f"pretrained={ckpt},mode=recycle",
                   "--tasks", "recycle_tiny_mc,recycle_tiny_gen", "--include_path", str(TASK_DIR),
                   "--device", "cpu", "--output_path", str(tmp_path / "res")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "recycle_tiny_mc" in out and "recycle_tiny_gen" in out and "acc" in out
    assert list((tmp_path / "res").rglob("results*.json"))
