"""The engine thread: one thread owns the model and its `Engine`; requests queue and take free slots.

    queue = JobQueue(limit=64)
    supervisor = Supervisor(lambda q: Worker(model, module, tokenizer, 4, True, 4, q), queue)
    supervisor.start()                   # starts the engine thread; it warms up the graphs first
    job = Job(prompt_ids, config, loop)  # in a request handler
    supervisor.submit(job)               # QueueFull when the queue is full, EngineDown when it gave up
    event = await job.next_event()       # JobEvent(text, finish, ...) pieces as rounds accept tokens
    supervisor.cancel(job)               # a client that went away: its slot is freed at once

Continuous batching: between two engine steps the thread admits a queued request into a free slot
(prefilling only its rows) and releases finished or cancelled ones, so a request never waits for
another to finish. Each round runs over the smallest batch of the engine's ladder (1, 2, 4, ... up
to the slots) that holds the busy slots and has a compiled graph: before it reports ready the thread
compiles the greedy graphs of the smallest and the widest batch and the sampled ones of the widest
(so start-up does not grow with the ladder), and the others later, one at a time, whenever it has
been idle for IDLE_COMPILE_S (a request arriving then waits for that one graph).

Text leaves the thread already detokenized (incrementally) and cut at stop strings: `Job` holds
back the last len(longest stop) - 1 characters until it knows they are not the start of a stop
string.

Failures stay with the requests they touch: a request the engine refuses at admission fails alone
(400), a failed prefill or round fails the requests in it (500), and the thread goes on serving.
Whatever escapes that ends the engine thread after failing the requests it held; the `Supervisor`
starts a fresh engine on the same queue, so waiting requests are served after the restart.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..decoding import Engine, GenerationConfig, SlotOutput, compiled
from ..decoding.engine import SlotStats
from ..decoding.rounds import RoundShape
from ..decoding.stops import trim_at_stop
from ..errors import RecycleError
from ..tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)

IDLE_COMPILE_S = 1.0  # with nothing to decode for this long, the engine thread compiles a graph still missing


class QueueFull(RecycleError):
    """The request queue is at its limit (the server answers 429)."""


@dataclass
class JobEvent:
    """A piece of one request's output. finish: None while running, else 'stop' | 'length' | 'error';
    an error carries its message and HTTP status (400: the request itself was refused, 500: a failure)."""

    text: str
    finish: str | None = None
    error: str | None = None
    status: int = 500


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


class WorkerMetrics(Protocol):
    """What the engine thread reports (the server's Prometheus metrics implement it)."""

    def step(self, seconds: float, rows: int, batch: int) -> None: ...

    def finished(self, job: Job, stats: SlotStats) -> None: ...

    def restarted(self) -> None: ...


class EngineDown(RecycleError):
    """The engine failed and could not be started again (the server answers 503)."""


class JobQueue:
    """Requests waiting for a slot. It outlives engine threads: a restarted engine serves what waited."""

    def __init__(self, limit: int):
        self.limit = limit
        self._jobs: collections.deque[Job] = collections.deque()
        self._lock = threading.Lock()
        self.wake = threading.Event()  # set when a job arrives or is cancelled, or on stop

    def put(self, job: Job) -> None:
        with self._lock:
            if len(self._jobs) >= self.limit:
                raise QueueFull(f"the server's queue is full ({self.limit} requests waiting); retry later")
            self._jobs.append(job)
        self.wake.set()

    def take(self, n: int) -> list[Job]:
        """Up to n waiting jobs, oldest first (cancelled ones are dropped)."""
        out: list[Job] = []
        with self._lock:
            while len(out) < n and self._jobs:
                job = self._jobs.popleft()
                if not job.cancelled:
                    out.append(job)
        return out

    def drain(self) -> list[Job]:
        return self.take(len(self._jobs))

    def __len__(self) -> int:
        return len(self._jobs)


class Worker(threading.Thread):
    """One engine thread: an `Engine` over the model, fed from a `JobQueue` (see the module docstring).

    A failure while admitting, prefilling, decoding or delivering fails the requests it touched and the
    thread goes on. Anything else that escapes the loop ends the thread after failing the requests it
    held (`crashed`); the `Supervisor` then starts a fresh one on the same queue."""

    def __init__(self, model, module, tokenizer: Tokenizer, slots: int, compile: bool, width: int,
                 queue: JobQueue, metrics: WorkerMetrics | None = None, tree: tuple[int, int] = (0, 2),
                 batches: Sequence[int] | None = None, threads: int | None = None):
        super().__init__(name="recyclegpt-engine", daemon=True)
        self.threads = threads  # intra-op threads of this thread's torch ops (None: torch's current setting)
        self.tree = tree  # (nodes, top-k) of verify requests' draft trees; nodes 0: chains
        self.engine = Engine(model, module, slots, compile=compile, tokenizer=tokenizer, width=width,
                             batches=batches)
        self.later: list[tuple[RoundShape, int]] = []  # graphs compiled when the thread is idle
        self.compile, self.queue, self.metrics = compile, queue, metrics
        self.ready = threading.Event()
        self.warmup_s = 0.0
        self._jobs: dict[int, Job] = {}  # slot -> job
        self._admitting: list[Job] = []  # taken from the queue, not yet in a slot
        self._stopping = threading.Event()
        self.error: str | None = None  # why the thread ended, when it crashed

    def stop(self) -> None:
        self._stopping.set()
        self.queue.wake.set()

    @property
    def busy_slots(self) -> int:
        return len(self._jobs)

    @property
    def crashed(self) -> bool:
        return self.error is not None

    # ---- the engine thread
    def run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                self._warm_up()
                self.ready.set()
                while not self._stopping.is_set():
                    self._admit()
                    self._drop_cancelled()
                    if not self.engine.decoding():
                        woken = self.queue.wake.wait(IDLE_COMPILE_S if self.later else 0.5)
                        self.queue.wake.clear()
                        if not woken and self.later and not self.queue and not self._stopping.is_set():
                            self._compile_one()
                        continue
                    self._step()
        except BaseException as e:  # noqa: B036 -- whatever ends the thread is reported, then the supervisor restarts it
            self.error = describe(e)
            log.exception("the engine thread stopped")
            for job in list(self._jobs.values()) + self._admitting:
                job.fail(f"the decoding engine failed while serving this request ({self.error}); it is restarting")
            self._jobs.clear()
            self._admitting = []

    def _warm_up(self) -> None:
        """Compile before serving: the greedy graphs at the smallest and the widest batch and the sampled ones
        at the widest (no round waits for a compile, and a lone greedy request runs at batch 1); the rest
        go to `later`: the greedy ones of the batches in between first, then the sampled ones."""
        if not self.compile:
            return
        t0 = time.perf_counter()
        e = self.engine
        nodes, topk = self.tree
        modes = ("ar", "verify", "recycle") if nodes else ("ar", "verify")  # recycle rows make chain rounds
        tree = dict(tree=nodes, tree_topk=topk) if nodes else {}
        sampling = ({}, dict(temperature=1.0), dict(temperature=1.0, top_p=0.9))  # greedy, sampled, filtered
        shapes = sorted({s for kw in sampling for mode in modes
                         for s in e.shapes_for(GenerationConfig(mode=mode, k=e.width, **kw,
                                                                **(tree if mode == "verify" else {})))},
                        key=lambda s: (s.sampled, s.filtered, s.width))
        ends = sorted({e.batches[0], e.batches[-1]})
        now = [(s, b) for s in shapes if not s.sampled for b in ends]
        now += [(s, ends[-1]) for s in shapes if s.sampled]
        self.later = [(s, b) for s in shapes if not s.sampled for b in e.batches if b not in ends]
        self.later += [(s, b) for s in shapes if s.sampled for b in e.batches[:-1]]
        for shape, batch in now:
            log.info("compiling the decoding round %s", compiled.shape_label(shape, batch, e.dtype))
            e.warm_up(shape, batch)
        self.warmup_s = time.perf_counter() - t0
        log.info("decoding graphs compiled in %.1f s (%d more when idle)", self.warmup_s, len(self.later))

    def _compile_one(self) -> None:
        """Compile the next graph of `later`. One that fails is dropped (logged): its rounds keep running at
        the next wider batch that has a graph, as they did before."""
        shape, batch = self.later[0]
        label = compiled.shape_label(shape, batch, self.engine.dtype)
        log.info("compiling the decoding round %s (idle)", label)
        try:
            self.engine.warm_up(shape, batch)
        except Exception:
            log.exception("compiling %s failed; its rounds run at a wider batch", label)
        self.later.pop(0)  # only now: /health counts the graph being compiled as still to come

    def _admit(self) -> None:
        """Admit one waiting request if a slot is free: its prompt is prefilled now and its first token goes
        out at once. One per turn of the loop, so the requests already decoding get a round between two
        prefills (a burst of arrivals does not stall them for every prefill in a row), and of a burst the
        first to be admitted answers first instead of all answering after the last prefill."""
        free = self.engine.free_slots()
        jobs = self.queue.take(1) if free else []
        if not jobs:
            return
        self._admitting = jobs
        self._start(free[0], jobs[0])
        self._admitting = []

    def _start(self, slot: int, job: Job) -> None:
        """Admit a job into a slot (prefilled). If that raises, the slot stays free and the job fails alone:
        400 when the engine refused it, 500 when it failed otherwise."""
        try:
            (out,) = self.engine.admit_many([(slot, job.prompt_ids, job.config)])
        except Exception as e:
            if slot not in self.engine.free_slots():
                self.engine.release(slot)
            if isinstance(e, RecycleError):
                job.fail(str(e), status=400)
            else:
                log.exception("admitting a request failed")
                job.fail(f"admitting the request failed: {describe(e)}")
            return
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
                job.fail(f"decoding failed: {describe(e)}")
                self._release(slot)
            return
        self._report("step", time.perf_counter() - t0, len(jobs), self.engine.last_batch)
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


def describe(e: BaseException) -> str:
    """An exception in one line, for an error message: its type and the first line of what it says."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class Supervisor(threading.Thread):
    """Keeps an engine thread running: when one ends by a failure, the requests it held have been failed
    (500); a fresh `Worker` (a new `Engine`: slot state and caches reset; compiled graphs are reused) takes
    over the same queue, so what waited is served. `state` is what /health reports: 'warming up' before
    the first engine is ready, 'ok', 'degraded' while a failed engine restarts, 'error' after
    `max_failed_starts` engines in a row failed before serving a round (requests then get 503)."""

    def __init__(self, make_worker: Callable[[JobQueue], Worker], queue: JobQueue,
                 metrics: WorkerMetrics | None = None, max_failed_starts: int = 5):
        super().__init__(name="recyclegpt-supervisor", daemon=True)
        self.make_worker, self.queue, self.metrics = make_worker, queue, metrics
        self.max_failed_starts = max_failed_starts
        self.worker = make_worker(queue)
        self.restarts = 0
        self.last_error: str | None = None
        self.gave_up = False
        self._stopping = threading.Event()

    # ---- any thread
    def submit(self, job: Job) -> None:
        if self.gave_up:
            raise EngineDown(f"the decoding engine stopped ({self.last_error}) and could not be restarted")
        self.queue.put(job)

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self.queue.wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self.worker.stop()

    @property
    def state(self) -> str:
        if self.gave_up:
            return "error"
        if self.worker.ready.is_set() and self.worker.is_alive():
            return "ok"
        return "degraded" if self.restarts or self.worker.crashed else "warming up"

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def busy_slots(self) -> int:
        return self.worker.busy_slots

    # ---- the supervisor thread
    def run(self) -> None:
        failed_starts = 0
        while not self._stopping.is_set():
            worker = self.worker
            worker.start()
            worker.join()
            if self._stopping.is_set():
                return
            self.restarts += 1
            self.last_error = worker.error or "the engine thread ended"
            failed_starts = failed_starts + 1 if worker.engine.stats.steps == 0 else 1
            if self.metrics is not None:
                self.metrics.restarted()
            if failed_starts >= self.max_failed_starts:
                log.error("the engine failed %d times in a row before serving: giving up", failed_starts)
                self.gave_up = True
                for job in self.queue.drain():
                    job.fail(f"the decoding engine stopped ({self.last_error})")
                return
            log.warning("restarting the decoding engine (restart %d) after: %s", self.restarts, self.last_error)
            if self._stopping.wait(min(0.05 * 2 ** failed_starts, 5.0)):  # a crash loop must not spin
                return
            try:
                self.worker = self.make_worker(self.queue)
            except Exception as e:  # cannot even build an engine: nothing to restart
                log.exception("building a new engine failed")
                self.last_error, self.gave_up = describe(e), True
                for job in self.queue.drain():
                    job.fail(f"the decoding engine stopped ({self.last_error})")
                return
