"""recyclegpt's CPU kernels (`recyclegpt.kernels`): parity with the torch code they replace, every row computed
alike at every row count, decoding routed through them, and the fallback when they cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from recyclegpt import kernels
from recyclegpt.config import ModelConfig, ModuleConfig
from recyclegpt.decoding import GenerationConfig, generate
from recyclegpt.decoding.testing import random_models
from recyclegpt.layers import Linear
from recyclegpt.model import FullModel, TreePlacement
from recyclegpt.module import RecyclableModule

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler: the kernels cannot be built")


@pytest.fixture(autouse=True)
def kernels_on():
    assert kernels.set_enabled(True), "the kernel did not build"
    yield
    kernels.set_enabled(True)


def test_linears_match_torch_and_every_row_is_computed_alike():
    torch.manual_seed(0)
    # K not a multiple of 16, N not a multiple of the 64 outputs of a tile nor of the 16 of a panel, a bias.
    layers = [Linear(40, 129, bias=True), Linear(40, 8), Linear(40, 3)]
    with torch.no_grad():
        for rows in (1, 2, 3, 4, 5, 9):
            x = torch.randn(2, rows, 40)
            for layer in layers:
                together = layer.decode(x)
                torch.testing.assert_close(together, layer(x), rtol=1e-5, atol=1e-5)  # torch's linear
                for r in range(rows):  # the row alone, bit for bit
                    assert torch.equal(layer.decode(x[:, r:r + 1]), together[:, r:r + 1])


def test_training_and_other_dtypes_stay_on_torch():
    layer = Linear(16, 8)
    x = torch.randn(3, 16, requires_grad=True)
    assert not kernels.applies(x, layer.weight)  # autograd on: torch's linear, which has a backward
    layer.decode(x).sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        assert kernels.applies(x, layer.weight)
        assert not kernels.applies(x.double(), layer.weight.double())
        assert kernels.applies(x.bfloat16(), layer.weight.bfloat16())
        assert not kernels.applies(x.bfloat16(), layer.weight)  # mixed dtypes


def _cfg() -> ModelConfig:
    # Grouped-query attention (3 query heads per kv head), q/k/v biases, head_dim 8 (not a multiple of 16).
    return ModelConfig(vocab_size=64, dim=48, n_layer=2, n_head=6, n_kv_head=2, ffn_dim=80, max_seq_len=40,
                       qkv_bias=True, tie_embeddings=False)


def _randomised(net: torch.nn.Module) -> torch.nn.Module:
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    return net.eval()


def _both_ways(run):
    """run() with the kernels off, then on; both results."""
    kernels.set_enabled(False)
    ref = run()
    kernels.set_enabled(True)
    return ref, run()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_blocks_match_the_torch_blocks_chain_and_tree(dtype):
    torch.manual_seed(0)
    model = _randomised(FullModel(_cfg())).to(dtype)
    module = _randomised(RecyclableModule(model.cfg, ModuleConfig(n_layer=2))).to(dtype)  # block 0: fc's output
    prompt = torch.randint(0, 64, (2, 10))
    pos = torch.tensor([[10, 11, 12], [10, 11, 12]])
    nxt = torch.randint(0, 64, (2, 3))
    # A tree: token 1 and 2 are both children of token 0 (one depth, two slots).
    tree_pos = torch.tensor([[10, 11, 11]] * 2)
    visible = torch.zeros(2, 1, 3, 40, dtype=torch.bool)
    visible[..., :10] = True
    visible[:, 0, 0, 10] = visible[:, 0, 1, [10, 11]] = visible[:, 0, 2, [10, 12]] = True
    tree = TreePlacement(slots=pos, bias=torch.where(visible, 0.0, float("-inf")))

    def run(t: TreePlacement | None):
        def go():
            with torch.inference_mode():
                model.setup_caches(2)
                module.setup_caches(2)
                h = model.prefill(prompt, torch.arange(2))
                module.prefill(model, torch.cat([prompt[:, 1:], nxt[:, :1]], 1), h, torch.arange(2))
                logits, h = model(nxt, tree_pos if t else pos, tree=t)
                mlogits, _ = module(model, nxt, h, tree_pos if t else pos, tree=t)
                return logits, mlogits, [c.k_cache.clone() for c in model.caches + module.caches]
        return go

    # bf16: torch rounds after every op, the kernel only the block's output and the cache entries.
    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        if dtype is torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        else:  # within 3% of the largest value
            assert (a.float() - b.float()).abs().max() <= 0.03 * b.float().abs().max()

    for t in (None, tree):
        (ref, mref, kref), (got, mgot, kgot) = _both_ways(run(t))
        close(got, ref)
        close(mgot, mref)
        for a, b in zip(kgot, kref, strict=True):
            close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_blocks_rows_alone_equal_rows_together(dtype):
    torch.manual_seed(1)
    model = _randomised(FullModel(_cfg())).to(dtype)
    prompt = torch.randint(0, 64, (3, 7))
    nxt = torch.randint(0, 64, (3, 4))
    pos = torch.arange(7, 11).expand(3, 4)
    with torch.inference_mode():
        model.setup_caches(3)
        model.prefill(prompt, torch.arange(3))
        together, _ = model(nxt, pos)  # a verify-like pass: 4 tokens per row
        alone = torch.cat([model(nxt[:, i:i + 1], pos[:, i:i + 1])[0] for i in range(4)], 1)  # ar-like passes
    assert torch.equal(alone, together)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_runs_through_the_kernels_and_verify_equals_ar(monkeypatch, dtype):
    model, module = random_models(seed=3, dtype=dtype)
    calls = []
    real = kernels.decode_blocks
    monkeypatch.setattr(kernels, "decode_blocks", lambda *a: calls.append(1) or real(*a))
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    ar = generate(model, module, prompts, GenerationConfig(mode="ar", max_new_tokens=16))
    assert calls, "decoding passes did not reach the kernel"
    for k in (1, 3):
        assert generate(model, module, prompts, GenerationConfig(mode="verify", k=k, max_new_tokens=16)).tokens \
            == ar.tokens
    tree = generate(model, module, prompts, GenerationConfig(mode="verify", tree=6, max_new_tokens=16))
    assert tree.tokens == ar.tokens


def test_off_by_environment(monkeypatch):
    monkeypatch.setenv("RECYCLEGPT_KERNELS", "0")
    assert not kernels.set_enabled(True) and not kernels.enabled()
    model, module = random_models(seed=0)
    calls = []
    monkeypatch.setattr(kernels, "decode_blocks", lambda *a: calls.append(1))
    out = generate(model, module, [[1, 2, 3]], GenerationConfig(mode="verify", k=2, max_new_tokens=6))
    assert len(out.tokens[0]) == 6 and not calls  # torch's kernels did the work


def test_a_failed_build_warns_once_and_decoding_goes_on(tmp_path):
    # A fresh process whose cache holds no built library and whose "compiler" fails.
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from recyclegpt import kernels\n"
            "from recyclegpt.decoding import GenerationConfig, generate\n"
            "from recyclegpt.decoding.testing import random_models\n"
            "m, mod = random_models(seed=0)\n"
            "out = generate(m, mod, [[1, 2, 3]], GenerationConfig(mode='verify', k=2, max_new_tokens=6))\n"
            "print(kernels.enabled(), len(out.tokens[0]))\n")
    env = {**os.environ, "RECYCLEGPT_CACHE": str(tmp_path), "CXX": "/bin/false"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "6"]
    assert done.stderr.count("CPU kernel not built") == 1


def test_packed_weights_follow_weight_changes():
    layer = Linear(32, 20, bias=False)
    x = torch.randn(2, 32)
    with torch.no_grad():
        before = layer.decode(x)
        layer.weight.mul_(2)  # in place: the version counter moves, the packed copy is made again
        torch.testing.assert_close(layer.decode(x), 2 * before)
        layer.weight = torch.nn.Parameter(torch.zeros(20, 32))  # replaced
        assert torch.equal(layer.decode(x), torch.zeros(2, 20))


def test_a_stack_of_blocks_follows_weight_changes():
    torch.manual_seed(4)
    model = _randomised(FullModel(_cfg()))
    prompt, nxt, pos = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 2)), torch.tensor([[6, 7]])

    def logits():
        with torch.inference_mode():
            model.setup_caches(1)
            model.prefill(prompt, torch.arange(1))
            return model(nxt, pos)[0]

    def kernel_equals_torch() -> torch.Tensor:
        ref, got = _both_ways(logits)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        return got

    before = kernel_equals_torch()
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight.mul_(2)  # in place: its version counter moves
    changed = kernel_equals_torch()
    assert not torch.equal(changed, before)
    model.layers[0].attention.wq.weight = torch.nn.Parameter(torch.randn(48, 48))  # a new parameter
    assert not torch.equal(kernel_equals_torch(), changed)


def test_compiled_rounds_run_the_kernels_and_equal_eager(monkeypatch):
    from recyclegpt.decoding import compiled
    monkeypatch.setattr(compiled, "BACKEND", "eager")  # dynamo's capture, run op by op: what inductor would get
    model, module = random_models(seed=2)
    prompts = [[1, 2, 3, 4], [5, 6]]
    eager = generate(model, module, prompts, GenerationConfig(mode="ar", max_new_tokens=8))
    for mode in ("ar", "verify"):
        out = generate(model, module, prompts, GenerationConfig(mode=mode, max_new_tokens=8, compile=True))
        assert out.tokens == eager.tokens
