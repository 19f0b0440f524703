"""`tree="auto"`: choose a chain or a draft tree, and its size, by measuring them on this machine.

A draft shape pays when what it gains in accepted tokens per round (τ) outgrows what its round costs:
the module's drafting plus one full pass over its n+1 tokens. Both halves depend on where it runs (on
a GPU a pass of 16 tokens costs about what a pass of 4 does; on a small CPU it costs nearly four
times as much), on the model and on the text, so `choose_draft` measures instead of guessing: it
decodes a few calibration prompts with every candidate in the caller's setting (device, dtype, batch
size, sampling, compile), interleaved and repeated, and keeps the candidate with the most tokens per
second of decoding (τ / seconds per round). The choice is cached in `cache_dir()/auto.json` per
weights (a hash of the full model's and the module's parameters), machine (CPU or GPU model, torch
threads, torch version) and setting; `refresh=True` measures again. The calibration prompts matter
(code accepts more than prose): pass prompts like the ones you will decode.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import RecycleError
from ..files import atomic_write_text
from ..model import FullModel
from ..module import RecyclableModule
from ..runtime import cache_dir, machine_info
from .compiled import weights_version
from .generation import generate
from .options import GenerationConfig
from .tree import tree_candidates

log = logging.getLogger(__name__)

CACHE_FILE = "auto.json"
_HASH_ATTR = "_recyclegpt_weights_hash"  # (weights' version, hash) on the full model: see weights_hash
FORMAT = 1  # bump when the measurement changes meaning: older records are measured again


@dataclass(frozen=True)
class DraftShape:
    """A verify round's draft: a chain of k module drafts (tree 0), or a tree of `tree` nodes, k deep."""

    k: int
    tree: int = 0
    tree_topk: int = 2

    @property
    def label(self) -> str:
        return f"tree {self.tree} (depth {self.k})" if self.tree else f"chain k={self.k}"

    def apply(self, config: GenerationConfig) -> GenerationConfig:
        return replace(config, k=self.k, tree=self.tree, tree_topk=self.tree_topk)


# Chains of 2-5 drafts and trees of 6-16 nodes: on a small CPU the best is a short chain, on a GPU (or a
# model too large for the CPU's caches) a wider tree.
CANDIDATES: tuple[DraftShape, ...] = (DraftShape(2), DraftShape(3), DraftShape(4), DraftShape(5), DraftShape(4, 6),
                                      DraftShape(4, 8), DraftShape(5, 12), DraftShape(5, 16))


@dataclass
class Trial:
    """One candidate's measurement: τ, milliseconds per round and decoded tokens per second."""

    shape: DraftShape
    tau: float
    round_ms: float
    tokens_per_s: float


@dataclass
class AutoChoice:
    best: DraftShape
    trials: list[Trial]
    cached: bool  # True: read from the cache file, not measured by this call
    measured_at: str  # ISO date of the measurement

    def describe(self) -> str:
        """One line: the choice and what it beat."""
        chains = [t for t in self.trials if not t.shape.tree]
        best = next(t for t in self.trials if t.shape == self.best)
        line = f"auto: {best.shape.label}, {best.tokens_per_s:.0f} tokens/s (τ {best.tau:.2f})"
        if chains and self.best.tree:
            c = max(chains, key=lambda t: t.tokens_per_s)
            line += f"; the best chain, {c.shape.label}: {c.tokens_per_s:.0f} tokens/s (τ {c.tau:.2f})"
        return line + f"; {'cached, ' if self.cached else ''}measured {self.measured_at}"


def weights_hash(model: FullModel, module: RecyclableModule) -> str:
    """sha256 over the full model's and the module's parameters and buffers (names, dtypes, bytes).
    Kept on the model with the weights' version counters (as compiled graphs are): a later call reads it
    back instead of hashing every byte again, until a weight changes in place or moves."""
    version = (id(module), weights_version(model, module))
    memo = model.__dict__.get(_HASH_ATTR)
    if memo is not None and memo[0] == version:
        return memo[1]
    h = hashlib.sha256()
    for net in (model, module):
        for name, t in sorted(net.state_dict().items()):
            if "cache" in name:  # KV caches are buffers too; they are state, not weights
                continue
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    model.__dict__[_HASH_ATTR] = (version, h.hexdigest()[:16])
    return model.__dict__[_HASH_ATTR][1]


def cache_key(model: FullModel, module: RecyclableModule, config: GenerationConfig, batch: int) -> dict[str, Any]:
    """What a measurement holds for: these weights on this machine, in this setting."""
    weight = model.tok_embeddings.weight
    m = machine_info(weight.device)
    return {"format": FORMAT, "weights": weights_hash(model, module), "cpu": m["cpu"], "gpu": m.get("gpu"),
            "threads": m["threads"], "torch": torch.__version__, "device": weight.device.type,
            "dtype": str(weight.dtype).removeprefix("torch."), "batch": batch, "compile": config.compile,
            "temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p}


def _key_string(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # unreadable or corrupt: measure again, and overwrite it then
        log.warning("ignoring the auto cache %s (%s)", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _from_record(rec: dict[str, Any]) -> AutoChoice:
    trials = [Trial(DraftShape(**t["shape"]), t["tau"], t["round_ms"], t["tokens_per_s"]) for t in rec["trials"]]
    return AutoChoice(DraftShape(**rec["best"]), trials, True, rec["measured_at"])


def measure(model: FullModel, module: RecyclableModule, batches: Sequence[Sequence[Sequence[int]]],
            config: GenerationConfig, shape: DraftShape, max_new_tokens: int) -> Trial:
    """Decode each batch of prompts once with `shape` and time the decoding rounds (prefills are left out:
    every candidate pays the same ones)."""
    cfg = shape.apply(replace(config, mode="verify", drafter="module", adaptive_k=False, eos_id=None,
                              stop_strings=(), max_new_tokens=max_new_tokens,
                              seed=0 if config.seed is None else config.seed))
    produced = passes = row_passes = 0
    seconds = 0.0
    for batch in batches:
        st = generate(model, module, batch, cfg).stats
        produced += sum(max(0, t - 1) for t in st.new_tokens)  # the prefill's first token excluded
        passes += st.full_passes
        row_passes += sum(st.row_passes)
        seconds += st.decode_s
    return Trial(shape, produced / max(row_passes, 1), 1e3 * seconds / max(passes, 1), produced / max(seconds, 1e-9))


def resolve_draft(model: FullModel, module: RecyclableModule | None, prompts: Sequence[Sequence[int]],
                  config: GenerationConfig) -> tuple[GenerationConfig, AutoChoice | None]:
    """`config` ready to decode `prompts`: with tree="auto", the fastest measured draft shape applied
    (`choose_draft` on these prompts, or its cached choice) and that choice; any other config as it is."""
    if config.tree != "auto":
        return config, None
    config.validate()
    choice = choose_draft(model, module, prompts, config)
    return choice.best.apply(config), choice


def choose_draft(model: FullModel, module: RecyclableModule, prompts: Sequence[Sequence[int]],
                 config: GenerationConfig | None = None, *, batch_size: int | None = None,
                 candidates: Sequence[DraftShape] | None = None, max_new_tokens: int = 48, repeats: int = 2,
                 refresh: bool = False, use_cache: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> AutoChoice:
    """The fastest draft shape among `candidates` (default `CANDIDATES`) for decoding prompts like
    `prompts`, `batch_size` at a time (default: all together), with `config` (its k and tree are
    ignored): read from the cache, or measured (a warm-up run per candidate, which compiles its round
    graph under `config.compile`, then `repeats` timed runs of `max_new_tokens` tokens per prompt,
    interleaved; a candidate's speed is its best run). `progress(done, total)` is called after each run."""
    config = config or GenerationConfig()
    if module is None:
        raise RecycleError("auto draft choice needs the recyclable module (it drafts every candidate)")
    if not prompts:
        raise RecycleError("auto draft choice needs at least one calibration prompt")
    room = model.cfg.max_seq_len - max(len(p) for p in prompts) - 1
    max_new_tokens = min(max_new_tokens, room)
    if max_new_tokens < 8:
        raise RecycleError("the calibration prompts leave fewer than 8 tokens of context to decode; "
                           "use shorter prompts")
    candidates = [s for s in (CANDIDATES if candidates is None else candidates)
                  if not s.tree or s.k <= s.tree <= tree_candidates(s.k, s.tree_topk)]
    if not candidates:
        raise RecycleError("no valid draft shape among the auto candidates")
    batch_size = batch_size or len(prompts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RecycleError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    key = cache_key(model, module, config, batch_size)
    path, name = cache_dir() / CACHE_FILE, _key_string(key)
    if use_cache and not refresh:
        rec = _read_cache(path).get(name)
        if rec is not None and [DraftShape(**t["shape"]) for t in rec.get("trials", [])] == list(candidates):
            return _from_record(rec)

    total, done = len(candidates) * (1 + repeats), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    for shape in candidates:  # warm-up: compiles each candidate's round graph once (under config.compile)
        measure(model, module, batches[:1], config, shape, min(8, max_new_tokens))
        tick()
    runs: dict[DraftShape, list[Trial]] = {s: [] for s in candidates}
    for _ in range(repeats):
        for shape in candidates:
            runs[shape].append(measure(model, module, batches, config, shape, max_new_tokens))
            tick()
    trials = [max(runs[s], key=lambda t: t.tokens_per_s) for s in candidates]
    best = max(trials, key=lambda t: t.tokens_per_s).shape
    choice = AutoChoice(best, trials, False, datetime.date.today().isoformat())
    if use_cache:
        _save(path, name, key, choice)
    log.info("%s", choice.describe())
    return choice


def _save(path: Path, name: str, key: dict[str, Any], choice: AutoChoice) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[name] = {"key": key, "best": asdict(choice.best), "measured_at": choice.measured_at,
                      "trials": [{**asdict(t), "shape": asdict(t.shape)} for t in choice.trials]}
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    except OSError as e:  # a read-only home must not stop decoding: the choice is just not remembered
        log.warning("could not save the auto choice to %s (%s)", path, e)
