"""The decoding loop: batch state, one `step()` per full-model pass, events, counters.

`Decoder` holds the per-row (slot) state on the host (token history, budget, finish reason) and
the per-row device state (position n of the pending token, the pending token, the module's
catch-up inputs). Each `step()` makes exactly one full-model pass for the whole batch, does one
host sync, and returns a `StepEvent` with every row's newly accepted tokens. Finished rows stay in
the batch as frozen slots (their device position is pinned at 0 and their outputs ignored), which
is the seam for continuous batching: a server would prefill a new sequence into a free slot
between steps (`HostDrafter.reset(row)` exists for that) instead of waiting for the batch to end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import RecycleError
from ..model import FullModel
from ..module import RecyclableModule
from . import compiled, steps
from .drafters import AcceptanceTracker, AdaptiveK, HostDrafter, NgramDrafter, prefer_ngram
from .options import GenerationConfig
from .sampling import Picker
from .stops import Decodes, StopChecker, StopFn, trim_at_stop


@dataclass
class DecodeStats:
    """Counters of one generation. Passes are batched calls (one call over B rows counts once).

    tau (mean accepted length) = new tokens / full passes during decoding, per row-pass: the token
    the prefill produces and the prefill pass itself are excluded, the bonus token is included.
    acceptance_by_position[i] = P(draft i+1 accepted | drafts 1..i accepted), over active rows.
    """

    mode: str
    batch_size: int
    k: int | None = None
    prefill_passes: int = 0
    full_passes: int = 0
    module_passes: int = 0
    new_tokens: list[int] = field(default_factory=list)  # per row, including a final EOS
    row_passes: list[int] = field(default_factory=list)  # per row, decode passes while active
    proposed_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    drafter_rounds: dict[str, int] = field(default_factory=dict)  # row-rounds per drafter:
    # 'module', 'ngram', or 'host' (a HostDrafter object)
    k_used: list[int] = field(default_factory=list)  # k of every verify round
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tau(self) -> float:
        passes = sum(self.row_passes)
        produced = sum(max(0, t - 1) for t in self.new_tokens)
        return produced / passes if passes else float("nan")

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / p for a, p in zip(self.accepted_by_position, self.proposed_by_position, strict=True) if p]

    @property
    def total_new_tokens(self) -> int:
        return sum(self.new_tokens)

    @property
    def tokens_per_s(self) -> float:
        t = self.prefill_s + self.decode_s
        return self.total_new_tokens / t if t > 0 else float("nan")

    def count_acceptance(self, proposed: int, accepted: int) -> None:
        while len(self.proposed_by_position) < proposed:
            self.proposed_by_position.append(0)
            self.accepted_by_position.append(0)
        for i in range(min(proposed, accepted + 1)):
            self.proposed_by_position[i] += 1
            if i < accepted:
                self.accepted_by_position[i] += 1


@dataclass
class StepEvent:
    """One decoding step: tokens[b] are row b's newly accepted tokens (possibly none)."""

    step: int  # 0 = prefill
    tokens: list[list[int]]
    finish_reasons: list[str | None]  # per row: None while running, else 'eos' | 'stop' | 'length'
    done: bool


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (no EOS; a stop string's last token included)
    finish_reasons: list[str | None]
    stats: DecodeStats
    texts: list[str] | None = None  # decoded, cut before any stop string (with a tokenizer)


@dataclass
class _Row:
    prompt: list[int]
    budget: int
    ctx: list[int]  # prompt + generated; its last token is the pending one
    generated: list[int] = field(default_factory=list)
    produced: int = 0  # tokens produced, a final EOS included
    finish: str | None = None


def _ensure_caches(net: torch.nn.Module, batch: int, dtype: torch.dtype) -> None:
    caches = net.caches
    if len(caches) and caches[0].k_cache.shape[0] == batch and caches[0].k_cache.dtype == dtype:
        return
    net.setup_caches(batch, dtype)


class Decoder:
    """One batch of prompts decoded step by step (see the module docstring)."""

    def __init__(self, model: FullModel, module: RecyclableModule | None, config: GenerationConfig,
                 tokenizer: Decodes | None = None, stop_fn: StopFn | None = None):
        config.validate()
        if config.uses_module:
            if module is None:
                what = "mode 'recycle'" if config.mode == "recycle" else f"drafter {config.drafter!r}"
                raise RecycleError(f"{what} needs a recyclable module (or use drafter='ngram' / mode='ar')")
            if module.fc.in_features != 2 * model.cfg.dim:
                raise RecycleError("the recyclable module does not match the full model's width")
        self.model, self.module, self.cfg = model, module, config
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.max_seq_len = model.cfg.max_seq_len
        self.vocab_size = model.cfg.vocab_size
        gen = torch.Generator(device=self.device)
        if config.seed is None:
            gen.seed()
        else:
            gen.manual_seed(config.seed)
        self.picker = Picker(config.temperature, config.top_k, config.top_p, gen)
        self.stopper = StopChecker(config.eos_ids, config.stop_strings, tokenizer, stop_fn)
        self.tokenizer = tokenizer
        self.use_module = config.uses_module
        self.host_drafter: HostDrafter | None = None
        self.drafter_name = config.drafter if isinstance(config.drafter, str) else "host"
        self.host_label = "ngram" if self.drafter_name in ("ngram", "hybrid") else "host"
        if config.mode == "verify" and self.drafter_name != "module":
            if isinstance(config.drafter, str):
                min_n = config.ngram_min_n or (2 if config.drafter == "hybrid" else 1)
                self.host_drafter = NgramDrafter(config.ngram_max_n, min(min_n, config.ngram_max_n))
            else:
                self.host_drafter = config.drafter
        self.ngram_k = config.ngram_k or config.k
        self.hybrid = self.drafter_name == "hybrid"
        k_max = max(config.k_max, config.k)
        track = max(k_max, self.ngram_k)
        self.trackers = {"module": AcceptanceTracker(track), "host": AcceptanceTracker(track)}
        self.adaptive: AdaptiveK | None = None
        if config.adaptive_k:
            key = "module" if self.drafter_name in ("module", "hybrid") else "host"
            cost = 0.25 if key == "module" else 0.05  # one draft's price relative to a full pass
            self.adaptive = AdaptiveK(config.k, 1, k_max, cost, self.trackers[key])
        self.rows: list[_Row] = []
        self.stats = DecodeStats(config.mode, 0)
        self._step = 0
        self._aranges: dict[int, Tensor] = {}
        # compile=True: compiled rounds (decoding.compiled), looked up once per (kind, k) and batch.
        self.compiled = config.compile
        self._sampling: compiled.Sampling = None if self.picker.greedy else (
            self.picker.temperature, self.picker.top_k, self.picker.top_p)
        self._noise = compiled.Noise(gen)
        self._rounds: dict[tuple, object] = {}

    # ---------------------------------------------------------------- public loop
    @property
    def done(self) -> bool:
        return all(r.finish is not None for r in self.rows)

    def start(self, prompts: Sequence[Sequence[int]]) -> StepEvent:
        """Prefill every row (one full pass, one module pass when the mode uses the module)."""
        budgets = self.cfg.row_budgets(len(prompts))
        if not prompts:
            raise RecycleError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise RecycleError(f"prompt {i} is empty; give at least one token")
            if len(p) >= self.max_seq_len:
                raise RecycleError(f"prompt {i} has {len(p)} tokens; the model's limit is "
                                   f"{self.max_seq_len} including at least one new token")
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise RecycleError(f"prompt {i} has token ids outside 0..{self.vocab_size - 1}")
        B = len(prompts)
        self.rows = [_Row(list(p), min(b, self.max_seq_len - len(p)), list(p))
                     for p, b in zip(prompts, budgets, strict=True)]
        self.stats = DecodeStats(self.cfg.mode, B, self.cfg.k if self.cfg.mode == "verify" else None,
                                 new_tokens=[0] * B, row_passes=[0] * B)
        if self.host_drafter is not None:
            for b in range(B):
                self.host_drafter.reset(b)
        ensure = compiled.stable_caches if self.compiled else _ensure_caches
        with torch.no_grad():
            ensure(self.model, B, self.dtype)
            if self.use_module:
                ensure(self.module, B, self.dtype)
        self.rows_t = torch.arange(B, device=self.device)
        self._frozen: Tensor | None = None  # long [B]: 0 for finished rows, 1 otherwise
        self._step = 0
        if all(r.budget == 0 for r in self.rows):
            for r in self.rows:
                r.finish = "length"
            return StepEvent(0, [[] for _ in self.rows], [r.finish for r in self.rows], True)
        t0 = time.perf_counter()
        if self.compiled and self.host_drafter is not None and self.cfg.mode == "verify":
            self._warm_host_round()
        event = self._prefill()
        self.stats.prefill_s += time.perf_counter() - t0
        return event

    def step(self) -> StepEvent:
        """One decoding step (exactly one full-model pass over the batch)."""
        if self.done:
            raise RuntimeError("all rows are finished")
        t0 = time.perf_counter()
        self._step += 1
        mode = self.cfg.mode
        if mode == "ar":
            event = self._step_ar()
        elif mode == "recycle":
            event = self._step_recycle()
        else:
            event = self._step_verify()
        self.stats.decode_s += time.perf_counter() - t0
        return event

    # ---------------------------------------------------------------- steps
    def _arange(self, n: int) -> Tensor:
        a = self._aranges.get(n)
        if a is None:
            a = self._aranges[n] = torch.arange(n, device=self.device)
        return a

    @torch.inference_mode()
    def _prefill(self) -> StepEvent:
        prompts = [r.prompt for r in self.rows]
        logits, h = steps.prefill(self.model, self.module if self.use_module else None, prompts, self.device)
        self.stats.prefill_passes += 1
        tok, _ = self.picker.pick(logits)
        self.pending = tok
        self.n = torch.tensor([len(p) for p in prompts], device=self.device)
        if self.use_module:
            # the module's entry at n-1 reads (h_{n-1}, x_n): the first catch-up
            self.cu: steps.CatchUp = (tok[:, None], h[:, None], (self.n - 1)[:, None], None)
            if self.compiled:  # compiled rounds carry the catch-up's result (same shapes every round)
                self.mlogits, self.g = steps.module_catch_up(self.model, self.module, self.cu, self.rows_t)
                self.stats.module_passes += 1
        return self._emit([[t] for t in tok.tolist()], passes=False)

    def _compiled_round(self, kind: str, k: int | None = None, eager: bool = False):
        key = (kind, k, eager, len(self.rows))
        fn = self._rounds.get(key)
        if fn is None:
            make = compiled.eager_round if eager else compiled.compiled_round
            module = self.module if self.use_module else None  # e.g. `ngram` has no module caches
            args = (kind, self.model, module, k, self._sampling) if eager else (
                kind, self.model, module, len(self.rows), k, self._sampling)
            fn = self._rounds[key] = make(*args)
        return fn

    def _expo(self, *shape: int, slot: str = "e") -> Tensor:
        return self._noise.expo((len(self.rows), *shape, self.vocab_size), self.device, slot)

    @torch.inference_mode()
    def _step_ar(self) -> StepEvent:
        if self.compiled:
            noise = () if self._sampling is None else (self._expo(),)
            tok, self.n = self._compiled_round("ar")(self.pending, self.n, *noise)
        else:
            logits, _ = steps.decode_one(self.model, self.pending[:, None], self.n[:, None])
            tok, _ = self.picker.pick(logits)
            self.n.add_(1)
        self.stats.full_passes += 1
        self.pending = tok
        self._freeze()
        return self._emit([[t] for t in tok.tolist()])

    @torch.inference_mode()
    def _step_recycle(self) -> StepEvent:
        if self.compiled:
            noise = () if self._sampling is None else (self._expo(2),)
            out, self.pending, self.n, self.mlogits = self._compiled_round("recycle")(
                self.pending, self.n, self.mlogits, *noise)
        else:
            out, self.pending, self.cu = steps.recycle_round(
                self.model, self.module, self.pending, self.n, self.cu, self.picker, self.rows_t, self._arange(2))
            self.n.add_(2)
        self.stats.full_passes += 1
        self.stats.module_passes += 1
        self._freeze()
        return self._emit(out.tolist())

    def _fits(self, active: list[int]) -> int:
        """Most drafts that fit this round: positions n..n+k must exist (< max_seq_len) for every row."""
        return self.max_seq_len - 1 - max(len(self.rows[b].ctx) - 1 for b in active)

    def _draft_cap(self, active: list[int]) -> int:
        """Most drafts any row can use this round: they must fit, and more than remaining-1 drafts can
        never all be kept."""
        remaining = max(self.rows[b].budget - self.rows[b].produced for b in active)
        return max(1, min(self._fits(active), remaining - 1))

    @torch.inference_mode()
    def _warm_host_round(self) -> None:
        """Compile the host-draft graph now, not at the first n-gram match in the middle of a run. It
        runs on dummy inputs at positions 0..K before the prefill, which then overwrites those cache
        entries (later positions are masked until decoding writes them). Once compiled, nothing runs."""
        K = self.ngram_k
        if K + 1 > self.max_seq_len:
            return
        fn = self._compiled_round("verify_host", K)
        if not getattr(fn, "first", True):
            return
        B, dev = len(self.rows), self.device
        zeros = torch.zeros(B, dtype=torch.long, device=dev)
        # Constant noise of the right shapes: the run's random stream must not depend on whether this ran.
        noise = () if self._sampling is None else (torch.full((B, K), 0.5, device=dev),
                                                   torch.ones(B, self.vocab_size, device=dev))
        fn(zeros, zeros.clone(), zeros.new_zeros(B, K), zeros.clone(), *noise)

    def _verify_compiled_host(self, active: list[int], k: int) -> StepEvent | None:
        """A compiled round on the host drafter's proposals, padded to K = ngram_k (one graph), when every
        active row takes them (the hybrid: when each prefers them to the module's chain). None: the
        round goes to the module's graph instead (or, without a module, to the compiled `ar` step when
        no row has a proposal)."""
        K = self.ngram_k
        fits = self._fits(active)
        eager = K > fits  # near max_seq_len: fewer drafts, the same round run eagerly
        K = max(1, min(K, fits))
        props, use_mod = self._host_proposals(active, k, K)
        if any(use_mod):
            return None
        if not self.use_module and not any(props):
            return self._step_ar()
        B = len(self.rows)
        drafts = torch.tensor([p + [0] * (K - len(p)) for p in props], dtype=torch.long, device=self.device)
        lens = torch.tensor([len(p) for p in props], dtype=torch.long, device=self.device)
        noise = () if self._sampling is None else (self._noise.uniform((B, K), self.device), self._expo(slot="e2"))
        vals, self.pending, self.n, mlogits, g = self._compiled_round("verify_host", K, eager)(
            self.pending, self.n, drafts, lens, *noise)
        if self.use_module:
            self.mlogits, self.g = mlogits, g
            self.stats.module_passes += 1
        self.stats.k_used.append(max(map(len, props)))
        self.stats.full_passes += 1
        return self._finish_verify(vals.tolist(), [len(p) for p in props], ["host"] * B)

    def _verify_compiled(self, active: list[int], k: int) -> tuple[list[list[int]], int]:
        """One compiled verify round (k = the configured or adaptive k; never capped by the budget, which
        would compile another graph: tokens past a row's budget are dropped by `_emit`). Near
        max_seq_len, where k drafts do not fit, the same round runs eagerly with fewer drafts."""
        fits = self._fits(active)
        eager = k > fits
        k = max(1, min(k, fits))
        noise = () if self._sampling is None else (
            self._expo(k), self._noise.uniform((len(self.rows), k), self.device), self._expo(slot="e2"))
        vals, self.pending, self.n, self.mlogits, self.g = self._compiled_round("verify", k, eager)(
            self.pending, self.n, self.mlogits, self.g, *noise)
        return vals.tolist(), k

    @torch.inference_mode()
    def _step_verify(self) -> StepEvent:
        active = [b for b, r in enumerate(self.rows) if r.finish is None]
        if self.compiled:
            k = self.adaptive.next_k() if self.adaptive is not None else self.cfg.k
            if self.host_drafter is not None:
                event = self._verify_compiled_host(active, k)
                if event is not None:
                    return event
            vals, k = self._verify_compiled(active, k)
            self.stats.k_used.append(k)
            self.stats.module_passes += k
            self.stats.full_passes += 1
            return self._finish_verify(vals, [k] * len(self.rows), ["module"] * len(self.rows))
        cap = self._draft_cap(active)
        k = min(self.adaptive.next_k() if self.adaptive is not None else self.cfg.k, cap)
        self.stats.k_used.append(k)
        if self.host_drafter is None:
            out, accepted, self.pending, self.cu = steps.verify_round_module(
                self.model, self.module, self.pending, self.n, self.cu, k, self.picker, self.rows_t,
                self._arange(k + 1))
            self.stats.module_passes += k
            proposed = [k] * len(self.rows)
            kinds = ["module"] * len(self.rows)
        else:
            out, accepted, proposed, kinds = self._verify_with_host_drafts(active, k, cap)
        self.stats.full_passes += 1
        vals = torch.cat([accepted[:, None], out], 1).tolist()
        self.n.add_(accepted + 1)
        return self._finish_verify(vals, proposed, kinds)

    def _finish_verify(self, vals: list[list[int]], proposed: list[int], kinds: list[str]) -> StepEvent:
        """vals[b] = [accepted, tokens...]: counters, trackers and the event of one verify round."""
        self._freeze()
        new = []
        for b, row_vals in enumerate(vals):
            a = row_vals[0]
            new.append(row_vals[1:a + 2])
            if self.rows[b].finish is None:
                self.stats.count_acceptance(proposed[b], a)
                label = kinds[b] if kinds[b] == "module" else self.host_label
                self.stats.drafter_rounds[label] = self.stats.drafter_rounds.get(label, 0) + 1
                self.trackers[kinds[b]].update(proposed[b], a)
        return self._emit(new)

    def _host_proposals(self, active: list[int], k: int, k_host: int) -> tuple[list[list[int]], list[bool]]:
        """Per row: the host drafter's proposal (at most k_host tokens) and, for the hybrid, whether the
        module's chain of k promises more accepted tokens than it (finished rows: [], False)."""
        B = len(self.rows)
        props: list[list[int]] = [[] for _ in range(B)]
        for b in active:
            props[b] = self.host_drafter.propose(b, self.rows[b].ctx, k_host)[:k_host]
        use_mod = [False] * B
        if self.hybrid:
            for b in active:
                use_mod[b] = not prefer_ngram(self.trackers["module"], k, self.trackers["host"], len(props[b]))
        return props, use_mod

    def _verify_with_host_drafts(self, active: list[int], k: int, cap: int
                                 ) -> tuple[Tensor, Tensor, list[int], list[str]]:
        """Verify round whose drafts come (for some or all rows) from the host drafter."""
        B, dev = len(self.rows), self.device
        props, use_mod = self._host_proposals(active, k, min(self.ngram_k, cap) if self.hybrid else k)
        any_mod = any(use_mod)
        if self.use_module:  # keep the module's cache true every round, draft only if someone uses it
            logits1, g = steps.module_catch_up(self.model, self.module, self.cu, self.rows_t, head=any_mod)
            self.stats.module_passes += 1
        lens = [k if use_mod[b] else len(props[b]) for b in range(B)]
        K = max(lens)
        host_rows = [[0] * K if use_mod[b] else p + [0] * (K - len(p)) for b, p in enumerate(props)]
        drafts = torch.tensor(host_rows, dtype=torch.long, device=dev).view(B, K)
        q = None
        if not self.picker.greedy:
            q = torch.nn.functional.one_hot(drafts, self.vocab_size).float()
        pos = self.n[:, None] + self._arange(K + 1)
        if any_mod:
            mdrafts, mq = steps.draft_chain(self.model, self.module, logits1, g, pos, k, self.picker)
            self.stats.module_passes += k - 1
            sel = torch.tensor(use_mod, device=dev)
            pad = K - k
            if pad:
                mdrafts = torch.cat([mdrafts, mdrafts.new_zeros(B, pad)], 1)
            drafts = torch.where(sel[:, None], mdrafts, drafts)
            if q is not None:
                if pad:
                    mq = torch.cat([mq, mq.new_zeros(B, pad, self.vocab_size)], 1)
                q = torch.where(sel[:, None, None], mq, q)
        draft_len = None if min(lens) == K else torch.tensor(lens, device=dev)
        logits, h = steps.verify_pass(self.model, self.pending, drafts, pos)
        accepted, nxt = steps.accept(self.picker, logits, drafts, q, draft_len)
        out = steps.commit(drafts, accepted, nxt, self._arange(K + 1))
        self.pending = nxt
        if self.use_module:
            self.cu = (out, h, pos, accepted)
        kinds = ["module" if use_mod[b] else "host" for b in range(B)]
        return out, accepted, lens, kinds

    # ---------------------------------------------------------------- bookkeeping
    def _freeze(self) -> None:
        if self._frozen is not None:
            self.n.mul_(self._frozen)

    def _emit(self, new: list[list[int]], passes: bool = True) -> StepEvent:
        """Apply budgets and stops to each row's proposed new tokens; build the step's event."""
        out: list[list[int]] = []
        finished_now = False
        for b, (row, toks) in enumerate(zip(self.rows, new, strict=True)):
            if row.finish is not None:
                out.append([])
                continue
            if passes:
                self.stats.row_passes[b] += 1
            toks = toks[:row.budget - row.produced]
            start = len(row.generated)
            row.generated.extend(toks)
            keep, reason = self.stopper.scan(b, row.generated, start)
            produced = keep - start + (reason == "eos")
            del row.generated[keep:]
            emitted = row.generated[start:]
            row.ctx.extend(emitted)
            row.produced += produced
            self.stats.new_tokens[b] += produced
            if reason is None and row.produced >= row.budget:
                reason = "length"
            if reason is not None:
                row.finish = reason
                finished_now = True
            out.append(emitted)
        if finished_now:
            running = [r.finish is None for r in self.rows]
            self._frozen = torch.tensor(running, dtype=torch.long, device=self.device)
            self._freeze()
        return StepEvent(self._step, out, [r.finish for r in self.rows], self.done)

    def result(self) -> GenerationResult:
        tokens = [list(r.generated) for r in self.rows]
        texts = None
        if self.tokenizer is not None:
            texts = [trim_at_stop(self.tokenizer.decode(t), self.cfg.stop_strings) for t in tokens]
        return GenerationResult(tokens, [r.finish for r in self.rows], self.stats, texts)


class Generation:
    """Iterator of StepEvents (prefill first); `result()` finishes the run and returns the outcome."""

    def __init__(self, decoder: Decoder, prompts: Sequence[Sequence[int]]):
        self.decoder = decoder
        self._prompts = prompts
        self._started = False

    @property
    def stats(self) -> DecodeStats:
        return self.decoder.stats

    def __iter__(self) -> Iterator[StepEvent]:
        return self

    def __next__(self) -> StepEvent:
        if not self._started:
            self._started = True
            return self.decoder.start(self._prompts)
        if self.decoder.done:
            raise StopIteration
        return self.decoder.step()

    def result(self) -> GenerationResult:
        for _ in self:
            pass
        return self.decoder.result()


def stream(model: FullModel, module: RecyclableModule | None, prompts: Sequence[Sequence[int]],
           config: GenerationConfig | None = None, tokenizer: Decodes | None = None,
           stop_fn: StopFn | None = None) -> Generation:
    """Decode step by step: iterate for StepEvents; `.result()` gives the GenerationResult."""
    return Generation(Decoder(model, module, config or GenerationConfig(), tokenizer, stop_fn), prompts)


def generate(model: FullModel, module: RecyclableModule | None, prompts: Sequence[Sequence[int]],
             config: GenerationConfig | None = None, tokenizer: Decodes | None = None,
             stop_fn: StopFn | None = None) -> GenerationResult:
    """Decode every prompt to completion (see the package docstring)."""
    return stream(model, module, prompts, config, tokenizer, stop_fn).result()
