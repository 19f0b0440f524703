"""Full model and recyclable module: cache equivalence, rollback, parameter share, shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_pair

from recyclegpt.config import ModuleConfig, preset
from recyclegpt.model import FullModel
from recyclegpt.module import RecyclableModule


def positions(B: int, start: int, T: int) -> torch.Tensor:
    return (torch.arange(T) + start).expand(B, T)


@torch.no_grad()
def test_cached_forward_equals_uncached(tiny):
    cfg, model, _ = tiny
    x = torch.randint(0, cfg.model.vocab_size, (2, 17))
    ref_logits, ref_h = model(x)
    model.setup_caches(2, torch.float32)
    parts = [(0, 9), (9, 10), (10, 17)]
    logits = torch.cat([model(x[:, a:b], positions(2, a, b - a))[0] for a, b in parts], dim=1)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_per_row_positions_match_separate_rows():
    cfg, model, _ = tiny_pair(1)
    a = torch.randint(0, cfg.model.vocab_size, (1, 11))
    b = torch.randint(0, cfg.model.vocab_size, (1, 6))
    ref_a, _ = model(a)
    ref_b, _ = model(b)
    # Row b is right-padded; its pad positions are written but never read by its real queries.
    model.setup_caches(2, torch.float32)
    pad = torch.zeros(1, 5, dtype=torch.long)
    logits, _ = model(torch.cat([a, torch.cat([b, pad], 1)]), positions(2, 0, 11))
    torch.testing.assert_close(logits[0], ref_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, :6], ref_b[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_rollback_overwrites_stale_entries(tiny):
    cfg, model, _ = tiny
    x = torch.randint(0, cfg.model.vocab_size, (1, 12))
    model.setup_caches(1, torch.float32)
    model(x[:, :8], positions(1, 0, 8))
    junk = torch.randint(0, cfg.model.vocab_size, (1, 4))
    model(junk, positions(1, 8, 4))  # a rejected draft
    logits, _ = model(x[:, 8:], positions(1, 8, 4))  # roll back to length 8 and continue
    ref, _ = model.__class__.forward(model, x)
    torch.testing.assert_close(logits, ref[:, 8:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_module_cached_equals_uncached(tiny):
    cfg, model, module = tiny
    x = torch.randint(0, cfg.model.vocab_size, (2, 15))
    _, h = model(x)
    ref, ref_g = module(model, x[:, 1:], h[:, :-1])
    module.setup_caches(2, torch.float32)
    out1, _ = module(model, x[:, 1:6], h[:, :5], positions(2, 0, 5))
    out2, g2 = module(model, x[:, 6:], h[:, 5:-1], positions(2, 5, 9))
    torch.testing.assert_close(torch.cat([out1, out2], 1), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g2, ref_g[:, 5:], atol=1e-5, rtol=1e-5)


def test_parameter_share_of_default_size():
    cfg, _ = preset("small")
    model, module = FullModel(cfg.model), RecyclableModule(cfg.model, cfg.module)
    share = module.num_params() / (model.num_params() + module.num_params())
    assert 0.05 < share < 0.15  # the paper adds about 15%; one block + fc is ~10% here
    # Module = fc (2d*d) + one block without input norm.
    d = cfg.model.dim
    block = sum(p.numel() for p in model.layers[0].parameters()) - d
    assert module.num_params() == 2 * d * d + block


def test_module_layout_is_eagle():
    cfg, _ = preset("tiny")
    module = RecyclableModule(cfg.model, ModuleConfig(n_layer=2))
    names = set(dict(module.named_parameters()))
    assert "fc.weight" in names and module.fc.weight.shape == (cfg.model.dim, 2 * cfg.model.dim)
    assert not any(n.startswith("layers.0.attention_norm") for n in names)
    assert "layers.1.attention_norm.weight" in names
    assert not any(n.startswith("norm") for n in names)


@torch.no_grad()
def test_module_reads_embedding_first():
    cfg, model, module = tiny_pair(2)
    x = torch.randint(0, cfg.model.vocab_size, (1, 4))
    h = torch.randn(1, 4, cfg.model.dim)
    d = cfg.model.dim
    # Zero the h half of fc: the output must then depend on the token embedding only.
    module.fc.weight[:, d:] = 0
    a, _ = module(model, x, h)
    b, _ = module(model, x, torch.randn_like(h))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fan_in, fan_out", [(1536, 576), (2048, 576), (384, 1024), (576, 4096)])
def test_linear_row_result_independent_of_row_count_bf16(fan_in, fan_out, threads):
    """A one-token `ar` pass and a multi-token verify pass must round each row the same way in bf16 (plain
    nn.Linear does not on oneDNN CPUs: a single row, and with two threads on AVX-512 without bf16 any call of
    under four rows, takes another path)."""
    from recyclegpt.layers import Linear

    torch.manual_seed(0)
    lin = Linear(fan_in, fan_out, bias=False).to(torch.bfloat16)
    x = torch.randn(1, 6, fan_in).to(torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            together = lin(x)  # [1, 6, out]
            for rows in (1, 2, 3):  # a one-token ar pass, verify passes of k = 1 and 2
                parts = torch.cat([lin(x[:, j:j + rows]) for j in range(0, 6, rows)], 1)
                assert torch.equal(parts, together), rows
    finally:
        torch.set_num_threads(before)
    assert together.shape == (1, 6, fan_out)
