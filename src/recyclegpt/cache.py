"""Static KV cache with per-row positions and free rollback.

Every row writes its keys/values at its own absolute positions, and a query at position p reads
only keys at positions <= p. So rolling back is just moving a row's length back: entries past it
are overwritten before any query can see them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    def __init__(self, batch: int, max_seq_len: int, n_kv_head: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        super().__init__()
        shape = (batch, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("rows", torch.arange(batch, device=device)[:, None], persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """input_pos: [B, T]; k, v: [B, Hkv, T, D]. Returns the whole cache [B, Hkv, S, D]."""
        # Advanced indices on dims 0 and 2 around a slice put (B, T) first: values are [B, T, Hkv, D].
        self.k_cache[self.rows, :, input_pos] = k.transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache[self.rows, :, input_pos] = v.transpose(1, 2).to(self.v_cache.dtype)
        return self.k_cache, self.v_cache

    def first_rows(self, batch: int) -> KVCache:
        """A cache over this one's first `batch` rows: its tensors are views, so what a pass over the
        view writes lands in these rows (a round over fewer rows than the cache holds)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        for name in ("k_cache", "v_cache", "rows"):
            view.register_buffer(name, getattr(self, name)[:batch], persistent=False)
        return view

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Row src's entries at positions < length into row dst (the rest of dst is junk afterwards)."""
        for buf in (self.k_cache, self.v_cache):
            buf[dst, :, :length] = buf[src, :, :length]

    def copy_slots(self, src: Tensor, dst: Tensor) -> None:
        """Row b's entries at slots src[b] to slots dst[b] (both [B, T]); every source is read before
        any destination is written."""
        for buf in (self.k_cache, self.v_cache):
            # Indexing, as `update` does: a compiled graph writes the T slots in place, where
            # scatter_ made it copy the whole cache.
            buf[self.rows, :, dst] = buf[self.rows, :, src].clone()  # [B, T, Hkv, D]


class CacheRows:
    """Prefill store: keeps a prompt's keys/values at positions 0..T-1 of cache rows `rows` and hands the
    fresh ones back, so the prompt's queries attend causally over the prompt itself (SDPA) instead of
    over the whole static cache (less work: the prompt's length, not the cache's, sets the key count)."""

    def __init__(self, cache: KVCache, rows: Tensor):
        self.cache, self.rows = cache, rows  # rows [G]: the cache row of each batch entry

    def update(self, input_pos: Tensor | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        T = k.shape[2]  # k, v: [G, Hkv, T, D]
        self.cache.k_cache[self.rows, :, :T] = k.to(self.cache.k_cache.dtype)
        self.cache.v_cache[self.rows, :, :T] = v.to(self.cache.v_cache.dtype)
        return k, v


class UnrollKV:
    """Training-time store for the recyclable module's unrolled steps.

    Step s of the unroll attends to step 1's keys causally and to its own position's keys from
    steps 2..s; this list-backed store hands attention exactly those keys (the mask selects).
    """

    def __init__(self) -> None:
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []

    def update(self, input_pos: Tensor | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.append(k)
        self.v.append(v)
        return torch.cat(self.k, dim=2), torch.cat(self.v, dim=2)


def unroll_mask(T: int, step: int, device: torch.device | str = "cpu") -> Tensor:
    """Bool mask [T, step*T] for unrolled module step `step` (1-based).

    Query t attends to step-1 keys j <= t and to the keys of steps 2..step at index t (diagonal):
    exactly what the decode-time cache holds when drafting in a chain.
    """
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=device)
    return torch.cat([causal] + [eye] * (step - 1), dim=1)
