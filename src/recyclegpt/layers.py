"""Transformer building blocks shared by the full model and the recyclable module.

LLaMA conventions (RMSNorm, RoPE with the rotate-half layout, SwiGLU, grouped-query attention),
kept identical to Hugging Face `LlamaForCausalLM` so weights copy across without permutation.
Caches are passed in explicitly; no layer keeps decoding state of its own.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import ModelConfig

# (out, in, dtype, threads) -> the fewest rows a call needs for each of its rows to round as in a larger call;
# probed once per shape (`Linear`).
_ROWS_NEEDED: dict[tuple, int] = {}
_PROBE_ROWS = 32  # the probe's large call


def _rows_needed(weight: Tensor) -> int:
    key = (*weight.shape, weight.dtype, torch.get_num_threads())
    rows = _ROWS_NEEDED.get(key)
    if rows is None:
        # Only outputs near a bf16 rounding boundary show another accumulation order: 32 rows give thousands
        # of outputs, so a differing path is all but certain to show.
        g = torch.Generator().manual_seed(0)
        x = torch.randn(_PROBE_ROWS, weight.shape[1], generator=g).to(weight.dtype)
        with torch.no_grad():
            full = F.linear(x, weight)
            rows = _ROWS_NEEDED[key] = next(
                (m for m in (1, 2, 4, 8, 16) if torch.equal(
                    torch.cat([F.linear(x[i:i + 1].expand(m, -1), weight)[:1] for i in range(_PROBE_ROWS)]), full)),
                _PROBE_ROWS)
    return rows


class Linear(nn.Linear):
    """nn.Linear whose result for a row does not depend on how many rows the call has (CPU).

    In a decoding pass on the CPU (float32 or bfloat16), `decode` (and `model.run_blocks` for whole blocks) run
    recyclegpt's own kernels (`kernels`), which compute each row alike at every row count and stream the weights
    once for all rows.

    Elsewhere bfloat16 calls go to torch. oneDNN's bf16 kernels take other paths for calls of few rows: a single row
    (seen on AVX-512-BF16 CPUs at 1536 -> 576 and 2048 -> 576), and with two threads on an AVX-512 CPU without
    bf16 arithmetic anything under four rows at most shapes. The one-token `ar` pass then rounds differently
    from the same row inside a (k+1)-token verify pass, and greedy `verify` drifts from `ar`. A one-time probe
    per shape and thread count finds the fewest rows that round like a large call (1, 2, 4, ...); a call with
    fewer rows is padded to that many (the last row repeated: a stride-0 view for one row) and the extra rows
    dropped. Shapes that need nothing pay nothing. Compiled graphs skip this: with inductor's GEMM templates
    every row is computed alike; with oneDNN's (larger models) a one-token pass can still round a row
    differently, and this trick inside a graph did not cure it (docs/results.md, "Exactness in bfloat16").
    """

    def forward(self, x: Tensor) -> Tensor:
        n = x.numel() // x.shape[-1]
        if n < _PROBE_ROWS and x.dtype is torch.bfloat16 and x.device.type == "cpu" \
                and not torch.compiler.is_compiling():  # a call of _PROBE_ROWS rows or more never needs padding
            need = _rows_needed(self.weight)
            if n < need:
                flat = x.reshape(n, -1)
                pad = flat[-1:].expand(need - n, -1)
                y = F.linear(flat.expand(need, -1) if n == 1 else torch.cat([flat, pad]), self.weight, self.bias)
                return y[:n].reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)

    def decode(self, x: Tensor) -> Tensor:
        """The call of a decoding pass, whose rows must not depend on the pass's row count: recyclegpt's CPU
        kernel where it applies (`kernels.applies`), else `forward`."""
        if kernels.applies(x, self.weight):
            return kernels.skinny_linear(x, self)
        return self(x)


class KVStore(Protocol):
    """Anything attention can write keys/values into and read all visible keys/values back from."""

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (as HF Llama does) so bf16 inputs keep their scale exactly.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, max_pos: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables [max_pos, head_dim] in the rotate-half layout (frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)  # [P, D/2]
    emb = torch.cat([angles, angles], dim=-1)  # [P, D]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, T, H, D]; cos/sin: [B, T, D] or [T, D]."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_bias(visible: Tensor) -> Tensor:
    """bool -> the float32 additive bias attention takes: 0 where a query sees a key, -inf elsewhere.

    Masks travel as this bias, not as bools: added to the scores it gives exactly what masked_fill
    would (s + 0 = s), and a compiled graph reads float rows vectorised where it read a stored bool
    mask several times slower on CPU, in every layer's softmax."""
    return torch.where(visible, 0.0, float("-inf"))


def cache_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """Attention against the KV cache whose every query row is computed independently of the others.

    Lossless drafting needs the logits of position p to be bit-identical whether p is scored in a
    one-token `ar` pass or inside a (k+1)-token verify pass. SDPA's fused CPU kernel picks its block
    sizes from the query length, so in bf16 the same row rounds differently (greedy `verify` then
    drifts from `ar`); plain matmuls + an fp32 softmax do not, at a small extra cost per pass.
    q: [B, H, Tq, D]; k, v: [B, H, S, D]; bias: float32 [B, 1, Tq, S] (`attention_bias`).
    """
    scores = (q @ k.transpose(-2, -1)).float() * (q.shape[-1] ** -0.5)  # [B, H, Tq, S]
    probs = (scores + bias).softmax(-1).to(v.dtype)
    return probs @ v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = Linear(cfg.dim, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = Linear(cfg.dim, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = Linear(cfg.n_head * cfg.head_dim, cfg.dim, bias=False)

    def keys_values(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, dim] -> this layer's keys (RoPE applied) and values, [B, Hkv, T, D] each."""
        B, T, _ = x.shape
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_head, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: Tensor,  # [B, T, dim]
        cos: Tensor,
        sin: Tensor,
        bias: Tensor | None,  # float32 [B or 1, 1, T, S] (`attention_bias`); None means plain causal over T
        kv: KVStore | None,
        input_pos: Tensor | None,  # [B, T]
    ) -> Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_head, self.head_dim), cos, sin).transpose(1, 2)  # [B, H, T, D]
        k, v = self.keys_values(x, cos, sin)
        rep = self.n_head // self.n_kv_head
        if kv is not None:
            k, v = kv.update(input_pos, k, v)  # [B, Hkv, S, D]
        if bias is None:  # plain causal (training, prefill): is_causal needs equal query and key lengths
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if rep > 1:
                # Grouped-query attention without copying keys/values per query head: fold the `rep` query
                # heads that share a kv head into the query length (static shapes, no repeat of the
                # [S]-long cache, which would otherwise be copied `rep` times on every decode step).
                q = q.reshape(B, self.n_kv_head, rep * T, self.head_dim)
                bias = bias.repeat(1, 1, rep, 1)
            y = cache_attention(q, k, v, bias)
        y = y.reshape(B, self.n_head, T, self.head_dim)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)  # gate
        self.w3 = Linear(dim, hidden, bias=False)  # up
        self.w2 = Linear(hidden, dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn_dim: int | None = None, input_norm: bool = True):
        super().__init__()
        # Block 0 of the recyclable module reads the fc output directly (EAGLE-1 layout).
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps) if input_norm else nn.Identity()
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, ffn_dim or cfg.ffn_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor | None,
                kv: KVStore | None, input_pos: Tensor | None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, bias, kv, input_pos)
        return x + self.feed_forward(self.ffn_norm(x))
