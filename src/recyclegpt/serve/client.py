"""The API side of the engine: `EngineClient` sends requests to the engine (`worker.Worker`) and turns what
comes back into each request's events; it starts the engine, sees it die, and starts a fresh one.

    client = EngineClient(lambda: ProcessEngine(ckpt, opts), opts, metrics)   # or ThreadEngine(bundle, opts)
    client.start()                       # the engine loads, then compiles; `state` says where it is
    client.submit(job)                   # QueueFull (429), EngineDown (503: not serving now)
    event = await job.next_event()       # JobEvent(text, finish, ...) pieces as rounds accept tokens
    client.cancel(job)                   # a client that went away: its slot is freed at once

One thread reads the engine's messages: it detokenizes tokens into their `Job`s (so the engine process does
no text work) and feeds the metrics. Another writes to the engine, so a request handler never waits on it.
When the connection closes without a stop, the engine died: the requests it had taken fail with 503 (their
text so far cannot be resumed), the ones still waiting in its queue are sent again to a fresh engine
(started with a backoff), and `state` says 'degraded' until it is ready. An engine that dies
`max_failed_starts` times in a row before serving a round is given up: 'error', every request 503.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from ..decoding.engine import SlotStats
from ..errors import RecycleError
from .jobs import EngineDown, Job, Quarantined, QueueFull
from .options import ServeOptions, one_per_core, parse_cpus
from .worker import describe, run_engine

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # an engine told to stop that has not ended after this long is killed
QUARANTINE_AFTER = 2  # a request the engine died admitting this many times is refused


class Metrics(Protocol):
    """What the client reports (the server's Prometheus metrics implement it)."""

    def step(self, seconds: float, batch: int, kind: str, undrafted: bool) -> None: ...

    def finished(self, job: Job, stats: SlotStats) -> None: ...

    def restarted(self) -> None: ...


class EngineHandle(Protocol):
    """A running engine: the API's end of its connection, and how it ended."""

    conn: Connection

    def reason(self) -> str:
        """Once the connection has closed: wait for the engine to end, and say why it did."""
        ...

    def stop(self, timeout: float) -> None:
        """Wait up to `timeout` for the engine to end after 'stop' (or its connection closing); then end it."""
        ...

    def kill(self) -> None:
        """End a hung engine now (its connection then closes)."""
        ...


class ThreadEngine:
    """The engine on a thread of this process, over an already loaded model (`create_app(bundle, ...)`: tests,
    notebooks, `recyclegpt serve --engine thread`). A crash of the process takes the API with it."""

    def __init__(self, bundle, opts: ServeOptions):
        self.conn, theirs = multiprocessing.Pipe()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, args=(bundle, opts, theirs), name="recyclegpt-engine",
                                       daemon=True)
        self.thread.start()

    def _run(self, bundle, opts: ServeOptions, conn: Connection) -> None:
        import torch

        if opts.threads is not None:
            torch.set_num_threads(opts.threads)  # this thread's OpenMP team (`runtime.serial_here`)
        try:
            run_engine(lambda: bundle, opts, conn)
        except BaseException as e:  # noqa: B036 -- reported through `reason`; the client restarts the engine
            self.error = describe(e)
        finally:
            conn.close()

    def reason(self) -> str:
        self.thread.join()
        return self.error or "the engine thread ended"

    def stop(self, timeout: float) -> None:
        self.thread.join(timeout)

    def kill(self) -> None:
        log.error("the engine thread is hung and a thread cannot be killed: restart the server (the engine "
                  "process of `recyclegpt serve`, the default, is killed and restarted instead)")


class ProcessEngine:
    """The engine in a process of its own (`python -m recyclegpt.serve.process`), which loads the checkpoint
    itself, with one OpenMP thread per physical core, bound to `opts.cpus` when they are given. It ends when this
    process does (Linux: a parent-death signal; elsewhere when it finds its connection closed)."""

    def __init__(self, ckpt: str | Path, opts: ServeOptions):
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "recyclegpt.serve.process", str(theirs.fileno())]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), env=engine_environment(opts))
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        # what to load and how to serve it: over the connection, not the command line (which any user of the
        # machine can read, and which would show the API key)
        self.conn.send({"ckpt": str(ckpt), "opts": asdict(opts)})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def reason(self) -> str:
        code = self.proc.wait()
        if code < 0:
            return f"the engine process was killed by {signal.Signals(-code).name}"
        return f"the engine process exited with code {code}"

    def stop(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not stop within %.0f s: killing it", timeout)
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()


def engine_environment(opts: ServeOptions) -> dict[str, str]:
    """The engine process's environment: one OpenMP thread per physical core (opts.threads, when set, instead),
    and with opts.cpus a list (or 'auto'), each thread bound to one of those CPUs (OMP_PLACES / OMP_PROC_BIND,
    read when the OpenMP runtime starts). What the user set in these variables wins."""
    env = dict(os.environ)
    cpus = parse_cpus(opts.cpus)
    if cpus is not None:
        env.setdefault("OMP_PLACES", ",".join(f"{{{c}}}" for c in cpus))
        env.setdefault("OMP_PROC_BIND", "close")
    threads = opts.threads or len(cpus if cpus is not None else one_per_core(sorted(os.sched_getaffinity(0))))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


class EngineClient:
    """Requests to an engine and their output back, across engine restarts (see the module docstring)."""

    def __init__(self, launch: Callable[[], EngineHandle], opts: ServeOptions, metrics: Metrics | None = None,
                 max_failed_starts: int = 5):
        self.launch, self.opts, self.metrics = launch, opts, metrics
        self.max_failed_starts = max_failed_starts
        self.handle: EngineHandle | None = None
        self.restarts = 0
        self.last_error: str | None = None
        self.gave_up = False
        self.info: dict[str, Any] = {}  # the engine's last 'ready' / 'status': warmup_s, compiled, later
        self.ready = threading.Event()  # the engine serves
        self.loaded = threading.Event()  # the engine has loaded the model (or given up trying)
        self._jobs: dict[int, Job] = {}  # rid -> a request the engine holds (waiting or decoding)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # _jobs, and posting what depends on them
        # Messages to the engine go through a writer thread: a request handler never blocks on the engine
        # (which reads between rounds, not while it compiles a graph). Each carries the generation of the
        # engine it was meant for, so nothing queued for a dead engine reaches its successor twice.
        self._outbox: queue.SimpleQueue[tuple[int, tuple] | None] = queue.SimpleQueue()
        self._generation = 0
        self._switch = threading.Lock()  # the handle and its generation change together
        self._served = False  # the current engine has run a round
        self._said: str | None = None  # what the current engine said when it died
        self._crashes: collections.OrderedDict[int, int] = collections.OrderedDict()  # Job.key -> engines it took down
        self._heard = time.monotonic()  # the engine's last message, or when it was last given work while idle
        self._stopping = threading.Event()
        self._reader = threading.Thread(target=self._run, name="recyclegpt-engine-client", daemon=True)
        self._writer = threading.Thread(target=self._write, name="recyclegpt-engine-writer", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="recyclegpt-engine-watchdog", daemon=True)

    # ---- any thread
    def start(self) -> None:
        """Start the engine (once; later calls do nothing)."""
        if self.handle is None:
            self.handle = self.launch()
            self._reader.start()
            self._writer.start()
            self._watchdog.start()

    def wait_loaded(self) -> None:
        """Block until the engine has loaded the model; RecycleError with its reason if it could not."""
        self.loaded.wait()
        if self.gave_up:
            raise RecycleError(f"the decoding engine could not start: {self.last_error}")

    def submit(self, job: Job) -> None:
        if self._crashes.get(job.key, 0) >= QUARANTINE_AFTER:
            raise Quarantined(f"the decoding engine failed {self._crashes[job.key]} times while admitting this same "
                              "request (prompt and settings); it is refused so that it cannot stop the engine for "
                              "everyone again")
        if not self.ready.is_set():
            raise EngineDown(self._not_serving())
        with self._lock:
            if self.queue_depth >= self.opts.max_queue:
                raise QueueFull(f"the server's queue is full ({self.opts.max_queue} requests waiting); retry later")
            if not self._jobs:  # an idle engine's silence so far is not a hang
                self._heard = time.monotonic()
            job.rid = next(self._ids)
            self._jobs[job.rid] = job
            self._post_add(job)  # under the lock: a restart's resend and this send never both happen

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self._lock:
            if self._jobs.pop(job.rid, None) is not None:
                self._post(("cancel", job.rid))

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        self._stopping.set()
        handle = self.handle
        if handle is None:
            return
        self._post(("stop",))
        handle.stop(timeout)  # its end of the connection closes: the reader thread sees that and returns
        self._reader.join(timeout)
        self._outbox.put(None)
        self._writer.join(timeout)
        handle.conn.close()

    @property
    def state(self) -> str:
        if self.gave_up:
            return "error"
        if self.ready.is_set():
            return "ok"
        return "degraded" if self.restarts else "warming up"

    @property
    def queue_depth(self) -> int:
        return sum(not j.taken for j in list(self._jobs.values()))

    @property
    def busy_slots(self) -> int:
        return sum(j.taken for j in list(self._jobs.values()))

    def _not_serving(self) -> str:
        if self.gave_up:
            return f"the decoding engine stopped ({self.last_error}) and could not be restarted"
        if self.restarts:
            return f"the decoding engine is restarting after a failure ({self.last_error}); retry shortly"
        return "the server is warming up (compiling its decoding graphs); retry when /health answers 200"

    def _post_add(self, job: Job) -> None:
        """Send a request. Its time limit runs from its arrival, across restarts."""
        left = 1e9 if job.deadline is None else max(0.0, job.deadline - time.monotonic())
        self._post(("add", job.rid, job.prompt_ids, job.config, left))

    def _post(self, msg: tuple) -> None:
        self._outbox.put((self._generation, msg))

    # ---- the watchdog thread
    def _watch(self) -> None:
        """An engine that holds requests and has said nothing for opts.engine_timeout_s is hung (a deadlock, a
        stuck kernel): kill it, so its requests get their 503 and a fresh engine serves the rest. A round, a
        prefill or a graph compiled when idle each take far less."""
        while not self._stopping.wait(min(1.0, self.opts.engine_timeout_s / 4)):
            silent = time.monotonic() - self._heard
            if self._jobs and self.ready.is_set() and silent > self.opts.engine_timeout_s:
                log.error("the decoding engine said nothing for %.0f s while holding %d requests: killing it",
                          silent, len(self._jobs))
                self._said = f"the engine stopped answering for {silent:.0f} s and was killed"
                self._heard = time.monotonic()
                self.handle.kill()

    # ---- the writer thread
    def _write(self) -> None:
        """Send what was posted, in order, to the engine it was meant for; a dead engine's messages are
        dropped (the reader thread handles its end)."""
        while True:
            item = self._outbox.get()
            if item is None:
                return
            generation, msg = item
            with self._switch:
                if generation != self._generation:
                    continue
                try:
                    self.handle.conn.send(msg)
                except (OSError, ValueError):
                    pass

    # ---- the reader thread
    def _run(self) -> None:
        failed_starts = 0
        while True:
            self._read(self.handle.conn)
            if self._stopping.is_set():
                # This thread lives until the engine has ended: it may have started it, and a process started
                # from a thread gets its parent-death signal when that thread ends (`process.py`).
                self.handle.stop(STOP_TIMEOUT_S)
                return
            self.ready.clear()
            reason = self._end()
            failed_starts = 1 if self._served else failed_starts + 1
            if failed_starts >= self.max_failed_starts or not self.loaded.is_set():
                self._give_up(failed_starts, reason)
                return
            log.warning("restarting the decoding engine (restart %d) after: %s", self.restarts, reason)
            if self._stopping.wait(min(0.05 * 2 ** failed_starts, 5.0)):  # a crash loop must not spin
                return
            try:
                handle = self.launch()
            except Exception as e:  # cannot even start an engine: nothing to restart
                log.exception("starting a new engine failed")
                self._give_up(failed_starts, describe(e))
                return
            with self._lock, self._switch:
                self.handle, self._generation, self._served, self._said = handle, self._generation + 1, False, None
                self._heard = time.monotonic()
                for job in self._jobs.values():  # what waited in the dead engine's queue waits in the new one's
                    self._post_add(job)

    def _read(self, conn: Connection) -> None:
        """Dispatch the engine's messages until its connection closes."""
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            self._heard = time.monotonic()
            try:
                self._dispatch(msg)
            except Exception:  # a bug here must not stop the reading: log it and go on
                log.exception("handling the engine's message %r failed", msg[0])

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "out":
            step, outputs = msg[1], msg[2]
            if step is not None:
                self._served = True
                self._report("step", *step)
            for rid, tokens, finish, produced, stats in outputs:
                self._deliver(rid, tokens, finish, produced, stats)
        elif kind == "taken":
            job = self._jobs.get(msg[1])
            if job is not None:
                job.taken = True
        elif kind == "fail":
            with self._lock:
                job = self._jobs.pop(msg[1], None)
            if job is not None:
                job.fail(msg[2], msg[3])
        elif kind == "loaded":
            for name, value in msg[1].items():  # --tree auto's choice: what requests are checked against
                setattr(self.opts, name, value)
            self.loaded.set()
        elif kind in ("ready", "status"):
            self.info = msg[1]
            if kind == "ready":
                self.ready.set()
        elif kind == "died":
            self._said = msg[1]

    def _deliver(self, rid: int, tokens: list[int], finish: str | None, produced: int, stats) -> None:
        job = self._jobs.get(rid)
        if job is None:  # cancelled while its tokens were on the way
            return
        try:
            job.feed(tokens, finish, produced)
        except Exception as e:  # e.g. a tokenizer that cannot decode: this request alone fails
            job.fail(f"cannot decode the output: {type(e).__name__}")
            self.cancel(job)
            return
        if finish is not None:
            with self._lock:
                self._jobs.pop(rid, None)
            self._report("finished", job, stats)

    def _end(self) -> str:
        """The engine died: say why, fail what it was decoding, count the restart."""
        ended = self.handle.reason()  # waits for the engine's end (a process is reaped)
        reason = self.last_error = self._said or ended  # what it said before dying says more, when it could
        with self._lock:
            lost = [j for j in self._jobs.values() if j.taken]
            for job in lost:
                del self._jobs[job.rid]
        # The engine admits one request at a time: one taken without a token yet was being prefilled when it
        # died, and if it does so again, it is the cause (`submit` refuses it from then on).
        admitting = [j for j in lost if j.first_token_at is None]
        if len(admitting) == 1:
            key = admitting[0].key
            self._crashes[key] = self._crashes.pop(key, 0) + 1
            while len(self._crashes) > 1024:
                self._crashes.popitem(last=False)
        for job in lost:
            job.fail(f"the decoding engine failed while serving this request ({reason}); it is restarting, retry",
                     503)
        self.restarts += 1
        if self.metrics is not None:
            self.metrics.restarted()
        return reason

    def _give_up(self, failed_starts: int, reason: str) -> None:
        log.error("the decoding engine failed %d time(s) in a row before serving: giving up (%s)", failed_starts,
                  reason)
        self.gave_up = True
        self.loaded.set()
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.fail(f"the decoding engine stopped ({reason}) and could not be restarted", 503)

    def _report(self, what: str, *args) -> None:
        """Metrics never stop the serving: a failing metric is logged and skipped."""
        if self.metrics is None:
            return
        try:
            getattr(self.metrics, what)(*args)
        except Exception:
            log.exception("metrics update %s failed", what)
