"""Compiled rounds: `rounds.decode_round` through `torch.compile`, cached per shape and batch.

There is one round function (`rounds.decode_round`); this module only compiles it. A compiled graph
is specialised on a `RoundShape` (width, chain, module, sampled, filtered, tree) and the batch size:
every mix of per-slot settings (modes, temperatures, top-k/top-p values, k up to the width, host or
module drafts) runs through the same graph, and slots joining and leaving compile nothing new. (A
first row with top-k or top-p switches to the `filtered` graph, which sorts every distribution.)

Caching: compiled callables live per (model, module, shape, batch, dtype, threads, cache tensors,
inductor options, whether recyclegpt's CPU kernels are on, weights' versions) in this process
(`compiled_round`); each gets its own code
object, so dynamo's per-function recompile limit and guard chain never mix keys, and after the
first call dynamo's guards are skipped (see `_CompiledRound`). The first call of each compiles
(`COMPILE_STATS` records the seconds). A new process compiles again: inductor's FX graph cache is
bypassed for frozen graphs (their prepacked weights cannot be pickled), so only the C++ kernels and
autotuning results come from inductor's on-disk cache (`TORCHINDUCTOR_CACHE_DIR`, default
/tmp/torchinductor_$USER). Inductor runs with `freezing` (weights become constants): compiled graphs
must not outlive in-place weight changes, so the weights' version counters are part of the key and
a change compiles afresh; each compiled graph holds its own prepacked copy of the weights (memory).
KV caches: a frozen graph keeps the cache tensors it was traced with, so decoding installs one cache
set per (batch, dtype) and keeps it, and for an engine's smaller batches views of that set's first
rows, kept the same way (`stable_caches`).
"""

from __future__ import annotations

import os
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import kernels
from ..model import FullModel
from ..module import RecyclableModule
from ..runtime import weight_bytes
from .rounds import RoundShape, decode_round

# Inductor options (chosen by measurement on 2-core CPUs: benchmarks/compiled_speed.py and the README's notes):
# - freezing: weights become graph constants, prepacked (needs inference mode; see the key below).
# - max_autotune with the C++ GEMM templates only (mode "max-autotune-no-cudagraphs" restricted to CPP, ATen
#   as the fallback where no template applies): at a few rows the templates beat oneDNN/MKL; letting
#   autotuning benchmark both picked differently from run to run.
# - the Python wrapper (cpp_wrapper off): about as fast per call at this size, and its kernels come
#   from inductor's on-disk cache in a new process (the C++ wrapper's source embeds tensor addresses,
#   so it is rebuilt every time).
# - max_autotune only up to AUTOTUNE_MAX_BATCH rows: at batch 8 the templates lost to ATen's GEMMs.
# - and only for a full model of at most AUTOTUNE_MAX_WEIGHT_BYTES: on the 17.3M model (35 MB in bf16) the
#   templates won; on the 44.8M one (90 MB, more than the 32 MB L3 of the AMD EPYC measured) they lost at
#   every round width, compiled `verify` k=3 at 218 against 296 tokens/s with ATen's GEMMs and a tree of
#   8 nodes at 133 against 244 (docs/results.md, "Draft trees"). Sizes in between were not measured. The price: in
#   bf16, oneDNN's GEMMs round a row differently in a one-token pass than in a wider one, so at a near tie
#   compiled `verify` can pick another token than compiled `ar`; the templates round a row the same way at
#   every width (benchmarks/identity.py; docs/results.md, "Exactness in bfloat16").
# - cpp.enable_concat_linear: linears that read the same input (q/k/v, gate/up) run as one GEMM over their
#   concatenated frozen weights: fewer, larger calls. On the shipped model in float32 on an AVX-512 Xeon it
#   measured within run noise of the unfused graphs, for `ar` and `verify` alike (benchmarks/inductor_options.py,
#   docs/llama_cpp.md); benchmarks/identity.py still finds verify = ar.
# RECYCLEGPT_COMPILE_MODE: auto (the above), max-autotune (every batch size and model), default (no
# autotuning: compiles faster, runs slower at batch 1 on the small model).
_MODE = os.environ.get("RECYCLEGPT_COMPILE_MODE", "auto")
_AUTOTUNE = _MODE != "default"
AUTOTUNE_MAX_BATCH = 1 << 30 if _MODE == "max-autotune" else 2
AUTOTUNE_MAX_WEIGHT_BYTES = 1 << 62 if _MODE == "max-autotune" else 48 << 20
INDUCTOR_OPTIONS = {"freezing": True, "cpp.enable_concat_linear": True,
                    "max_autotune": _AUTOTUNE, "max_autotune_gemm_backends": "CPP",
                    "autotune_fallback_to_aten": True, "cpp_wrapper": False, "triton.cudagraphs": False,
                    "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
BACKEND = "inductor"  # tests use "eager" (the same captured graphs, run op by op) where inductor does not matter
SKIP_GUARDS = os.environ.get("RECYCLEGPT_COMPILE_GUARDS", "0") != "1"  # 1: evaluate dynamo's guards every call


# ------------------------------------------------------------------------------ caching
@dataclass
class CompileStats:
    """Seconds spent in first calls (compiles, or loads from inductor's on-disk cache), per key."""

    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


COMPILE_STATS = CompileStats()
_LOCK = threading.Lock()
_ATTR = "_recyclegpt_compiled"  # the per-model cache lives on the model (a cycle gc can collect)


def inductor_options(batch: int, model: FullModel) -> dict:
    """INDUCTOR_OPTIONS for a graph over `batch` rows of `model` (max-autotune only where it measured
    faster: few rows, weights of at most AUTOTUNE_MAX_WEIGHT_BYTES)."""
    opts = dict(INDUCTOR_OPTIONS)
    if batch > AUTOTUNE_MAX_BATCH or weight_bytes(model) > AUTOTUNE_MAX_WEIGHT_BYTES:
        opts["max_autotune"] = False
    return opts


def stable_caches(net: torch.nn.Module, batch: int, dtype: torch.dtype, rows: int | None = None) -> None:
    """Install net's KV caches for (batch, dtype), made once and kept: compiled graphs hold the cache
    tensors they were traced with (frozen graphs treat module tensors as fixed), so decoding must find
    the very same tensors every time, even after another batch size used the model. rows < batch: views
    of the set's first `rows` rows (a round over fewer rows than the engine has slots), kept the same way."""
    sets = net.__dict__.setdefault("_recyclegpt_cache_sets", {})
    caches = sets.get((batch, dtype))
    if caches is None:
        net.setup_caches(batch, dtype)
        caches = sets[(batch, dtype)] = net.caches
    if rows is not None and rows != batch:
        views = sets.get((batch, dtype, rows))
        if views is None:
            views = sets[(batch, dtype, rows)] = torch.nn.ModuleList(c.first_rows(rows) for c in caches)
        caches = views
    if net.caches is not caches:
        net.caches = caches


_SLOTS_ATTR = "_recyclegpt_parameter_slots"


def weights_version(*nets: torch.nn.Module) -> tuple:
    """The nets' parameters' storage addresses and in-place version counters: changes when a weight is
    changed in place, loaded into, or replaced by another tensor (`module.weight = ...`).

    Runs once per decoding round, so the walk over the module tree (`parameters()`) is done once per net:
    the net keeps its modules' parameter dicts and names, and each call only reads the current tensor in
    each. Replacing a whole submodule after a compile is not seen: call `clear_cache` then."""
    out = []
    for net in nets:
        slots = net.__dict__.get(_SLOTS_ATTR)
        if slots is None:
            slots = net.__dict__[_SLOTS_ATTR] = [(m._parameters, name) for m in net.modules()
                                                 for name, p in m._parameters.items() if p is not None]
        out.extend((t.data_ptr(), t._version) for t in (d[name] for d, name in slots))
    return tuple(out)


def _fresh_function(fn: Callable) -> Callable:
    """A copy of closure `fn` with its own code object: dynamo keeps one cache per code object."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class _CompiledRound:
    """A compiled round. The first call traces and compiles with inductor's options set globally (dynamo
    reads `freezing` while tracing: only then do weights become graph constants) and records its
    seconds; later calls skip dynamo's guard evaluation (a noticeable cost per call on a CPU, all of it on
    the model's parameters): each callable has its own code object holding one compiled entry, and
    `compiled_round` keys it by everything the guards would check (round shape, batch, dtype,
    threads, the weights' identity and versions). Input shapes are still asserted by the graph."""

    def __init__(self, fn: Callable, label: str, options: dict):
        self.fn, self.label, self.first, self.options = fn, label, True, options

    def __call__(self, *args):
        if not self.first:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=SKIP_GUARDS):
                return self.fn(*args)
        t0 = time.perf_counter()
        with torch._inductor.config.patch(self.options):
            out = self.fn(*args)
        self.first = False
        COMPILE_STATS.seconds[self.label] = COMPILE_STATS.seconds.get(self.label, 0.0) + time.perf_counter() - t0
        return out


def compiled_round(model: FullModel, module: RecyclableModule | None, shape: RoundShape, batch: int) -> Callable:
    """`rounds.decode_round` for `shape` over `batch` slots, compiled (cached; compiles on the first call).

    Called as fn(state, inputs), like decode_round without its first three arguments."""
    dtype = model.tok_embeddings.weight.dtype
    inductor = BACKEND == "inductor"
    # The cache tensors' identity is in the key: a graph must never run on caches it was not traced with.
    # The options a graph gets follow from INDUCTOR_OPTIONS, the autotuning limits, the batch and the model's
    # size (fixed for this model and dtype): the key holds all but the last, and the derived options are worked
    # out on a miss only, off the per-round path.
    nets = (model, module) if shape.module else (model,)
    caches = tuple(c.k_cache.data_ptr() for net in nets for c in net.caches)
    options = ((tuple(sorted(INDUCTOR_OPTIONS.items())), AUTOTUNE_MAX_BATCH, AUTOTUNE_MAX_WEIGHT_BYTES)
               if inductor else ())
    key = (shape, id(nets[-1]), batch, dtype, torch.get_num_threads(), BACKEND, caches, options,
           kernels.enabled(), weights_version(*nets))
    with _LOCK:
        per_model = model.__dict__.setdefault(_ATTR, {})
        fn = per_model.get(key)
        if fn is not None:
            return fn
        # A stale entry for the same slot (weights changed in place) is dropped.
        for old in [o for o in per_model if o[:-1] == key[:-1]]:
            del per_model[old]

        def body(state, inputs):
            return decode_round(model, module, shape, state, inputs)

        fn = per_model[key] = compile_pass(body, model, batch, shape_label(shape, batch, dtype))
        return fn


def compile_pass(fn: Callable, model: FullModel, batch: int = 1, label: str | None = None) -> Callable:
    """fn compiled the way decoding compiles a round: its own code object, a full graph of static shapes,
    inductor's options for `batch` rows of `model` (`inductor_options`), compiled on the first call
    (`_CompiledRound`). `compiled_round` uses it; benchmarks use it to time or inspect one pass alone."""
    inductor = BACKEND == "inductor"
    options = inductor_options(batch, model) if inductor else {}
    graph = torch.compile(_fresh_function(fn), fullgraph=True, dynamic=False, backend=BACKEND,
                          options=dict(options) if inductor else None)
    return _CompiledRound(graph, label or fn.__name__, options)


def shape_label(shape: RoundShape, batch: int, dtype: torch.dtype) -> str:
    """How COMPILE_STATS names a graph, e.g. 'verify k=3 B=1 bfloat16' or 'ar B=8 float32 sampled'."""
    kind, sampling = _round_kind(shape)
    return f"{kind} B={batch} {str(dtype).removeprefix('torch.')}{sampling}"


def round_kind(shape: RoundShape) -> str:
    """A round shape in words, e.g. 'verify k=3' or 'ar sampled'."""
    return "".join(_round_kind(shape))


def _round_kind(shape: RoundShape) -> tuple[str, str]:
    if shape.tree:
        kind = f"verify tree {shape.width} depth={shape.depth} top-k={shape.topk}"
    elif shape.width == 0:
        kind = "ar" if not shape.module else "ar+module"
    elif shape.chain == shape.width:
        kind = f"verify k={shape.width}"
    else:
        kind = f"verify width={shape.width} chain={shape.chain}"
    return kind, (" sampled" if shape.sampled else "") + (" top-k/top-p" if shape.filtered else "")


def clear_cache(model: FullModel, module: RecyclableModule | None = None) -> None:
    """Drop the model's compiled rounds (inductor's on-disk cache stays) and the parameter slots
    `weights_version` keeps on the model (and on `module`, when given)."""
    with _LOCK:
        model.__dict__.pop(_ATTR, None)
        for net in (model, module):
            if net is not None:
                net.__dict__.pop(_SLOTS_ATTR, None)
