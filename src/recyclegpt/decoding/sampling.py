"""Turning logits into tokens, and the acceptance rule of a draft-and-verify round.

Every function here is plain tensor code with per-row settings, so one round body serves a batch
whose rows mix greedy and sampled requests, eagerly or inside a compiled graph:

- `logits_to_probs`: temperature, then top-k, then top-p, per row. Temperature 0 is greedy: the
  row's distribution is the one-hot argmax, so greedy rows need no special case anywhere below.
- `race`: one categorical draw as argmax(p / E) with E ~ Exp(1) (the exponential race: the same
  distribution as `torch.multinomial`). The caller supplies E, drawn from the request's own
  generator, so a request's random stream does not depend on what else is in the batch and a
  compiled graph needs no generator inside it.
- `accept`: greedy rows keep the longest prefix of drafts equal to the full model's argmax;
  sampled rows use the speculative-sampling rule (accept d_i with probability min(1, p_i(d_i) /
  q_i(d_i)); at the first rejection draw from norm(max(0, p_i - q_i)); when every real draft is
  accepted, draw the bonus token from p). A deterministic drafter (prompt lookup) is q = one-hot.
  Rows carry their own number of real drafts (`lens`); drafts past it are padding, never accepted.
  `force` rows accept their real drafts unverified: the paper's lossy `recycle` round.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Per-row (temperature [B], top_k [B], top_p [B]); top_k 0 and top_p 1.0 as plain numbers switch those
# filters off for every row, and `logits_to_probs` then leaves out their sort over the vocabulary.
Settings = tuple[Tensor, Tensor | int, Tensor | float]


def _per_row(value: float | Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    """A setting as a tensor broadcastable against `like` [B, ..., V]: a number, or one value per row [B]."""
    if not isinstance(value, Tensor):
        return torch.tensor(value, dtype=dtype, device=like.device)
    return value.to(dtype).view(-1, *([1] * (like.dim() - 1)))


def logits_to_probs(logits: Tensor, temperature: float | Tensor, top_k: int | Tensor = 0,
                    top_p: float | Tensor = 1.0) -> Tensor:
    """logits [B, ..., V] -> probabilities [B, ..., V] in fp32: temperature, then top-k, then top-p.

    Settings are numbers or per-row tensors [B]. Temperature 0 gives the one-hot argmax; top_k 0 and
    top_p 1 switch those filters off. Ties at a filter's boundary are all kept.
    """
    x = logits.float()
    V = x.shape[-1]
    greedy = _per_row(temperature, x, x.dtype) == 0
    onehot = F.one_hot(x.argmax(-1), V).to(x.dtype)
    plain = not isinstance(top_k, Tensor) and not isinstance(top_p, Tensor) and top_k in (0, V) and top_p >= 1
    if not isinstance(temperature, Tensor) and temperature == 0:
        return onehot
    # Temperatures under 1e-30 divide as 1e-30: logits / T stays finite (a float32 inf would make the softmax
    # NaN), and the distribution is already the argmax's to float32 precision there.
    x = x / torch.where(greedy, 1.0, _per_row(temperature, x, x.dtype).clamp_min(1e-30))
    if not plain:
        s = x.sort(-1, descending=True).values  # [B, ..., V]
        k = _per_row(top_k, x, torch.long)
        k = torch.where((k <= 0) | (k > V), V, k).expand(*x.shape[:-1], 1)
        kth = s.gather(-1, k - 1)  # the k-th largest value: everything below it goes
        s = s.masked_fill(s < kth, float("-inf"))
        ps = s.softmax(-1)
        # top-p: drop a token when the mass strictly before it already reaches top_p (the top one stays).
        # (top_p at least 1e-30: a tiny top_p that float32 rounds to 0 must still keep the top token.)
        keep = (ps.cumsum(-1) - ps) < _per_row(top_p, x, x.dtype).clamp_min(1e-30)
        cut = torch.where(keep, s, float("inf")).amin(-1, keepdim=True)
        x = x.masked_fill((x < kth) | (x < cut), float("-inf"))
    return torch.where(greedy, onehot, x.softmax(-1))


def race(p: Tensor, expo: Tensor) -> Tensor:
    """One categorical draw per distribution: p [..., V], expo [..., V] Exp(1) noise -> long [...].

    argmax(p / E): token v wins with probability p[v]. A one-hot p always gives its argmax."""
    return (p / expo.clamp_min(1e-20)).argmax(-1)


def pick(logits: Tensor, sampled: bool, temperature: Tensor, top_k: Tensor | int, top_p: Tensor | float,
         expo: Tensor) -> tuple[Tensor, Tensor | None]:
    """Choose a token per row: logits [B, V] -> (tokens [B], probs [B, V] | None).

    sampled False: every row is greedy (argmax, no probabilities). Otherwise per-row settings [B]
    and Exp(1) noise [B, V]; greedy rows (temperature 0) still get their argmax."""
    if not sampled:
        return logits.float().argmax(-1), None
    p = logits_to_probs(logits, temperature, top_k, top_p)
    return race(p, expo), p


def accept(logits: Tensor, drafts: Tensor, lens: Tensor, force: Tensor, sampled: bool,
           settings: Settings, q: Tensor | None, uniform: Tensor, expo: Tensor
           ) -> tuple[Tensor, Tensor]:
    """The acceptance rule of one round (see the module docstring).

    logits [B, K+1, V]: the full model at the pending token and each draft; drafts [B, K];
    lens [B]: real drafts per row; force [B] bool: accept the real drafts unverified; settings:
    per-row (temperature, top_k, top_p); sampled rounds also need q [B, K, V] (the drafts'
    distributions; one-hot for host drafts), uniform [B, K] and expo [B, V] (the row's noise).
    Returns (accepted [B] in 0..lens, next token [B]: the correction or the bonus token).
    """
    B, K = drafts.shape
    valid = torch.arange(K, device=drafts.device) < lens[:, None]  # [B, K]
    if not sampled:
        targets = logits.float().argmax(-1)  # [B, K+1]
        ok = valid & ((drafts == targets[:, :K]) | force[:, None])
        accepted = ok.long().cumprod(1).sum(1)
        return accepted, targets.gather(1, accepted[:, None])[:, 0]
    V = logits.shape[-1]
    p = logits_to_probs(logits, *settings)  # [B, K+1, V]
    pd = p[:, :K].gather(-1, drafts[..., None])[..., 0]
    qd = q.gather(-1, drafts[..., None])[..., 0]
    ok = valid & ((uniform * qd < pd) | force[:, None])  # u < min(1, p/q) for q > 0
    accepted = ok.long().cumprod(1).sum(1)
    p_next = p.gather(1, accepted[:, None, None].expand(B, 1, V))[:, 0]  # [B, V]
    q_next = q.gather(1, accepted.clamp(max=K - 1)[:, None, None].expand(B, 1, V))[:, 0]
    rejected = ((accepted < lens) & ~force).to(p.dtype)  # a real draft was rejected at `accepted`
    residual = (p_next - q_next * rejected[:, None]).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    # mass == 0 only through rounding (p == q makes a rejection impossible): fall back to p.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
    return accepted, race(residual, expo)
