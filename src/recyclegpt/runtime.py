"""Where and in what precision to run: device, dtype and thread defaults."""

from __future__ import annotations

import functools
import os
import platform
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import RecycleError

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


CPU_CLASSES = ("AMX", "AVX-512-BF16", "AVX-512", "AVX2", "other")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of the first CPU in a /proc/cpuinfo text (default: this machine's)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_class(cpuinfo: str | None = None) -> str:
    """What the CPU's vector units can do for a decoding pass, as one word: AMX (bf16 tile matmuls),
    AVX-512-BF16 (bf16 dot products), AVX-512, AVX2 (with FMA), or other."""
    flags = cpu_flags(cpuinfo)
    if {"amx_tile", "amx_bf16"} <= flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512-BF16"
    if "avx512f" in flags:
        return "AVX-512"
    if {"avx2", "fma"} <= flags:
        return "AVX2"
    return "other"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: bf16 matmuls run natively, so bf16 is the fast CPU default there (else fp32)."""
    return cpu_class() in ("AMX", "AVX-512-BF16")


def weight_bytes(net: torch.nn.Module) -> int:
    """Bytes of a network's parameters (a tied weight counted once): what one pass streams from memory."""
    return sum(p.numel() * p.element_size() for p in net.parameters())


def memory_bandwidth(size_mb: int = 256, repeats: int = 20) -> float:
    """Bytes per second a one-row linear layer streams from memory with torch's threads: the best of `repeats`
    calls over a float32 weight far larger than any cache (a GEMV, the work of a one-token pass, reads it at
    close to the machine's bandwidth; a plain sum reached about half of it). A pass that streams its weights
    once cannot take less than weight bytes / this (the floor `recyclegpt bench` reports)."""
    import time

    import torch.nn.functional as F

    w = torch.ones((size_mb << 18) // 4096, 4096, dtype=torch.float32)  # size_mb MiB
    x = torch.ones(1, 4096)
    for _ in range(3):  # fault the pages in; the first calls after that still run slow (measured: 17 vs 27 GB/s)
        F.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return w.numel() * w.element_size() / best


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise RecycleError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RecycleError(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise RecycleError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "meta":  # holds no data: nothing could run on it
        raise RecycleError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RecycleError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices here "
                           f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, generic: bool = False) -> torch.dtype:
    """dtype 'auto': bf16 on CUDA and on CPUs with native bf16, else fp32. For the generic (transformers)
    backend it is fp32 everywhere: transformers' kernels round a bf16 pass differently depending on how
    many tokens it holds (attention block sizes, GEMM paths), so a `verify` pass over k+1 tokens and an
    `ar` pass over one could disagree; recyclegpt's native model has row-stable kernels for that, a
    transformers model does not. In fp32 `verify` is identical to `ar` there too."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if generic:
            return torch.float32
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise RecycleError(f"unknown dtype {dtype!r}; choose auto, float32 or bfloat16")
    return DTYPES[dtype]


def cache_dir() -> Path:
    """Where recyclegpt keeps what it can recompute: $RECYCLEGPT_CACHE, else $XDG_CACHE_HOME/recyclegpt,
    else ~/.cache/recyclegpt."""
    if os.environ.get("RECYCLEGPT_CACHE"):
        return Path(os.environ["RECYCLEGPT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "recyclegpt"


def set_threads() -> None:
    """Use every core for intra-op work unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


def serial_here() -> int:
    """Make this thread's torch ops serial (one intra-op thread) and return the count it had: for a thread
    that hands the compute to another one, as the server's HTTP thread hands it to the engine thread.

    Why: OpenMP (libgomp, which torch uses) gives each thread that runs a parallel op a team of worker
    threads, kept for that thread's life, and when the teams' threads outnumber the cores it stops
    spinning between parallel regions and puts its workers to sleep instead. A second team, even an idle
    one, so makes every parallel region of the engine thread wait for sleeping workers to wake
    (`benchmarks/thread_teams.py` measures what that costs an engine step). A serial thread has no team."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def in_thread(fn: Callable[..., T], *args: Any, threads: int) -> T:
    """fn(*args) on a short-lived thread with `threads` intra-op threads; its result, or its exception
    raised here. The thread's OpenMP team goes when it ends (see `serial_here`)."""
    out: list[Any] = []

    def run() -> None:
        torch.set_num_threads(threads)
        try:
            out.append((True, fn(*args)))
        except BaseException as e:  # noqa: B036 -- handed to the calling thread as is
            out.append((False, e))

    worker = threading.Thread(target=run, name="recyclegpt-compute")
    worker.start()
    worker.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a measurement ran on: CPU model, cores, torch threads, platform (and the GPU on CUDA)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cpu_class": cpu_class(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "platform": platform.platform(), "python": platform.python_version()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
    return out
