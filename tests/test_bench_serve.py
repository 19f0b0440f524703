"""`recyclegpt bench serve`: the load generator against a fake OpenAI-compatible server on 127.0.0.1.

The fake server (http.server, one thread per connection, HTTP/1.1 chunked) streams completions
with a known timing: the first chunk after TTFT_S, then one chunk every GAP_S carrying 2, 1, 2,
1, ... tokens, usage in a last chunk, then [DONE]; every event is written in two pieces so that
the client sees events split across reads. Prompts containing FAIL get a 400 error JSON, MIDERR
an error event mid-stream, SLOW a stall (for --timeout).
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recyclegpt.bench.serve_load import (
    RequestRecord,
    ServeLoadOptions,
    SSEParser,
    level_metrics,
    normalize_base_url,
    percentile,
    report_to_json,
    run_serve_load,
)
from recyclegpt.cli import build_parser, main
from recyclegpt.errors import RecycleError

needs_httpx = pytest.mark.skipif(importlib.util.find_spec("httpx") is None,
                                 reason="httpx is not installed (pip install -e '.[dev]')")

TTFT_S = 0.03
GAP_S = 0.012
PATTERN = (2, 1)  # tokens per chunk, cycled: 8 tokens -> chunks 2, 1, 2, 1, 2


class FakeServer:
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> FakeServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _chunks(n_tokens: int) -> list[int]:
    out, i = [], 0
    while sum(out) < n_tokens:
        out.append(min(PATTERN[i % len(PATTERN)], n_tokens - sum(out)))
        i += 1
    return out


def _make_handler(srv: FakeServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delays in timings

        def log_message(self, *args) -> None:
            pass

        def send_json(self, status: int, obj: dict) -> None:
            raw = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
            else:
                self.send_json(404, {"error": {"message": f"no route {self.path}"}})

        def event(self, obj) -> None:
            data = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
            payload = b"data: " + data + b"\n\n"
            half = len(payload) // 2
            for piece in (payload[:half], payload[half:]):  # an event split across two HTTP chunks
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.flush()

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            chat = self.path == "/v1/chat/completions"
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                return self.send_json(404, {"error": {"message": f"no route {self.path}"}})
            with srv.lock:
                srv.bodies.append(body)
                srv.auth.append(self.headers.get("Authorization"))
                srv.in_flight += 1
                srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            try:
                self.stream(body, chat)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                with srv.lock:
                    srv.in_flight -= 1

        def stream(self, body: dict, chat: bool) -> None:
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            if "FAIL" in prompt:
                return self.send_json(400, {"error": {"message": "bad prompt", "type": "BadRequestError"}})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            opts = body.get("stream_options") or {}
            every_usage = bool(opts.get("continuous_usage_stats"))
            if chat:
                self.event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            t_end = time.monotonic() + (3.0 if "SLOW" in prompt else 0)
            while time.monotonic() < t_end and not srv.stopping.is_set():
                time.sleep(0.01)
            time.sleep(TTFT_S)
            sizes = _chunks(body["max_tokens"])
            done = 0
            for i, n in enumerate(sizes):
                if i:
                    time.sleep(GAP_S)
                if "MIDERR" in prompt and i == 2:
                    self.event({"error": {"message": "engine died", "code": 500}})
                    break
                done += n
                text = "\u2028x" * n  # U+2028 must not split a line
                last = i == len(sizes) - 1
                choice = {"index": 0, "finish_reason": "length" if last else None}
                if chat:
                    choice["delta"] = {"content": text}
                else:
                    choice["text"] = text
                    if body.get("logprobs"):
                        choice["logprobs"] = {"tokens": [f"t{j}" for j in range(n)]}
                ev = {"object": "text_completion", "choices": [choice]}
                if every_usage:
                    ev["usage"] = {"prompt_tokens": 5, "completion_tokens": done, "total_tokens": 5 + done}
                self.event(ev)
            else:
                if opts.get("include_usage"):
                    self.event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": done,
                                                         "total_tokens": 5 + done}})
            self.event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler


@contextmanager
def fake_server():
    srv = FakeServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def prompt_file(tmp_path: Path, lines: list[str]) -> str:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there now


# ---- pieces ----------------------------------------------------------------------------------

def test_sse_parser_any_split():
    stream = (b": keep-alive comment\r\n"
              b"data: {\"a\": 1}\r\n\r\n"
              b"data: {\"t\": \"\xe2\x80\xa8\xc3\xa9\"}\n\n"  # U+2028 and a 2-byte character
              b"data: line1\ndata: line2\n\n"
              b"event: ignored\ndata:[DONE]\r\r")
    expected = ['{"a": 1}', '{"t": "\u2028\u00e9"}', "line1\nline2", "[DONE]"]
    for step in (1, 2, 3, 7, len(stream)):
        p = SSEParser()
        got = []
        for i in range(0, len(stream), step):
            got += p.feed(stream[i:i + step])
        got += p.close()
        assert got == expected, step
    p = SSEParser()
    assert p.feed(b"data: unterminated") == [] and p.close() == ["unterminated"]


def test_normalize_url_and_percentile():
    for url in ("http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1",
                "http://127.0.0.1:8000/v1/"):
        assert normalize_base_url(url) == "http://127.0.0.1:8000"
    assert normalize_base_url("https://h/prefix/v1") == "https://h/prefix"
    for bad in ("127.0.0.1:8000", "ftp://h", "http://h:99999", "http://h/v1?x=1"):
        with pytest.raises(RecycleError):
            normalize_base_url(bad)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5


def test_level_metrics_by_hand():
    a = RequestRecord(0, "p0", ttft_ms=100, latency_ms=400, output_tokens=4, status=200,
                      chunk_times_ms=[100, 200, 400], chunk_tokens=[1, 1, 2], usage_reported=True)
    b = RequestRecord(1, "p1", status=400, error="HTTP 400: bad")
    m = level_metrics([a, b], wall_s=2.0)
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (1, 1, 4)
    assert m["output_tokens_per_s"] == 2.0 and m["request_throughput"] == 0.5
    assert m["tpot_ms"]["mean"] == pytest.approx(100)  # (400 - 100) / (4 - 1)
    assert m["itl_ms"]["p50"] == pytest.approx(150)  # gaps 100, 200
    assert m["itl_per_token_ms"]["mean"] == pytest.approx(100)  # 100 (1 token), 200 / 2 twice
    assert m["tokens_per_chunk"] == pytest.approx(4 / 3, abs=1e-3)
    assert m["errors"] == {"HTTP 400: bad": 1}


# ---- against the fake server -----------------------------------------------------------------

@needs_httpx
def test_known_timing_and_levels(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("RECYCLEGPT_API_KEY", "sekrit")
    with fake_server() as srv:
        opts = ServeLoadOptions(url=srv.url + "/v1", prompts=prompt_file(tmp_path, ["alpha", "beta", "gamma"]),
                                num_requests=4, max_tokens=8, concurrency=[1, 3], extra={"logprobs": 1})
        report = run_serve_load(opts)
        assert srv.max_in_flight == 3
        bodies, auth = list(srv.bodies), list(srv.auth)
    assert report["model"] == "fake-model" and report["url"] == srv.url
    assert len(bodies) == 1 + 4 + 4  # warm-up + two levels
    b = bodies[0]
    assert b["stream"] is True and b["ignore_eos"] is True and b["stream_options"] == {"include_usage": True}
    assert b["logprobs"] == 1 and b["model"] == "fake-model" and b["max_tokens"] == 8
    assert [x["prompt"] for x in bodies[1:5]] == ["alpha", "beta", "gamma", "alpha"]  # cycled
    assert set(auth) == {"Bearer sekrit"}
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 3]
    for lv in report["levels"]:
        assert (lv["completed"], lv["failed"], lv["total_output_tokens"]) == (4, 0, 32)
        for r in lv["requests"]:
            assert r.ok and r.usage_reported and r.output_tokens == 8 and r.prompt_tokens == 5
            assert r.chunk_tokens == [2, 1, 2, 1, 2] and r.finish_reason == "length"
            assert r.text == "\u2028x" * 8
        # loose bounds: the machine may be busy, sleeps only ever run long
        assert TTFT_S * 1e3 * 0.9 <= lv["ttft_ms"]["p50"] < 400
        assert GAP_S * 1e3 * 0.9 <= lv["itl_ms"]["p50"] < 200
        assert lv["itl_per_token_ms"]["p50"] < lv["itl_ms"]["p50"]  # 2-token chunks halve their gaps
        assert 4 * GAP_S * 1e3 / 7 * 0.9 <= lv["tpot_ms"]["p50"] < 100  # 4 gaps over 7 tokens
        assert lv["tokens_per_chunk"] == pytest.approx(1.6)
        assert lv["output_tokens_per_s"] == pytest.approx(32 / lv["duration_s"], rel=1e-3)
        assert lv["ttft_ms"]["p50"] <= lv["ttft_ms"]["p95"] <= lv["ttft_ms"]["p99"]
    c1, c3 = report["levels"]
    assert c3["duration_s"] < c1["duration_s"]  # 3 in flight beat 1 at a time
    js = report_to_json(report)
    json.dumps(js)
    assert "text" not in js["levels"][0]["requests"][0]
    assert report_to_json(report, save_texts=True)["levels"][0]["requests"][0]["text"] == "\u2028x" * 8
    assert "sekrit" not in json.dumps(js)


@needs_httpx
def test_failures_counted_and_chat_usage_per_chunk(tmp_path):
    prompts = prompt_file(tmp_path, ["fine", "FAIL me", "MIDERR here", "fine again"])
    with fake_server() as srv:
        report = run_serve_load(ServeLoadOptions(url=srv.url, prompts=prompts, num_requests=4, max_tokens=6,
                                                 concurrency=[2]))
        chat = run_serve_load(ServeLoadOptions(
            url=srv.url, model="fake-model", endpoint="chat", prompts=prompts, num_requests=1, max_tokens=5,
            extra={"stream_options": {"continuous_usage_stats": True}}))
        chat_body = srv.bodies[-1]
    lv = report["levels"][0]
    assert (lv["completed"], lv["failed"]) == (2, 2)
    errors = {r.prompt_id.split(":")[-1]: r.error for r in lv["requests"]}
    assert errors["2"] == "HTTP 400: bad prompt"
    assert errors["3"] == "error in the stream: engine died"
    assert errors["1"] is None and errors["4"] is None
    assert lv["total_output_tokens"] == 12 and lv["errors"]
    assert any("failed" in n for n in report["notes"])
    assert chat_body["messages"] == [{"role": "user", "content": "fine"}]
    assert chat_body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    r = chat["levels"][0]["requests"][0]
    assert r.ok and r.chunk_tokens == [2, 1, 2] and r.output_tokens == 5  # the role-only chunk carries no text
    assert chat["endpoint"] == "/v1/chat/completions"


@needs_httpx
def test_rejected_warmup_is_one_line_error(tmp_path, capsys):
    with fake_server() as srv:
        rc = main(["bench", "serve", "--url", srv.url, "--prompts", prompt_file(tmp_path, ["FAIL"]), "--no-progress"])
        assert len(srv.bodies) == 1  # nothing after the warm-up
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the warm-up request") and "HTTP 400: bad prompt" in err[0]


@needs_httpx
def test_request_rate_duration_and_timeout(tmp_path):
    prompts = prompt_file(tmp_path, ["fine", "fine", "SLOW"])
    with fake_server() as srv:
        rate = run_serve_load(ServeLoadOptions(url=srv.url, prompts=prompts, num_requests=2, max_tokens=3,
                                               request_rate=[40.0], seed=1))
        cut = run_serve_load(ServeLoadOptions(url=srv.url, prompts=prompts, num_requests=50, max_tokens=3,
                                              concurrency=[1], duration=0.15, timeout=0.3))
    lv = rate["levels"][0]
    assert lv["request_rate"] == 40.0 and lv["concurrency"] is None and lv["completed"] == 2
    lv = cut["levels"][0]
    assert 1 <= lv["issued"] < 50
    assert any("--duration" in n for n in cut["notes"])
    if lv["issued"] >= 3:  # the SLOW prompt was reached
        assert any("timed out after 0.3 s" in e for e in lv["errors"])


@needs_httpx
def test_cli_end_to_end(tmp_path, capsys):
    out, png = tmp_path / "r" / "serve.json", tmp_path / "serve.png"
    with fake_server() as srv:
        rc = main(["bench", "serve", "--url", srv.url + "/v1/", "--num-requests", "2", "--max-tokens", "4",
                   "--concurrency", "1", "2", "--extra", '{"mode": "verify", "k": 3}', "--json", str(out),
                   "--plot", str(png), "--save-texts", "--no-progress"])
        body = srv.bodies[-1]
    assert rc == 0
    assert body["mode"] == "verify" and body["k"] == 3
    captured = capsys.readouterr()
    assert "c=1" in captured.out and "c=2" in captured.out and "fake-model" in captured.out
    rep = json.loads(out.read_text())
    assert rep["url"] == srv.url and rep["model"] == "fake-model" and rep["date"]
    assert rep["settings"]["concurrency"] == [1, 2] and rep["settings"]["extra"] == {"mode": "verify", "k": 3}
    assert rep["settings"]["prompt_set"] == "code"
    assert [lv["completed"] for lv in rep["levels"]] == [2, 2]
    req = rep["levels"][0]["requests"][0]
    assert req["text"] and req["output_tokens"] == 4 and len(req["chunk_times_ms"]) == 3
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        assert set(rep["levels"][1][key]) == {"mean", "p50", "p95", "p99"}
    assert png.stat().st_size > 1000


@needs_httpx
def test_dead_url_is_one_line_error(capsys):
    url = dead_url()
    for extra in ([], ["--model", "m"]):  # /v1/models lookup, or straight to the warm-up request
        assert main(["bench", "serve", "--url", url, "--no-progress", "--num-requests", "1", *extra]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and url in err[0], err
        assert "Traceback" not in captured.err


def test_cli_dispatch_keeps_bench_ckpt(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: recyclegpt bench serve") and "--concurrency" in text and "(default 32)" in text
    from recyclegpt.bench.serve_load import build_parser as serve_parser

    for action in serve_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "bench serve" in capsys.readouterr().out
    args = build_parser().parse_args(["bench", "some/ckpt", "--k", "2", "3"])
    assert args.ckpt == "some/ckpt" and args.k == [2, 3] and args.func.__name__ == "run_bench"
    args = build_parser().parse_args(["bench", "./serve"])  # a checkpoint directory named serve
    assert args.ckpt == "./serve" and args.func.__name__ == "run_bench"
    for bad in (["--extra", "[1]"], ["--concurrency", "0"], ["--concurrency", "2", "--request-rate", "1"]):
        capsys.readouterr()
        assert main(["bench", "serve", "--url", "http://127.0.0.1:9", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: argument") and err.count("\n") == 1  # one line, no usage dump


def test_missing_httpx_is_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "httpx", None)  # import httpx raises ImportError
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'recyclegpt[serve]'" in err[0], err
