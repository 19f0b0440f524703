"""The recyclable module: predicts the token after next from the full model's state.

[embed(x_{t+1}) ; h_t] -> Linear(2d -> d, no bias) -> M blocks -> shared LM head -> p(x_{t+2})

This is the EAGLE-1 draft layout (embedding half first, block 0 without input norm, no final
norm, the full model's embedding and head), so a trained module exports to vLLM/SGLang exactly.
The module has its own KV cache; its attention is causal over its own positions. For chained
drafting (step i > 1) the caller feeds the module's own output state back in place of h.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels
from .cache import CacheRows, KVCache, UnrollKV, unroll_mask
from .config import ModelConfig, ModuleConfig
from .layers import Block, Linear, RMSNorm, attention_bias
from .model import FullModel, TreePlacement, run_blocks


class RecyclableModule(nn.Module):
    def __init__(self, model_cfg: ModelConfig, cfg: ModuleConfig):
        super().__init__()
        self.model_cfg, self.cfg = model_cfg, cfg
        d = model_cfg.dim
        if cfg.input_norms:
            self.enorm = RMSNorm(d, model_cfg.norm_eps)
            self.hnorm = RMSNorm(d, model_cfg.norm_eps)
        self.fc = Linear(2 * d, d, bias=False)
        self.layers = nn.ModuleList(
            Block(model_cfg, cfg.ffn_dim, input_norm=i > 0) for i in range(cfg.n_layer)
        )
        self.norm = RMSNorm(d, model_cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.caches = nn.ModuleList()
        self.apply(FullModel._init_weights)

    def setup_caches(self, batch: int, dtype: torch.dtype | None = None) -> None:
        p = self.fc.weight
        if p.device.type == "cpu":
            kernels.load()  # decoding's CPU kernels (`model.run_blocks`, `Linear.decode`), built on first use
        mc = self.model_cfg
        self.caches = nn.ModuleList(
            KVCache(batch, mc.max_seq_len, mc.n_kv_head, mc.head_dim, dtype or p.dtype, p.device)
            for _ in self.layers
        )

    def _fuse(self, emb: Tensor, h: Tensor, decoding: bool = False) -> Tensor:
        if self.cfg.input_norms:
            emb, h = self.enorm(emb), self.hnorm(h)
        x = torch.cat([emb, h], dim=-1)
        return self.fc.decode(x) if decoding else self.fc(x)  # a decoding pass's few rows: the CPU kernel

    def forward(self, model: FullModel, idx: Tensor, h: Tensor, input_pos: Tensor | None = None,
                logits: bool = True, tree: TreePlacement | None = None) -> tuple[Tensor | None, Tensor]:
        """One module pass over T positions.

        idx: [B, T] tokens x_{t+1}; h: [B, T, dim] full-model (or module) states h_t;
        input_pos: [B, T] the positions t (uses the module's caches) or None (plain causal); tree: the
        cache slots and attention bias of draft-tree entries (`model.run_blocks`).
        Returns logits [B, T, V] for x_{t+2} and the output state [B, T, dim] the head reads.
        `model` supplies the shared embedding and LM head.
        """
        x = run_blocks(self.layers, None if input_pos is None else self.caches,
                       self._fuse(model.embed(idx), h, decoding=input_pos is not None),
                       model.rope_cos, model.rope_sin, model.key_pos, input_pos, tree)
        g = self.norm(x)
        return (model.lm_head(g) if logits else None), g

    def prefill(self, model: FullModel, idx: Tensor, h: Tensor, rows: Tensor) -> Tensor:
        """The module's entries for a prompt from position 0 (`FullModel.prefill`): idx [G, T] tokens
        x_{t+1}, h [G, T, dim] states h_t, into cache rows `rows` [G]. Returns the output state
        [G, T, dim] (the head's input: the last real entry's gives the first draft)."""
        fill = [CacheRows(c, rows) for c in self.caches]
        x = run_blocks(self.layers, fill, self._fuse(model.embed(idx), h), model.rope_cos, model.rope_sin,
                       model.key_pos, None)
        return self.norm(x)

    def forward_unrolled(self, model: FullModel, idx: Tensor, h: Tensor, steps: int) -> list[Tensor]:
        """Training: `steps` chained module passes over a whole sequence, no cache.

        idx: [B, T] the full token sequence x_0..x_{T-1}; h: [B, T, dim] the full model's states.
        Step s (1-based) at index t reads (state, x_{t+s}) at position t+s-1 and predicts x_{t+s+1};
        step 1's state is h_t, step s>1's is step s-1's output at t. Returns per-step logits
        [B, T-s, V] aligned with targets idx[:, s+1:].
        """
        B, T = idx.shape
        stores = [UnrollKV() for _ in self.layers]
        state = h[:, : T - 1]  # [B, T-1, dim]
        L = T - 1
        out: list[Tensor] = []
        for s in range(1, steps + 1):
            if L - (s - 1) <= 1:
                break
            # Keep length L for every step (so the masks line up); indices past the data are padding
            # whose outputs are never scored.
            tok = torch.zeros(B, L, dtype=idx.dtype, device=idx.device)
            n = T - s  # real tokens x_{t+s} for t in [0, T-s)
            tok[:, :n] = idx[:, s:]
            pos = torch.arange(L, device=idx.device) + (s - 1)
            pos = pos.clamp(max=model.cfg.max_seq_len - 1)
            cos, sin = model.rope_cos[pos], model.rope_sin[pos]
            bias = None if s == 1 else attention_bias(unroll_mask(L, s, idx.device))[None, None]
            x = self._fuse(model.embed(tok), state)
            for layer, kv in zip(self.layers, stores, strict=True):
                x = layer(x, cos, sin, bias, kv, None)
            g = self.norm(x)
            out.append(model.lm_head(g[:, : T - s - 1]))
            state = g
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
