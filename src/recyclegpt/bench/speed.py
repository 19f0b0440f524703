"""`recyclegpt bench`: decoding speed of every mode against what users would pick instead.

Lanes (one row of the report each):
  ar                 the project's plain decoding: one full pass per token, eager
  ar (compiled)      the same with each round one torch.compile'd graph (`--compile headline`, the
                     default, also compiles the verify k lanes; `--compile all` every native lane;
                     `--compile ar` only this one). The baseline
                     of every speedup is the fastest `ar` lane ("speedup" in docs/definitions.md);
                     compile time is spent in the warm-up and reported as warmup_s, not counted in
                     tokens/s
  recycle            the paper's alternation of full model and module (lossy)
  verify k=1..4      lossless draft-and-verify with the module drafting k tokens; `verify adaptive`
                     moves k from recent acceptance
  hf_generate        transformers' `generate` on the same weights converted to LlamaForCausalLM,
                     same dtype and device, static or dynamic KV cache, whichever measured faster
  hf_assisted        transformers' prompt-lookup decoding (`prompt_lookup_num_tokens`)

Measurement (as defined in docs/definitions.md): same weights, dtype, device, prompts, batch and
max_new_tokens for every lane, in one process; each lane is warmed up first; then `repeats` rounds,
each running every lane over the whole prompt set, interleaved per batch (every lane decodes batch
b, in an order rotated per batch and round, before any decodes batch b+1: a change in machine load
hits all lanes alike); a lane's tokens/s is the median over rounds of (new tokens / wall seconds of
its generate calls, prefill included). Decode tokens/s leaves the prefill out (tokens made by
decoding passes / wall seconds after the prefill: the serving view, time per output token), so a
prefill shared by every lane does not dilute the decoding speedup; both are reported. Prompts are
tokenized before timing. By default EOS does not end a row, so every lane produces exactly
max_new_tokens per prompt and the lanes do the same amount of work.

Per lane: tokens/s, speedup vs the `ar` baseline, full passes per token (row-passes, prefill
included: `ar` = 1.0), tau (new tokens / full passes during decoding, prefill excluded, bonus
token included), acceptance by draft position, and whether the greedy output is token-identical
to `ar`'s (null when sampling: sampled outputs differ token by token by construction).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..decoding import GenerationConfig, generate
from ..decoding.auto import choose_draft
from ..errors import RecycleError
from ..prompts import PromptSet
from ..runtime import machine_info, memory_bandwidth, weight_bytes
from .report import progress_bar

NATIVE_MODES = ("ar", "recycle", "verify")
HF_MODES = ("hf_generate", "hf_assisted")
ALL_MODES = NATIVE_MODES + HF_MODES
COMPILE_CHOICES = ("none", "ar", "headline", "all")


@dataclass
class BenchOptions:
    max_new_tokens: int = 128
    batch_size: int = 1
    temperature: float = 0.0
    seed: int = 0
    repeats: int = 3
    modes: Sequence[str] = ALL_MODES
    ks: Sequence[int] = (1, 2, 3, 4)
    adaptive: bool = True
    hybrid: bool = True  # a `verify hybrid` lane (module + prompt-lookup drafter)
    prompt_lookup: int = 10  # hf_assisted: prompt_lookup_num_tokens
    trees: Sequence[int] = ()  # `verify tree N` lanes: node budgets
    tree_depth: int = 4
    tree_topk: int = 2
    auto: bool = False  # a `verify auto` lane: the draft tree="auto" picks, measured on these prompts
    hf_cache: str = "auto"  # auto | static | dynamic
    compile: str = "headline"  # none | ar (a compiled `ar` lane, the baseline if faster) | headline (ar and
    # the verify k lanes compiled: the headline comparison) | all (every native lane compiled too)
    ignore_eos: bool = True
    progress: bool = True

    def validate(self) -> None:
        for name in ("max_new_tokens", "batch_size", "repeats", "prompt_lookup"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise RecycleError(f"{name} must be an integer >= 1, got {v!r}")
        if self.temperature < 0:
            raise RecycleError(f"temperature must be >= 0, got {self.temperature}")
        bad = [m for m in self.modes if m not in ALL_MODES]
        if bad:
            raise RecycleError(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(ALL_MODES)}")
        if not self.modes:
            raise RecycleError("no modes to benchmark")
        if any(not isinstance(k, int) or k < 1 for k in self.ks):
            raise RecycleError(f"--k values must be integers >= 1, got {list(self.ks)}")
        if self.compile not in COMPILE_CHOICES:
            raise RecycleError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile!r}")
        if self.hf_cache not in ("auto", "static", "dynamic"):
            raise RecycleError(f"hf cache must be auto, static or dynamic, got {self.hf_cache!r}")


@dataclass
class Counters:
    """Summed over every generate call of one lane in one round."""

    new_tokens: int = 0
    rows: int = 0  # prefill row-passes (one per prompt)
    row_passes: int = 0  # decode row-passes (prefill excluded)
    produced: int = 0  # new tokens produced by decode passes (= new_tokens - the prefill's token per row)
    full_passes: int = 0  # batched full-model calls, prefill included
    module_passes: int = 0  # module row-passes (a batched call over B rows counts B)
    prefill_s: float = 0.0  # wall seconds of the prefill (the module's prompt entries included)
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    k_used: list[int] = field(default_factory=list)

    def add_positions(self, proposed: Sequence[int], accepted: Sequence[int]) -> None:
        for i, (p, a) in enumerate(zip(proposed, accepted, strict=True)):
            if i >= len(self.proposed):
                self.proposed.append(0)
                self.accepted.append(0)
            self.proposed[i] += p
            self.accepted[i] += a


@dataclass
class Lane:
    label: str  # row name: "verify k=3", "hf_generate"
    mode: str  # JSON mode: ar | recycle | verify | hf_generate | hf_assisted
    k: int | None
    run: Callable[[list[list[int]], int], tuple[list[list[int]], Counters]]  # (batch, batch index)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    baseline_candidate: bool = False  # an `ar` lane: the fastest of these is the baseline
    warm: Callable[[list[list[int]], int], Any] | None = None  # a short run for the warm-up


def weight_floor(model, module, device: torch.device) -> dict[str, float] | None:
    """What bounds a CPU decoding pass from below: the bytes of the weights it streams and the memory bandwidth
    measured here (`runtime.memory_bandwidth`). None on other devices."""
    if device.type != "cpu":
        return None
    return {"bandwidth": memory_bandwidth(), "model_bytes": weight_bytes(model),
            "module_bytes": weight_bytes(module) if module is not None else 0}


def _bytes_per_token(c: Counters, floor: dict[str, float], batch: int) -> float:
    """Weight bytes streamed per new token: each batched full-model call reads the full model once for all its
    rows (prefill included), each batched module call the module."""
    return (c.full_passes * floor["model_bytes"] + c.module_passes / batch * floor["module_bytes"]) / c.new_tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ native lanes

def native_lane(model, module, label: str, mode: str, lane_k: int | None, opts: BenchOptions,
                eos_id: int | None, **gen_kw) -> Lane:
    """A lane decoding with `recyclegpt.decoding.generate`; gen_kw go to GenerationConfig (they may set k)."""
    cfg_kw = dict(mode=mode, temperature=opts.temperature, eos_id=None if opts.ignore_eos else eos_id)
    if lane_k is not None:
        cfg_kw["k"] = lane_k
    cfg_kw.update(gen_kw)
    GenerationConfig(**cfg_kw, max_new_tokens=opts.max_new_tokens).validate()

    def make(max_new_tokens: int) -> Callable[[list[list[int]], int], tuple[list[list[int]], Counters]]:
        def run(batch: list[list[int]], bi: int) -> tuple[list[list[int]], Counters]:
            res = generate(model, module if mode != "ar" else None, batch,
                           GenerationConfig(**cfg_kw, max_new_tokens=max_new_tokens, seed=opts.seed + bi))
            st = res.stats
            c = Counters(new_tokens=st.total_new_tokens, rows=len(batch), row_passes=sum(st.row_passes),
                         produced=sum(max(0, t - 1) for t in st.new_tokens),
                         full_passes=st.full_passes + st.prefill_passes,
                         module_passes=st.module_passes * len(batch), k_used=list(st.k_used),
                         prefill_s=st.prefill_s)
            c.add_positions(st.proposed_by_position, st.accepted_by_position)
            return res.tokens, c
        return run

    return Lane(label, mode, lane_k, make(opts.max_new_tokens), warm=make(min(16, opts.max_new_tokens)),
                baseline_candidate=mode == "ar")


# ---------------------------------------------------------------------------------------- HF lanes

class _PassCounter:
    """Counts forward calls of a transformers model (each is one full-model pass over the batch) and
    times the first call after `reset` (generate's prefill)."""

    def __init__(self, hf_model):
        self.n = 0
        self.first_s: float | None = None
        self._t0 = 0.0
        self.handles = [hf_model.register_forward_pre_hook(self._pre), hf_model.register_forward_hook(self._post)]

    def reset(self) -> None:
        self.first_s = None

    def _pre(self, *_):
        self.n += 1
        self._t0 = time.perf_counter()

    def _post(self, *_):
        if self.first_s is None:
            self.first_s = time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _left_pad(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for b, p in enumerate(batch):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def _cut(row: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in row:
        return row[:row.index(eos_id)]
    return row


class HFRunner:
    """transformers' generate on the converted model; one instance shared by both HF lanes."""

    def __init__(self, model, opts: BenchOptions, eos_id: int | None):
        import transformers

        from ..hf import to_hf_model

        transformers.logging.set_verbosity_error()
        self.opts = opts
        self.eos_id = None if opts.ignore_eos else eos_id
        self.pad_id = eos_id if eos_id is not None else 0
        # A generic (transformers-backed) base already is a transformers model: use it as it is.
        self.hf = model.hf if hasattr(model, "hf") else to_hf_model(model, eos_token_id=self.eos_id)
        self.hf.generation_config.pad_token_id = self.pad_id
        self.hf.generation_config.eos_token_id = self.eos_id
        self.device = model.tok_embeddings.weight.device
        self.counter = _PassCounter(self.hf)
        self.version = transformers.__version__

    def kwargs(self, assisted: bool, cache: str | None) -> dict[str, Any]:
        o = self.opts
        kw: dict[str, Any] = dict(max_new_tokens=o.max_new_tokens, do_sample=o.temperature > 0,
                                  pad_token_id=self.pad_id)
        if o.temperature > 0:
            kw.update(temperature=o.temperature, top_k=0, top_p=1.0)
        if assisted:
            kw["prompt_lookup_num_tokens"] = o.prompt_lookup
        elif cache == "static":
            kw["cache_implementation"] = "static"
        return kw

    @torch.inference_mode()
    def generate_rows(self, batch: list[list[int]], bi: int, assisted: bool, cache: str | None
                      ) -> tuple[list[list[int]], Counters]:
        # transformers' assisted generation supports batch size 1 only: rows run one after another.
        groups = [[p] for p in batch] if assisted else [batch]
        out: list[list[int]] = []
        c = Counters()
        kw = self.kwargs(assisted, cache)
        for gi, g in enumerate(groups):
            ids, mask = _left_pad(g, self.pad_id, self.device)
            if self.opts.temperature > 0:
                torch.manual_seed(self.opts.seed + bi * 1000 + gi)
            before = self.counter.n
            self.counter.reset()
            seq = self.hf.generate(ids, attention_mask=mask, **kw)
            calls = self.counter.n - before
            c.prefill_s += self.counter.first_s or 0.0
            rows = [_cut(r, self.eos_id) for r in seq[:, ids.shape[1]:].tolist()]
            out.extend(rows)
            new = sum(len(r) for r in rows)
            c.new_tokens += new
            c.rows += len(g)
            c.full_passes += calls
            # Every call is one pass over all rows of the group; the first is the prefill.
            c.row_passes += max(0, calls - 1) * len(g)
            c.produced += sum(max(0, len(r) - 1) for r in rows)
        return out, c


def hf_lanes(runner: HFRunner, opts: BenchOptions, cache: str) -> list[Lane]:
    lanes = []
    if "hf_generate" in opts.modes:
        lanes.append(Lane("hf_generate", "hf_generate", None,
                          lambda b, i: runner.generate_rows(b, i, False, cache),
                          note=f"transformers {runner.version} generate, {cache} cache",
                          extra={"cache": cache}))
    if "hf_assisted" in opts.modes:
        note = f"transformers {runner.version} prompt lookup, {opts.prompt_lookup} tokens"
        if opts.batch_size > 1:
            note += "; batch 1 per row (transformers' assisted generation takes batch size 1 only)"
        lanes.append(Lane("hf_assisted", "hf_assisted", opts.prompt_lookup,
                          lambda b, i: runner.generate_rows(b, i, True, None),
                          note=note, extra={"cache": "dynamic", "prompt_lookup_num_tokens": opts.prompt_lookup}))
    return lanes


# -------------------------------------------------------------------------------------- the bench

def _batches(prompt_ids: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    return [prompt_ids[i:i + batch_size] for i in range(0, len(prompt_ids), batch_size)]


def _merge(total: Counters, c: Counters) -> None:
    for f in ("new_tokens", "rows", "row_passes", "produced", "full_passes", "module_passes", "prefill_s"):
        setattr(total, f, getattr(total, f) + getattr(c, f))
    total.add_positions(c.proposed, c.accepted)
    total.k_used.extend(c.k_used)


def _timed_batch(lane: Lane, batch: list[list[int]], bi: int, device: torch.device
                 ) -> tuple[list[list[int]], Counters, float]:
    _sync(device)
    t0 = time.perf_counter()
    toks, c = lane.run(batch, bi)
    _sync(device)
    return toks, c, time.perf_counter() - t0


def _run_lane(lane: Lane, batches: list[list[list[int]]], device: torch.device
              ) -> tuple[list[list[int]], Counters, float]:
    """One lane over all batches (used for the HF cache probe)."""
    tokens: list[list[int]] = []
    total = Counters()
    seconds = 0.0
    for bi, batch in enumerate(batches):
        toks, c, sec = _timed_batch(lane, batch, bi, device)
        tokens.extend(toks)
        _merge(total, c)
        seconds += sec
    return tokens, total, seconds


# ------------------------------------------------------------------------------------ native lane registry

@dataclass
class _Lanes:
    """What every native lane of one run is built from."""

    model: Any
    module: Any
    opts: BenchOptions
    eos_id: int | None
    prompt_ids: list[list[int]]

    def eager(self, label: str, mode: str, lane_k: int | None, **gen_kw) -> Lane:
        return native_lane(self.model, self.module, label, mode, lane_k, self.opts, self.eos_id, **gen_kw)

    def compiled(self, label: str, mode: str, lane_k: int | None, **gen_kw) -> Lane:
        lane = native_lane(self.model, self.module, f"{label} (compiled)", mode, lane_k, self.opts, self.eos_id,
                           compile=True, **gen_kw)
        lane.extra["compiled"] = True
        lane.note = "torch.compile'd decode step; its compile time is in warm-up, not in tokens/s"
        return lane

    def both(self, label: str, mode: str, lane_k: int | None, compiled: bool, **gen_kw) -> list[Lane]:
        """The eager lane, and the compiled one when `compiled`."""
        return [self.eager(label, mode, lane_k, **gen_kw)] + (
            [self.compiled(label, mode, lane_k, **gen_kw)] if compiled else [])


def _ar_lanes(c: _Lanes) -> list[Lane]:
    return c.both("ar", "ar", None, c.opts.compile != "none")


def _recycle_lanes(c: _Lanes) -> list[Lane]:
    return c.both("recycle", "recycle", None, c.opts.compile == "all")


def _compile_verify(opts: BenchOptions) -> bool:
    return opts.compile in ("headline", "all")


def _chain_lanes(c: _Lanes) -> list[Lane]:
    eager = [c.eager(f"verify k={k}", "verify", k) for k in c.opts.ks]
    return eager + ([c.compiled(f"verify k={k}", "verify", k) for k in c.opts.ks] if _compile_verify(c.opts) else [])


def _tree_lanes(c: _Lanes) -> list[Lane]:
    """Draft trees of depth tree_depth (`decoding.tree`), one per node budget."""
    o, lanes = c.opts, []
    for nodes in o.trees:
        note = f"draft tree: {nodes} nodes, depth {o.tree_depth}, top-{o.tree_topk} per node"
        for lane in c.both(f"verify tree {nodes}", "verify", o.tree_depth, _compile_verify(o), tree=nodes,
                           tree_topk=o.tree_topk):
            lane.extra.update(tree=nodes, tree_depth=o.tree_depth, tree_topk=o.tree_topk)
            lane.note = note + ("; " + lane.note if lane.note else "")
            lanes.append(lane)
    return lanes


def _auto_lanes(c: _Lanes) -> list[Lane]:
    """What tree="auto" picks (`decoding.auto`), measured afresh on these prompts, per lane kind."""
    lanes = []
    for compiled in [False] + ([True] if _compile_verify(c.opts) else []):
        choice = choose_draft(c.model, c.module, c.prompt_ids,
                              GenerationConfig(temperature=c.opts.temperature, compile=compiled),
                              batch_size=c.opts.batch_size, use_cache=False)
        best = choice.best
        label, kw = f"verify auto ({best.label})", dict(tree=best.tree, tree_topk=best.tree_topk)
        lane = (c.compiled if compiled else c.eager)(label, "verify", best.k, **kw)
        lane.extra.update(auto=best.label, auto_trials=[dict(draft=t.shape.label, tau=t.tau, round_ms=t.round_ms,
                                                             tokens_per_s=t.tokens_per_s) for t in choice.trials])
        lane.note = f"tree=auto chose {best.label} on these prompts" + ("; " + lane.note if lane.note else "")
        lanes.append(lane)
    return lanes


def _hybrid_lanes(c: _Lanes) -> list[Lane]:
    """The module chain or a longer prompt-lookup match, per row and round (`decoding.drafters`): the lane to
    hold against hf_assisted, which drafts up to --prompt-lookup tokens too."""
    kw = dict(drafter="hybrid", ngram_k=c.opts.prompt_lookup)
    note = f"module chain (k=3) or an n-gram match of up to {c.opts.prompt_lookup} tokens"
    lanes = c.both("verify hybrid", "verify", 3, c.opts.compile == "all", **kw)
    for lane in lanes:
        lane.extra["drafter"] = "hybrid"
        lane.note = note + ("; two graphs (module round, host-draft round)" if lane.extra.get("compiled") else "")
    return lanes


def _adaptive_lanes(c: _Lanes) -> list[Lane]:
    kmax = max(c.opts.ks) if c.opts.ks else 4
    lane = c.eager("verify adaptive", "verify", None, adaptive_k=True, k=min(3, kmax), k_max=kmax)  # k: start value
    lane.extra["adaptive_k"], lane.note = True, f"k adapts in 1..{kmax}"
    return [lane]


# (which runs ask for it, how its lanes are built), in report order: adding a lane kind is one entry.
NATIVE_LANES: list[tuple[Callable[[BenchOptions], bool], Callable[[_Lanes], list[Lane]]]] = [
    (lambda o: "ar" in o.modes, _ar_lanes),
    (lambda o: "recycle" in o.modes, _recycle_lanes),
    (lambda o: "verify" in o.modes, _chain_lanes),
    (lambda o: "verify" in o.modes and bool(o.trees), _tree_lanes),
    (lambda o: "verify" in o.modes and o.auto, _auto_lanes),
    (lambda o: "verify" in o.modes and o.hybrid, _hybrid_lanes),
    (lambda o: "verify" in o.modes and o.adaptive, _adaptive_lanes),
]


# ------------------------------------------------------------------------------------------ the run

@torch.inference_mode()
def run_bench(model, module, tokenizer, prompts: PromptSet, opts: BenchOptions | None = None,
              checkpoint: str = "") -> dict[str, Any]:
    """Run the benchmark; returns the report as a dict with the `bench --json` keys of docs/definitions.md:
    encode the prompts, build the lanes (`NATIVE_LANES`, then transformers' lanes), warm every lane up, time
    interleaved rounds, and turn the medians into rows."""
    opts = opts or BenchOptions()
    opts.validate()
    device = model.tok_embeddings.weight.device
    prompt_ids, truncated = _encode_prompts(model, tokenizer, prompts, opts)
    batches = _batches(prompt_ids, opts.batch_size)
    ctx = _Lanes(model, module, opts, tokenizer.eos_id, prompt_ids)
    lanes = [lane for wanted, build in NATIVE_LANES if wanted(opts) for lane in build(ctx)]
    hf_wanted = any(m in opts.modes for m in HF_MODES)
    probe = opts.hf_cache == "auto" and "hf_generate" in opts.modes
    n_warm = len(lanes) + (len(HF_MODES) if hf_wanted else 0) + (4 if probe else 0)
    total_ticks = n_warm + opts.repeats * (len(lanes) + sum(m in opts.modes for m in HF_MODES)) * len(batches)
    runner = None
    with progress_bar(opts.progress) as prog:
        task = prog.add_task("warm-up", total=total_ticks) if prog else None

        def tick(desc: str | None = None) -> None:
            if prog is not None:
                prog.update(task, advance=1, description=desc or prog.tasks[0].description)

        _warm_up(lanes, prompt_ids, batches, tick)
        if hf_wanted:
            runner = HFRunner(model, opts, tokenizer.eos_id)
            lanes.extend(_hf_lanes_probed(runner, opts, batches, device, probe, tick))
        timed = _timed_rounds(lanes, batches, opts, device, tick)
    if runner is not None:
        runner.counter.remove()
    floor = weight_floor(model, module, device)
    results = _result_rows(lanes, timed, opts, floor, model)
    return _report(model, module, prompts, opts, checkpoint, prompt_ids, truncated, results, floor)


def _encode_prompts(model, tokenizer, prompts: PromptSet, opts: BenchOptions) -> tuple[list[list[int]], int]:
    """Token ids per prompt, each cut from the left to leave room for max_new_tokens; and how many were cut."""
    limit = model.cfg.max_seq_len - opts.max_new_tokens
    if limit < 1:
        raise RecycleError(f"--max-new-tokens {opts.max_new_tokens} leaves no room for a prompt in the model's "
                           f"{model.cfg.max_seq_len}-token window")
    prompt_ids, truncated = [], 0
    for i, p in enumerate(prompts.prompts):
        ids = tokenizer.encode(p)
        if not ids:
            raise RecycleError(f"prompt {prompts.ids[i]} encodes to no tokens")
        if len(ids) > limit:  # keep the end: the text right before the continuation matters most
            ids = ids[-limit:]
            truncated += 1
        prompt_ids.append(ids)
    return prompt_ids, truncated


def _warm_up(lanes: list[Lane], prompt_ids: list[list[int]], batches: list[list[list[int]]],
             tick: Callable[[str], None]) -> None:
    """Every lane once on short prompts and few tokens (first calls allocate caches, fill allocator pools,
    import lazily); compiled lanes compile one graph per batch size (and k), so they warm on every size used."""
    sizes = sorted({len(b) for b in batches})
    for lane in lanes:
        t0 = time.perf_counter()
        for size in sizes if lane.extra.get("compiled") else sizes[-1:]:
            lane.warm([p[:32] for p in prompt_ids[:size]], 0)
        lane.extra["warmup_s"] = round(time.perf_counter() - t0, 2)
        tick(f"warm-up {lane.label}")


def _hf_lanes_probed(runner: HFRunner, opts: BenchOptions, batches: list[list[list[int]]], device: torch.device,
                     probe: bool, tick: Callable[[str], None]) -> list[Lane]:
    """transformers' lanes, warmed up; with --hf-cache auto, the faster of its static and dynamic caches,
    measured once on the first prompts at full length."""
    short = dataclasses.replace(opts, max_new_tokens=min(16, opts.max_new_tokens))
    warm_batch = [p[:32] for p in batches[0]]

    def warm(assisted: bool, cache: str) -> None:
        saved, runner.opts = runner.opts, short
        runner.generate_rows(warm_batch, 0, assisted, cache)
        runner.opts = saved

    for assisted in (False, True):
        warm(assisted, "dynamic")
        tick("warm-up transformers")
    cache, cache_probe = opts.hf_cache, {}
    if probe:
        for c in ("static", "dynamic"):
            warm(False, c)
            tick(f"hf cache probe: {c}")
        probe_batches = batches[: -(-4 // opts.batch_size)]  # about 4 prompts
        for c in ("static", "dynamic"):
            lane = Lane(c, "hf_generate", None, lambda b, i, c=c: runner.generate_rows(b, i, False, c))
            _, cnt, sec = _run_lane(lane, probe_batches, device)
            cache_probe[c] = cnt.new_tokens / sec
            tick(f"hf cache probe: {c}")
        cache = max(cache_probe, key=cache_probe.get)
    elif cache == "auto":
        cache = "dynamic"
    lanes = hf_lanes(runner, opts, cache)
    for lane in lanes:
        if cache_probe and lane.mode == "hf_generate":
            lane.extra["cache_probe_tokens_per_s"] = {k: round(v, 2) for k, v in cache_probe.items()}
            lane.note += " (faster of static/dynamic, measured once)"
    return lanes


@dataclass
class _Timed:
    """Per lane label: tokens/s, decode tokens/s, prefill seconds and seconds per round; the first round's
    outputs; the counters (pooled over rounds when sampling)."""

    tps: dict[str, list[float]]
    decode_tps: dict[str, list[float]]
    prefill_secs: dict[str, list[float]]
    secs: dict[str, list[float]]
    outputs: dict[str, list[list[int]]]
    counters: dict[str, Counters]


def _timed_rounds(lanes: list[Lane], batches: list[list[list[int]]], opts: BenchOptions, device: torch.device,
                  tick: Callable[[str], None]) -> _Timed:
    """Timed rounds, interleaved per batch: every lane runs batch b before any runs batch b+1 (lane order
    rotated per batch and round), so a change in machine load hits all lanes alike instead of whichever lane
    happened to run then. A lane's round = all batches."""
    t = _Timed(*({lane.label: [] for lane in lanes} for _ in range(4)), {}, {})
    n = len(lanes)
    for r in range(opts.repeats):
        r_toks: dict[str, list[list[int]]] = {lane.label: [] for lane in lanes}
        r_cnt = {lane.label: Counters() for lane in lanes}
        r_sec = {lane.label: 0.0 for lane in lanes}
        for bi, batch in enumerate(batches):
            shift = (r + bi) % n
            for lane in lanes[shift:] + lanes[:shift]:
                toks, cnt, sec = _timed_batch(lane, batch, bi, device)
                r_toks[lane.label].extend(toks)
                _merge(r_cnt[lane.label], cnt)
                r_sec[lane.label] += sec
                first = bi * opts.batch_size + 1
                which = f"prompt {first}" if len(batch) == 1 else f"prompts {first}-{first + len(batch) - 1}"
                tick(f"round {r + 1}/{opts.repeats}, {which}: {lane.label}")
            gc.collect()
        for lane in lanes:
            cnt, sec = r_cnt[lane.label], r_sec[lane.label]
            t.tps[lane.label].append(cnt.new_tokens / sec if sec > 0 else float("nan"))
            dsec = sec - cnt.prefill_s
            t.decode_tps[lane.label].append(cnt.produced / dsec if dsec > 0 else float("nan"))
            t.prefill_secs[lane.label].append(cnt.prefill_s)
            t.secs[lane.label].append(sec)
            if lane.label not in t.outputs:
                t.outputs[lane.label] = r_toks[lane.label]
                t.counters[lane.label] = cnt
            elif opts.temperature != 0:  # sampled runs differ per round: pool the counters
                _merge(t.counters[lane.label], cnt)
    return t


def _result_rows(lanes: list[Lane], t: _Timed, opts: BenchOptions, floor: dict[str, float] | None,
                 model) -> list[dict[str, Any]]:
    """One report row per lane: medians over rounds, speedups against the fastest `ar` lane, acceptance,
    identity with `ar`, the floor share."""
    greedy = opts.temperature == 0
    device = model.tok_embeddings.weight.device
    dtype_name = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    medians = {k: statistics.median(v) for k, v in t.tps.items()}
    decode_medians = {k: statistics.median(v) for k, v in t.decode_tps.items()}
    base_lanes = [lane for lane in lanes if lane.baseline_candidate]
    baseline = max(base_lanes, key=lambda ln: medians[ln.label]) if base_lanes else None
    # Identical-to-ar compares with the `ar` of the same kernels: compiled lanes with the compiled
    # `ar` (bf16 rounding differs between eager and compiled graphs; docs/definitions.md, "lossless").
    refs = {False: "ar" if "ar" in t.outputs else None,
            True: "ar (compiled)" if "ar (compiled)" in t.outputs else ("ar" if "ar" in t.outputs else None)}
    results = []
    for lane in lanes:
        c = t.counters[lane.label]
        tp = medians[lane.label]
        ref_label = refs[bool(lane.extra.get("compiled"))]
        ar_ref = t.outputs.get(ref_label) if ref_label else None
        row: dict[str, Any] = {
            "mode": lane.mode,
            "k": lane.k,
            "tokens_per_s": round(tp, 3),
            "speedup_vs_ar": round(tp / medians[baseline.label], 4) if baseline else None,
            "full_passes_per_token": round((c.rows + c.row_passes) / c.new_tokens, 4) if c.new_tokens else None,
            "mean_accepted": round(c.produced / c.row_passes, 4) if c.row_passes else None,
            "acceptance_by_position": ([round(a / p, 4) for a, p in zip(c.accepted, c.proposed, strict=True) if p]
                                       if lane.mode == "verify" else None),
            "identical_to_ar": (t.outputs[lane.label] == ar_ref) if (greedy and ar_ref is not None) else None,
            # extras
            "label": lane.label,
            "dtype": dtype_name,
            "device": str(device),
            "new_tokens": c.new_tokens,
            "tokens_per_s_rounds": [round(x, 3) for x in t.tps[lane.label]],
            "seconds_median": round(statistics.median(t.secs[lane.label]), 4),
            "decode_tokens_per_s": round(decode_medians[lane.label], 3),
            "decode_speedup_vs_ar": (round(decode_medians[lane.label] / decode_medians[baseline.label], 4)
                                     if baseline else None),
            "prefill_s_median": round(statistics.median(t.prefill_secs[lane.label]), 4),
            "module_passes_per_token": (round(c.module_passes / c.new_tokens, 4) if c.new_tokens else None)
            if lane.mode in NATIVE_MODES else None,
            "bandwidth_share": (round(tp * _bytes_per_token(c, floor, opts.batch_size) / floor["bandwidth"], 4)
                                if floor and c.new_tokens and lane.mode in NATIVE_MODES else None),
            "baseline": bool(baseline is lane),
            "note": lane.note,
            **lane.extra,
        }
        if greedy and ar_ref is not None:
            row["prompts_identical_to_ar"] = sum(a == b for a, b in zip(t.outputs[lane.label], ar_ref, strict=True))
            row["identical_reference"] = ref_label
        if c.k_used:
            row["k_mean"] = round(sum(c.k_used) / len(c.k_used), 3)
        results.append(row)
    return results


def _report(model, module, prompts: PromptSet, opts: BenchOptions, checkpoint: str, prompt_ids: list[list[int]],
            truncated: int, results: list[dict[str, Any]], floor: dict[str, float] | None) -> dict[str, Any]:
    import transformers

    device = model.tok_embeddings.weight.device
    baseline = next((r["label"] for r in results if r["baseline"]), None)
    return {
        "model": checkpoint or "(in memory)",
        "device": str(device),
        "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
        "batch_size": opts.batch_size,
        "prompts": len(prompt_ids),
        "max_new_tokens": opts.max_new_tokens,
        "results": results,
        # extras
        "prompt_set": prompts.name,
        "prompt_tokens_mean": round(sum(map(len, prompt_ids)) / len(prompt_ids), 1),
        "prompts_truncated": truncated,  # cut from the left to fit max_seq_len - max_new_tokens
        "temperature": opts.temperature,
        "seed": opts.seed,
        "repeats": opts.repeats,
        "ignore_eos": opts.ignore_eos,
        "compile": opts.compile,
        "baseline": baseline,
        "params": {"model": sum(p.numel() for p in model.parameters()),
                   "module": sum(p.numel() for p in module.parameters()) if module is not None else 0},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": machine_info(device),
        "floor": floor and {"memory_bandwidth_gb_s": round(floor["bandwidth"] / 1e9, 2),
                            "weight_bytes": floor["model_bytes"], "module_weight_bytes": floor["module_bytes"],
                            "ar_tokens_per_s": round(floor["bandwidth"] / floor["model_bytes"], 1)},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "timing": "median over rounds of new tokens / wall seconds of the generate calls (prefill included); "
                  "decode_tokens_per_s: tokens of decoding passes / seconds after the prefill; lanes interleaved "
                  "per batch, order rotated per batch and round, each warmed up first",
    }
