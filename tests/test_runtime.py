"""runtime: the CPU class read from /proc/cpuinfo texts (synthetic ones, so every class is covered on any
machine), the dtype it implies, and the memory-bandwidth probe."""

from __future__ import annotations

import pytest

from recyclegpt import runtime

BASE = "fpu vme sse sse2 ssse3 sse4_1 sse4_2 popcnt avx f16c"
CPUINFO = {
    "AMX": BASE + " avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8",
    "AVX-512-BF16": BASE + " avx2 fma avx512f avx512bw avx512_vnni avx512_bf16",
    "AVX-512": BASE + " avx2 fma avx512f avx512dq avx512bw avx512_vnni",
    "AVX2": BASE + " avx2 fma",
    "other": BASE,
}


@pytest.mark.parametrize("cls", list(CPUINFO))
def test_cpu_class_from_cpuinfo(cls):
    text = f"processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: Some CPU\nflags\t\t: {CPUINFO[cls]}\n\n" \
           f"processor\t: 1\nflags\t\t: {CPUINFO[cls]}\n"
    assert runtime.cpu_class(text) == cls
    assert cls in runtime.CPU_CLASSES


def test_cpu_class_of_an_arm_or_empty_cpuinfo():
    assert runtime.cpu_class("processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n") == "other"
    assert runtime.cpu_class("") == "other"


def test_this_machine_has_a_class_and_a_positive_bandwidth():
    assert runtime.cpu_class() in runtime.CPU_CLASSES
    assert runtime.memory_bandwidth(size_mb=16, repeats=2) > 0
    assert runtime.machine_info(__import__("torch").device("cpu"))["cpu_class"] == runtime.cpu_class()


def test_compute_on_a_thread_of_its_own():
    """serial_here leaves this thread one intra-op thread and returns the count it had; in_thread runs a
    function with the given count on a new thread and hands back its result or its exception."""
    import threading

    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert runtime.serial_here() == 2 and torch.get_num_threads() == 1
        seen = runtime.in_thread(lambda x: (x, torch.get_num_threads(), threading.current_thread().name), 7,
                                 threads=2)
        assert seen == (7, 2, "recyclegpt-compute")
        assert torch.get_num_threads() == 1  # the caller's own setting is untouched

        def fails():
            raise KeyError("inside")

        with pytest.raises(KeyError, match="inside"):
            runtime.in_thread(fails, threads=1)
    finally:
        torch.set_num_threads(before)
