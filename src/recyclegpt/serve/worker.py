"""The engine side of the server: a `Worker` owns the model's `Engine` and serves the requests that arrive on
its connection to the API (`client.EngineClient`), in a process of its own (`recyclegpt serve`: `process.py`)
or on a thread of the API's process (`create_app` over a loaded model).

Messages, tuples pickled by `multiprocessing.connection` (request ids and token ids are small ints):

    API -> engine
      ("add", rid, prompt_ids, config, timeout_s)   a request; it waits in the engine's queue for a slot
      ("cancel", rid)                               drop it, waiting or decoding (its slot is free at once)
      ("stop",)                                     end the loop
    engine -> API
      ("loaded", draft)           the model is loaded; draft: width, tree, tree_topk, default_k (--tree auto's choice)
      ("ready", info)             the graphs it serves with are compiled; info: warmup_s, compiled, later
      ("status", info)            the same, after each graph compiled when idle
      ("taken", rid)              the request left the queue for a slot and is being prefilled
      ("out", step, outputs)      new tokens, outputs = [(rid, tokens, finish, produced, stats or None)], after an
                                  admission (step None) or a round (step = (seconds, batch, round kind,
                                  undrafted: the load made a drafting round run without drafts))
      ("fail", rid, message, status)   the request failed: 400 refused at admission, 500 failed
      ("died", message)           the loop ends by a failure (when it can still say so)

Continuous batching: between two rounds the worker takes what arrived, admits one waiting request into a
free slot (prefilling only its rows, its first token sent at once) and releases finished, cancelled or
expired ones, so a request never waits for another to finish. Each round runs over the smallest batch of
the engine's ladder (1, 2, 4, ... up to the slots) that holds the busy slots and has a compiled graph:
before it reports ready the worker compiles the greedy graphs of the smallest and the widest batch and the
sampled ones of the widest (so start-up does not grow with the ladder), and the others later, one at a
time, whenever it has been idle for IDLE_COMPILE_S (a request arriving then waits for that one graph).

Failures stay with the requests they touch: a request the engine refuses at admission fails alone (400), a
failed prefill or round fails the requests in it (500), and the worker goes on serving. Whatever escapes
that ends the loop: the API sees its connection close and starts a fresh engine.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from ..decoding import Engine, GenerationConfig, SlotOutput, compiled
from ..decoding.engine import ladder
from ..decoding.rounds import RoundShape
from ..errors import RecycleError
from .options import ServeOptions

log = logging.getLogger(__name__)

IDLE_COMPILE_S = 1.0  # with nothing to decode for this long, the worker compiles a graph still missing


@dataclass
class Request:
    """A request on the engine side."""

    rid: int
    prompt_ids: list[int]
    config: GenerationConfig
    deadline: float  # time.monotonic() in this process


def run_engine(load: Callable[[], Any], opts: ServeOptions, conn: Connection) -> None:
    """The engine side from start to end, in the engine process (`process.py`) or on the engine thread
    (`client.ThreadEngine`): load() the `RecycleGPT` bundle, build the worker, serve. Whatever ends it by a
    failure, loading included, is logged and sent to the API as 'died' (while the connection takes it), then
    raised."""
    try:
        start_worker(load(), opts, conn).serve()
    except BaseException as e:  # noqa: B036 -- whatever ends the engine is reported, then raised
        log.exception("the decoding engine stopped")
        try:
            conn.send(("died", describe(e)))
        except (OSError, ValueError):
            pass
        raise


def start_worker(bundle, opts: ServeOptions, conn: Connection) -> Worker:
    """The engine side over a loaded model: --tree auto's measurement (it sets opts' draft shape), the engine,
    and 'loaded' sent to the API."""
    if opts.tree == "auto":
        choose_server_draft(bundle, opts)
    engine = Engine(bundle.model, bundle.module, opts.slots, compile=opts.compile, tokenizer=bundle.tokenizer,
                    width=opts.width, batches=opts.batches or ladder(opts.slots), load_aware=opts.load_aware)
    conn.send(("loaded", dict(width=opts.width, tree=opts.tree, tree_topk=opts.tree_topk, default_k=opts.default_k)))
    return Worker(engine, conn, tree=(int(opts.tree), opts.tree_topk))


def choose_server_draft(bundle, opts: ServeOptions) -> None:
    """--tree auto: the chain or tree that decodes fastest with every slot busy (the shipped code and prose
    prompts, `slots` at a time, compiled as the server runs), measured here or read from the cache; it
    sets the rounds' width (the draft depth) and the tree size. Requests asking for a larger k are refused."""
    from ..prompts import load_prompts

    ps = load_prompts("all").prompts
    prompts = [ps[i % len(ps)] for i in range(opts.slots)]
    log.info("--tree auto: measuring chains and trees with %d busy slots (compile=%s)", opts.slots, opts.compile)
    choice = bundle.choose_draft(prompts, batch_size=opts.slots, compile=opts.compile)
    log.info("%s", choice.describe())
    best = choice.best
    opts.width, opts.tree, opts.tree_topk = best.k, best.tree, best.tree_topk
    opts.default_k = min(opts.default_k, best.k)


class Worker:
    """An `Engine` serving the requests of one connection (see the module docstring)."""

    def __init__(self, engine: Engine, conn: Connection, tree: tuple[int, int] = (0, 2)):
        self.engine, self.conn = engine, conn
        self.tree = tree  # (nodes, top-k) of verify requests' draft trees; nodes 0: chains
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: dict[int, Request] = {}  # slot -> the request decoding in it
        self.later: list[tuple[RoundShape, int]] = []  # graphs compiled when idle
        self.warmup_s = 0.0

    def serve(self) -> None:
        """Warm up, then serve until the API says stop or goes away (`run_engine` reports a failure)."""
        with torch.inference_mode():
            self._warm_up()
            self.conn.send(("ready", self.info()))
            while self._turn():
                pass

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"warmup_s": round(self.warmup_s, 1), "later": len(self.later)}
        if self.engine.compile:
            out["compiled"] = self.engine.compiled_batches()  # round kind -> the batches it has graphs for
        return out

    def _turn(self) -> bool:
        """One turn of the loop: take messages, admit one request, expire, run a round. False: stop."""
        idle = not self.engine.decoding() and not self.waiting
        wait = (IDLE_COMPILE_S if self.later else None) if idle else 0
        if self.conn.poll(wait):
            if not self._receive():
                return False
        elif idle and self.later:
            self._compile_one()
            return True
        self._admit()
        self._expire()
        if self.engine.decoding():
            self._step()
        return True

    def _receive(self) -> bool:
        """Everything the API has sent so far. False: it said stop, or went away."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                log.info("the API closed the connection: stopping")
                return False
            kind = msg[0]
            if kind == "add":
                rid, ids, config, timeout_s = msg[1:]
                self.waiting.append(Request(rid, ids, config, time.monotonic() + timeout_s))
            elif kind == "cancel":
                self._cancel(msg[1])
            elif kind == "stop":
                return False
            if not self.conn.poll(0):
                return True

    def _cancel(self, rid: int) -> None:
        for r in self.waiting:
            if r.rid == rid:
                self.waiting.remove(r)
                return
        for slot, r in list(self.rows.items()):
            if r.rid == rid:
                self._release(slot)

    def _warm_up(self) -> None:
        """Compile before serving: the greedy graphs at the smallest and the widest batch and the sampled ones
        at the widest (no round waits for a compile, and a lone greedy request runs at batch 1); the rest
        go to `later`: the undrafted ones of load-aware drafting first (it uses them only once compiled),
        then the greedy ones of the batches in between, then the sampled ones."""
        if not self.engine.compile:
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
        undrafted = sorted({e.undrafted_shape(s) for s in shapes if not s.sampled and s.chain and not s.tree}
                           if e.load_aware else set(), key=lambda s: s.filtered)
        ends = sorted({e.batches[0], e.batches[-1]})
        now = [(s, b) for s in shapes if not s.sampled for b in ends]
        now += [(s, ends[-1]) for s in shapes if s.sampled]
        self.later = [(s, b) for s in undrafted for b in reversed(e.batches)]  # widest first: where drafts pay least
        self.later += [(s, b) for s in shapes if not s.sampled for b in e.batches if b not in ends]
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
        self.conn.send(("status", self.info()))

    def _admit(self) -> None:
        """Admit one waiting request if a slot is free: its prompt is prefilled now and its first token goes
        out at once. One per turn of the loop, so the requests already decoding get a round between two
        prefills (a burst of arrivals does not stall them for every prefill in a row), and of a burst the
        first to be admitted answers first instead of all answering after the last prefill."""
        free = self.engine.free_slots()
        if not free or not self.waiting:
            return
        r = self.waiting.popleft()
        self.conn.send(("taken", r.rid))
        self._start(free[0], r)

    def _start(self, slot: int, r: Request) -> None:
        """Admit a request into a slot (prefilled). If that raises, the slot stays free and the request fails
        alone: 400 when the engine refused it, 500 when it failed otherwise."""
        try:
            (out,) = self.engine.admit_many([(slot, r.prompt_ids, r.config)])
        except Exception as e:
            if slot not in self.engine.free_slots():
                self.engine.release(slot)
            if isinstance(e, RecycleError):
                self.conn.send(("fail", r.rid, str(e), 400))
            else:
                log.exception("admitting a request failed")
                self.conn.send(("fail", r.rid, f"admitting the request failed: {describe(e)}", 500))
            return
        self.rows[slot] = r
        self.conn.send(("out", None, [self._output(slot, r, out)]))

    def _expire(self) -> None:
        now = time.monotonic()
        late = "the request took longer than the server's time limit"
        for slot, r in list(self.rows.items()):
            if now > r.deadline:
                self.conn.send(("fail", r.rid, late, 500))
                self._release(slot)
        while self.waiting and now > self.waiting[0].deadline:  # the oldest first: later ones expire later
            self.conn.send(("fail", self.waiting.popleft().rid, late, 500))

    def _release(self, slot: int) -> None:
        self.rows.pop(slot, None)
        self.engine.release(slot)

    def _step(self) -> None:
        t0 = time.perf_counter()
        rows = dict(self.rows)
        try:
            outs = self.engine.step()
        except Exception as e:  # a failed round fails its requests, not the server
            log.exception("a decoding round failed")
            for slot, r in rows.items():
                self.conn.send(("fail", r.rid, f"decoding failed: {describe(e)}", 500))
                self._release(slot)
            return
        e = self.engine
        step = (time.perf_counter() - t0, e.last_batch, compiled.round_kind(e.last_shape), e.last_undrafted)
        self.conn.send(("out", step, [self._output(slot, r, outs[slot]) for slot, r in rows.items()
                                      if outs[slot] is not None]))

    def _output(self, slot: int, r: Request, out: SlotOutput) -> tuple:
        """A slot's new tokens as sent to the API; a finished request's slot is released."""
        stats = self.engine.request(slot).stats
        if out.finish is None:
            return r.rid, out.tokens, None, stats.produced, None
        self._release(slot)
        return r.rid, out.tokens, out.finish, stats.produced, stats


def describe(e: BaseException) -> str:
    """An exception in one line, for an error message: its type and the first line of what it says."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
