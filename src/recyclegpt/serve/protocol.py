"""The OpenAI API's request and response shapes (completions and chat completions), as served here.

Requests are validated by pydantic models that reject unknown fields (as OpenAI does) and accept
OpenAI's fields that this server cannot honour only at their neutral values (n=1, no logprobs, no
penalties, ...), so a request is never silently served differently from what it asked. Fields
beyond OpenAI's, as vLLM accepts them: `mode` (verify, ar, recycle), `k`, `top_k`, `ignore_eos`.
Every refusal is an `ApiError` rendered as OpenAI's error JSON with a 4xx status. The settings a request
shares with the Python API and the command line (`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`,
`k`, `stop`, the texts) are held to the same table, `decoding.limits`: a value is refused here exactly when
`RecycleGPT.generate` refuses it.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from ..decoding.limits import SETTINGS, InvalidSetting, check_stops, check_text


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                             413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _setting(name: str, nullable: bool = False) -> WithJsonSchema:
    """The JSON schema of a request setting from `limits.SETTINGS` (its range as the API checks it): the
    field itself takes any JSON value and `_Sampling.check` holds it to the same table, with the same message."""
    s = SETTINGS[name]
    schema: dict[str, Any] = {"type": "integer" if s.kind is int else "number"}
    if s.lo is not None:
        schema["exclusiveMinimum" if s.lo_open else "minimum"] = s.lo
    if s.hi is not None:
        schema["exclusiveMaximum" if s.hi_open else "maximum"] = s.hi
    if s.optional or nullable:  # null: the setting's default
        schema = {"anyOf": [schema, {"type": "null"}]}
    return WithJsonSchema(schema)


_TEXT = WithJsonSchema({"type": "string"})  # valid Unicode: no lone surrogates (`limits.check_text`)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints. Types are strict (no "5" for 5, no true for 1), as the Python API's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[Any, _TEXT]
    max_tokens: Annotated[Any, _setting("max_new_tokens", nullable=True)] = None
    temperature: Annotated[Any, _setting("temperature")] = 1.0
    top_p: Annotated[Any, _setting("top_p")] = 1.0
    n: Literal[1] = 1
    seed: Annotated[Any, _setting("seed")] = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    logit_bias: dict[str, float] | None = None
    user: Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "null"}]})] = None
    # beyond OpenAI (as vLLM)
    mode: Literal["verify", "ar", "recycle"] = "verify"
    k: Annotated[Any, _setting("k", nullable=True)] = None
    top_k: Annotated[Any, _setting("top_k")] = 0
    ignore_eos: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return None

    # (request field, limits.SETTINGS entry) of the settings shared with the Python API
    SHARED: ClassVar[tuple[tuple[str, str], ...]] = (
        ("max_tokens", "max_new_tokens"), ("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
        ("top_k", "top_k"), ("k", "k"))

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def check(self) -> None:
        """InvalidSetting (named as the request names it) unless every shared setting and text is one the
        Python API accepts too (`limits`)."""
        check_text(self.model, "model")
        if self.user is not None:
            check_text(self.user, "user")
        for name, setting in self.SHARED:
            value = getattr(self, name)
            if value is not None:  # null: the default (a null where there is none fails GenerationConfig.validate)
                SETTINGS[setting].check(value, name)
        check_stops(self.stops, "stop")


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def check(self) -> None:
        super().check()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise InvalidSetting("prompt", "give one prompt (a string, or a list with one string)")
        check_text(self.text, "prompt")
        if not self.text:
            raise InvalidSetting("prompt", "the prompt is empty")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[Any, _setting("max_new_tokens", nullable=True)] = None
    logprobs: Literal[False] | None = None
    SHARED = _Sampling.SHARED + (("max_completion_tokens", "max_new_tokens"),)

    def check(self) -> None:
        super().check()
        for i, m in enumerate(self.messages):
            check_text(m.content, f"messages[{i}].content")
            if m.name is not None:
                check_text(m.name, f"messages[{i}].name")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None, chat: bool,
                     first: bool = False) -> dict[str, Any]:
    """One streamed chunk (`text_completion` or `chat.completion.chunk`)."""
    if chat:
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, created: int, chat: bool, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": use}


def completion_response(rid: str, model: str, text: str, finish: str, chat: bool, use: dict[str, int]
                        ) -> dict[str, Any]:
    created = int(time.time())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
                "usage": use}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": use}
