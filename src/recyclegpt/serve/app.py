"""The HTTP side: an OpenAI-compatible FastAPI app over the engine thread (`worker`).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming by server-sent
events in OpenAI's chunk format, ending with `data: [DONE]`), GET /health (200 once the decoding
graphs are compiled, 503 before), GET /metrics (Prometheus text format).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from ..decoding import GenerationConfig
from ..errors import RecycleError
from .metrics import Metrics
from .protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    completion_chunk,
    completion_response,
    new_id,
    usage,
    usage_chunk,
)
from .worker import Job, QueueFull, Worker

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """Server settings (the `recyclegpt serve` flags)."""

    model_name: str = "recyclegpt"
    slots: int = 8
    compile: bool = True
    width: int = 3  # most drafts a request may ask for (k); every verify round is this wide
    default_k: int = 3
    tree: int | str = 0  # verify requests draft trees of this many nodes (0: chains), `width` deep;
    # "auto": `run_server` measures chains and trees at start (`decoding.auto`) and sets width and tree
    tree_topk: int = 2
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int | None = None  # None: the context
    default_max_tokens: int = 16  # OpenAI's default for completions
    request_timeout_s: float = 600.0


class ChatTemplate:
    """A Hugging Face chat template (Jinja), rendered in a sandbox as transformers does."""

    def __init__(self, source: str, bos: str = "", eos: str = ""):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template, self.bos, self.eos = env.from_string(source), bos, eos

    def render(self, messages: list[dict[str, Any]]) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos,
                                        eos_token=self.eos)
        except TemplateError as e:
            raise ApiError(400, f"the chat template refused these messages: {e}", "messages") from None

    @classmethod
    def find(cls, ckpt: str | Path, eos: str = "") -> ChatTemplate | None:
        """The template next to a checkpoint: chat_template.jinja, or tokenizer_config.json's chat_template."""
        root = Path(ckpt)
        for d in (root, root / "checkpoint"):
            f = d / "chat_template.jinja"
            if f.is_file():
                return cls(f.read_text(), eos=eos)
            cfg = d / "tokenizer_config.json"
            if cfg.is_file():
                try:
                    data = json.loads(cfg.read_text())
                except (OSError, ValueError):
                    continue
                tpl = data.get("chat_template")
                if isinstance(tpl, list):  # [{"name": ..., "template": ...}]
                    tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
                if isinstance(tpl, str):
                    bos = data.get("bos_token") if isinstance(data.get("bos_token"), str) else ""
                    return cls(tpl, bos=bos, eos=eos)
        return None


def create_app(bundle, opts: ServeOptions, chat_template: ChatTemplate | None = None) -> FastAPI:
    """The app for a loaded `RecycleGPT` bundle; its engine thread starts with the app and stops with it."""
    tokenizer = bundle.tokenizer
    context = bundle.model.cfg.max_seq_len
    max_tokens_limit = min(opts.max_tokens_limit or context, context - 1)
    metrics = Metrics()
    worker = Worker(bundle.model, bundle.module, tokenizer, opts.slots, opts.compile, opts.width, opts.max_queue,
                    metrics, tree=(opts.tree, opts.tree_topk))
    metrics.watch(worker)
    eos_text = tokenizer.tok.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    if chat_template is not None and not chat_template.eos:
        chat_template.eos = eos_text or ""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()
        worker.join(timeout=10)

    app = FastAPI(title="recyclegpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics = worker, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        try:
            response = await call_next(request)
        except Exception:  # a bug in a handler: an OpenAI-style 500, and the server goes on
            log.exception("request failed")
            response = JSONResponse(ApiError(500, "internal error").body(), status_code=500)
        if request.url.path.startswith("/v1/"):
            metrics.requests.labels(endpoint=request.url.path, status=str(response.status_code)).inc()
        return response

    def authorize(request: Request) -> None:
        if opts.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {opts.api_key}":
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def read_json(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > opts.max_body_bytes:
            raise ApiError(413, f"request body over {opts.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > opts.max_body_bytes:
                raise ApiError(413, f"request body over {opts.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    def parse(model_cls, data: dict[str, Any]):
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err.get("loc", ())) or None
            msg = err.get("msg", "invalid request")
            if err.get("type") == "extra_forbidden":
                msg = f"unrecognized request argument: {param}"
            elif param:
                msg = f"{param}: {msg}"
            raise ApiError(400, msg, param) from None

    def config_for(req, ids: list[int], chat: bool) -> GenerationConfig:
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if max_tokens is None:
            max_tokens = min(context - len(ids), max_tokens_limit) if chat else opts.default_max_tokens
        if max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens must be at most {max_tokens_limit}", "max_tokens")
        if len(ids) + max_tokens > context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; with max_tokens {max_tokens} that exceeds the "
                           f"model's context of {context} tokens", "max_tokens" if len(ids) < context else "prompt",
                           code="context_length_exceeded")
        k = req.k if req.k is not None else min(opts.default_k, opts.width)
        if k > opts.width:
            raise ApiError(400, f"k must be at most {opts.width} on this server", "k")
        tree = dict(tree=opts.tree, tree_topk=opts.tree_topk) if opts.tree and req.mode == "verify" else {}
        cfg = GenerationConfig(mode=req.mode, max_new_tokens=max_tokens, k=k, **tree, temperature=req.temperature,
                               top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                               eos_id=None if req.ignore_eos else tokenizer.eos_id, stop_strings=tuple(req.stop))
        try:
            cfg.validate()
        except RecycleError as e:
            raise ApiError(400, str(e)) from None
        return cfg

    async def handle(request: Request, chat: bool) -> Response:
        authorize(request)
        req = parse(ChatRequest if chat else CompletionRequest, await read_json(request))
        if req.model != opts.model_name:
            raise ApiError(404, f"the model '{req.model}' does not exist; this server has '{opts.model_name}'",
                           "model", "model_not_found")
        if chat:
            if chat_template is None:
                raise ApiError(400, "this model has no chat template (chat_template.jinja or tokenizer_config.json "
                               "next to the checkpoint); use /v1/completions", "messages")
            text = chat_template.render([m.model_dump(exclude_none=True) for m in req.messages])
        else:
            text = req.text
        ids = tokenizer.encode(text)
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", "prompt")
        cfg = config_for(req, ids, chat)
        if not worker.is_alive() and worker.ready.is_set():
            raise ApiError(503, "the decoding engine has stopped")
        job = Job(ids, cfg, asyncio.get_running_loop(), tokenizer, time.monotonic() + opts.request_timeout_s)
        try:
            worker.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e)) from None
        rid = new_id("chatcmpl" if chat else "cmpl")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return StreamingResponse(stream_events(job, rid, chat, include_usage), media_type="text/event-stream")
        return await collect(request, job, rid, chat)

    async def stream_events(job: Job, rid: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        first = True
        try:
            async for ev in job.events():
                if ev.finish == "error":
                    yield f"data: {json.dumps(ApiError(500, ev.error or 'decoding failed').body())}\n\n"
                    break
                if ev.text or ev.finish is not None or (chat and first):
                    chunk = completion_chunk(rid, opts.model_name, created, ev.text, ev.finish, chat, first)
                    yield f"data: {json.dumps(chunk)}\n\n"
                    first = False
            else:
                if include_usage:
                    use = usage(job.prompt_tokens, job.completion_tokens)
                    yield f"data: {json.dumps(usage_chunk(rid, opts.model_name, created, chat, use))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if job.finish is None:  # the client went away: free its slot now
                worker.cancel(job)

    async def collect(request: Request, job: Job, rid: str, chat: bool) -> Response:
        parts: list[str] = []
        events = job.events()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.__anext__(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        worker.cancel(job)
                        return Response(status_code=499)
                    continue
                except StopAsyncIteration:
                    break
                if ev.finish == "error":
                    raise ApiError(500, ev.error or "decoding failed")
                parts.append(ev.text)
                if ev.finish is not None:
                    break
        finally:
            if job.finish is None:
                worker.cancel(job)
        use = usage(job.prompt_tokens, job.completion_tokens)
        return JSONResponse(completion_response(rid, opts.model_name, "".join(parts), job.finish, chat, use))

    @app.get("/health")
    async def health() -> JSONResponse:
        if worker.error is not None or (worker.ready.is_set() and not worker.is_alive()):
            return JSONResponse({"status": "error", "detail": "the decoding engine stopped"}, status_code=503)
        if not worker.ready.is_set():
            return JSONResponse({"status": "warming up", "detail": "compiling the decoding graphs"}, status_code=503)
        return JSONResponse({"status": "ok", "warmup_s": round(worker.warmup_s, 1)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": opts.model_name, "object": "model",
                                                         "created": int(time.time()), "owned_by": "recyclegpt",
                                                         "max_model_len": context}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    return app
