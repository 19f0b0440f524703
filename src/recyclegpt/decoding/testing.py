"""Helpers for tests and sanity benchmarks: small random models and uncached references.

Not used by decoding itself. Random models here get their embedding and (untied) output
weights scaled up so logits are peaked: greedy decisions then have clear margins and
fp32 rounding differences between batch shapes cannot flip them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import ModuleConfig, preset
from ..model import FullModel
from ..module import RecyclableModule


def random_models(seed: int = 0, preset_name: str = "tiny", scale: float = 10.0,
                  dtype: torch.dtype = torch.float32, module_cfg: ModuleConfig | None = None,
                  **model_overrides) -> tuple[FullModel, RecyclableModule]:
    """A randomly initialised (model, module) pair from a preset, model fields overridable."""
    cfg, _ = preset(preset_name)
    overrides = {"tie_embeddings": False, **model_overrides}
    mc = dataclasses.replace(cfg.model, **overrides)
    torch.manual_seed(seed)
    model = FullModel(mc)
    module = RecyclableModule(mc, module_cfg or cfg.module)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(scale)
        if not mc.tie_embeddings:
            model.output.weight.mul_(scale)
    return model.to(dtype).eval(), module.to(dtype).eval()


def copy_models(seed: int = 0, context: float = 0.0, scale: float = 10.0,
                **model_overrides) -> tuple[FullModel, RecyclableModule]:
    """A full model whose attention output is scaled by `context` and a module that computes the
    full model's context-free next-token function of its input token.

    With context=0 the full model maps x_t -> x_{t+1} independently of the past and every module
    draft (chained too) is correct; a small context > 0 makes some drafts wrong.
    """
    cfg, _ = preset("tiny")
    mc = dataclasses.replace(cfg.model, tie_embeddings=False, **model_overrides)
    torch.manual_seed(seed)
    model = FullModel(mc)
    module = RecyclableModule(mc, ModuleConfig(n_layer=mc.n_layer, final_norm=True))
    d = mc.dim
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(scale)
        model.output.weight.mul_(scale)
        for src, dst in zip(model.layers, module.layers, strict=True):
            state = {k: v for k, v in src.state_dict().items() if not k.startswith("attention_norm")}
            dst.load_state_dict(state, strict=False)
            dst.attention.wo.weight.zero_()
            src.attention.wo.weight.mul_(context)
        module.norm.load_state_dict(model.norm.state_dict())
        module.fc.weight.zero_()
        module.fc.weight[:, :d] = torch.eye(d)  # [embed(x_{t+1}); h_t] -> embed(x_{t+1})
    return model.eval(), module.eval()


@torch.no_grad()
def reference_greedy(model: FullModel, prompt: Sequence[int], n: int) -> list[int]:
    """Greedy continuation by full recompute of the sequence each step (no cache)."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@torch.no_grad()
def uncached_logits(model: FullModel, module: RecyclableModule, seq: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Full-model logits [P, V] (row t predicts x_{t+1}) and module logits [P-1, V] (row t reads
    (h_t, x_{t+1}) and predicts x_{t+2}) over the true sequence, both without caches."""
    idx = torch.tensor([list(seq)])
    logits, h = model(idx)
    mlogits, _ = module(model, idx[:, 1:], h[:, :-1])
    return logits[0], mlogits[0]


def cache_prefix(net: torch.nn.Module, row: int, length: int) -> list[tuple[Tensor, Tensor]]:
    """Copies of each layer's cached keys/values of `row` at positions < length."""
    return [(c.k_cache[row, :, :length].clone(), c.v_cache[row, :, :length].clone()) for c in net.caches]
