"""No request can stop the server: the request classes that once did, failures isolated per request, the
engine supervised (killed mid-request, restarted, the next request served), and one table of accepted
values shared by the Python API, the command line and the server. Tiny random checkpoint, fp32, eager."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from test_serve import KEY, TEMPLATE, LiveServer, _opts, change_workers, metric, offline_ar  # noqa: E402

from recyclegpt import argtypes, cli  # noqa: E402
from recyclegpt.decoding import Engine, GenerationConfig  # noqa: E402
from recyclegpt.decoding.limits import SETTINGS  # noqa: E402
from recyclegpt.errors import RecycleError  # noqa: E402
from recyclegpt.serve.app import ChatTemplate, create_app  # noqa: E402
from recyclegpt.serve.worker import Worker  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(bundle):
    _, m = bundle
    with LiveServer(create_app(m, _opts(), ChatTemplate(TEMPLATE, eos="<|endoftext|>"))) as s:
        yield s


def post(server, body: bytes | dict, path: str = "/v1/completions", timeout: float = 30) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=data, headers=AUTH, timeout=timeout)


def health(server) -> dict:
    return httpx.get(server.url + "/health").json()


def wait_for(cond, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


# ------------------------------------------------------------------ the classes that stopped the engine or 500ed
A = {"model": "tiny", "prompt": "def"}
BAD = [
    ("seed above 2^64", b'{"model": "tiny", "prompt": "a", "seed": 18446744073709551621, "temperature": 1}', "seed"),
    ("seed above 2^63", {**A, "seed": 2 ** 63}, "seed"),
    ("seed true", {**A, "seed": True}, "seed"),
    ("top_k beyond int64", {**A, "top_k": 2 ** 70, "temperature": 1}, "top_k"),
    ("temperature beyond float32", {**A, "temperature": 1e39}, "temperature"),
    ("temperature NaN", b'{"model": "tiny", "prompt": "a", "temperature": NaN}', "temperature"),
    ("max_tokens a string", {**A, "max_tokens": "5"}, "max_tokens"),
    ("max_tokens 5.0", {**A, "max_tokens": 5.0}, "max_tokens"),
    ("k beyond 64", {**A, "k": 65}, "k"),
    ("lone surrogate prompt", b'{"model": "tiny", "prompt": "a\\ud800"}', "prompt"),
    ("lone surrogate stop", b'{"model": "tiny", "prompt": "a", "stop": "\\udcff"}', "stop"),
    ("lone surrogate model", b'{"model": "\\ud800", "prompt": "a"}', "model"),
    ("lone surrogate user", b'{"model": "tiny", "prompt": "a", "user": "\\udfff"}', "user"),
    ("five stop strings", {**A, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("not UTF-8", b'{"model": "tiny", "prompt": "\xff\xfe"}', None),
    ("nested too deeply", b"[" * 100_000 + b"]" * 100_000, None),
    ("a 5000-digit number", b'{"model": "tiny", "prompt": "a", "max_tokens": ' + b"1" * 5000 + b"}", None),
    ("truncated", b'{"model": "tiny", "prompt": "a', None),
]


@pytest.mark.parametrize("body,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_each_bad_request_is_a_400_and_the_engine_serves_on(server, bundle, body, param):
    r = post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"] and err["type"] == "invalid_request_error"
    if param is not None:
        assert param in (err["param"] or ""), err
    assert health(server) == {"status": "ok", "restarts": 0, "warmup_s": 0.0}


def test_chat_texts_are_checked_like_prompts(server):
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud83d"}]}'
    r = post(server, body, "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi", "name": "\\udc80"}]}'
    assert post(server, body, "/v1/chat/completions").status_code == 400
    assert health(server)["status"] == "ok"


def test_a_tokenizer_that_cannot_take_the_text_is_a_400(bundle, monkeypatch):
    _, m = bundle
    real = m.tokenizer.encode
    monkeypatch.setattr(m.tokenizer, "encode", lambda text: real(text) if "poison" not in text
                        else (_ for _ in ()).throw(TypeError("TextInputSequence must be str")))
    with LiveServer(create_app(m, _opts())) as s:
        r = post(s, {**A, "prompt": "poison"})
        assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"], r.text
        assert post(s, {**A, "max_tokens": 4, "temperature": 0}).json()["choices"][0]["text"] == offline_ar(m, "def", 4)


def test_max_tokens_0_answers_with_a_finish_reason(server):
    r = post(server, {**A, "max_tokens": 0})
    assert r.status_code == 200 and r.json()["choices"][0] == {"index": 0, "text": "", "logprobs": None,
                                                                 "finish_reason": "length"}


@pytest.mark.parametrize("mode", ["ar", "verify", "recycle"])
def test_a_seeded_request_samples_what_the_api_samples(server, bundle, mode):
    """The seed means the same on both surfaces: the server's request is row 0 of an offline `generate`."""
    _, m = bundle
    for seed in (7, -3, 2 ** 63 - 1, -2 ** 63):
        r = post(server, {**A, "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": seed, "mode": mode})
        want = m.generate("def", mode=mode, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=seed)[0]
        assert r.json()["choices"][0]["text"] == want


# ------------------------------------------------------------------ failures stay with their request
def engine_side(m, slots: int = 4, compile: bool = False, batches=None, load_aware: bool = False):
    """(a `Worker` over the tiny model, the API's end of its connection, held by the test)."""
    api, theirs = multiprocessing.Pipe()
    engine = Engine(m.model, m.module, slots, compile=compile, tokenizer=m.tokenizer, width=3, batches=batches,
                    load_aware=load_aware)
    return Worker(engine, theirs), api


def received(api) -> list[tuple]:
    out = []
    while api.poll(0):
        out.append(api.recv())
    return out


@pytest.mark.parametrize("failure, status", [(RecycleError("refused"), 400), (RuntimeError("prefill bug"), 500)])
def test_one_request_failing_at_admission_fails_alone(bundle, failure, status):
    """Queued together, one request whose admission raises fails alone (400 when the engine refused it, 500
    when it failed) and frees its slot; the other is prefilled and decodes its offline text."""
    _, m = bundle
    worker, api = engine_side(m)
    real = worker.engine.admit_many

    def admit_many(requests):
        if any(len(prompt) == len(m.tokenizer.encode("poison pill")) for _, prompt, _ in requests):
            raise failure
        return real(requests)

    worker.engine.admit_many = admit_many
    config = GenerationConfig(mode="ar", max_new_tokens=4, eos_id=m.tokenizer.eos_id)
    for rid, text in enumerate(["def", "poison pill"]):
        api.send(("add", rid, m.tokenizer.encode(text), config, 60.0))
    assert worker._receive()
    worker._admit()  # one request per turn: good, then bad
    worker._admit()
    assert worker.engine.free_slots() == [1, 2, 3] and len(worker.rows) == 1 and not worker.waiting
    while worker.engine.decoding():
        worker._step()
    msgs = received(api)
    assert [msg for msg in msgs if msg[0] == "taken"] == [("taken", 0), ("taken", 1)]
    outputs = [o for msg in msgs if msg[0] == "out" for o in msg[2]]
    assert m.tokenizer.decode([t for o in outputs for t in o[1]]) == offline_ar(m, "def", 4)
    assert outputs[-1][2] == "length" and outputs[-1][4].produced == 4 and {o[0] for o in outputs} == {0}
    (fail,) = [msg for msg in msgs if msg[0] == "fail"]
    assert fail[1] == 1 and fail[3] == status


def test_a_cancel_frees_a_decoding_or_waiting_request_and_stop_ends_the_loop(bundle):
    _, m = bundle
    worker, api = engine_side(m, slots=1)
    config = GenerationConfig(mode="ar", max_new_tokens=50, eos_id=None)
    for rid in (0, 1, 2):
        api.send(("add", rid, m.tokenizer.encode("def"), config, 60.0))
    assert worker._receive()
    worker._admit()
    api.send(("cancel", 0))  # decoding
    api.send(("cancel", 2))  # waiting
    assert worker._receive()
    assert worker.engine.free_slots() == [0] and [r.rid for r in worker.waiting] == [1] and not worker.rows
    api.send(("stop",))
    assert not worker._turn()


def test_a_request_past_its_time_limit_fails_waiting_or_decoding(bundle):
    _, m = bundle
    worker, api = engine_side(m, slots=1)
    config = GenerationConfig(mode="ar", max_new_tokens=50, eos_id=None)
    api.send(("add", 0, m.tokenizer.encode("def"), config, 60.0))
    api.send(("add", 1, m.tokenizer.encode("def"), config, 0.0))
    worker._receive()
    worker._admit()
    worker.rows[0].deadline = 0.0  # the decoding one's time is up too
    worker._expire()
    fails = [msg for msg in received(api) if msg[0] == "fail"]
    assert sorted(f[1] for f in fails) == [0, 1] and all("time limit" in f[2] for f in fails)
    assert worker.engine.free_slots() == [0] and not worker.waiting


def failing_admission(monkeypatch, when, error: BaseException) -> None:
    """Every engine the server starts raises `error` when it admits a request for which when(prompt, config)."""
    def install(worker):
        real = worker.engine.admit_many

        def admit_many(requests):
            if any(when(prompt, cfg) for _, prompt, cfg in requests):
                raise error
            return real(requests)

        worker.engine.admit_many = admit_many

    change_workers(monkeypatch, install)


def test_a_request_refused_at_admission_is_a_400_even_streamed(bundle, monkeypatch):
    _, m = bundle
    failing_admission(monkeypatch, lambda prompt, cfg: cfg.max_new_tokens == 3, RecycleError("this engine refuses 3"))
    app = create_app(m, _opts())
    with LiveServer(app) as s:
        for stream in (False, True):
            r = post(s, {**A, "max_tokens": 3, "stream": stream})
            assert r.status_code == 400 and r.json()["error"]["message"] == "this engine refuses 3"
        assert post(s, {**A, "max_tokens": 4, "temperature": 0}).json()["choices"][0]["text"] == offline_ar(m, "def", 4)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_waits_longer_than_a_disconnect_poll_is_served(bundle, monkeypatch, stream):
    """Waiting for a piece polls the client every DISCONNECT_POLL_S; a poll's timeout once closed the request's
    event stream, and a request queued longer than that got a 500 (found by the fuzz run)."""
    from recyclegpt.serve import app as app_module

    _, m = bundle
    monkeypatch.setattr(app_module, "DISCONNECT_POLL_S", 0.01)
    polls = []

    def slow_admission(worker):
        real_admit = worker._admit

        def slow_admit():  # admission waits until the handler's wait has timed out a few times
            if worker.waiting:
                wait_for(lambda: len(polls) >= 5, "no polls", 10)
            real_admit()

        worker._admit = slow_admit

    async def counting_wait_for(aw, timeout):
        polls.append(1)
        return await asyncio.wait_for(aw, timeout)

    change_workers(monkeypatch, slow_admission)
    app = create_app(m, _opts())
    monkeypatch.setattr(app_module, "asyncio", SimpleNamespace(wait_for=counting_wait_for,
                                                               get_running_loop=asyncio.get_running_loop))
    with LiveServer(app) as s:
        r = post(s, {**A, "max_tokens": 6, "temperature": 0, "stream": stream})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"] if not stream else "".join(
            json.loads(line[6:])["choices"][0]["text"] for line in r.text.splitlines()
            if line.startswith("data: {") and json.loads(line[6:])["choices"])
        assert text == offline_ar(m, "def", 6) and len(polls) >= 5


def test_a_client_that_leaves_while_queued_cancels_its_request(bundle, monkeypatch):
    """A non-streamed request waits in the queue; its client times out: the server notices and cancels it
    (a middleware once hid the disconnect, and the request would have decoded for nobody)."""
    from recyclegpt.serve import app as app_module

    _, m = bundle
    monkeypatch.setattr(app_module, "DISCONNECT_POLL_S", 0.01)
    change_workers(monkeypatch, lambda w: setattr(w, "_admit", lambda: None))  # nothing leaves the queue
    app = create_app(m, _opts())
    sup, jobs = app.state.engine, []
    real_submit = sup.submit
    sup.submit = lambda job: (jobs.append(job), real_submit(job))
    with LiveServer(app) as s:
        with pytest.raises(httpx.ReadTimeout):
            post(s, {**A, "max_tokens": 4}, timeout=0.2)
        wait_for(lambda: jobs and jobs[0].cancelled, "the request was not cancelled")


def test_a_bug_in_a_handler_is_a_500_that_says_so_and_is_counted(bundle):
    _, m = bundle
    app = create_app(m, _opts())
    app.state.engine.submit = lambda job: (_ for _ in ()).throw(RuntimeError("a bug"))
    with LiveServer(app) as s:
        r = post(s, {**A, "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError: a bug"
        assert httpx.get(s.url + "/v1/no-such-route", headers=AUTH).status_code == 404
        text = httpx.get(s.url + "/metrics").text
        assert 'recyclegpt_requests_total{endpoint="/v1/completions",status="500"} 1.0' in text
        assert 'endpoint="other",status="404"' in text and "no-such-route" not in text
        assert health(s)["status"] == "ok"


# ------------------------------------------------------------------ supervision
class _Kill(BaseException):
    """Escapes every `except Exception`: the engine's loop ends, as it would on a bug in the loop itself."""


def test_a_killed_engine_costs_only_the_requests_in_flight(bundle, monkeypatch):
    """One slot: A decodes, B waits in the engine's queue. The engine dies mid-A: A gets a 503 that says so,
    a fresh engine starts, B (never taken) goes to it and is served with the offline text, /health and
    /metrics count the restart, and later requests are served as before."""
    _, m = bundle
    steps, b_waiting = [], threading.Event()

    def dying(worker):
        real_step = worker.engine.step

        def dying_step():
            steps.append(1)
            if len(steps) == 3:
                b_waiting.wait(10)  # B is queued behind A before the engine dies
                raise _Kill("killed mid-request")
            return real_step()

        worker.engine.step = dying_step

    change_workers(monkeypatch, dying)
    app = create_app(m, _opts(slots=1))
    with LiveServer(app) as s:
        results = {}
        a = threading.Thread(target=lambda: results.setdefault("a", post(s, {**A, "max_tokens": 50,
                                                                            "ignore_eos": True})))
        a.start()
        wait_for(lambda: len(steps) >= 1, "A never started decoding")
        b = threading.Thread(target=lambda: results.setdefault("b", post(s, {**A, "prompt": "The", "max_tokens": 6,
                                                                            "temperature": 0})))
        b.start()
        wait_for(lambda: app.state.engine.queue_depth == 1, "B never queued")
        b_waiting.set()
        a.join(30)
        b.join(30)
        ra, rb = results["a"], results["b"]
        assert ra.status_code == 503 and "restarting" in ra.json()["error"]["message"], ra.text
        assert rb.status_code == 200 and rb.json()["choices"][0]["text"] == offline_ar(m, "The", 6)
        h = health(s)
        assert h["status"] == "ok" and h["restarts"] == 1 and "_Kill: killed mid-request" in h["last_error"]
        assert metric(s, "recyclegpt_engine_restarts_total") == 1
        r = post(s, {**A, "max_tokens": 8, "temperature": 0, "stream": True})
        assert r.status_code == 200 and "[DONE]" in r.text
        assert post(s, {**A, "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"] == offline_ar(m, "def", 8)


def test_a_request_that_takes_the_engine_down_twice_is_refused(bundle, monkeypatch):
    """A request whose admission kills the engine (here: a bug that escapes the loop for one prompt) gets a 503
    each time, and after the second engine it took down a 400: a client retrying it cannot stop the engine
    for everyone again. Other requests are served throughout."""
    _, m = bundle
    poison = len(m.tokenizer.encode("poison pill"))
    failing_admission(monkeypatch, lambda prompt, cfg: len(prompt) == poison, _Kill("admission bug"))
    app = create_app(m, _opts())
    with LiveServer(app) as s:
        bad = {**A, "prompt": "poison pill", "max_tokens": 4}
        for restarts in (1, 2):
            r = post(s, bad)
            assert r.status_code == 503 and "admission bug" in r.json()["error"]["message"], r.text
            wait_for(lambda: health(s)["status"] == "ok", "no fresh engine")
            assert health(s)["restarts"] == restarts
        r = post(s, bad)
        assert r.status_code == 400 and "refused" in r.json()["error"]["message"], r.text
        assert post(s, {**bad, "max_tokens": 5}).status_code == 503  # other settings: another request
        wait_for(lambda: health(s)["status"] == "ok", "no fresh engine")
        assert post(s, {**A, "max_tokens": 4, "temperature": 0}).json()["choices"][0]["text"] == offline_ar(m, "def", 4)


def test_health_and_requests_say_503_while_the_engine_restarts(bundle, monkeypatch):
    _, m = bundle
    starts = []

    def first_dies(worker):
        starts.append(1)
        if len(starts) == 1:
            worker.engine.step = lambda: (_ for _ in ()).throw(_Kill("boom"))

    change_workers(monkeypatch, first_dies)
    app = create_app(m, _opts())
    engine, release = app.state.engine, threading.Event()
    launch = engine.launch

    def slow_launch():  # the restart waits for the test
        if engine.restarts:
            release.wait(10)
        return launch()

    engine.launch = slow_launch
    with LiveServer(app) as s:
        r = post(s, {**A, "max_tokens": 4})
        assert r.status_code == 503
        wait_for(lambda: health(s)["status"] == "degraded", "never degraded")
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["restarts"] == 1
        r = post(s, {**A, "max_tokens": 4})
        assert r.status_code == 503 and "restarting" in r.json()["error"]["message"]
        release.set()
        wait_for(lambda: health(s)["status"] == "ok", "never recovered")
        assert post(s, {**A, "max_tokens": 4, "temperature": 0}).json()["choices"][0]["text"] == offline_ar(m, "def", 4)


def test_an_engine_that_cannot_start_is_given_up_and_requests_get_503(bundle, monkeypatch):
    _, m = bundle
    change_workers(monkeypatch, lambda w: setattr(
        w, "_warm_up", lambda: (_ for _ in ()).throw(RuntimeError("cannot warm up"))))
    app = create_app(m, _opts())
    app.state.engine.max_failed_starts = 2
    with LiveServer(app, ready=False) as s:
        wait_for(lambda: health(s)["status"] == "error", "never gave up")
        h = httpx.get(s.url + "/health")
        assert h.status_code == 503 and h.json()["restarts"] == 2 and "cannot warm up" in h.json()["last_error"]
        r = post(s, {**A, "max_tokens": 4})
        assert r.status_code == 503 and "could not be restarted" in r.json()["error"]["message"]


# ------------------------------------------------------------------ the engine in a process of its own
def _process_opts(**kw):
    return _opts(device="cpu", dtype="float32", **kw)


def _sse_text(lines) -> str:
    return "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines
                   if line.startswith("data: {") and json.loads(line[6:]).get("choices"))


def _signal_mid_stream(server, pid: int, sig: int) -> tuple[list[str], list[dict]]:
    """Send `sig` to the engine process while a long greedy stream decodes: (the stream's remaining
    non-empty lines, the errors among them)."""
    with httpx.stream("POST", server.url + "/v1/completions", headers=AUTH, json={
            **A, "prompt": "The", "max_tokens": 240, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        next(lines)  # decoding
        os.kill(pid, sig)
        rest = [line for line in lines if line]
    return rest, [json.loads(line[6:])["error"] for line in rest if line.startswith('data: {"error"')]


def test_the_engine_process_serves_offline_ar_texts_and_frees_cancelled_rows(bundle):
    """`create_app(checkpoint_dir)`: the engine loads the checkpoint in a process of its own. Greedy texts
    equal offline `ar`, requests joining at every batch of the ladder; a client that leaves frees its row in
    the engine process (the next lone request runs at batch 1, not 2)."""
    path, m = bundle
    app = create_app(path, _process_opts())
    prompts = [f"def f{i}(x):" for i in range(5)]
    lengths = [20, 6, 14, 9, 17]
    with LiveServer(app) as s:
        assert app.state.engine.handle.pid != os.getpid()
        results: dict[int, httpx.Response] = {}
        threads = [threading.Thread(target=lambda i=i: results.setdefault(i, post(s, {
            **A, "prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0, "mode": ("ar", "verify")[i % 2]})))
            for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            assert results[i].json()["choices"][0]["text"] == offline_ar(m, p, n)

        def at(batch: int) -> float:
            text = httpx.get(s.url + "/metrics").text
            return sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith(f'recyclegpt_engine_steps_by_batch_total{{batch="{batch}"}}'))

        with httpx.stream("POST", s.url + "/v1/completions", headers=AUTH, json={
                **A, "prompt": "The", "max_tokens": 240, "stream": True, "ignore_eos": True}) as r:
            next(r.iter_lines())  # decoding: it holds a row
        wait_for(lambda: app.state.engine.busy_slots == 0, "the API did not cancel it")
        before = at(2)
        assert post(s, {**A, "max_tokens": 12, "temperature": 0}).json()["choices"][0]["text"] == offline_ar(m, "def",
                                                                                                            12)
        assert at(2) == before  # the cancelled row is gone from the engine: the lone request ran at batch 1


def test_killing_the_engine_process_is_a_503_and_a_fresh_engine_serves_on(bundle):
    path, m = bundle
    app = create_app(path, _process_opts(slots=2))
    with LiveServer(app) as s:
        first = app.state.engine.handle
        rest, errors = _signal_mid_stream(s, first.pid, signal.SIGKILL)
        assert len(errors) == 1 and "killed by SIGKILL" in errors[0]["message"], errors
        assert rest[-1] == "data: [DONE]"
        wait_for(lambda: health(s)["status"] == "ok", "no fresh engine", 60)
        h = health(s)
        assert h["restarts"] == 1 and "SIGKILL" in h["last_error"] and app.state.engine.handle.pid != first.pid
        assert post(s, {**A, "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"] == offline_ar(m, "def", 8)
        second = app.state.engine.handle
    assert first.proc.poll() is not None and second.proc.poll() == 0  # stopped with the server, nothing left


def test_a_hung_engine_process_is_killed_and_replaced(bundle):
    """An engine that holds requests and says nothing for --engine-timeout (here: stopped with SIGSTOP
    mid-stream) is killed: its request gets a 503 saying so, and a fresh engine serves the next one."""
    path, m = bundle
    app = create_app(path, _process_opts(slots=2, engine_timeout_s=1.0))
    with LiveServer(app) as s:
        first = app.state.engine.handle
        _, errors = _signal_mid_stream(s, first.pid, signal.SIGSTOP)
        assert len(errors) == 1 and "stopped answering" in errors[0]["message"], errors
        wait_for(lambda: health(s)["status"] == "ok", "no fresh engine", 60)
        assert health(s)["restarts"] == 1 and app.state.engine.handle.pid != first.pid
        assert post(s, {**A, "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"] == offline_ar(m, "def", 8)
    assert first.proc.poll() == -signal.SIGKILL


def test_serve_stops_with_a_one_line_error_when_the_engine_cannot_load(bundle, tmp_path, capsys):
    path, _ = bundle
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "module.safetensors").write_bytes(b"not safetensors")
    assert cli.main(["serve", str(bad), "--no-compile", "--port", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "could not start" in err and "corrupt" in err and "Traceback" not in err


def _cli_server(path, stderr) -> tuple[subprocess.Popen, int]:
    """`recyclegpt serve` (eager, fp32) in a session of its own, once ready: (the API process, its engine's pid)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    api = subprocess.Popen([sys.executable, "-m", "recyclegpt.cli", "serve", str(path), "--no-compile", "--port",
                            str(port), "--device", "cpu", "--dtype", "float32"], stderr=stderr,
                           start_new_session=True)

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, "the server never became ready", 120)
    except BaseException:
        api.kill()
        raise
    children = Path(f"/proc/{api.pid}/task/{api.pid}/children").read_text().split()
    assert len(children) == 1
    return api, int(children[0])


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except OSError:
        return True


@pytest.mark.slow
def test_the_engine_process_ends_when_the_api_process_dies(bundle):
    """`recyclegpt serve` killed with SIGKILL (no shutdown at all): its engine process goes too."""
    api, engine = _cli_server(bundle[0], subprocess.DEVNULL)
    try:
        api.kill()
        api.wait()
        wait_for(lambda: _gone(engine), "the engine process outlived the API", 20)
    finally:
        api.kill()


@pytest.mark.slow
def test_ctrl_c_shuts_the_server_down_cleanly(bundle, tmp_path):
    """Ctrl-C reaches the whole process group: the API shuts down and stops its engine, which does not take
    the signal itself (it would look like a crash, and the API would start another engine)."""
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        api, engine = _cli_server(bundle[0], err)
        try:
            os.killpg(api.pid, signal.SIGINT)
            assert api.wait(30) == 0
            wait_for(lambda: _gone(engine), "the engine process outlived the API", 20)
        finally:
            api.kill()
    text = log.read_text()
    assert "Traceback" not in text and "restarting" not in text, text[-2000:]


# ------------------------------------------------------------------ one table of values for API, CLI and server
def _values(name: str) -> list:
    s = SETTINGS[name]
    vals: list = [0, 1, -1, 0.5, 1.0, float("nan"), float("inf"), 2 ** 63, 2 ** 64 + 5, -2 ** 63 - 1, 1e39, 1e-300]
    for end in (s.lo, s.hi):
        if end is not None:
            vals += [end, end - 1, end + 1] if s.kind is int else [end, end * 1.5 if end else -1e-9]
    return vals


SHARED = [("max_new_tokens", "max_tokens", "--max-new-tokens"), ("temperature", "temperature", "--temperature"),
          ("top_k", "top_k", "--top-k"), ("top_p", "top_p", "--top-p"), ("seed", "seed", "--seed"),
          ("k", "k", "--k")]


@pytest.mark.parametrize("setting, field, flag", SHARED, ids=[s[0] for s in SHARED])
def test_api_cli_and_server_accept_the_same_values(server, bundle, setting, field, flag):
    path, m = bundle
    context = m.model.cfg.max_seq_len
    server_k = 3  # the server's --max-k: a larger k is refused there by its own setting, as the README says
    parser = cli.build_parser()
    for v in _values(setting):
        try:
            m.config("ar", **({setting: v} if setting != "max_new_tokens" else {"max_new_tokens": v}))
            api = True
        except RecycleError:
            api = False
        try:
            parser.parse_args(["generate", str(path), "--prompt", "x", flag, str(v)])
            command_line = True
        except argtypes.UsageError:
            command_line = False
        body = {**A, "mode": "ar", "max_tokens": 1, field: v}
        r = post(server, json.dumps(body, allow_nan=True).encode())
        served = r.status_code == 200
        assert r.status_code in (200, 400), (v, r.text)
        if setting == "k" and api and v > server_k:
            assert not served and "at most 3" in r.json()["error"]["message"]
            continue
        if setting == "max_new_tokens" and api and v >= context - 1:  # beyond the context: OpenAI's 400, the API caps
            assert not served and "context" in r.text or "at most" in r.text, r.text
            continue
        assert api == command_line == served, (setting, v, api, command_line, r.text)


def test_the_docs_table_says_what_the_settings_table_holds():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "reliability.md").read_text()
    section = doc.split("## The server: no request can stop it")[1].split("What the server does")[0]
    for setting, field, flag in SHARED:
        row = next(line for line in section.splitlines() if line.startswith("|") and f"`{flag}`" in line)
        assert SETTINGS[setting].allowed in row and f"`{field}`" in row, (setting, row)


@pytest.mark.slow
def test_the_engine_compiles_the_rest_of_the_ladder_when_idle_and_survives_a_failed_compile(bundle, monkeypatch):
    """Before ready: greedy graphs at the smallest and the widest batch, sampled ones at the widest; the greedy
    ones of the batch in between, then the sampled ones of the smaller batches, wait in `later`. A graph whose
    compile fails is dropped (its rounds stay at a wider batch) and the engine goes on; the others compile one
    per call, each followed by a status message to the API. Dynamo with the `eager` backend."""
    import torch

    from recyclegpt.decoding import compiled

    monkeypatch.setattr(compiled, "BACKEND", "eager")
    _, m = bundle
    worker, api = engine_side(m, compile=True, batches=(1, 2))
    with torch.inference_mode():
        worker._warm_up()
        ready = worker.engine.compiled_batches()
        assert ready["ar"] == [1, 4] and ready["verify k=3"] == [1, 4] and ready["verify k=3 sampled"] == [4]
        assert [(s.sampled, b) for s, b in worker.later] == [(False, 2)] * 2 + [(True, 1), (True, 2)] * 4
        real = worker.engine.warm_up
        failing = worker.later[-1][0]  # a sampled one: its compiles at batches 1 and 2 both fail

        def warm_up(shape, batch=None):
            if shape == failing:
                raise RuntimeError("inductor fell over")
            return real(shape, batch)

        monkeypatch.setattr(worker.engine, "warm_up", warm_up)
        while worker.later:
            worker._compile_one()
    done = worker.engine.compiled_batches()
    assert done[compiled.round_kind(failing)] == [4]  # the failed one: still only the widest
    assert sum(b == [1, 2, 4] for b in done.values()) == len(done) - 1
    statuses = [msg[1] for msg in received(api)]
    assert [st["later"] for st in statuses] == list(range(9, -1, -1)) and statuses[-1]["compiled"] == done

    # load-aware drafting: its undrafted graphs come first among those compiled when idle, widest batch first
    worker, _ = engine_side(m, compile=True, batches=(1, 2), load_aware=True)
    with torch.inference_mode():
        worker._warm_up()
    undrafted = Engine.undrafted_shape(worker.engine.shapes_for(GenerationConfig(mode="verify", k=3))[0])
    assert worker.later[:3] == [(undrafted, 4), (undrafted, 2), (undrafted, 1)] and len(worker.later) == 13
