"""The HTTP side: an OpenAI-compatible FastAPI app over the decoding engine (`client` -> `worker`).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming by server-sent
events in OpenAI's chunk format, ending with `data: [DONE]`), GET /health (200 once the decoding
graphs are compiled; 503 while warming up, while a failed engine restarts, or after it gave up),
GET /metrics (Prometheus text format), GET /openapi.json (the request bodies' schemas, with the ranges
of `decoding.limits`).

No request can stop the server: a body is parsed with limits that turn any parser failure into a 400,
its settings are checked against the table the Python API uses, and whatever fails while serving it
fails it alone (`worker`); a response is 200 only with a `finish_reason`. The engine runs in a process of
its own (`create_app(checkpoint_dir, ...)`, what `recyclegpt serve` does): if it dies, the requests it was
decoding get a 503, /health says so, and a fresh engine serves the rest (`client`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema

from ..checkpoint import load_config, load_tokenizer
from ..decoding import GenerationConfig
from ..decoding.engine import row_configs
from ..decoding.limits import InvalidSetting
from ..errors import RecycleError
from .client import EngineClient, ProcessEngine, ThreadEngine
from .jobs import EngineDown, Job, JobEvent, Quarantined, QueueFull
from .metrics import Metrics
from .options import ServeOptions
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
from .worker import describe

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 1.0  # how often a request waiting for its next piece checks whether its client went away


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
        except Exception as e:  # a template that fails on some input (a type error in its code, ...)
            raise ApiError(400, f"the chat template failed on these messages: {describe(e)}",
                           "messages") from None

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


class _Api:
    """What the OpenAI routes do with a request: authorize, read and check the body, admit it to the engine,
    answer from its events (streamed or collected). One per app."""

    def __init__(self, tokenizer, context: int, opts: ServeOptions, engine: EngineClient,
                 chat_template: ChatTemplate | None):
        self.opts, self.engine, self.chat_template, self.tokenizer = opts, engine, chat_template, tokenizer
        self.context = context
        self.max_tokens_limit = min(opts.max_tokens_limit or self.context, self.context - 1)

    def authorize(self, request: Request) -> None:
        if self.opts.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.opts.api_key}":
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.opts.max_body_bytes:
            raise ApiError(413, f"request body over {self.opts.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.opts.max_body_bytes:
                raise ApiError(413, f"request body over {self.opts.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # bad syntax or UTF-8, numbers over 4300 digits, deep nesting
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0] if str(e) else ""
            raise ApiError(400, f"the request body is not valid JSON ({why})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    def parse(self, model_cls, data: dict[str, Any]):
        """The request model, its types checked by pydantic and its settings and texts by `req.check()`
        (the same table as the Python API's); any refusal is a 400 naming the field."""
        try:
            req = model_cls.model_validate(data)
            req.check()
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            param = ".".join(str(x) for x in err.get("loc", ())) or None
            msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                msg = f"unrecognized request argument: {param}"
            elif param:
                msg = f"{param}: {msg}"
            raise ApiError(400, _one_line(msg), param) from None
        except InvalidSetting as e:
            raise ApiError(400, _one_line(str(e)), e.name) from None
        return req

    def config_for(self, req, ids: list[int], chat: bool) -> GenerationConfig:
        opts, context, limit = self.opts, self.context, self.max_tokens_limit
        max_tokens = getattr(req, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = req.max_tokens
        if len(ids) >= context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the model's context is {context} tokens, with at "
                           "least one new token", "messages" if chat else "prompt", code="context_length_exceeded")
        if max_tokens is None:  # OpenAI's defaults: what the context leaves (chat), 16 (completions); within limits
            max_tokens = min(context - len(ids) if chat else opts.default_max_tokens, limit)
        if max_tokens > limit:
            raise ApiError(400, f"max_tokens must be at most {limit}", "max_tokens")
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
                               eos_id=None if req.ignore_eos else self.tokenizer.eos_id, stop_strings=req.stops)
        try:
            cfg.validate()
        except InvalidSetting as e:
            raise ApiError(400, str(e), {"max_new_tokens": "max_tokens", "stop_strings": "stop"}.get(e.name, e.name)
                           ) from None
        except RecycleError as e:
            raise ApiError(400, str(e)) from None
        return row_configs(cfg, 1)[0]  # the request's seed draws as row 0 of an offline `generate` call

    async def handle(self, request: Request, chat: bool) -> Response:
        self.authorize(request)
        req = self.parse(ChatRequest if chat else CompletionRequest, await self.read_json(request))
        if req.model != self.opts.model_name:
            raise ApiError(404, f"the model '{req.model}' does not exist; this server has '{self.opts.model_name}'",
                           "model", "model_not_found")
        if chat:
            if self.chat_template is None:
                raise ApiError(400, "this model has no chat template (chat_template.jinja or tokenizer_config.json "
                               "next to the checkpoint); use /v1/completions", "messages")
            text = self.chat_template.render([m.model_dump(exclude_none=True) for m in req.messages])
        else:
            text = req.text
        try:
            ids = self.tokenizer.encode(text)
        except Exception as e:  # checked text should always encode; if not, it is this input's problem
            raise ApiError(400, f"the tokenizer cannot encode this text: {describe(e)}",
                           "messages" if chat else "prompt") from None
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", "prompt")
        cfg = self.config_for(req, ids, chat)
        job = Job(ids, cfg, asyncio.get_running_loop(), self.tokenizer,
                  time.monotonic() + self.opts.request_timeout_s)
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e)) from None
        except EngineDown as e:
            raise ApiError(503, str(e)) from None
        except Quarantined as e:
            raise ApiError(400, str(e)) from None
        rid = new_id("chatcmpl" if chat else "cmpl")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # The first event (the prefill's token, or a refusal) comes before any header: a request the engine
        # refuses or fails at admission gets its own status (400 / 500), streamed or not.
        try:
            first = await self.next_event(request, job)
        except BaseException:
            self.engine.cancel(job)  # never leave a request decoding for nobody
            raise
        if first is None:
            return Response(status_code=499)
        if first.finish == "error":
            raise ApiError(first.status, first.error or "decoding failed")
        if req.stream:
            return StreamingResponse(self.stream_events(job, first, rid, chat, include_usage),
                                     media_type="text/event-stream")
        return await self.collect(request, job, first, rid, chat)

    async def next_event(self, request: Request, job: Job) -> JobEvent | None:
        """The job's next event; None when the client went away first (its request is then cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(job.next_event(), timeout=DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    self.engine.cancel(job)
                    return None

    async def stream_events(self, job: Job, first: JobEvent, rid: str, chat: bool, include_usage: bool
                            ) -> AsyncIterator[str]:
        created = int(time.time())
        opening = True
        ev = first
        try:
            while True:
                if ev.finish == "error":
                    yield f"data: {json.dumps(ApiError(ev.status, ev.error or 'decoding failed').body())}\n\n"
                    break
                if ev.text or ev.finish is not None or (chat and opening):
                    chunk = completion_chunk(rid, self.opts.model_name, created, ev.text, ev.finish, chat, opening)
                    yield f"data: {json.dumps(chunk)}\n\n"
                    opening = False
                if ev.finish is not None:
                    if include_usage:
                        use = usage(job.prompt_tokens, job.completion_tokens)
                        yield f"data: {json.dumps(usage_chunk(rid, self.opts.model_name, created, chat, use))}\n\n"
                    break
                ev = await job.next_event()  # a client that goes away cancels this, and `finally` frees its slot
            yield "data: [DONE]\n\n"
        finally:
            if job.finish is None:  # the client went away: free its slot now
                self.engine.cancel(job)

    async def collect(self, request: Request, job: Job, first: JobEvent, rid: str, chat: bool) -> Response:
        parts: list[str] = []
        ev: JobEvent | None = first
        try:
            while ev is not None:
                if ev.finish == "error":
                    raise ApiError(ev.status, ev.error or "decoding failed")
                parts.append(ev.text)
                if ev.finish is not None:
                    break
                ev = await self.next_event(request, job)
            if ev is None:
                return Response(status_code=499)
        finally:
            if job.finish is None:
                self.engine.cancel(job)
        if job.finish not in ("stop", "length"):  # a 200 always says why the text ended
            raise ApiError(500, "the request ended without a finish reason")
        use = usage(job.prompt_tokens, job.completion_tokens)
        return JSONResponse(completion_response(rid, self.opts.model_name, "".join(parts), job.finish, chat, use))



def create_app(model, opts: ServeOptions, chat_template: ChatTemplate | None = None) -> FastAPI:
    """The app over `model`: a checkpoint directory, which an engine process of its own loads (on opts.device,
    in opts.dtype, its threads bound to opts.cpus) while this process loads only the tokenizer; or a loaded
    `RecycleGPT` bundle, decoded on a thread of this process (tests, notebooks: a crash there ends the API
    too). The engine starts with the app and stops with it."""
    metrics = Metrics()
    if isinstance(model, (str, Path)):
        cfg = load_config(model)
        tokenizer, context = load_tokenizer(model, cfg), cfg.model.max_seq_len
        engine = EngineClient(lambda: ProcessEngine(model, opts), opts, metrics)
    else:
        tokenizer, context = model.tokenizer, model.model.cfg.max_seq_len
        engine = EngineClient(lambda: ThreadEngine(model, opts), opts, metrics)
    metrics.watch(engine)
    eos_text = tokenizer.tok.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    if chat_template is not None and not chat_template.eos:
        chat_template.eos = eos_text or ""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="recyclegpt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    app.add_middleware(_Guard, metrics=metrics)
    _add_operations_routes(app, engine, metrics)
    _add_openai_routes(app, _Api(tokenizer, context, opts, engine, chat_template))
    app.openapi = functools.partial(_openapi, app)
    return app


def _add_operations_routes(app: FastAPI, engine: EngineClient, metrics: Metrics) -> None:
    """GET /health (the engine's state) and GET /metrics (Prometheus)."""

    @app.get("/health")
    async def health() -> JSONResponse:
        state = engine.state
        body: dict[str, Any] = {"status": state, "restarts": engine.restarts}
        if engine.last_error is not None:
            body["last_error"] = engine.last_error
        info = engine.info
        if "compiled" in info:
            body["compiled"] = info["compiled"]  # round kind -> the batches it has graphs for
        if info.get("later"):
            body["compiling_when_idle"] = info["later"]
        if state == "ok":
            body["warmup_s"] = info.get("warmup_s", 0.0)
            return JSONResponse(body)
        body["detail"] = {"warming up": "loading the model and compiling the decoding graphs",
                          "degraded": "the decoding engine failed and is restarting; requests get 503 until "
                                      "it is back, those that waited in its queue are served then",
                          "error": "the decoding engine failed and could not be restarted"}[state]
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_openai_routes(app: FastAPI, api: _Api) -> None:
    """GET /v1/models, POST /v1/completions, POST /v1/chat/completions."""
    opts, context = api.opts, api.context

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        api.authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": opts.model_name, "object": "model",
                                                         "created": int(time.time()), "owned_by": "recyclegpt",
                                                         "max_model_len": context}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await api.handle(request, chat=True)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with the request bodies the handlers parse themselves (they read the raw body to
    bound its size and answer parser failures with a 400), from the same pydantic models."""
    if app.openapi_schema is None:
        schema = get_openapi(title="recyclegpt", version="1", routes=app.routes,
                             description="OpenAI-compatible completions with a recyclable module")
        bodies = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest}
        _, defs = models_json_schema([(m, "validation") for m in bodies.values()],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        for path, model in bodies.items():
            schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = schema
    return app.openapi_schema


V1_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions")


class _Guard:
    """Pure ASGI middleware: counts /v1 responses by route and status, and answers an exception no handler
    turned into a response with OpenAI's error JSON (500, saying what failed) so the server goes on.
    (Starlette's `@app.middleware("http")` would do the same in fewer lines, but behind it a handler's
    `request.is_disconnected()` never sees the client go away: a request whose client left would decode on.)"""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: list[int] = []

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:
            log.exception("request failed")
            if not status:  # nothing sent yet: the client gets a 500 that says what failed
                msg = f"internal error: {describe(e)}"
                await JSONResponse(ApiError(500, msg).body(), status_code=500)(scope, receive, sending)
        finally:
            path = scope.get("path", "")
            if path.startswith("/v1/"):  # unknown /v1 paths share one label: no label per URL a client makes up
                self.metrics.requests.labels(endpoint=path if path in V1_ROUTES else "other",
                                             status=str(status[0] if status else 500)).inc()


def _one_line(text: str) -> str:
    return " ".join(text.split())
