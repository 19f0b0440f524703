"""Compiled decode rounds: `GenerationConfig(compile=True)`.

Each decoding step is one `torch.compile`d graph with static shapes (batch B and k fixed per graph),
acceptance computed inside, and one host sync per step (the caller's `.tolist()` on the packed
result):

- `ar_round`: one full pass over [B, 1] + the pick -> (token [B], n + 1).
- `recycle_round`: module token from the carried head logits, full pass over [x_n, x_{n+1}], full
  model's token, then the module's catch-up over the two true entries -> the next head logits.
- `verify_round`: chain of k module drafts, one full pass over [x_n, d_1..d_k], acceptance, commit,
  and the module's catch-up over the round's k+1 true entries (row b's head read at its accepted
  count) -> the next head logits and state.

The module rounds carry the catch-up's *result* (head logits [B, V] and output state g [B, d] at
position n-1) instead of its inputs, so every round has the same shapes: the first catch-up (the
prompt's last entry; `steps.prefill` fills the others) runs once, eagerly, after the prefill. Rounds
cost the same module passes as the eager ladder in `steps` (k per verify round, one per recycle
round); the last round's catch-up is one extra module pass per generation.

Sampling runs in the graph too, without a torch.Generator inside it: the caller draws the noise with
the run's generator (`Noise`) and passes it in. A categorical draw is argmax(p / E) with E ~ Exp(1)
(the exponential-race form of sampling: the same distribution as `torch.multinomial`, a different
random stream), and the speculative rule takes its uniforms u from the caller. So sampled output
has the right distribution and is reproducible per seed, but is not token-identical to eager
sampling with the same seed.

Caching: compiled callables live per (model, module, kind, batch, k, dtype, sampling, threads, cache
tensors, inductor options, weights' versions) in this process (`compiled_round`); each gets its own
code object, so dynamo's per-function recompile limit and guard chain never mix keys, and after the
first call dynamo's guards are skipped (see `_CompiledRound`). The first call of each compiles
(`COMPILE_STATS` records the seconds: tens of seconds per graph on a 2-core CPU). A new process
compiles again: inductor's FX graph cache is bypassed for frozen graphs (their prepacked weights
cannot be pickled), so only the C++ kernels and autotuning results come from inductor's on-disk
cache (`TORCHINDUCTOR_CACHE_DIR`, default /tmp/torchinductor_$USER), which saves the C++ compile
time. Inductor runs with `freezing` (weights become constants): compiled graphs must not outlive
in-place weight changes, so the weights' version counters are part of the key and a change
compiles afresh; each compiled graph holds its own prepacked copy of the weights (memory).
KV caches: a frozen graph keeps the cache tensors it was traced with, so compiled decoding installs
one cache set per (batch, dtype) and keeps it (`stable_caches`).
"""

from __future__ import annotations

import os
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..model import FullModel
from ..module import RecyclableModule
from .sampling import logits_to_probs

# Inductor options (what measured best on this 2-core CPU, see the report in benchmarks/compiled_speed.py):
# - freezing: weights become graph constants, prepacked (needs inference mode; see the key below).
# - max_autotune with the C++ GEMM templates only (mode "max-autotune-no-cudagraphs" restricted to CPP, ATen
#   as the fallback where no template applies): at 1-4 rows the templates ran 1.5-3x faster than
#   oneDNN/MKL; letting autotuning benchmark both picked differently from run to run.
# - the Python wrapper (cpp_wrapper off): about as fast per call at this size, and its kernels come
#   from inductor's on-disk cache in a new process (the C++ wrapper's source embeds tensor addresses,
#   so it is rebuilt every time).
# - max_autotune only up to AUTOTUNE_MAX_BATCH rows: at batch 8 the templates lost to ATen's GEMMs
#   (compiled `ar` 389 vs 482 tok/s, verify k=2 321 vs 507; shipped checkpoint, bf16, 1 thread).
# RECYCLEGPT_COMPILE_MODE: auto (the above), max-autotune (every batch size), default (none: compiles
# faster, runs about 2x slower at batch 1).
_MODE = os.environ.get("RECYCLEGPT_COMPILE_MODE", "auto")
_AUTOTUNE = _MODE != "default"
AUTOTUNE_MAX_BATCH = 1 << 30 if _MODE == "max-autotune" else 2
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": _AUTOTUNE, "max_autotune_gemm_backends": "CPP",
                    "autotune_fallback_to_aten": True, "cpp_wrapper": False, "triton.cudagraphs": False,
                    "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
BACKEND = "inductor"  # tests use "eager" (the same captured graphs, run op by op) where inductor does not matter
SKIP_GUARDS = os.environ.get("RECYCLEGPT_COMPILE_GUARDS", "0") != "1"  # 1: evaluate dynamo's guards every call

Sampling = tuple[float, int, float] | None  # (temperature, top_k, top_p); None = greedy


# ------------------------------------------------------------------------------ graph bodies
def _pick(logits: Tensor, sampling: Sampling, expo: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """logits [..., V] -> (tokens [...], probs [..., V] | None); expo: Exp(1) noise shaped like logits."""
    if sampling is None:
        return logits.float().argmax(-1), None
    p = logits_to_probs(logits, *sampling)
    return _race(p, expo), p


def _race(p: Tensor, expo: Tensor) -> Tensor:
    """One categorical draw per row of p: argmax(p / E), E ~ Exp(1) i.i.d. (E > 0 enforced)."""
    return (p / expo.clamp_min(1e-20)).argmax(-1)


def ar_round(model: FullModel, pending: Tensor, n: Tensor, sampling: Sampling = None,
             expo: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """pending [B], n [B] -> (token [B], n + 1)."""
    logits, _ = model(pending[:, None], n[:, None])
    tok, _ = _pick(logits[:, 0], sampling, expo)
    return tok, n + 1


def _catch_up(model: FullModel, module: RecyclableModule, idx: Tensor, h: Tensor, pos: Tensor,
              last: Tensor | None) -> tuple[Tensor, Tensor]:
    _, g = module(model, idx, h, pos, logits=False)
    if last is None:
        g = g[:, -1]
    else:
        g = g.gather(1, last[:, None, None].expand(-1, 1, g.shape[-1]))[:, 0]
    return model.lm_head(g), g


def recycle_round(model: FullModel, module: RecyclableModule, pending: Tensor, n: Tensor, mlogits: Tensor,
                  sampling: Sampling = None, expo: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The paper's round. Returns (out [B, 2] = x_{n+1}, x_{n+2}; next pending; n + 2; next mlogits)."""
    B = pending.shape[0]
    m, _ = _pick(mlogits, sampling, None if expo is None else expo[:, 0])
    pos = n[:, None] + torch.arange(2, device=n.device)
    _, h = model(torch.stack([pending, m], 1), pos, logits=False)
    c, _ = _pick(model.lm_head(h[:, -1]), sampling, None if expo is None else expo[:, 1])
    out = torch.stack([m, c], 1)
    mlogits, _ = _catch_up(model, module, out, h, pos, None)
    return out, c, n + 2, mlogits.view(B, -1)


def _accept_speculative(drafts: Tensor, q: Tensor, p: Tensor, u: Tensor, expo: Tensor,
                        valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`sampling.accept_speculative` with the caller's noise: u [B, K] uniforms, expo [B, V].

    valid [B, K] (bool, a prefix per row): drafts that exist; the others are padding, never accepted,
    and their q must be zero so that stopping at one samples from p itself."""
    B, K = drafts.shape
    V = p.shape[-1]
    pd = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
    qd = q.gather(-1, drafts[..., None]).squeeze(-1)
    ok = u * qd < pd
    if valid is not None:
        ok = ok & valid
    accepted = ok.long().cumprod(1).sum(1)
    p_next = p.gather(1, accepted[:, None, None].expand(B, 1, V))[:, 0]
    q_next = q.gather(1, accepted.clamp(max=K - 1)[:, None, None].expand(B, 1, V))[:, 0]
    rejected = (accepted < K).to(p.dtype)
    residual = (p_next - q_next * rejected[:, None]).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
    return accepted, _race(residual, expo)


def verify_round(model: FullModel, module: RecyclableModule, k: int, pending: Tensor, n: Tensor, mlogits: Tensor,
                 g: Tensor, sampling: Sampling = None, noise: tuple[Tensor, Tensor, Tensor] | None = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Module drafter round with the catch-up at its end.

    pending [B] = x_n; n [B]; mlogits [B, V], g [B, d]: the module's head logits and state at n-1.
    noise (sampling only): (Exp(1) [B, k, V] for the drafts, uniforms [B, k], Exp(1) [B, V]).
    Returns (vals [B, k+2] = accepted, then row b's tokens out[:a+1] (junk past them); next pending;
    n + accepted + 1; next mlogits; next g).
    """
    pos = n[:, None] + torch.arange(k + 1, device=n.device)
    d, q = _pick(mlogits, sampling, None if noise is None else noise[0][:, 0])
    drafts, qs = [d], [q]
    for i in range(2, k + 1):
        sl, g2 = module(model, d[:, None], g[:, None], pos[:, i - 2:i - 1])
        g = g2[:, 0]
        d, q = _pick(sl[:, 0], sampling, None if noise is None else noise[0][:, i - 1])
        drafts.append(d)
        qs.append(q)
    q_all = None if sampling is None else torch.stack(qs, 1)
    return _verify_drafts(model, module, pending, n, torch.stack(drafts, 1), None, sampling, q_all,
                          None if noise is None else noise[1:])


def verify_host_round(model: FullModel, module: RecyclableModule | None, pending: Tensor, n: Tensor, drafts: Tensor,
                      lens: Tensor, sampling: Sampling = None, noise: tuple[Tensor, Tensor] | None = None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Verify round for drafts made on the host (prompt lookup / n-gram: `drafter` ngram or hybrid).

    drafts [B, K] with lens [B] real drafts per row (the rest is padding, never accepted). A host
    drafter is deterministic, so its q is one-hot. With a module, its catch-up runs at the end as in
    `verify_round`, so the next round can draft with either. noise (sampling): (uniforms [B, K],
    Exp(1) [B, V]). Returns what `verify_round` returns (mlogits, g None without a module).
    """
    K = drafts.shape[1]
    valid = torch.arange(K, device=n.device) < lens[:, None]
    q = None
    if sampling is not None:
        q = torch.nn.functional.one_hot(drafts, model.cfg.vocab_size).float() * valid[..., None]
    return _verify_drafts(model, module, pending, n, drafts, valid, sampling, q, noise)


def _verify_drafts(model: FullModel, module: RecyclableModule | None, pending: Tensor, n: Tensor, drafts: Tensor,
                   valid: Tensor | None, sampling: Sampling, q: Tensor | None,
                   noise: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The verify pass over [pending, drafts [B, K]] at positions n..n+K, acceptance (greedy, or the
    speculative rule with the drafts' q [B, K, V] and noise (uniforms [B, K], Exp(1) [B, V])), and the
    module's catch-up on the result. valid [B, K]: drafts that exist (None: all)."""
    B, K = drafts.shape
    ar = torch.arange(K + 1, device=n.device)
    pos = n[:, None] + ar
    logits, h = model(torch.cat([pending[:, None], drafts], 1), pos)
    if sampling is None:
        targets = logits.float().argmax(-1)
        agree = drafts == targets[:, :K]
        accepted = (agree if valid is None else agree & valid).long().cumprod(1).sum(1)
        nxt = targets.gather(1, accepted[:, None])[:, 0]
    else:
        p = logits_to_probs(logits, *sampling)
        accepted, nxt = _accept_speculative(drafts, q, p, noise[0], noise[1], valid)
    out = torch.where(ar == accepted[:, None], nxt[:, None], torch.cat([drafts, nxt[:, None]], 1))
    vals = torch.cat([accepted[:, None], out], 1)
    if module is None:
        return vals, nxt, n + accepted + 1, None, None
    mlogits, g = _catch_up(model, module, out, h, pos, accepted)
    return vals, nxt, n + accepted + 1, mlogits.view(B, -1), g.view(B, -1)


# ------------------------------------------------------------------------------ noise
@dataclass
class Noise:
    """Reusable noise buffers for sampled rounds, refilled in place from the run's generator."""

    generator: torch.Generator | None
    bufs: dict[tuple, Tensor] = field(default_factory=dict)

    def _buf(self, kind: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        key = (kind, shape)
        b = self.bufs.get(key)
        if b is None:
            b = self.bufs[key] = torch.empty(shape, device=device)
        return b

    def expo(self, shape: tuple[int, ...], device: torch.device, slot: str = "e") -> Tensor:
        return self._buf(slot, shape, device).exponential_(generator=self.generator)

    def uniform(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        return self._buf("u", shape, device).uniform_(generator=self.generator)


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


def inductor_options(batch: int) -> dict:
    """INDUCTOR_OPTIONS for a graph over `batch` rows (max-autotune only where it measured faster)."""
    opts = dict(INDUCTOR_OPTIONS)
    if batch > AUTOTUNE_MAX_BATCH:
        opts["max_autotune"] = False
    return opts


def stable_caches(net: torch.nn.Module, batch: int, dtype: torch.dtype) -> None:
    """Install net's KV caches for (batch, dtype), made once and kept: compiled graphs hold the cache
    tensors they were traced with (frozen graphs treat module tensors as fixed), so compiled decoding
    must find the very same tensors every time, even after another batch size used the model."""
    sets = net.__dict__.setdefault("_recyclegpt_cache_sets", {})
    caches = sets.get((batch, dtype))
    if caches is None:
        net.setup_caches(batch, dtype)
        sets[(batch, dtype)] = net.caches
    elif net.caches is not caches:
        net.caches = caches


def _weights_version(*nets: torch.nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version) for net in nets for p in net.parameters())


def _fresh_function(fn: Callable) -> Callable:
    """A copy of closure `fn` with its own code object: dynamo keeps one cache per code object."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class _CompiledRound:
    """A compiled round. The first call traces and compiles with inductor's options set globally (dynamo
    reads `freezing` while tracing: only then do weights become graph constants) and records its
    seconds; later calls skip dynamo's guard evaluation (~0.5 ms a call on this CPU, all of it on
    the model's parameters): each callable has its own code object holding one compiled entry, and
    `compiled_round` keys it by everything the guards would check (batch, k, dtype, sampling,
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


def compiled_round(kind: str, model: FullModel, module: RecyclableModule | None, batch: int, k: int | None,
                   sampling: Sampling) -> Callable:
    """The compiled step for kind 'ar' | 'recycle' | 'verify' | 'verify_host' (cached; compiles on the
    first call; for verify_host, k is the padded draft length K).

    Call signatures: ar(pending, n[, expo]); recycle(pending, n, mlogits[, expo]);
    verify(pending, n, mlogits, g[, expo_drafts, u, expo_next]); verify_host(pending, n, drafts, lens[, u,
    expo_next]).
    """
    dtype = model.tok_embeddings.weight.dtype
    inductor = BACKEND == "inductor"
    options = inductor_options(batch) if inductor else {}
    # The cache tensors' identity is in the key: a graph must never run on caches it was not traced with.
    nets = (model,) if kind == "ar" or module is None else (model, module)
    caches = tuple(c.k_cache.data_ptr() for net in nets for c in net.caches)
    key = (kind, id(nets[-1]), batch, k, dtype, sampling, torch.get_num_threads(), BACKEND, caches,
           tuple(sorted(options.items())), _weights_version(*nets))
    with _LOCK:
        per_model = model.__dict__.setdefault(_ATTR, {})
        fn = per_model.get(key)
        if fn is not None:
            return fn
        # A stale entry for the same slot (weights changed in place) is dropped.
        for old in [o for o in per_model if o[:-1] == key[:-1]]:
            del per_model[old]
        if kind == "ar":
            def body(pending, n, expo=None):
                return ar_round(model, pending, n, sampling, expo)
        elif kind == "recycle":
            def body(pending, n, mlogits, expo=None):
                return recycle_round(model, module, pending, n, mlogits, sampling, expo)
        elif kind == "verify":
            def body(pending, n, mlogits, g, e1=None, u=None, e2=None):
                noise = None if e1 is None else (e1, u, e2)
                return verify_round(model, module, k, pending, n, mlogits, g, sampling, noise)
        elif kind == "verify_host":
            def body(pending, n, drafts, lens, u=None, e2=None):
                return verify_host_round(model, module, pending, n, drafts, lens, sampling,
                                         None if u is None else (u, e2))
        else:
            raise ValueError(f"unknown compiled round {kind!r}")
        compiled = torch.compile(_fresh_function(body), fullgraph=True, dynamic=False, backend=BACKEND,
                                 options=dict(options) if inductor else None)
        label = f"{kind}{'' if k is None else f' k={k}'} B={batch} {str(dtype).removeprefix('torch.')}" + (
            "" if sampling is None else " sampled")
        fn = per_model[key] = _CompiledRound(compiled, label, options)
        return fn


def eager_round(kind: str, model: FullModel, module: RecyclableModule | None, k: int | None,
                sampling: Sampling) -> Callable:
    """The same round uncompiled (used where a compiled shape would be used once: k capped by max_seq_len)."""
    if kind == "ar":
        return lambda pending, n, expo=None: ar_round(model, pending, n, sampling, expo)
    if kind == "recycle":
        return lambda pending, n, mlogits, expo=None: recycle_round(model, module, pending, n, mlogits, sampling,
                                                                    expo)
    if kind == "verify_host":
        return lambda pending, n, drafts, lens, u=None, e2=None: verify_host_round(
            model, module, pending, n, drafts, lens, sampling, None if u is None else (u, e2))
    return lambda pending, n, mlogits, g, e1=None, u=None, e2=None: verify_round(
        model, module, k, pending, n, mlogits, g, sampling, None if e1 is None else (e1, u, e2))


def clear_cache(model: FullModel) -> None:
    """Drop the model's compiled rounds (inductor's on-disk cache stays)."""
    with _LOCK:
        model.__dict__.pop(_ATTR, None)
