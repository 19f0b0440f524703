"""The full model: a LLaMA-family decoder-only LM.

tokens x_1..x_t -> embed -> N blocks -> final norm -> h_t -> LM head -> p(x_{t+1})

`forward(idx, input_pos)` returns (logits, hidden) where hidden is h, the post-norm state the
LM head reads; the recyclable module consumes it. With `input_pos` the static KV caches set up
by `setup_caches` are used; without it the call is a plain causal pass (training, reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import kernels
from .cache import CacheRows, KVCache
from .config import ModelConfig
from .layers import Block, KVStore, Linear, RMSNorm, attention_bias, rope_tables


def cache_bias(input_pos: Tensor, key_pos: Tensor) -> Tensor:
    """Float32 [B, 1, T, S] (`attention_bias`): a query at position p sees keys at positions <= p."""
    return attention_bias(key_pos[None, None, None, :] <= input_pos[:, None, :, None])


class TreePlacement(NamedTuple):
    """Where a draft tree's tokens live in a static cache, which differs from their positions: tokens at
    one depth share a position (their RoPE angle) but need a cache slot each, and see only their own
    ancestors (`decoding.tree`)."""

    slots: Tensor  # [B, T] long: the cache slot each token's keys/values are written to
    bias: Tensor  # float32 [B, 1, T, S] (`attention_bias`): the cache slots each token attends to


def run_blocks(layers: nn.ModuleList, kvs: Sequence[KVStore] | None, x: Tensor, rope_cos: Tensor,
               rope_sin: Tensor, key_pos: Tensor, input_pos: Tensor | None,
               tree: TreePlacement | None = None) -> Tensor:
    """x [B, T, d] through `layers`.

    input_pos [B, T]: against the static caches `kvs`. Without `tree`, a token at position p is stored
    at slot p and sees slots <= p; with it, it is stored at tree.slots and sees what tree.bias says.
    input_pos None: a plain causal pass over x from position 0; `kvs`, if given, only store each
    layer's keys/values (a prefill: `CacheRows`).
    """
    slots = input_pos
    if input_pos is None:
        T = x.shape[1]
        cos, sin, bias = rope_cos[:T], rope_sin[:T], None
        kvs = kvs if kvs is not None else [None] * len(layers)
    elif tree is None:
        cos, sin, bias = rope_cos[input_pos], rope_sin[input_pos], cache_bias(input_pos, key_pos)
    else:
        cos, sin, bias, slots = rope_cos[input_pos], rope_sin[input_pos], tree.bias, tree.slots
    if kernels.blocks_apply(layers, x, kvs, bias):
        # A decoding pass on the CPU: every block in one kernel call (`kernels`).
        return kernels.decode_blocks(layers, x, cos, sin, bias, kvs, slots)
    for layer, kv in zip(layers, kvs, strict=True):
        x = layer(x, cos, sin, bias, kv, slots)
    return x


class FullModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("key_pos", torch.arange(cfg.max_seq_len), persistent=False)
        self.caches = nn.ModuleList()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def setup_caches(self, batch: int, dtype: torch.dtype | None = None) -> None:
        p = self.tok_embeddings.weight
        if p.device.type == "cpu":
            kernels.load()  # decoding's CPU kernels (`model.run_blocks`, `Linear.decode`), built on first use
        self.caches = nn.ModuleList(
            KVCache(batch, self.cfg.max_seq_len, self.cfg.n_kv_head, self.cfg.head_dim, dtype or p.dtype, p.device)
            for _ in self.layers
        )

    def embed(self, idx: Tensor) -> Tensor:
        return self.tok_embeddings(idx)

    def lm_head(self, h: Tensor) -> Tensor:
        """Logits of states h [..., dim], the call decoding makes (the module's drafts, the first token after a
        prompt): recyclegpt's CPU kernel where it applies (`Linear.decode`), torch's linear elsewhere (training)."""
        return self.output.decode(h)

    def forward(self, idx: Tensor, input_pos: Tensor | None = None, logits: bool = True,
                tree: TreePlacement | None = None) -> tuple[Tensor | None, Tensor]:
        """idx: [B, T]; input_pos: [B, T] absolute positions (uses the caches) or None; tree: the cache
        slots and attention bias of a draft tree's tokens (`run_blocks`).

        Returns logits [B, T, V] (None when logits=False) and hidden h [B, T, dim].
        """
        x = run_blocks(self.layers, None if input_pos is None else self.caches, self.tok_embeddings(idx),
                       self.rope_cos, self.rope_sin, self.key_pos, input_pos, tree)
        h = self.norm(x)
        if not logits:
            return None, h
        # A cache pass is a decoding pass: its logits row for a token must not depend on how many tokens the
        # pass holds (`verify` against `ar`), which `Linear.decode` guarantees on recyclegpt's kernel.
        return (self.output(h) if input_pos is None else self.output.decode(h)), h

    def prefill(self, idx: Tensor, rows: Tensor) -> Tensor:
        """Prompts from position 0: idx [G, T] into cache rows `rows` [G]. A causal pass over the prompts
        themselves that stores every layer's keys/values (`CacheRows`). Returns h [G, T, dim]."""
        fill = [CacheRows(c, rows) for c in self.caches]
        return self.norm(run_blocks(self.layers, fill, self.tok_embeddings(idx), self.rope_cos, self.rope_sin,
                                    self.key_pos, None))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
