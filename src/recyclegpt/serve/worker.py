"""The engine thread: one thread owns the model and its `Engine`; requests queue and take free slots.

    worker = Worker(model, module, tokenizer, slots=4, compile=True, width=4, max_queue=64)
    worker.start()                       # warms up the graphs (`ready` is set once they are compiled)
    job = Job(prompt_ids, config, loop)  # in a request handler
    worker.submit(job)                   # QueueFull when the queue is full
    async for event in job.events(): ... # JobEvent(text, finish, ...) pieces as rounds accept tokens
    worker.cancel(job)                   # a client that went away: its slot is freed at once

Continuous batching: between two engine steps the thread admits queued requests into free slots
(prefilling only their rows) and releases finished or cancelled ones, so a request never waits for
another to finish. Text leaves the thread already detokenized (incrementally) and cut at stop
strings: `Job` holds back the last len(longest stop) - 1 characters until it knows they are not the
start of a stop string. A failure inside a step fails the requests in that step (their handlers
answer 500) and the thread goes on serving.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..decoding import Engine, GenerationConfig, SlotOutput
from ..decoding.engine import SlotStats
from ..decoding.stops import trim_at_stop
from ..errors import RecycleError
from ..tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)


class QueueFull(RecycleError):
    """The request queue is at its limit (the server answers 429)."""


@dataclass
class JobEvent:
    """A piece of one request's output. finish: None while running, else 'stop' | 'length' | 'error'."""

    text: str
    finish: str | None = None
    error: str | None = None


class Job:
    """One request: its prompt and settings, and the channel its output travels back on."""

    def __init__(self, prompt_ids: Sequence[int], config: GenerationConfig, loop: asyncio.AbstractEventLoop,
                 tokenizer: Tokenizer, deadline: float | None = None):
        self.prompt_ids, self.config, self.loop = list(prompt_ids), config, loop
        self.deadline = deadline  # time.monotonic() after which the request is ended
        self.queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self.cancelled = False
        self.slot: int | None = None
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.finish: str | None = None
        self._decoder = StreamDecoder(tokenizer)
        self._text = ""  # decoded so far
        self._sent = 0  # characters of _text already sent
        self._hold = max((len(s) for s in config.stop_strings), default=1) - 1

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    # ---- called on the engine thread
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

    def fail(self, message: str) -> None:
        self.finish = "error"
        self._put(JobEvent("", "error", message))

    # ---- called on the event loop
    async def events(self) -> AsyncIterator[JobEvent]:
        while True:
            event = await self.queue.get()
            yield event
            if event.finish is not None:
                return


class WorkerMetrics(Protocol):
    """What the engine thread reports (the server's Prometheus metrics implement it)."""

    def step(self, seconds: float, rows: int) -> None: ...

    def finished(self, job: Job, stats: SlotStats) -> None: ...


class Worker(threading.Thread):
    """The thread that owns the engine (see the module docstring)."""

    def __init__(self, model, module, tokenizer: Tokenizer, slots: int, compile: bool, width: int,
                 max_queue: int, metrics: WorkerMetrics | None = None, tree: tuple[int, int] = (0, 2)):
        super().__init__(name="recyclegpt-engine", daemon=True)
        self.tree = tree  # (nodes, top-k) of verify requests' draft trees; nodes 0: chains
        self.engine = Engine(model, module, slots, compile=compile, tokenizer=tokenizer, width=width)
        self.compile, self.max_queue = compile, max_queue
        self.metrics = metrics
        self.ready = threading.Event()
        self.warmup_s = 0.0
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: dict[int, Job] = {}  # slot -> job
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    # ---- any thread
    def submit(self, job: Job) -> None:
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(job)
        self._wake.set()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy_slots(self) -> int:
        return len(self._jobs)

    # ---- the engine thread
    def run(self) -> None:
        try:
            with torch.inference_mode():
                self._warm_up()
                self.ready.set()
                while not self._stopping.is_set():
                    self._admit()
                    self._drop_cancelled()
                    if not self.engine.decoding():
                        self._wake.wait(0.5)
                        self._wake.clear()
                        continue
                    self._step()
        except BaseException as e:  # the thread must not die silently: the health check reports it
            self.error = e
            log.exception("engine thread stopped")
            for job in list(self._jobs.values()) + list(self._queue):
                job.fail("the decoding engine stopped")
            raise

    def _warm_up(self) -> None:
        if not self.compile:
            return
        t0 = time.perf_counter()
        e = self.engine
        nodes, topk = self.tree
        modes = ("ar", "verify", "recycle") if nodes else ("ar", "verify")  # recycle rows make chain rounds
        tree = dict(tree=nodes, tree_topk=topk) if nodes else {}
        sampling = ({}, dict(temperature=1.0), dict(temperature=1.0, top_p=0.9))  # greedy, sampled, filtered
        shapes = {s for kw in sampling for mode in modes
                  for s in e.shapes_for(GenerationConfig(mode=mode, k=e.width, **kw,
                                                         **(tree if mode == "verify" else {})))}
        for shape in sorted(shapes, key=lambda s: (s.width, s.sampled)):
            log.info("compiling the decoding round %s", shape)
            e.warm_up(shape)
        self.warmup_s = time.perf_counter() - t0
        log.info("decoding graphs compiled in %.1f s", self.warmup_s)

    def _admit(self) -> None:
        free = self.engine.free_slots()
        batch: list[tuple[int, Job]] = []
        with self._lock:
            while free and self._queue:
                job = self._queue.popleft()
                if job.cancelled:
                    continue
                batch.append((free.pop(0), job))
        if not batch:
            return
        try:
            outs = self.engine.admit_many([(slot, job.prompt_ids, job.config) for slot, job in batch])
        except RecycleError as e:  # validated by the handler already; fail these requests alone
            for _, job in batch:
                job.fail(str(e))
            return
        for (slot, job), out in zip(batch, outs, strict=True):
            job.slot = slot
            self._jobs[slot] = job
            self._deliver(slot, job, out)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for slot, job in list(self._jobs.items()):
            if job.cancelled:
                self._release(slot)
            elif job.deadline is not None and now > job.deadline:
                job.fail("the request took longer than the server's time limit")
                self._release(slot)

    def _release(self, slot: int) -> None:
        self._jobs.pop(slot, None)
        self.engine.release(slot)

    def _step(self) -> None:
        t0 = time.perf_counter()
        jobs = dict(self._jobs)
        try:
            outs = self.engine.step()
        except Exception as e:  # a failed round fails its requests, not the server
            log.exception("a decoding round failed")
            for slot, job in jobs.items():
                job.fail(f"decoding failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                self._release(slot)
            return
        self._report("step", time.perf_counter() - t0, len(jobs))
        for slot, job in jobs.items():
            if outs[slot] is not None:
                self._deliver(slot, job, outs[slot])

    def _deliver(self, slot: int, job: Job, out: SlotOutput) -> None:
        """Hand a slot's new tokens to its request; release the slot once it is done."""
        stats = self.engine.request(slot).stats
        try:
            job.feed(out.tokens, out.finish, stats.produced)
        except Exception as e:  # e.g. a tokenizer that cannot decode: this request alone fails
            job.fail(f"cannot decode the output: {type(e).__name__}")
            self._release(slot)
            return
        if out.finish is not None:
            self._report("finished", job, stats)
            self._release(slot)

    def _report(self, what: str, *args) -> None:
        """Metrics never stop the engine: a failing metric is logged and skipped."""
        if self.metrics is None:
            return
        try:
            getattr(self.metrics, what)(*args)
        except Exception:
            log.exception("metrics update %s failed", what)
