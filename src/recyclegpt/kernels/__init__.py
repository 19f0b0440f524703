"""recyclegpt's own CPU kernels for decoding passes (`decode.cpp`, ops `torch.ops.recyclegpt.*`).

- `decode_blocks`: a pass's whole stack of transformer blocks (`layers.Block`) over the static KV caches in one call,
  one OpenMP parallel region, where torch runs some twenty ops per block, each with its own dispatch and fork/join.
- `skinny_linear`: linear layers over a decoding pass's few rows (the full model's head).

Why: a decoding pass multiplies a few rows (1 for `ar`, k+1 for `verify`, times the batch) by every weight
matrix, so it is bound by reading the weights. The kernels stream packed weights (`pack`) once for all of a
pass's rows, and compute every output by the same arithmetic whatever the row count, which BLAS libraries do
not promise: a row's bits in a one-token pass are its bits in a wider pass, so `verify` stays identical to `ar`.

How: the C++ source ships with the package and is built on first use with the system's C++ compiler and
torch's headers, for this CPU (`-march=native`: AVX-512, AVX2, ... whatever it has), into
`cache_dir()/kernels/<hash>/` (the hash covers the source, torch, the compiler and the CPU's flags), then
loaded into torch. Building takes about 10 seconds, once per machine. Without a compiler, or with
RECYCLEGPT_KERNELS=0, decoding runs on torch's own kernels, as before (a warning says so once).

Where they run: decoding passes (passes over the static KV cache), eager or compiled, on the CPU, without
autograd, for float32 and bfloat16 models (bfloat16 weights and caches are read as they are and the arithmetic is
float32: on CPUs without bf16 instructions too, and more precise than torch's bf16 path, which rounds after
every op): `model.run_blocks` sends such a pass to `decode_blocks`, and the full model's head goes through
`Linear.decode` (`skinny_linear`). Prompts' prefills, training and evaluation keep torch's kernels (BLAS is faster
at many rows; those passes need no row-stability). `load()` is called by `FullModel.setup_caches` and
`RecyclableModule.setup_caches` (every decoding path sets up caches before its first pass), so the eager and
compiled passes of one process agree on it. The kernels read weights packed (`pack`): eagerly a copy kept on
each layer, in a compiled round a constant inductor's freezing folds once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime import cache_dir, cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.cpp")
_DTYPES = (torch.float32, torch.bfloat16)
PANEL = 16  # outputs per packed panel (`pack`; decode.cpp's PANEL)
_PACKED_ATTR = "_recyclegpt_packed"  # a layer's packed weight and the key it was made for (`packed`)
_STACK_ATTR = "_recyclegpt_stack"  # a stack of blocks' decode_blocks arguments and what they were made from
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w"]

_lock = threading.Lock()
_state: dict[str, bool] = {}  # "registered": the ops are in torch; "loaded": on; "tried": load() ran


def enabled() -> bool:
    """Whether the kernels are loaded and on in this process (`load`, `set_enabled`)."""
    return _state.get("loaded", False)


def set_enabled(on: bool) -> bool:
    """Turn the kernels on (loading them if needed) or off for this process's later passes; returns whether they
    are on. Graphs compiled before keep what they were traced with (the compile key holds `enabled()`)."""
    if not on:
        _state["loaded"] = False
        return False
    _state.pop("tried", None)
    return load()


def load() -> bool:
    """Build (first time on this machine) and load the kernels; True when they are usable. Never raises: a
    failed build warns once and decoding keeps torch's kernels."""
    if _state.get("tried"):
        return enabled()
    with _lock:
        if _state.get("tried"):
            return enabled()
        _state["tried"], _state["loaded"] = True, False
        if os.environ.get("RECYCLEGPT_KERNELS", "1") == "0" or sys.platform != "linux":
            return False
        try:
            if not _state.get("registered"):  # a library is loaded once per process
                torch.ops.load_library(str(_build()))
                _register_fake()
                _state["registered"] = True
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            warnings.warn(f"recyclegpt: CPU kernel not built ({str(e).strip().splitlines()[-1][:200]}); decoding "
                          "uses torch's kernels (slower at few rows). Install g++ to enable it, or set "
                          "RECYCLEGPT_KERNELS=0 to silence this.", stacklevel=2)
            return False
        _state["loaded"] = True
        return True


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether a decoding pass's call x @ weight.T may go to the kernels: loaded, float32 or bfloat16 (x and the
    weight alike) on the CPU, inference (no autograd)."""
    return (x.dtype in _DTYPES and enabled() and x.device.type == "cpu" and weight.dtype is x.dtype
            and not torch.is_grad_enabled())


def pack(weight: Tensor) -> Tensor:
    """[N, K] -> [ceil(N / PANEL), K, PANEL]: panel j holds outputs j*PANEL.. for each k in turn (zero rows pad N),
    the layout the kernels stream (`decode.cpp`)."""
    N, K = weight.shape
    return F.pad(weight, (0, 0, 0, -N % PANEL)).view(-1, PANEL, K).transpose(1, 2).contiguous()


def packed(layer: torch.nn.Linear) -> Tensor:
    """The layer's weight packed (`pack`). In a compiled graph the expression itself: inductor's freezing folds it
    into a constant once. Eagerly, a copy kept on the layer, made again when the weight changes (its storage or
    its in-place version counter)."""
    w = layer.weight
    if torch.compiler.is_compiling():
        return pack(w)
    # Inference tensors keep no version counter (in-place changes to them go unseen; replacing them is seen).
    key = (w.data_ptr(), _version(w), w.shape)
    cached = layer.__dict__.get(_PACKED_ATTR)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = layer.__dict__[_PACKED_ATTR] = (key, pack(w.detach()))
    return cached[1]


def skinny_linear(x: Tensor, layer: torch.nn.Linear) -> Tensor:
    """layer(x): x [..., K] -> [..., N] (CPU, no autograd)."""
    return torch.ops.recyclegpt.skinny_linear(x.contiguous(), packed(layer), layer.out_features, layer.bias)


def blocks_apply(layers: Sequence[torch.nn.Module], x: Tensor, kvs: object, bias: Tensor | None) -> bool:
    """Whether a pass through `layers` goes to `decode_blocks`: a cache pass (KVCaches in x's dtype and an attention
    bias) under the linear layers' conditions (`applies`)."""
    if bias is None or kvs is None or x.dim() != 3 or not applies(x, layers[0].attention.wq.weight):
        return False
    return all(getattr(kv, "k_cache", None) is not None and kv.k_cache.dtype is x.dtype for kv in kvs)


def decode_blocks(layers: Sequence[torch.nn.Module], x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor,
                  kvs: Sequence[torch.nn.Module], slots: Tensor) -> Tensor:
    """x [B, T, d] through `layers` (`layers.Block`s, as `model.run_blocks` runs them) over static KV caches in one
    call: -> [B, T, d]; block l's new keys and values go into kvs[l]'s k_cache/v_cache [B, Hkv, S, D] at slots
    [B, T]; cos, sin [B, T, D]; bias float32 [B or 1, 1, T, S]."""
    attn_norms, ffn_norms, attn, qkv_bias, ffn = _stack_args(layers)
    return torch.ops.recyclegpt.decode_blocks(
        x.contiguous(), attn_norms, ffn_norms, layers[0].ffn_norm.eps, attn, qkv_bias, ffn,
        cos.to(x.dtype).contiguous(), sin.to(x.dtype).contiguous(), bias.contiguous(), [kv.k_cache for kv in kvs],
        [kv.v_cache for kv in kvs], slots.contiguous(), layers[0].attention.n_head)


# Bumped whenever any module registers a parameter or a submodule: a stack's cached arguments (`_stack_args`) are
# then made again, so a replaced weight or layer is never missed.
_registrations = [0]


def _count_registration(*_: object) -> None:
    _registrations[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def _stack_args(layers: Sequence[torch.nn.Module]) -> tuple[list, list, list, list, list]:
    """decode_blocks' per-block arguments: attention norms (None for an Identity: the module's first block), ffn
    norms, packed (wq, wk, wv, wo) per block, (bq, bk, bv) per block, packed (w1, w3, w2) per block. In a compiled
    graph built from the layers (the pack expressions fold into constants). Eagerly, kept on the stack and made again
    when any weight's storage or in-place version changes, or a parameter or module is registered anywhere: walking
    some seventy layers' attributes costs a pass far more than checking the tensors."""
    compiling = torch.compiler.is_compiling()
    cached = None if compiling else layers.__dict__.get(_STACK_ATTR)
    if cached is not None and cached[0] == _registrations[0] and all(
            w.data_ptr() == ptr and _version(w) == ver for w, ptr, ver in cached[1]):
        return cached[2]
    attn_norms, ffn_norms, attn, qkv_bias, ffn, weights = [], [], [], [], [], []
    for block in layers:
        a, f = block.attention, block.feed_forward
        attn_norms.append(getattr(block.attention_norm, "weight", None))
        ffn_norms.append(block.ffn_norm.weight)
        linears = [a.wq, a.wk, a.wv, a.wo, f.w1, f.w3, f.w2]
        packs = [packed(lin) for lin in linears]  # compiling: the pack expressions themselves
        attn += packs[:4]
        ffn += packs[4:]
        qkv_bias += [a.wq.bias, a.wk.bias, a.wv.bias]
        weights += [lin.weight for lin in linears]
    args = (attn_norms, ffn_norms, attn, qkv_bias, ffn)
    if not compiling:
        # Norms and biases are passed as they are (their changes are seen anyway); the packed weights are copies.
        layers.__dict__[_STACK_ATTR] = (_registrations[0], [(w, w.data_ptr(), _version(w)) for w in weights], args)
    return args


def _version(w: Tensor) -> int:
    return -1 if w.is_inference() else w._version  # inference tensors keep no version counter


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise OSError("no C++ compiler found (g++ or $CXX)")
    return cxx


def _build() -> Path:
    """The shared library for this source, torch, compiler and CPU: built into the cache unless there."""
    from torch.utils import cpp_extension

    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    key = hashlib.sha256("\n".join([SOURCE.read_text(), torch.__version__, version, abi, *_FLAGS,
                                    " ".join(sorted(cpu_flags()))]).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / key / "recyclegpt_kernels.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("building recyclegpt's CPU kernel into %s (once per machine, about 10 s)", out.parent)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / out.name
        cmd = [cxx, *_FLAGS, abi, *includes, str(SOURCE), "-o", str(part), *libs, "-lc10", "-ltorch_cpu"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{cxx} failed: {done.stderr.strip()[-500:]}")
        os.replace(part, out)  # atomic: a concurrent builder's identical file may land first; either is whole
    return out


def _register_fake() -> None:
    """Shapes for torch.compile's tracing (in a compiled round the ops run as extern calls)."""

    @torch.library.register_fake("recyclegpt::skinny_linear")
    def _(x: Tensor, weight: Tensor, n: int, bias: Tensor | None) -> Tensor:
        return x.new_empty((*x.shape[:-1], n))

    @torch.library.register_fake("recyclegpt::decode_blocks")
    def _(x: Tensor, *args: object) -> Tensor:
        return torch.empty_like(x)
