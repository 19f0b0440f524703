"""Turning logits into tokens, and the acceptance rules of `verify`.

One `logits_to_probs` serves the full model and the module alike, so draft distributions q and
target distributions p are shaped by the same temperature / top-k / top-p. Temperature 0 means
greedy: `Picker` then takes the argmax directly (the one-hot `logits_to_probs` result is the same
thing, used by the speculative rule's unit tests).

Acceptance (one verify round, per row; K drafts, K+1 target positions):
- greedy: accept the longest prefix where draft i equals the target argmax at position i-1,
  next token = target argmax right after it (a correction or the bonus token);
- sampling (speculative sampling, as in gpt-fast / Leviathan et al.): accept draft d_i with
  probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from
  norm(max(0, p_i - q_i)); when all drafts are accepted, sample the bonus token from p_{K+1}.
  A deterministic drafter (n-gram) is the case q = one-hot(d).
Rows may carry fewer real drafts than K (`draft_len`); drafts past it are never accepted and the
token after the last real draft comes from p alone (bonus).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import RecycleError


def validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise RecycleError (one line) for values no sampler accepts."""
    if not isinstance(temperature, (int, float)) or math.isnan(temperature) or temperature < 0:
        raise RecycleError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if math.isinf(temperature):
        raise RecycleError(f"temperature must be finite, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise RecycleError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or math.isnan(top_p) or not 0 < top_p <= 1:
        raise RecycleError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def logits_to_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits [..., V] -> probabilities [..., V] in fp32: temperature, then top-k, then top-p.

    temperature 0 gives the one-hot argmax. Ties at the top-k boundary are all kept.
    """
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    if temperature != 1:
        logits = logits / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (the top one stays).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def greedy(logits: Tensor) -> Tensor:
    """argmax over the last dim (bf16 argmax is several times slower on CPU than upcast + argmax)."""
    return logits.float().argmax(-1)


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw one token per distribution: probs [..., V] -> long [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


class Picker:
    """Chooses tokens from logits with one fixed sampling setting and one generator."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None):
        validate_sampling(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.greedy = temperature == 0
        self.generator = generator

    def probs(self, logits: Tensor) -> Tensor:
        return logits_to_probs(logits, self.temperature, self.top_k, self.top_p)

    def pick(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """logits [..., V] -> (tokens [...], probs [..., V] or None when greedy)."""
        if self.greedy:
            return greedy(logits), None
        p = self.probs(logits)
        return sample(p, self.generator), p


def accept_greedy(drafts: Tensor, targets: Tensor, draft_len: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """drafts [B, K]; targets [B, K+1] (argmax of the full model at each verified position).

    Returns (accepted [B] in 0..K, next_token [B]).
    """
    K = drafts.shape[1]
    ok = drafts == targets[:, :K]
    if draft_len is not None:
        ok &= torch.arange(K, device=drafts.device) < draft_len[:, None]
    accepted = ok.cumprod(1).sum(1)
    return accepted, targets.gather(1, accepted[:, None]).squeeze(1)


def accept_speculative(drafts: Tensor, q: Tensor, p: Tensor, generator: torch.Generator | None,
                       draft_len: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The speculative-sampling rule.

    drafts [B, K] (d_i drawn from q_i); q [B, K, V] draft probabilities; p [B, K+1, V] target
    probabilities (fp32). Returns (accepted [B] in 0..K, next_token [B]).
    """
    B, K = drafts.shape
    arange_k = torch.arange(K, device=drafts.device)
    pd = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
    qd = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, K, generator=generator, device=p.device, dtype=p.dtype)
    ok = u * qd < pd  # u < min(1, p/q) for q > 0
    if draft_len is not None:
        ok &= arange_k < draft_len[:, None]
    accepted = ok.cumprod(1).sum(1)
    rows = torch.arange(B, device=p.device)
    p_next = p[rows, accepted]  # [B, V]
    limit = draft_len if draft_len is not None else torch.full_like(accepted, K)
    rejected = accepted < limit  # a real draft was rejected at index `accepted`
    q_next = q[rows, accepted.clamp(max=K - 1)] if K else torch.zeros_like(p_next)
    residual = (p_next - q_next * rejected[:, None]).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    # mass == 0 only through rounding (p == q makes a rejection impossible): fall back to p.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
    return accepted, sample(residual, generator)
