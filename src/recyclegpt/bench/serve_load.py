"""`recyclegpt bench serve`: a load generator for any OpenAI-compatible completions endpoint.

The same tool measures recyclegpt's own server and vLLM (or SGLang, or anything that speaks the
OpenAI streaming API): every request streams (SSE), and per request we record the start, the
arrival of every chunk that carries text, the end, and the token counts the server reports.

Load shapes, one run ("level") each:
  - closed loop: `--concurrency 1 4 8` keeps N requests in flight until --num-requests are done;
  - open loop: `--request-rate R` issues requests at Poisson arrival times (R per second on
    average) with no limit on the requests in flight.
One warm-up request precedes the first level (not counted). `--duration S` stops issuing new
requests after S seconds (in-flight ones finish); `--timeout` bounds every request, so a run is
bounded by num_requests x levels and time.

Definitions (all latencies in ms in the report):
  - TTFT: request start to the first chunk that carries text.
  - ITL: the gap between consecutive text-carrying chunks. A chunk may carry several tokens
    (speculative decoding emits every accepted run at once), so ITL is per chunk; `itl_per_token`
    divides each gap by the chunk's token count where the stream says it (`logprobs`, or a usage
    count on every chunk as vLLM's `continuous_usage_stats` sends), else by 1, and counts each
    token once in the percentiles.
  - TPOT, per request: (latency - TTFT) / (output tokens - 1).
  - output tokens: the final `usage.completion_tokens` where the server reports it, else the
    chunks' token counts (1 per chunk where unknown).
  - output tokens/s: all completed requests' output tokens / the level's wall seconds (first
    request start to last request end); failed requests count in neither.

Only the given URL is contacted: redirects are not followed and proxy settings from the
environment are ignored (a proxy would sit inside every latency measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import argtypes as A
from ..errors import RecycleError
from .report import progress_bar

logger = logging.getLogger(__name__)

ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions"}
API_KEY_ENVS = ("RECYCLEGPT_API_KEY", "OPENAI_API_KEY")
STAT_KEYS = ("mean", "p50", "p95", "p99")
MAX_ERROR_CHARS = 300


# ---- options and records ---------------------------------------------------------------------

@dataclass
class ServeLoadOptions:
    url: str
    model: str | None = None  # None: the first id GET /v1/models lists
    api_key: str | None = None
    prompts: str = "code"  # a shipped set (code, prose, all) or a prompt file; cycled to num_requests
    num_requests: int = 32  # per level
    max_tokens: int = 128
    temperature: float = 0.0
    ignore_eos: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # merged into every request body
    endpoint: str = "completions"  # or chat
    concurrency: list[int] = field(default_factory=lambda: [1])
    request_rate: list[float] | None = None  # requests/s (Poisson); replaces concurrency when given
    duration: float | None = None  # seconds per level after which no new request is issued
    timeout: float = 600.0  # seconds per request, start to end
    seed: int = 0  # of the Poisson arrival times
    warmup: bool = True
    progress: bool = False

    def validate(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise RecycleError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        for name in ("num_requests", "max_tokens", "timeout"):
            if not getattr(self, name) > 0:
                raise RecycleError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.duration is not None and not self.duration > 0:
            raise RecycleError(f"duration must be > 0, got {self.duration}")
        if self.request_rate is not None:
            if not self.request_rate or any(not (r > 0 and math.isfinite(r)) for r in self.request_rate):
                raise RecycleError(f"request rates must be finite and > 0, got {self.request_rate}")
        elif not self.concurrency or any(c < 1 for c in self.concurrency):
            raise RecycleError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if not isinstance(self.extra, dict):
            raise RecycleError(f"extra must be a dict (a JSON object), got {type(self.extra).__name__}")
        if self.extra.get("stream", True) is not True:
            raise RecycleError("--extra may not turn streaming off: every measurement needs a streamed response")


@dataclass
class RequestRecord:
    index: int  # position in the level's request sequence
    prompt_id: str
    start_s: float = 0.0  # since the level started
    ttft_ms: float | None = None
    latency_ms: float | None = None  # start to the end of the stream
    output_tokens: int = 0
    prompt_tokens: int | None = None
    usage_reported: bool = False  # output_tokens came from usage.completion_tokens
    chunk_times_ms: list[float] = field(default_factory=list)  # arrival of each text chunk, since start
    chunk_tokens: list[int | None] = field(default_factory=list)  # tokens per text chunk where known
    finish_reason: str | None = None
    status: int | None = None  # HTTP status; None: no response
    error: str | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    def to_dict(self, save_text: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        for k in ("start_s", "ttft_ms", "latency_ms"):
            if d[k] is not None:
                d[k] = round(d[k], 3)
        d["chunk_times_ms"] = [round(t, 3) for t in self.chunk_times_ms]
        if not save_text:
            del d["text"]
        return d


# ---- target ----------------------------------------------------------------------------------

def normalize_base_url(url: str) -> str:
    """`http://host:port[/prefix]` without a trailing `/` or `/v1` (both accepted on input)."""
    raw = url.strip()
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RecycleError(f"--url must be an http(s) URL such as http://127.0.0.1:8000, got {url!r}")
    if parts.query or parts.fragment:
        raise RecycleError(f"--url takes the server's base URL without a query or fragment, got {url!r}")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise RecycleError(f"--url has an invalid port: {url!r}") from None
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def resolve_api_key(given: str | None) -> str | None:
    if given:
        return given
    return next((os.environ[k] for k in API_KEY_ENVS if os.environ.get(k)), None)


def merge_body(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`; a dict value present in both (stream_options) is merged one level deep."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def request_body(opts: ServeLoadOptions, model: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": opts.max_tokens, "temperature": opts.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if opts.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if opts.ignore_eos:
        body["ignore_eos"] = True
    return merge_body(body, opts.extra)


def _one_line(s: str, limit: int = MAX_ERROR_CHARS) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _error_message(obj: Any) -> str:
    """The message of an OpenAI-style `{"error": {...}}`, vLLM's `{"object": "error", ...}` or FastAPI's
    `{"detail": ...}` body."""
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            for key in ("message", "detail", "msg"):
                if err.get(key):
                    return _one_line(err[key] if isinstance(err[key], str) else json.dumps(err[key]))
        elif err:
            return _one_line(str(err))
    return _one_line(json.dumps(obj))


def _http_error(status: int, raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    try:
        msg = _error_message(json.loads(text))
    except (json.JSONDecodeError, ValueError):
        msg = _one_line(text) or "(empty body)"
    return f"HTTP {status}: {msg}"


# ---- server-sent events ----------------------------------------------------------------------

_LINE_END = re.compile(rb"\r\n|\r|\n")


class SSEParser:
    """Incremental server-sent-events parser: feed it bytes as they arrive, get each event's data.

    Lines end in CRLF, LF or CR (split on bytes, which never occur inside UTF-8 sequences or
    JSON strings, so text such as U+2028 cannot break a line); `data:` lines accumulate (joined
    by newlines) until a blank line dispatches the event; comments (`:`) and other fields are
    ignored. Events and lines may be split across reads anywhere.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        buf = self._buf + chunk
        hold_cr = buf.endswith(b"\r")  # a CR at the end may be the first half of CRLF
        if hold_cr:
            buf = buf[:-1]
        pieces = _LINE_END.split(buf)
        self._buf = pieces.pop() + (b"\r" if hold_cr else b"")
        events = []
        for line in pieces:
            ev = self._line(line)
            if ev is not None:
                events.append(ev)
        return events

    def close(self) -> list[str]:
        """Whatever the stream left without a final blank line."""
        events = self.feed(b"\n") if self._buf else []
        ev = self._line(b"")
        return events + ([ev] if ev is not None else [])

    def _line(self, line: bytes) -> str | None:
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(b":"):
            return None
        name, _, value = line.partition(b":")
        if name == b"data":
            self._data.append(value.removeprefix(b" ").decode("utf-8", "replace"))
        return None


class _StreamState:
    """Reads one response's events into a RequestRecord."""

    def __init__(self, rec: RequestRecord, chat: bool):
        self.rec, self.chat = rec, chat
        self.done = False
        self.last_cum: int | None = 0  # cumulative completion_tokens after the previous text chunk (None: unknown)
        self.parts: list[str] = []

    def handle(self, data: str, t_ms: float) -> None:
        rec = self.rec
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            rec.error = f"invalid JSON in the stream: {_one_line(data, 120)}"
            self.done = True
            return
        if not isinstance(obj, dict):
            rec.error = f"unexpected event in the stream: {_one_line(data, 120)}"
            self.done = True
            return
        if "error" in obj or obj.get("object") == "error":
            rec.error = f"error in the stream: {_error_message(obj)}"
            self.done = True
            return
        cum = None
        usage = obj.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                cum = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                rec.prompt_tokens = usage["prompt_tokens"]
        piece, logprob_tokens = "", None
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            if self.chat:
                delta = choice.get("delta") or {}
                piece += "".join(delta.get(k) or "" for k in ("reasoning_content", "reasoning", "content")
                                 if isinstance(delta.get(k), str))
            elif isinstance(choice.get("text"), str):
                piece += choice["text"]
            lp = choice.get("logprobs")
            if isinstance(lp, dict):
                toks = lp.get("content") if self.chat else lp.get("tokens")
                if isinstance(toks, list):
                    logprob_tokens = (logprob_tokens or 0) + len(toks)
            if choice.get("finish_reason"):
                rec.finish_reason = choice["finish_reason"]
        if cum is not None:
            rec.output_tokens, rec.usage_reported = cum, True
        if not piece:
            return
        if rec.ttft_ms is None:
            rec.ttft_ms = t_ms
        n = logprob_tokens
        if n is None and cum is not None and self.last_cum is not None:
            n = cum - self.last_cum  # usage on this and every earlier text chunk
        self.last_cum = cum
        rec.chunk_times_ms.append(t_ms)
        rec.chunk_tokens.append(n if n is not None and n > 0 else None)
        self.parts.append(piece)

    def finish(self) -> None:
        rec = self.rec
        rec.text = "".join(self.parts)
        if not rec.usage_reported:
            rec.output_tokens = sum(n or 1 for n in rec.chunk_tokens)
        if rec.error is None and not self.done:
            rec.error = "the stream ended before [DONE]"


# ---- requests --------------------------------------------------------------------------------

def _httpx():
    try:
        import httpx
    except ImportError:
        raise RecycleError("`recyclegpt bench serve` needs httpx: pip install 'recyclegpt[serve]'") from None
    return httpx


def make_client(opts: ServeLoadOptions, base_url: str):
    httpx = _httpx()
    headers = {"Accept": "text/event-stream"}
    key = resolve_api_key(opts.api_key)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    # The concurrency is ours to set (workers / arrivals); an httpx pool limit would queue requests unseen.
    return httpx.AsyncClient(base_url=base_url + "/v1", headers=headers, trust_env=False, follow_redirects=False,
                             timeout=httpx.Timeout(opts.timeout, connect=min(opts.timeout, 10.0)),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def send_request(client, path: str, body: dict[str, Any], chat: bool, index: int, prompt_id: str,
                       timeout: float, level_t0: float) -> RequestRecord:
    """One streamed request; any failure lands in the record (`error`), never raises (but cancellation)."""
    httpx = _httpx()
    rec = RequestRecord(index=index, prompt_id=prompt_id)
    state = _StreamState(rec, chat)
    t0 = time.perf_counter()
    rec.start_s = t0 - level_t0
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", path, json=body) as resp:
                rec.status = resp.status_code
                if resp.status_code != 200:
                    rec.error = _http_error(resp.status_code, await resp.aread())
                elif resp.headers.get("content-type", "").startswith("application/json"):
                    raw = await resp.aread()
                    try:
                        obj = json.loads(raw)
                    except json.JSONDecodeError:
                        obj = None
                    rec.error = (f"error: {_error_message(obj)}" if isinstance(obj, dict) and "error" in obj else
                                 "the response is JSON, not an event stream: does the server support \"stream\": true?")
                else:
                    parser = SSEParser()
                    async for chunk in resp.aiter_bytes():
                        t_ms = 1e3 * (time.perf_counter() - t0)
                        for data in parser.feed(chunk):
                            state.handle(data, t_ms)
                            if state.done:
                                break
                        if state.done:
                            break
                    if not state.done:
                        t_ms = 1e3 * (time.perf_counter() - t0)
                        for data in parser.close():
                            state.handle(data, t_ms)
    except TimeoutError:
        rec.error = f"timed out after {timeout:g} s (--timeout)"
    except httpx.HTTPError as e:
        rec.error = _one_line(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    except OSError as e:
        rec.error = _one_line(f"{type(e).__name__}: {e}")
    rec.latency_ms = 1e3 * (time.perf_counter() - t0)
    state.finish()
    return rec


async def first_model(client, base_url: str, timeout: float = 30.0) -> str:
    httpx = _httpx()
    try:
        resp = await client.get("/models", timeout=timeout)
    except httpx.HTTPError as e:
        raise RecycleError(f"{base_url} does not answer ({_one_line(str(e) or type(e).__name__, 160)}); "
                           "is the server running, and is --url right?") from None
    if resp.status_code in (401, 403):
        raise RecycleError(f"{base_url}/v1/models: {_http_error(resp.status_code, resp.content)}; pass --api-key "
                           f"(or set {' or '.join(API_KEY_ENVS)})")
    if resp.status_code != 200:
        raise RecycleError(f"{base_url}/v1/models: {_http_error(resp.status_code, resp.content)}; "
                           "pass --model to skip the lookup")
    try:
        data = resp.json().get("data") or []
        model = data[0]["id"]
    except (ValueError, AttributeError, LookupError, TypeError):
        raise RecycleError(f"{base_url}/v1/models lists no model ({_one_line(resp.text, 160)}); "
                           "pass --model") from None
    return str(model)


# ---- statistics ------------------------------------------------------------------------------

def percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) on sorted values."""
    if not sorted_vals:
        raise ValueError("percentile of no values")
    pos = (len(sorted_vals) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p95, p99 of `values` (None each where there are none)."""
    if not values:
        return dict.fromkeys(STAT_KEYS)
    s = sorted(values)
    return {"mean": round(sum(s) / len(s), 3), "p50": round(percentile(s, 50), 3),
            "p95": round(percentile(s, 95), 3), "p99": round(percentile(s, 99), 3)}


def level_metrics(records: Sequence[RequestRecord], wall_s: float) -> dict[str, Any]:
    """Throughput and latency statistics of one level (`wall_s`: its wall seconds)."""
    done = [r for r in records if r.ok]
    ttft, tpot, itl, itl_tok, e2e = [], [], [], [], []
    for r in done:
        if r.latency_ms is not None:
            e2e.append(r.latency_ms)
        if r.ttft_ms is not None:
            ttft.append(r.ttft_ms)
            if r.output_tokens > 1 and r.latency_ms is not None:
                tpot.append((r.latency_ms - r.ttft_ms) / (r.output_tokens - 1))
        for prev, t, n in zip(r.chunk_times_ms, r.chunk_times_ms[1:], r.chunk_tokens[1:], strict=False):
            gap = t - prev
            itl.append(gap)
            itl_tok.extend([gap / (n or 1)] * (n or 1))
    out_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    chunks = sum(len(r.chunk_times_ms) for r in done)
    errors = Counter(r.error or f"HTTP {r.status}" for r in records if not r.ok)
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": round(wall_s, 4),
        "request_throughput": round(len(done) / wall_s, 4) if wall_s > 0 else None,
        "output_tokens_per_s": round(out_tokens / wall_s, 3) if wall_s > 0 else None,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": prompt_tokens,
        "tokens_per_chunk": round(out_tokens / chunks, 4) if chunks else None,
        "ttft_ms": summarize(ttft),
        "tpot_ms": summarize(tpot),
        "itl_ms": summarize(itl),
        "itl_per_token_ms": summarize(itl_tok),
        "e2e_latency_ms": summarize(e2e),
        "errors": dict(errors.most_common(5)),
    }


# ---- the run ---------------------------------------------------------------------------------

def level_label(level: dict[str, Any]) -> str:
    if level.get("request_rate") is not None:
        return f"{level['request_rate']:g} req/s"
    return f"c={level['concurrency']}"


async def _run_level(client, opts: ServeLoadOptions, bodies: list[dict[str, Any]], ids: list[str],
                     concurrency: int | None, rate: float | None, advance: Callable[[], None]
                     ) -> tuple[list[RequestRecord], float]:
    path, chat = ENDPOINTS[opts.endpoint], opts.endpoint == "chat"
    n = opts.num_requests
    records: list[RequestRecord] = []
    t0 = time.perf_counter()

    def open_for_new() -> bool:
        return opts.duration is None or time.perf_counter() - t0 < opts.duration

    async def one(i: int) -> None:
        j = i % len(bodies)
        records.append(await send_request(client, path, bodies[j], chat, i, ids[j], opts.timeout, t0))
        advance()

    if rate is None:
        issued = 0

        async def worker() -> None:
            nonlocal issued
            while issued < n and open_for_new():
                i, issued = issued, issued + 1
                await one(i)

        await asyncio.gather(*(worker() for _ in range(min(concurrency or 1, n))))
    else:
        rng = random.Random(opts.seed)
        tasks, due = [], 0.0
        for i in range(n):
            delay = t0 + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if not open_for_new():
                break
            tasks.append(asyncio.create_task(one(i)))
            due += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    records.sort(key=lambda r: r.index)
    return records, wall


async def arun_serve_load(opts: ServeLoadOptions) -> dict[str, Any]:
    """Run every level against opts.url; the report (settings, per-level metrics, per-request records)."""
    from ..prompts import load_prompts

    opts.validate()
    base_url = normalize_base_url(opts.url)
    prompts = load_prompts(opts.prompts, opts.num_requests)
    levels: list[tuple[int | None, float | None]] = (
        [(None, r) for r in opts.request_rate] if opts.request_rate is not None else
        [(c, None) for c in opts.concurrency])
    notes: list[str] = []
    results: list[dict[str, Any]] = []
    async with make_client(opts, base_url) as client:
        model = opts.model or await first_model(client, base_url, min(30.0, opts.timeout))
        bodies = [request_body(opts, model, p) for p in prompts.prompts]
        if opts.warmup:
            warm = await send_request(client, ENDPOINTS[opts.endpoint], bodies[0], opts.endpoint == "chat", -1,
                                      prompts.ids[0], opts.timeout, time.perf_counter())
            if not warm.ok:
                hint = ("; is the server running, and is --url right?" if warm.status is None else
                        f"; pass --api-key (or set {' or '.join(API_KEY_ENVS)})" if warm.status in (401, 403) else "")
                raise RecycleError(f"the warm-up request to {base_url}/v1{ENDPOINTS[opts.endpoint]} failed: "
                                   f"{warm.error}{hint}")
        with progress_bar(opts.progress) as bar:
            for conc, rate in levels:
                label = level_label({"concurrency": conc, "request_rate": rate})
                task = bar.add_task(label, total=opts.num_requests) if bar is not None else None
                advance = (lambda b=bar, t=task: b.advance(t)) if bar is not None else (lambda: None)
                logger.info("level %s: %d requests", label, opts.num_requests)
                records, wall = await _run_level(client, opts, bodies, prompts.ids, conc, rate, advance)
                if bar is not None:
                    bar.update(task, total=len(records), completed=len(records))
                m = {"concurrency": conc, "request_rate": rate, "issued": len(records), **level_metrics(records, wall)}
                m["requests"] = records
                results.append(m)
                if m["failed"]:
                    first = next(iter(m["errors"]))
                    logger.info("%s: %d of %d requests failed (%s)", label, m["failed"], len(records), first)
                if len(records) < opts.num_requests:
                    notes.append(f"{label}: --duration ended the level after {len(records)} of "
                                 f"{opts.num_requests} requests")
    if opts.request_rate is None and max(opts.concurrency) > opts.num_requests:
        notes.append(f"concurrency above --num-requests ({opts.num_requests}) never has more than that in flight")
    done = [r for lv in results for r in lv["requests"] if r.ok]
    if done and not all(r.usage_reported for r in done):
        notes.append("the server reported no usage for some requests: their output tokens are counted as chunks "
                     "(1 token each where the stream does not say)")
    short = sum(r.output_tokens < opts.max_tokens for r in done)
    if opts.ignore_eos and short:
        notes.append(f"{short} completed requests produced fewer than max_tokens={opts.max_tokens} tokens: the "
                     "server may not honour ignore_eos (or ended them by a stop rule)")
    failed = sum(lv["failed"] for lv in results)
    if failed:
        notes.append(f"failed requests: {failed}; the most common errors are listed per level in the JSON report")
    settings = {k: v for k, v in asdict(opts).items() if k not in ("url", "model", "api_key", "progress")}
    settings["prompt_set"] = prompts.name
    settings["num_prompts"] = len(prompts)
    return {"tool": "recyclegpt bench serve", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "url": base_url, "endpoint": f"/v1{ENDPOINTS[opts.endpoint]}", "model": model,
            "settings": settings, "levels": results, "notes": notes}


def run_serve_load(opts: ServeLoadOptions) -> dict[str, Any]:
    """Synchronous `arun_serve_load` (runs its own event loop)."""
    return asyncio.run(arun_serve_load(opts))


# ---- output ----------------------------------------------------------------------------------

def report_to_json(report: dict[str, Any], save_texts: bool = False) -> dict[str, Any]:
    out = dict(report)
    out["levels"] = [{**lv, "requests": [r.to_dict(save_texts) if isinstance(r, RequestRecord) else r
                                         for r in lv["requests"]]} for lv in report["levels"]]
    return out


def write_json(report: dict[str, Any], path: str | Path, save_texts: bool = False) -> None:
    from ..files import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report_to_json(report, save_texts), indent=2) + "\n")


def _stats_cell(s: dict[str, float | None]) -> str:
    if s.get("mean") is None:
        return "-"
    return "/".join(f"{s[k]:.1f}" for k in STAT_KEYS)


def print_table(report: dict[str, Any], console=None) -> None:
    """One row per level; latencies as mean/p50/p95/p99 in ms."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if console is None:  # piped output: wide enough for one line per level unless $COLUMNS says otherwise
        console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=160)
    s = report["settings"]
    temp = "greedy" if not s["temperature"] else f"T={s['temperature']:g}"
    title = (f"{report['model']} at {report['url']}{report['endpoint']}: {s['num_requests']} requests per level "
             f"x {s['max_tokens']} tokens{' (ignore_eos)' if s['ignore_eos'] else ''}, "
             f"{temp}, prompts {s['prompt_set']}")
    per_token = any(lv["itl_per_token_ms"] != lv["itl_ms"] for lv in report["levels"])
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    cols = ["load", "ok", "fail", "s", "req/s", "out tok/s", "TTFT ms", "TPOT ms", "ITL ms (per chunk)"]
    if per_token:
        cols.append("ITL ms (per token)")
    cols.append("tok/chunk")
    for c in cols:
        t.add_column(c, justify="left" if c == "load" else "right", no_wrap=True)
    for lv in report["levels"]:
        row = [level_label(lv), str(lv["completed"]), f"[red]{lv['failed']}[/]" if lv["failed"] else "0",
               f"{lv['duration_s']:.2f}", f"{lv['request_throughput'] or 0:.2f}",
               f"{lv['output_tokens_per_s'] or 0:.1f}", _stats_cell(lv["ttft_ms"]), _stats_cell(lv["tpot_ms"]),
               _stats_cell(lv["itl_ms"])]
        if per_token:
            row.append(_stats_cell(lv["itl_per_token_ms"]))
        row.append("-" if lv["tokens_per_chunk"] is None else f"{lv['tokens_per_chunk']:.2f}")
        t.add_row(*row)
    console.print(t)
    console.print("latencies: mean/p50/p95/p99. TTFT: start to first text chunk; TPOT: (latency - TTFT) / "
                  "(output tokens - 1) per request; ITL: gap between text chunks (a chunk may carry several tokens); "
                  "out tok/s: output tokens of completed requests / the level's wall time.", style="dim")
    for note in report.get("notes", []):
        console.print(f"note: {note}", style="yellow")


def write_plot(report: dict[str, Any], path: str | Path) -> None:
    """Two panels against the load (concurrency or request rate): output tokens/s; p50 and p95 TPOT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = report["levels"]
    by_rate = bool(levels) and levels[0].get("request_rate") is not None
    xs = [lv["request_rate"] if by_rate else lv["concurrency"] for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(xs, [lv["output_tokens_per_s"] or 0 for lv in levels], marker="o", color="#1f77b4")
    ax1.set_ylabel("output tokens/s")
    for q, style in (("p50", "-"), ("p95", "--")):
        ax2.plot(xs, [lv["tpot_ms"][q] if lv["tpot_ms"][q] is not None else math.nan for lv in levels],
                 marker="o", ls=style, color="#d62728", label=f"TPOT {q}")
    ax2.set_ylabel("TPOT (ms)")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xlabel("request rate (req/s)" if by_rate else "concurrency (requests in flight)")
        if len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
        ax.grid(alpha=0.3)
    s = report["settings"]
    fig.suptitle(f"{report['model']} at {report['url']}: {s['max_tokens']} tokens per request", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line ----------------------------------------------------------------------------

def _json_object(s: str) -> dict[str, Any]:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {s!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"k\": 3}}', got {s!r}")
    return v


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `recyclegpt bench serve` parser; the CLI passes its one-line-error parser class and checks text
    and numbers with its own option types."""
    p = parser_class(
        prog="recyclegpt bench serve",
        description="Load-test a running OpenAI-compatible server (recyclegpt's own, vLLM, SGLang, ...): stream "
        "--num-requests completions per load level, closed loop (--concurrency N keeps N requests in flight; one "
        "run per listed level) or open loop (--request-rate R: Poisson arrivals), after one uncounted warm-up "
        "request. Reports per level: completed/failed requests, req/s, output tokens/s, and TTFT, TPOT and "
        "inter-token latency (mean, p50, p95, p99). Only --url is contacted (no redirects, no proxies).",
    )
    p.add_argument("--url", required=True, type=A.text,
                   help="the server's base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)")
    p.add_argument("--model", type=A.text,
                   help="model name sent in each request (default: the first id GET /v1/models lists)")
    p.add_argument("--api-key", type=A.text,
                   help="sent as `Authorization: Bearer KEY` (default: $RECYCLEGPT_API_KEY, else "
                   "$OPENAI_API_KEY, else no header)")
    p.add_argument("--endpoint", default="completions", choices=list(ENDPOINTS),
                   help="completions: POST /v1/completions with the prompt as is (default); chat: POST "
                   "/v1/chat/completions with the prompt as one user message (the server's chat template applies)")
    p.add_argument("--prompts", default="code", metavar="NAME|FILE",
                   help="shipped set (code, prose, all) or a file: one prompt per line, or JSONL with a \"prompt\" "
                   "field per line; cycled to --num-requests (default code)")
    p.add_argument("--num-requests", type=A.positive(int), default=32, metavar="N",
                   help="requests per load level (default 32)")
    p.add_argument("--max-tokens", type=A.positive(int), default=128, help="max_tokens of each request (default 128)")
    p.add_argument("--temperature", type=A.number(float, 0, 2), default=0.0,
                   help="sampling temperature (default 0: greedy)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send \"ignore_eos\": true (vLLM and recyclegpt's server accept it) so every request "
                   "produces exactly --max-tokens tokens (default on; --no-ignore-eos for servers that refuse it)")
    p.add_argument("--extra", type=_json_object, default={}, metavar="JSON",
                   help="a JSON object merged into every request body, e.g. '{\"mode\": \"verify\", \"k\": 3}' "
                   "(a dict value such as stream_options is merged into ours; default none)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=A.positive(int), nargs="+", default=[1], metavar="N",
                      help="closed-loop levels: each keeps N requests in flight until --num-requests are done "
                      "(default 1; e.g. --concurrency 1 4 8 16)")
    load.add_argument("--request-rate", type=A.positive(float), nargs="+", default=None, metavar="R",
                      help="open-loop levels instead: requests arrive as a Poisson process of R per second, any "
                      "number in flight")
    p.add_argument("--duration", type=A.positive(float), default=None, metavar="S",
                   help="per level, issue no new request after S seconds (in-flight ones finish; default: no limit)")
    p.add_argument("--timeout", type=A.positive(float), default=600.0, metavar="S",
                   help="give up on a request after S seconds, start to end; it counts as failed (default 600)")
    p.add_argument("--seed", type=A.number(int, 0, 2**32 - 1), default=0,
                   help="seed of the Poisson arrival times (default 0)")
    p.add_argument("--json", metavar="OUT.json", help="write settings, per-level metrics and per-request records "
                   "(chunk arrival times, token counts, errors) as JSON")
    p.add_argument("--save-texts", action="store_true", help="include the generated texts in --json")
    p.add_argument("--plot", metavar="OUT.png", help="plot output tokens/s and p50/p95 TPOT against the load")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not "
                   "a terminal either)")
    return p
