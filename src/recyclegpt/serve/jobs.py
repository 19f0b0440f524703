"""One request on the API side: its prompt and settings going to the engine, its text coming back.

Text is detokenized here, in the API's process (incrementally), and cut at stop strings: a `Job` holds back
the last len(longest stop) - 1 characters until it knows they are not the start of a stop string.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..decoding import GenerationConfig
from ..decoding.stops import trim_at_stop
from ..errors import RecycleError
from ..tokenizer import StreamDecoder, Tokenizer


class QueueFull(RecycleError):
    """The request queue is at its limit (the server answers 429)."""


class Quarantined(RecycleError):
    """A request that took the engine down each time it was admitted, refused from then on (the server answers
    400): a client retrying it must not stop the engine for everyone again and again."""


class EngineDown(RecycleError):
    """The engine is not serving: warming up, restarting after a failure, or given up (the server answers 503)."""


@dataclass
class JobEvent:
    """A piece of one request's output. finish: None while running, else 'stop' | 'length' | 'error';
    an error carries its message and HTTP status (400: the request itself was refused, 500: a failure,
    503: the engine went down while serving it)."""

    text: str
    finish: str | None = None
    error: str | None = None
    status: int = 500


class Job:
    """One request: its prompt and settings, and the channel its output travels back on (to the event loop)."""

    def __init__(self, prompt_ids: Sequence[int], config: GenerationConfig, loop: asyncio.AbstractEventLoop,
                 tokenizer: Tokenizer, deadline: float | None = None):
        self.prompt_ids, self.config, self.loop = list(prompt_ids), config, loop
        self.deadline = deadline  # time.monotonic() after which the request is ended
        self.queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self.cancelled = False
        self.rid: int | None = None  # its id on the engine's channel
        self.taken = False  # the engine took it from its queue (it is in a slot, or being prefilled)
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.finish: str | None = None
        self.key = hash((tuple(self.prompt_ids), repr(config)))  # the same request, sent again, has the same key
        self._decoder = StreamDecoder(tokenizer)
        self._text = ""  # decoded so far
        self._sent = 0  # characters of _text already sent
        self._hold = max((len(s) for s in config.stop_strings), default=1) - 1

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    # ---- called on the thread that reads the engine's messages
    def _put(self, event: JobEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def feed(self, tokens: list[int], finish: str | None, produced: int) -> None:
        """New tokens of this request (and, once done, why it ended)."""
        if tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.completion_tokens = produced
        self._text += self._decoder.push(tokens)
        if finish is None:
            safe = len(self._text) - self._hold
            if safe > self._sent:
                self._put(JobEvent(self._text[self._sent:safe]))
                self._sent = safe
            return
        self._text += self._decoder.flush()
        final = trim_at_stop(self._text, self.config.stop_strings)
        self.finish = "stop" if finish in ("eos", "stop") else "length"
        self._put(JobEvent(final[self._sent:], self.finish))

    def fail(self, message: str, status: int = 500) -> None:
        if self.finish is not None:  # already answered
            return
        self.finish = "error"
        self._put(JobEvent("", "error", message, status))

    # ---- called on the event loop
    async def next_event(self) -> JobEvent:
        """The next piece of output. Safe to cancel (a timeout around it loses nothing): it is a queue read,
        not an async generator, which a cancelled `__anext__` would close for good."""
        return await self.queue.get()
