"""The decoding engine: a fixed number of slots that requests join and leave, one round per step.

    engine = Engine(model, module, slots=8, compile=True, tokenizer=tok)
    out = engine.admit(slot, prompt_ids, GenerationConfig(...))   # prefill; out.tokens = [first token]
    outs = engine.step()          # one full-model pass over the busy slots: outs[slot] = SlotOutput | None
    engine.release(slot)          # the slot is free for the next request

A step's data flow:

    host plan    per decoding slot: how many drafts (its mode, k, remaining budget), the host
                 drafter's proposal, the request's own random noise             -> RoundInputs
    round        `rounds.decode_round`, eagerly or compiled, over all B slots     -> vals, SlotState
    host emit    per slot: budget, EOS, stop strings, counters                    -> SlotOutput

Slot state lives on the device (`rounds.SlotState`: pending token, position, the module's next-draft
logits and state) and per-slot settings in per-slot tensors (temperature, top-k, top-p), so one
graph per round shape serves every mix of requests.

Slots are the caller's names for requests; rows are where they live in the caches and the state. The
busy slots (decoding, or finished and not yet released) hold the first rows, and a round runs over
the smallest batch of the engine's ladder (`batches`, e.g. 1, 2, 4, 8) that holds them, so a lone
request does not pay for the slots nobody uses. When a request leaves, the last busy row moves into
its place (its cache entries and state: rows compute independently, so a row's tokens do not depend
on where it sits or which batch it runs in). Rows in a batch past the busy ones sit at the junk
position (`rounds`) with no drafts: they cost the padding they occupy. Admitting prefills only the
new slot's cache rows; the others keep theirs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..errors import RecycleError
from ..model import FullModel
from ..module import RecyclableModule
from . import compiled
from .drafters import (
    AcceptanceRates,
    AcceptanceTracker,
    AdaptiveK,
    HostDrafter,
    NgramDrafter,
    count_by_position,
    prefer_ngram,
)
from .limits import request_seed
from .options import GenerationConfig
from .prefill import prefill
from .rounds import RoundInputs, RoundShape, SlotState, decode_round, tree_noise_sizes
from .sampling import pick
from .stops import Decodes, StopChecker, StopFn
from .tree import tree_candidates

COST_DECAY = 0.9  # weight of the past in a round shape's measured seconds (`Engine.costs`), after COST_WINDOW rounds
COST_WINDOW = 10  # its first rounds are averaged plainly (the very first, which pays one-off setup, is dropped)
REFRESH_ROUNDS = 32  # load-aware drafting: after this many undrafted rounds in a row, one drafted round


@dataclass
class SlotOutput:
    """What one slot produced in a step (or at admission): new tokens and, once done, why."""

    tokens: list[int]
    finish: str | None  # None while decoding; 'eos' | 'stop' | 'length'


@dataclass
class SlotStats:
    """Counters of one request."""

    rounds: int = 0  # decoding passes while it was decoding (the prefill excluded)
    produced: int = 0  # tokens produced, a final EOS included
    proposed_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    drafter_rounds: dict[str, int] = field(default_factory=dict)  # 'module' | 'ngram' | 'host'
    k_used: list[int] = field(default_factory=list)  # drafts planned in each verify round

    def count_acceptance(self, proposed: int, accepted: int) -> None:
        count_by_position(self.proposed_by_position, self.accepted_by_position, proposed, accepted)


def add_by_position(proposed: list[int], accepted: list[int], stats: SlotStats) -> None:
    """Add one request's proposed/accepted counts by draft position into running totals (in place)."""
    for i, (p, a) in enumerate(zip(stats.proposed_by_position, stats.accepted_by_position, strict=True)):
        if i == len(proposed):
            proposed.append(0)
            accepted.append(0)
        proposed[i] += p
        accepted[i] += a


@dataclass
class EngineStats:
    """Counters of an engine over its life. Passes are batched calls (one call over B slots counts once)."""

    steps: int = 0  # full-model passes of decoding rounds
    module_passes: int = 0  # module calls of decoding rounds
    prefill_passes: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    batches: dict[int, int] = field(default_factory=dict)  # rounds per batch size
    undrafted: int = 0  # greedy drafting rounds run without drafts because the load made that faster (`load_aware`)


@dataclass
class _Plan:
    """One slot's part of a round."""

    lens: int  # real drafts
    width: int  # the round width it needs (its k, even when fewer drafts fit)
    chain: int = 0  # module drafts it needs
    force: bool = False
    host: list[int] | None = None  # the host drafter's proposal it takes
    tree: tuple[int, int] | None = None  # (node budget, top-k) of the draft tree it asks for (depth: width)


class Request:
    """A request in a slot: its settings, token history, random stream, drafter and counters."""

    def __init__(self, slot: int, prompt: list[int], cfg: GenerationConfig, budget: int, stopper: StopChecker):
        self.prompt, self.cfg, self.budget, self.stopper = prompt, cfg, budget, stopper
        self.ctx = list(prompt)  # prompt + emitted tokens; its last token is the pending one
        self.generated: list[int] = []
        self.finish: str | None = None
        self.stats = SlotStats()
        self.sampled = cfg.temperature > 0
        self.generator = torch.Generator()
        if cfg.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(request_seed(cfg.seed))
        self.drafter: HostDrafter | None = None
        self.drafter_label = cfg.drafter if isinstance(cfg.drafter, str) else "host"
        if cfg.mode == "verify" and cfg.drafter != "module":
            if isinstance(cfg.drafter, str):
                min_n = cfg.ngram_min_n or (2 if cfg.drafter == "hybrid" else 1)
                self.drafter = NgramDrafter(cfg.ngram_max_n, min(min_n, cfg.ngram_max_n))
            else:
                self.drafter = cfg.drafter
            self.drafter.reset(slot)
        self.ngram_k = cfg.ngram_k or cfg.k
        k_max = max(cfg.k_max, cfg.k)
        self.trackers = {"module": AcceptanceTracker(max(k_max, self.ngram_k)),
                         "host": AcceptanceTracker(max(k_max, self.ngram_k))}
        self.adaptive: AdaptiveK | None = None
        if cfg.adaptive_k:
            key = "module" if self.drafter_label in ("module", "hybrid") else "host"
            cost = 0.25 if key == "module" else 0.05  # one draft's price relative to a full pass
            self.adaptive = AdaptiveK(cfg.k, 1, k_max, cost, self.trackers[key])

    @property
    def uses_module(self) -> bool:
        return self.cfg.uses_module

    def plan(self, slot: int) -> _Plan:
        """How this slot takes part in the next round. Drafts never exceed what its budget can keep
        (remaining - 1: the round adds one token of the full model), so they also fit the context."""
        cap = self.budget - self.stats.produced - 1
        mode = self.cfg.mode
        if mode == "ar":
            return _Plan(0, 0)
        if mode == "recycle":
            return _Plan(min(1, cap), 1, chain=1, force=True)
        k = self.adaptive.next_k() if self.adaptive is not None else self.cfg.k
        if self.cfg.tree:  # a chain of k when the round cannot be a tree round (`Engine._shape`)
            return _Plan(min(k, cap), k, chain=k, tree=(self.cfg.tree, self.cfg.tree_topk))
        module_plan = _Plan(min(k, cap), k, chain=k)
        if self.drafter is None:
            return module_plan
        props = list(self.drafter.propose(slot, self.ctx, self.ngram_k))[:self.ngram_k]
        if self.drafter_label == "hybrid" and not prefer_ngram(self.trackers["module"], k, self.trackers["host"],
                                                              len(props)):
            return module_plan
        props = props[:max(cap, 0)]
        return _Plan(len(props), self.ngram_k if props else 0, host=props)


class Engine:
    """B decoding slots over one full model (and its recyclable module); see the module docstring.

    One engine owns the model's caches while it is used: do not interleave two engines of the same
    batch size on one model.
    """

    def __init__(self, model: FullModel, module: RecyclableModule | None, slots: int, compile: bool = False,
                 tokenizer: Decodes | None = None, stop_fn: StopFn | None = None, width: int | None = None,
                 batches: Sequence[int] | None = None, load_aware: bool = False):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise RecycleError(f"slots must be an integer >= 1, got {slots!r}")
        # The batch sizes a round may run at; the busy slots fill the first rows (see the module docstring).
        # A transformers model (generic backend) keeps a cache per row that cannot move to another row, and
        # skips idle rows itself: there a slot keeps its own row and rounds always cover every slot.
        self.batches = check_batches(batches, slots)
        self._compact = isinstance(model, FullModel)
        if not self._compact:
            self.batches = [slots]
        if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
            raise RecycleError(f"width must be an integer >= 1 or None, got {width!r}")
        # width None: a round is as wide as its widest request needs (a graph per width seen);
        # an int: every drafting round has this width, so a fixed set of graphs serves any mix of requests.
        self.width = width
        if module is not None and module.fc.in_features != 2 * model.cfg.dim:
            raise RecycleError("the recyclable module does not match the full model's width")
        self.model, self.module, self.slots, self.compile = model, module, slots, compile
        self.tokenizer, self.stop_fn = tokenizer, stop_fn
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.max_seq_len, self.vocab_size = model.cfg.max_seq_len, model.cfg.vocab_size
        self.junk = self.max_seq_len - 1  # the position idle slots and padding write to (`rounds`)
        # The engine's KV caches: one set per (batch, dtype) and model, kept (compiled graphs hold the tensors
        # they were traced with) and installed again before every use, so another engine or `generate` of
        # another batch size in between leaves this one's intact (two live engines of one batch size on one
        # model would share a set: don't).
        self._nets = [net for net in (model, module) if net is not None]
        self._caches: dict[int, list[torch.nn.ModuleList]] = {}  # per batch: each net's caches over its first rows
        with torch.no_grad():
            for b in self.batches:
                for net in self._nets:
                    compiled.stable_caches(net, slots, self.dtype, rows=b)
                self._caches[b] = [net.caches for net in self._nets]
        B, V, dev = slots, self.vocab_size, self.device
        width = model.cfg.dim if module is not None else 0
        with torch.inference_mode():  # like every tensor a round makes: graphs then see one kind of input
            self.state = SlotState(torch.zeros(B, dtype=torch.long, device=dev),
                                   torch.full((B,), self.junk, dtype=torch.long, device=dev),
                                   torch.zeros(B, V if module is not None else 0, dtype=self.dtype, device=dev),
                                   torch.zeros(B, width, dtype=self.dtype, device=dev))
            self.temperature = torch.zeros(B, device=dev)
            self.top_k = torch.zeros(B, dtype=torch.long, device=dev)
            self.top_p = torch.ones(B, device=dev)
        self._noise: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}
        self._slots: list[Request | None] = [None] * B
        self._row_of: dict[int, int] = {}  # busy slot -> its row (rows 0..len-1 where rows move: `_compact`)
        self._slot_at: list[int | None] = [None] * B  # row -> the slot in it
        self._compiled: set[tuple[RoundShape, int]] = set()  # (shape, batch) graphs that have run
        # load_aware: a greedy round whose drafts cost more than they bring at this batch runs without them
        # (`_fit_to_load`), judged from the rounds' measured seconds and the rows' live acceptance
        self.load_aware = load_aware
        self.costs: dict[tuple[RoundShape, int], float] = {}  # seconds per round, a moving average
        self._timed: dict[tuple[RoundShape, int], int] = {}  # rounds of each timed so far
        self.acceptance = AcceptanceRates()  # of module drafts, over every row and request
        self._undrafted_run = 0  # consecutive rounds `_fit_to_load` ran without drafts
        self.last_batch = 0  # the rows the latest round ran over
        self.last_shape: RoundShape | None = None  # the latest round's shape
        self.last_undrafted = False  # the latest round was a drafting round run without drafts (`load_aware`)
        self.stats = EngineStats()

    # ------------------------------------------------------------------ slots
    def free_slots(self) -> list[int]:
        return [b for b, s in enumerate(self._slots) if s is None]

    def decoding(self) -> list[int]:
        """Slots whose request is still decoding."""
        return [b for b, s in enumerate(self._slots) if s is not None and s.finish is None]

    def request(self, slot: int) -> Request:
        """The request in `slot` (prompt, generated tokens, finish reason, stats) until it is released."""
        s = self._slots[self._check_slot(slot)]
        if s is None:
            raise RecycleError(f"slot {slot} is free")
        return s

    def _check_slot(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.slots:
            raise RecycleError(f"slot must be an integer in 0..{self.slots - 1}, got {slot!r}")
        return slot

    def row(self, slot: int) -> int:
        """The cache row the request in `slot` sits in now (it changes when another request leaves)."""
        self.request(slot)
        return self._row_of[slot]

    @property
    def busy(self) -> int:
        """Slots taken (decoding, or finished and not yet released): the rows a round must cover."""
        return len(self._row_of)

    @torch.inference_mode()
    def release(self, slot: int) -> None:
        """Free a slot (finished or not): its request is dropped and the next admit may take it. The last
        busy row moves into the freed one, so the busy rows stay the first ones."""
        if self._slots[self._check_slot(slot)] is None:
            raise RecycleError(f"slot {slot} is already free")
        self._slots[slot] = None
        row, last = self._row_of.pop(slot), len(self._row_of)
        if not self._compact:
            last = row
        elif row != last:
            moved = self._slot_at[last]
            self._move_row(last, row, cache=self._slots[moved].finish is None)
            self._slot_at[row], self._row_of[moved] = moved, row
        self._slot_at[last] = None
        self._idle([last])

    def _move_row(self, src: int, dst: int, cache: bool) -> None:
        """Row src's state, settings and (cache: it still decodes) cache entries into row dst."""
        if cache:
            length = int(self.state.n[src])  # both nets' true entries sit at positions < n (`rounds`)
            for caches in self._caches[self.slots]:
                for c in caches:
                    c.move_row(src, dst, length)
        for t in (*self.state, self.temperature, self.top_k, self.top_p):
            t[dst] = t[src]

    def _idle(self, rows: list[int]) -> None:
        at = torch.tensor(rows, device=self.device)
        self.state.n[at] = self.junk
        self.temperature[at] = 0.0

    def admit(self, slot: int, prompt: Sequence[int], config: GenerationConfig | None = None) -> SlotOutput:
        """Start a request in a free slot: prefill its prompt and choose its first token."""
        return self.admit_many([(slot, prompt, config or GenerationConfig())])[0]

    @torch.inference_mode()
    def admit_many(self, requests: Sequence[tuple[int, Sequence[int], GenerationConfig]]) -> list[SlotOutput]:
        """Admit several requests at once; their prompts are prefilled in groups of similar length.
        Everything is checked before anything changes: a bad request raises and admits none."""
        new: list[tuple[int, Request]] = []
        taken = set()
        for slot, prompt, cfg in requests:
            self._check_slot(slot)
            if self._slots[slot] is not None or slot in taken:
                raise RecycleError(f"slot {slot} is busy; release it first (free slots: {self.free_slots()})")
            taken.add(slot)
            new.append((slot, self._new_request(slot, prompt, cfg)))
        if self.compile:
            for _, s in new:
                self._warm(s)
        for slot, s in new:
            self._slots[slot] = s
            row = self._row_of[slot] = len(self._row_of) if self._compact else slot
            self._slot_at[row] = slot
        started = [(slot, s) for slot, s in new if s.budget > 0]
        outputs = {slot: SlotOutput([], "length") for slot, s in new if s.budget == 0}
        for _, s in new:
            if s.budget == 0:
                s.finish = "length"
        if started:
            outputs.update(self._prefill(started))
        done = [self._row_of[slot] for slot, s in new if s.finish is not None]
        if done:
            self._idle(done)
        return [outputs[slot] for slot, _ in new]

    def _new_request(self, slot: int, prompt: Sequence[int], cfg: GenerationConfig) -> Request:
        if not isinstance(cfg, GenerationConfig):
            raise RecycleError(f"request settings must be a GenerationConfig, got {type(cfg).__name__}")
        cfg.validate()
        if not isinstance(cfg.max_new_tokens, int):
            raise RecycleError("max_new_tokens of one request must be one integer")
        if cfg.uses_module and self.module is None:
            what = "mode 'recycle'" if cfg.mode == "recycle" else f"drafter {cfg.drafter!r}"
            raise RecycleError(f"{what} needs a recyclable module (or use drafter='ngram' / mode='ar')")
        if cfg.tree == "auto":
            raise RecycleError("an engine runs one draft shape per request: resolve tree='auto' first "
                               "(decoding.auto.resolve_draft), or let RecycleGPT.generate/stream do it")
        prompt = self.check_prompt(prompt)
        if cfg.tree and not isinstance(self.model, FullModel):
            raise RecycleError("draft trees need recyclegpt's own model; this one runs through transformers "
                               "(generic backend): set tree=0")
        if cfg.tree and cfg.mode == "verify":
            depth = self.width or cfg.k  # a fixed-width engine's trees are `width` deep
            most = tree_candidates(depth, cfg.tree_topk)
            if cfg.tree > most:
                raise RecycleError(f"a tree of depth {depth} and top-k {cfg.tree_topk} has at most {most} candidate "
                                   f"nodes, got tree={cfg.tree}; raise k or tree_topk, or lower tree")
        if self.width is not None and cfg.mode != "ar":
            need = 1 if cfg.mode == "recycle" else max(cfg.k_max if cfg.adaptive_k else cfg.k, cfg.ngram_k or 0)
            if need > self.width:
                raise RecycleError(f"the request drafts up to {need} tokens (k / k_max / ngram_k); this engine's "
                                   f"rounds hold {self.width}: lower k or make the engine wider")
        stopper = StopChecker(cfg.eos_ids, cfg.stop_strings, self.tokenizer, self.stop_fn)
        budget = min(cfg.max_new_tokens, self.max_seq_len - len(prompt))
        return Request(slot, prompt, cfg, budget, stopper)

    def check_prompt(self, prompt: Sequence[int]) -> list[int]:
        """The prompt as a list of ids, or a RecycleError saying what is wrong with it."""
        try:
            prompt = [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise RecycleError("a prompt must be a sequence of token ids") from None
        if not prompt:
            raise RecycleError("the prompt is empty; give at least one token")
        if len(prompt) >= self.max_seq_len:
            raise RecycleError(f"the prompt has {len(prompt)} tokens; the model's limit is {self.max_seq_len} "
                               "including at least one new token")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise RecycleError(f"the prompt has token ids outside 0..{self.vocab_size - 1}")
        return prompt

    def _prefill(self, started: list[tuple[int, Request]]) -> dict[int, SlotOutput]:
        t0 = time.perf_counter()
        self._install_caches()  # every row (compiling a round may have left a smaller batch's views)
        slots = [self._row_of[slot] for slot, _ in started]  # their rows
        for row, (_, s) in zip(slots, started, strict=True):
            # float(): a Python int beyond int64 (temperature=2**63 is in range) would overflow the assignment
            self.temperature[row] = float(s.cfg.temperature)
            self.top_k[row] = s.cfg.top_k
            self.top_p[row] = float(s.cfg.top_p)
        module = self.module if any(s.uses_module for _, s in started) else None
        first, g, mlogits, passes = prefill(self.model, module, [s.prompt for _, s in started], slots,
                                            self._choose_first)
        rows = torch.tensor(slots, device=self.device)
        self.state.pending[rows] = first
        self.state.n[rows] = torch.tensor([len(s.prompt) for _, s in started], device=self.device)
        if g is not None:
            self.state.g[rows] = g.to(self.dtype)
            self.state.mlogits[rows] = mlogits.to(self.dtype)
        self.stats.prefill_passes += passes
        out = {slot: self._emit(slot, s, [t]) for (slot, s), t in zip(started, first.tolist(), strict=True)}
        self.stats.prefill_s += time.perf_counter() - t0
        return out

    def _choose_first(self, row: int, logits: Tensor) -> Tensor:
        """The first new token of the request in `row` from its prefill's logits [1, V]."""
        s = self._slots[self._slot_at[row]]
        noise = torch.ones_like(logits, dtype=torch.float32)
        if s.sampled:
            noise[0].exponential_(generator=s.generator)
        at = slice(row, row + 1)
        tok, _ = pick(logits, s.sampled, self.temperature[at], self.top_k[at], self.top_p[at], noise)
        return tok

    # ------------------------------------------------------------------ rounds
    def _install_caches(self, batch: int | None = None) -> None:
        """Put the engine's caches over the first `batch` rows (default: all) on its nets."""
        for net, caches in zip(self._nets, self._caches[batch or self.slots], strict=True):
            if net.caches is not caches:
                net.caches = caches

    def _round_fn(self, shape: RoundShape, batch: int):
        """The round over the first `batch` rows (their caches installed)."""
        self._install_caches(batch)
        if self.compile:
            return compiled.compiled_round(self.model, self.module, shape, batch)
        return functools.partial(decode_round, self.model, self.module, shape)

    def _batch(self, shape: RoundShape) -> int:
        """The batch a round of `shape` runs at: the smallest of the ladder that holds the busy rows, or
        (compiled) the smallest such whose graph is compiled already; none compiled: the smallest (it
        compiles now)."""
        fits = [b for b in self.batches if b >= self.busy]
        if self.compile:
            for b in fits:
                if (shape, b) in self._compiled:
                    return b
        return fits[0]

    def compiled_batches(self) -> dict[str, list[int]]:
        """The batches each compiled round shape has a graph for, by `compiled.round_kind`. Safe to call
        from another thread (a copy of the set is taken at once)."""
        out: dict[str, list[int]] = {}
        for shape, b in sorted(list(self._compiled), key=lambda x: x[1]):
            out.setdefault(compiled.round_kind(shape), []).append(b)
        return out

    def _buffers(self, shape: RoundShape, batch: int) -> list[Tensor]:
        """Noise buffers of a round shape over the first `batch` rows, refilled per row from each request's
        own generator."""
        sizes = tree_noise_sizes(shape) if shape.tree else (shape.width, shape.width)
        bufs = self._noise.get(sizes)
        if bufs is None:
            B, V, dev = self.slots, self.vocab_size, self.device
            with torch.inference_mode():
                bufs = self._noise[sizes] = (torch.ones(B, sizes[0], V, device=dev),
                                             torch.zeros(B, sizes[1], device=dev), torch.ones(B, V, device=dev))
        return self._rows(bufs, batch)

    def _inputs(self, shape: RoundShape, plans: dict[int, _Plan], batch: int) -> RoundInputs:
        """The round's inputs over the first `batch` rows; plans are by slot."""
        dev, width = self.device, shape.width
        lens, force, host = [0] * batch, [False] * batch, [False] * batch
        drafts = [[0] * width for _ in range(batch)]
        rows = {self._row_of[slot]: (slot, p) for slot, p in plans.items()}
        for b, (_, p) in rows.items():
            lens[b], force[b] = p.lens, p.force
            if p.host is not None:
                host[b] = True
                drafts[b][:len(p.host)] = p.host
        draft_noise, accept_noise, next_noise = self._buffers(shape, batch)
        for b, (slot, p) in rows.items():
            s = self._slots[slot]
            if not s.sampled:
                continue
            # The row's draws depend on its own plan and the kind of round only, never on the batch.
            if shape.tree:  # the module's draws, one per depth, one uniform per (depth, sibling)
                draft_noise[b].exponential_(generator=s.generator)
                accept_noise[b].uniform_(generator=s.generator)
                continue
            if p.lens:
                if p.host is None:
                    draft_noise[b, :p.lens].exponential_(generator=s.generator)
                accept_noise[b, :p.lens].uniform_(generator=s.generator)
            next_noise[b].exponential_(generator=s.generator)
        return RoundInputs(torch.tensor(lens, device=dev), torch.tensor(force, device=dev),
                           torch.tensor(host, device=dev), torch.tensor(drafts, dtype=torch.long, device=dev),
                           *self._rows((self.temperature, self.top_k, self.top_p), batch),
                           draft_noise, accept_noise, next_noise)

    def _rows(self, tensors: Sequence[Tensor], batch: int) -> list[Tensor]:
        """Per-row tensors over the first `batch` rows (views)."""
        return list(tensors) if batch == self.slots else [t[:batch] for t in tensors]

    def _shape(self, plans: dict[int, _Plan]) -> RoundShape:
        reqs = [self._slots[b] for b in plans]
        module, sampled = any(s.uses_module for s in reqs), any(s.sampled for s in reqs)
        filtered = any(s.cfg.filtered for s in reqs)
        trees = [p.tree for p in plans.values() if p.tree is not None]
        if trees and not any(p.force for p in plans.values()):
            # A tree round (`rounds.tree_round`): every drafting row takes part, module rows with the tree,
            # host rows as a chain; deep enough for every row's k and wide enough for every node budget.
            depth = max(p.width for p in plans.values())
            return self._tree_shape(max(n for n, _ in trees), depth, max(c for _, c in trees), module, sampled,
                                    filtered)
        width, chain = max(p.width for p in plans.values()), max(p.chain for p in plans.values())
        if self.width is not None:
            width, chain = (self.width if width else 0), (self.width if chain else 0)
        return RoundShape(width, chain, module, sampled, filtered=filtered)

    def _time_round(self, key: tuple[RoundShape, int], seconds: float) -> None:
        """Fold a round's seconds into `costs`: its first round is dropped (allocations, first-call setup: it can
        take many rounds' time, which a moving average would remember for long), the next COST_WINDOW averaged,
        then a moving average."""
        n = self._timed[key] = self._timed.get(key, -1) + 1
        if n == 0:
            return
        known = self.costs.get(key, 0.0)
        weight = 1 - 1 / n if n <= COST_WINDOW else COST_DECAY
        self.costs[key] = weight * known + (1 - weight) * seconds

    @staticmethod
    def undrafted_shape(shape: RoundShape) -> RoundShape:
        """A greedy chain round's shape without drafts: one token per row, the module's catch-up kept (so the
        next round can draft again)."""
        return RoundShape(0, 0, shape.module, False, filtered=shape.filtered)

    def _fit_to_load(self, shape: RoundShape, plans: dict[int, _Plan]) -> tuple[RoundShape, dict[int, _Plan]]:
        """Load-aware drafting: run this round without drafts when that yields more tokens per second.

        Drafts pay while a k+1-token pass costs little more than a one-token pass; with many rows busy the
        wider pass costs more, and drafts that are often rejected stop paying. From the measured seconds of
        both rounds at their batch and the live acceptance of module drafts over every row (`acceptance`, from
        the first drafted round on: no prior): undrafted when rows / cost(undrafted) > sum(1 + E[accepted
        drafts]) / cost(drafted). Only greedy module-chain rounds (their text does not depend on which rounds
        run; a seeded sampled request keeps the draws it would make offline), and only with the undrafted graph
        compiled already. Undrafted rounds are tried until one is timed at the batch, and after REFRESH_ROUNDS
        undrafted rounds in a row a drafted one runs to refresh the acceptance."""
        if shape.sampled or shape.tree or not shape.chain or any(p.force or p.host is not None
                                                                  for p in plans.values()):
            return shape, plans
        plain = self.undrafted_shape(shape)
        b_drafted, b_plain = self._batch(shape), self._batch(plain)
        if self.compile and (plain, b_plain) not in self._compiled:
            return shape, plans
        drafted_s, plain_s = self.costs.get((shape, b_drafted)), self.costs.get((plain, b_plain))
        if drafted_s is None or self._undrafted_run >= REFRESH_ROUNDS:
            self._undrafted_run = 0
            return shape, plans
        if plain_s is not None:
            tokens = sum(1 + self.acceptance.expected_accepted(p.lens) for p in plans.values())
            if tokens / drafted_s >= len(plans) / plain_s:
                self._undrafted_run = 0
                return shape, plans
        self._undrafted_run += 1
        return plain, {b: _Plan(0, 0) for b in plans}

    def _tree_shape(self, nodes: int, depth: int, topk: int, module: bool, sampled: bool,
                    filtered: bool) -> RoundShape:
        """The tree round for these needs; a fixed-width engine's trees are always `width` deep. Admission
        checked every request's tree against `tree_candidates` of its depth, so the largest fits the deepest."""
        if self.width is not None:
            depth = self.width
        return RoundShape(max(nodes, depth), 0, module, sampled, depth=depth, topk=topk, filtered=filtered)

    @torch.inference_mode()
    def step(self) -> list[SlotOutput | None]:
        """One round: exactly one full-model pass over the busy slots' rows (`_batch`). Returns, per slot,
        what it produced (None for slots not decoding)."""
        active = self.decoding()
        if not active:
            raise RecycleError("no request is decoding: admit one first")
        t0 = time.perf_counter()
        plans = {b: self._slots[b].plan(b) for b in active}
        shape = planned = self._shape(plans)
        if self.load_aware:
            shape, plans = self._fit_to_load(shape, plans)
        self.last_undrafted = shape != planned
        self.stats.undrafted += self.last_undrafted
        batch = self._batch(shape)
        state = SlotState(*self._rows(self.state, batch))
        t_round = time.perf_counter()
        vals, state = self._round_fn(shape, batch)(state, self._inputs(shape, plans, batch))
        if self.compile:
            self._compiled.add((shape, batch))
        if batch == self.slots:
            self.state = state
        else:
            for full, part in zip(self.state, state, strict=True):
                full[:batch] = part
        rows = vals.tolist()  # the round's one host sync
        if self.load_aware:  # what `_fit_to_load` judges by
            self._time_round((shape, batch), time.perf_counter() - t_round)
            self.acceptance.fade()
        self.stats.steps += 1
        self.last_batch, self.last_shape = batch, shape
        self.stats.batches[batch] = self.stats.batches.get(batch, 0) + 1
        self.stats.module_passes += shape.module_passes
        outputs: list[SlotOutput | None] = [None] * self.slots
        for b in active:
            s, p, row = self._slots[b], plans[b], rows[self._row_of[b]]
            a = row[0]
            s.stats.rounds += 1
            if s.cfg.mode == "verify":
                label = "module" if p.host is None else s.drafter_label
                label = "ngram" if label == "hybrid" else label
                s.stats.drafter_rounds[label] = s.stats.drafter_rounds.get(label, 0) + 1
                s.stats.k_used.append(p.width)
                if p.lens:
                    s.stats.count_acceptance(p.lens, a)
                    s.trackers["module" if p.host is None else "host"].update(p.lens, a)
                    if p.host is None and self.load_aware:
                        self.acceptance.update(p.lens, a)
            outputs[b] = self._emit(b, s, row[1:a + 2])
        done = [self._row_of[b] for b in active if self._slots[b].finish is not None]
        if done:
            self._idle(done)
        self.stats.decode_s += time.perf_counter() - t0
        return outputs

    def _emit(self, slot: int, s: Request, toks: list[int]) -> SlotOutput:
        """Apply the budget and stops to a slot's proposed new tokens."""
        toks = toks[:s.budget - s.stats.produced]
        start = len(s.generated)
        s.generated.extend(toks)
        keep, reason = s.stopper.scan(slot, s.generated, start)
        s.stats.produced += keep - start + (reason == "eos")
        del s.generated[keep:]
        emitted = s.generated[start:]
        s.ctx.extend(emitted)
        if reason is None and s.stats.produced >= s.budget:
            reason = "length"
        s.finish = reason
        return SlotOutput(emitted, reason)

    # ------------------------------------------------------------------ compiling
    def shapes_for(self, cfg: GenerationConfig) -> list[RoundShape]:
        """The round shapes a request decoding alone uses (adaptive k: its start value only)."""
        sampled, uses, filtered = cfg.temperature > 0, cfg.uses_module, cfg.filtered

        def shape(width: int, chain: int, module: bool) -> RoundShape:
            return RoundShape(width, chain, module, sampled, filtered=filtered)

        if cfg.mode == "verify" and cfg.tree:
            return [self._tree_shape(cfg.tree, cfg.k, cfg.tree_topk, True, sampled, filtered)]
        if self.width is not None:
            W = self.width
            if cfg.mode == "ar":
                return [shape(0, 0, False)]
            if cfg.mode == "recycle" or cfg.drafter in ("module", "hybrid"):
                return [shape(W, W, True)]
            return [shape(0, 0, uses), shape(W, 0, uses)]
        if cfg.mode == "ar":
            return [shape(0, 0, False)]
        if cfg.mode == "recycle":
            return [shape(1, 1, True)]
        host_k = cfg.ngram_k or cfg.k
        if cfg.drafter == "module":
            return [shape(cfg.k, cfg.k, True)]
        if cfg.drafter == "hybrid":
            return [shape(cfg.k, cfg.k, True), shape(max(host_k, cfg.k), cfg.k, True)]
        return [shape(0, 0, uses), shape(host_k, 0, uses)]

    def _warm(self, s: Request) -> None:
        """Compile what the request's rounds need where no batch that could hold it has a graph yet (`_batch`
        picks a compiled one where there is one, and `warm_up` then does nothing)."""
        for shape in self.shapes_for(s.cfg):
            self.warm_up(shape, self._batch(shape))

    @torch.inference_mode()
    def warm_up(self, shape: RoundShape, batch: int | None = None) -> float:
        """Compile the graph of `shape` over `batch` rows (default: all slots) now (no-op when eager or
        already compiled); returns the seconds. It runs with every row idle: only the junk position is
        written, so running slots are unharmed."""
        if not self.compile:
            return 0.0
        batch = self.slots if batch is None else batch
        if batch not in self.batches:
            raise RecycleError(f"batch {batch} is not one of this engine's batches {self.batches}")
        fn = self._round_fn(shape, batch)
        if not fn.first:
            self._compiled.add((shape, batch))
            return 0.0
        t0 = time.perf_counter()
        state = SlotState(*self._rows(self.state, batch))
        idle = state._replace(n=torch.full_like(state.n, self.junk))
        fn(idle, self._inputs(shape, {}, batch))  # no plans: no drafts, nothing drawn
        self._compiled.add((shape, batch))  # only once it compiled: a failed graph is never picked
        return time.perf_counter() - t0


def check_batches(batches: Sequence[int] | None, slots: int) -> list[int]:
    """An engine's batch ladder, sorted, always ending at `slots` (None: `slots` alone)."""
    if batches is None:
        return [slots]
    try:
        out = sorted({int(b) for b in batches} | {slots})
        bad = any(isinstance(b, bool) or int(b) != b for b in batches)
    except (TypeError, ValueError):
        out, bad = [], True
    if bad or out[0] < 1 or out[-1] > slots:
        raise RecycleError(f"batches must be integers in 1..{slots} (the slots), got {batches!r}")
    return out


def ladder(slots: int) -> list[int]:
    """The default batch ladder of an engine with `slots` slots: powers of two below it, then `slots`."""
    return sorted({1 << i for i in range(slots.bit_length()) if 1 << i < slots} | {slots})


def seed_for_row(seed: int | None, row: int) -> int | None:
    """The seed of row `row` of a batch whose config has `seed`: rows draw independent streams."""
    return None if seed is None else (seed * 0x9E3779B97F4A7C15 + row) % (1 << 63)


def row_configs(config: GenerationConfig, batch: int) -> list[GenerationConfig]:
    """One request config per row of a batch: its own token budget and seed."""
    budgets = config.row_budgets(batch)
    return [replace(config, max_new_tokens=b, seed=seed_for_row(config.seed, i)) for i, b in enumerate(budgets)]
