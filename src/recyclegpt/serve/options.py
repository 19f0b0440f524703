"""The server's settings (`recyclegpt serve`'s flags), read by the API side and the engine side alike."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import RecycleError


@dataclass
class ServeOptions:
    """Server settings (the `recyclegpt serve` flags)."""

    model_name: str = "recyclegpt"
    slots: int = 8
    batches: list[int] | None = None  # the batch ladder a round picks from (None: powers of two up to slots)
    compile: bool = True
    width: int = 3  # most drafts a request may ask for (k); every verify round is this wide
    default_k: int = 3
    tree: int | str = 0  # verify requests draft trees of this many nodes (0: chains), `width` deep;
    # "auto": the engine measures chains and trees when it starts (`decoding.auto`) and sets width and tree
    tree_topk: int = 2
    load_aware: bool = True  # a greedy round runs without drafts when that is faster at the load (`Engine`)
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int | None = None  # None: the context
    default_max_tokens: int = 16  # OpenAI's default for completions
    request_timeout_s: float = 600.0
    engine_timeout_s: float = 120.0  # an engine holding requests that says nothing for this long is hung: killed
    threads: int | None = None  # the engine's intra-op threads (None: one per CPU it runs on / torch's setting)
    cpus: str = "none"  # bind the engine process's threads: "none" (the OS schedules them), "auto" (one CPU of each
    # physical core) or a list of CPUs
    device: str = "auto"  # the engine process loads the checkpoint on this device, in this dtype
    dtype: str = "auto"


def parse_cpus(spec: str) -> list[int] | None:
    """--engine-cpus: 'auto' (one CPU of each physical core this process may run on), 'none' (no binding: None)
    or a list such as '0-3,6'. Raises RecycleError on anything else or on CPUs this process may not use."""
    spec = spec.strip().lower()
    if spec == "none":
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if spec == "auto":
        return one_per_core(allowed)
    cpus: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError:
        raise RecycleError(f"--engine-cpus {spec!r}: expected auto, none or CPU ids such as 0-3,6") from None
    outside = sorted(cpus - set(allowed))
    if outside:
        raise RecycleError(f"--engine-cpus {spec!r}: CPU {outside[0]} is not one this process may use "
                           f"({','.join(map(str, allowed))})")
    return sorted(cpus)


def one_per_core(cpus: list[int]) -> list[int]:
    """The first CPU of each physical core among `cpus` (SMT siblings share a core's units and its share of
    memory bandwidth: a second decoding thread on the same core adds contention, not speed)."""
    seen: set[str] = set()
    out = []
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            core = siblings.read_text().strip()
        except OSError:  # no topology (not Linux, or hidden): every CPU its own core
            core = str(cpu)
        if core not in seen:
            seen.add(core)
            out.append(cpu)
    return out
