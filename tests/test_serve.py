"""`recyclegpt serve`: a live server (`serve.testing.LiveServer`) on 127.0.0.1 and a free port, driven by the
real `openai` client and by raw HTTP. Tiny random checkpoint, fp32, eager decoding (no compile wait)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from recyclegpt import cli  # noqa: E402
from recyclegpt.decoding import GenerationConfig, generate  # noqa: E402
from recyclegpt.serve.app import ChatTemplate, create_app  # noqa: E402
from recyclegpt.serve.options import ServeOptions  # noqa: E402
from recyclegpt.serve.testing import LiveServer  # noqa: E402

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
KEY = "test-key"


def _opts(**kw) -> ServeOptions:
    return ServeOptions(**{"model_name": "tiny", "slots": 4, "compile": False, "api_key": KEY, **kw})


@pytest.fixture(scope="module")
def server(bundle):
    _, m = bundle
    with LiveServer(create_app(m, _opts(), ChatTemplate(TEMPLATE, eos="<|endoftext|>"))) as s:
        yield s


def offline_ar(m, text: str, n: int) -> str:
    res = generate(m.model, None, [m.tokenizer.encode(text)], GenerationConfig(mode="ar", max_new_tokens=n,
                                                                              eos_id=m.tokenizer.eos_id))
    return m.tokenizer.decode(res.tokens[0])


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def metric(server, name: str) -> float:
    """One unlabelled value of the server's /metrics."""
    text = httpx.get(server.url + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def busy_slots(server) -> float:
    return metric(server, "recyclegpt_busy_slots")


def change_workers(monkeypatch, change) -> None:
    """Every engine a server over a loaded model starts (on its thread) goes through change(worker) before it
    serves: how these tests make an engine fail, stall or refuse."""
    from recyclegpt.serve import worker as worker_module

    real = worker_module.start_worker

    def start(bundle, opts, conn):
        worker = real(bundle, opts, conn)
        change(worker)
        return worker

    monkeypatch.setattr(worker_module, "start_worker", start)


# ------------------------------------------------------------------ the API, greedy = offline ar
@pytest.mark.parametrize("mode", ["verify", "ar", None])
def test_completions_equal_offline_ar(server, bundle, mode):
    _, m = bundle
    c = client(server)
    extra = {} if mode is None else {"mode": mode}
    for prompt in ("def add(a, b):", "The quick brown fox"):
        want = offline_ar(m, prompt, 24)
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, extra_body=extra)
        assert r.choices[0].text == want
        assert r.usage.prompt_tokens == len(m.tokenizer.encode(prompt))
        stream = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                      stream_options={"include_usage": True}, extra_body=extra)
        pieces, usage, finish = [], None, None
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        assert "".join(pieces) == want and finish in ("stop", "length")
        assert usage.completion_tokens == r.usage.completion_tokens


def test_chat_with_template_and_stop(server, bundle):
    _, m = bundle
    c = client(server)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def f(x):"}]
    rendered = ChatTemplate(TEMPLATE).render(msgs)
    want = offline_ar(m, rendered, 20)
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=20, temperature=0, stream=True) if ch.choices]
    assert "".join(pieces) == want
    if len(want) > 6:  # a stop string cuts the text before it, in both forms
        stop = want[3:5]
        cut = want[:want.find(stop)]
        r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0, stop=[stop])
        assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
        pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=20, temperature=0, stop=stop, stream=True) if ch.choices]
        assert "".join(pieces) == cut


def test_32_concurrent_streams_finish_with_correct_usage(server, bundle):
    _, m = bundle
    prompts = [f"for i in range({i}):" for i in range(32)]

    async def one(c, p, n):
        stream = await c.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0.8, seed=n,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage
        return usage

    async def run():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(*(one(c, p, 8 + i % 9) for i, p in enumerate(prompts)))

    usages = asyncio.run(run())
    for i, (p, u) in enumerate(zip(prompts, usages, strict=True)):
        assert u.completion_tokens == 8 + i % 9 and u.prompt_tokens == len(m.tokenizer.encode(p))
    assert busy_slots(server) == 0


def test_requests_joining_at_every_batch_of_the_ladder_equal_offline_ar(bundle):
    """Four slots (batches 1, 2, 4), seven greedy requests of unequal lengths at once: queued ones join as
    others leave (rows move into the freed ones), rounds run at 4, then 2, then 1 rows as the last ones
    finish; every text equals offline `ar`."""
    _, m = bundle
    prompts = [f"def f{i}(x):" for i in range(7)]
    lengths = [30, 6, 22, 12, 26, 9, 17]
    want = [offline_ar(m, p, n) for p, n in zip(prompts, lengths, strict=True)]
    with LiveServer(create_app(m, _opts())) as s:
        async def one(c, i):
            r = await c.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                           extra_body={"mode": "verify" if i % 2 else "ar"})
            return r.choices[0].text

        async def run():
            c = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
            return await asyncio.gather(*(one(c, i) for i in range(len(prompts))))

        got = asyncio.run(run())
        batches = {line.split('batch="')[1].split('"')[0] for line in httpx.get(s.url + "/metrics").text.splitlines()
                   if line.startswith("recyclegpt_engine_steps_by_batch_total{")}
    assert got == want
    assert batches == {"1", "2", "4"}


def test_a_client_that_disconnects_frees_its_slot(server):
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "The", "max_tokens": 200, "stream": True,
                            "ignore_eos": True}) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first chunk arrived: the request holds a slot
    deadline = time.monotonic() + 10
    while busy_slots(server) != 0:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.02)


# ------------------------------------------------------------------ bad input
BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "tiny", "prompt": "a", "max_tokens": "x"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": 5}, 400, "prompt"),
    ({"model": "other", "prompt": "a"}, 404, "model"),
    ({"model": "tiny", "prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ({"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": "a b " * 300, "max_tokens": 16}, 400, None),
    ({"model": "tiny", "prompt": "a", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "tiny", "prompt": "a", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "a", "k": 99}, 400, "k"),
    ({"model": "tiny", "prompt": "a", "mode": "fast"}, 400, "mode"),
    ({"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ({"prompt": "a"}, 400, "model"),
    ({"model": "tiny", "prompt": "a", "x" * 10: "y" * (2 << 20)}, 413, None),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, body, status, param):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=data, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"] and err["type"]
    if param is not None:
        assert param in (err["param"] or "") or param in err["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_auth_and_chat_without_template(bundle):
    _, m = bundle
    with LiveServer(create_app(m, _opts())) as s:
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "a"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            client(s, key="wrong").models.list()
        assert [x.id for x in client(s).models.list().data] == ["tiny"]
        with pytest.raises(openai.BadRequestError, match="chat template"):
            client(s).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_full_queue_answers_429(bundle, monkeypatch):
    _, m = bundle
    change_workers(monkeypatch, lambda w: setattr(w, "_admit", lambda: None))  # nothing leaves the queue
    app = create_app(m, _opts(slots=1, max_queue=1))
    with LiveServer(app) as s:
        def wait_in_the_queue() -> None:  # never admitted: its client gives up, and the server cancels it
            with contextlib.suppress(httpx.ReadTimeout):
                httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "a"},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=3)

        waiting = threading.Thread(target=wait_in_the_queue, daemon=True)
        waiting.start()
        deadline = time.monotonic() + 10
        while app.state.engine.queue_depth < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "a"},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        waiting.join()


def test_a_failing_round_fails_its_requests_only(bundle, monkeypatch):
    _, m = bundle
    calls = []

    def flaky_steps(worker):
        real_step = worker.engine.step

        def flaky():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("boom")
            return real_step()

        worker.engine.step = flaky

    change_workers(monkeypatch, flaky_steps)
    app = create_app(m, _opts())
    with LiveServer(app) as s:
        c = client(s)
        with pytest.raises(openai.InternalServerError, match="boom"):
            c.completions.create(model="tiny", prompt="def", max_tokens=10, temperature=0)
        r = c.completions.create(model="tiny", prompt="def", max_tokens=10, temperature=0)
        assert r.choices[0].text == offline_ar(m, "def", 10)
        assert app.state.engine.busy_slots == 0
        metrics = httpx.get(s.url + "/metrics").text
        for name in ("recyclegpt_requests_total", "recyclegpt_queue_depth", "recyclegpt_busy_slots",
                     "recyclegpt_tau", "recyclegpt_generation_tokens_total",
                     'recyclegpt_engine_steps_by_round_total{kind="verify k=3"}',
                     "recyclegpt_engine_steps_undrafted_total"):
            assert name in metrics


def test_serve_cli_help_and_bad_options(bundle, capsys):
    path, _ = bundle
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "OpenAI" in capsys.readouterr().out
    assert cli.main(["serve", str(path), "--k", "5", "--max-k", "4"]) == 2
    assert "--k 5" in capsys.readouterr().err
    assert cli.main(["serve", str(path), "--tree", "2", "--max-k", "3"]) == 2
    assert "smaller than --max-k" in capsys.readouterr().err
    assert cli.main(["serve", str(path), "--tree", "30", "--max-k", "3", "--tree-topk", "2"]) == 2
    assert "at most 10 nodes" in capsys.readouterr().err
    assert cli.main(["serve", str(path), "--batches", "1,16", "--slots", "8"]) == 2
    assert "at most --slots 8" in capsys.readouterr().err
    for bad in ("0,2", "1,two"):
        assert cli.main(["serve", str(path), "--batches", bad]) == 2
        assert "--batches" in capsys.readouterr().err
    assert cli.main(["serve", str(Path(path) / "missing")]) == 2


def test_health_waits_for_warm_up(bundle, monkeypatch):
    """With compiling on, /health answers 503 until the graphs are compiled (here: a warm-up held back), and
    so do requests."""
    _, m = bundle
    release = threading.Event()
    change_workers(monkeypatch, lambda w: setattr(w, "_warm_up", lambda: release.wait(10)))
    app = create_app(m, _opts(compile=True))
    try:
        with LiveServer(app, ready=False) as s:
            r = httpx.get(s.url + "/health")
            assert r.status_code == 503 and r.json()["status"] == "warming up"
            r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "a"},
                           headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 503 and "warming up" in r.json()["error"]["message"]
            release.set()
            deadline = time.monotonic() + 10
            while httpx.get(s.url + "/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.01)
    finally:
        release.set()


def test_tree_server_answers_like_offline_ar(bundle):
    """`recyclegpt serve --tree N`: verify requests draft trees (any k up to --max-k), ar and recycle requests
    still work beside them, greedy text equals offline ar."""
    _, m = bundle
    with LiveServer(create_app(m, _opts(width=3, tree=6, tree_topk=2))) as s:
        c = client(s)
        prompt = "def add(a, b):"
        want = offline_ar(m, prompt, 24)
        for extra in ({}, {"k": 1}, {"mode": "ar"}):
            r = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, extra_body=extra)
            assert r.choices[0].text == want
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                 extra_body={"mode": "recycle"})
        assert r.usage.completion_tokens >= 1


# ------------------------------------------------------------------ the engine process's threads
def test_engine_cpus_and_the_engine_environment(monkeypatch):
    from recyclegpt.errors import RecycleError
    from recyclegpt.serve.client import engine_environment
    from recyclegpt.serve.options import one_per_core, parse_cpus

    allowed = sorted(os.sched_getaffinity(0))
    assert parse_cpus("none") is None
    assert parse_cpus("auto") == one_per_core(allowed) and set(parse_cpus("auto")) <= set(allowed)
    assert parse_cpus(f"{allowed[0]}-{allowed[0]}") == [allowed[0]]
    for bad, why in (("two", "expected auto, none or CPU ids"), ("3-1", "expected"),
                     ("100000", "not one this process")):
        with pytest.raises(RecycleError, match=why):
            parse_cpus(bad)
    for name in ("OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND"):
        monkeypatch.delenv(name, raising=False)
    env = engine_environment(ServeOptions(cpus=str(allowed[0])))
    assert (env["OMP_PLACES"], env["OMP_PROC_BIND"], env["OMP_NUM_THREADS"]) == (f"{{{allowed[0]}}}", "close", "1")
    env = engine_environment(ServeOptions())  # unbound: one thread per physical core
    assert "OMP_PLACES" not in env and env["OMP_NUM_THREADS"] == str(len(one_per_core(allowed)))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins
    assert engine_environment(ServeOptions(cpus="auto"))["OMP_NUM_THREADS"] == "3"


def test_serve_refuses_engine_cpus_it_cannot_use(bundle, capsys):
    path, _ = bundle
    assert cli.main(["serve", str(path), "--engine-cpus", "100000"]) == 2
    assert "--engine-cpus" in capsys.readouterr().err
