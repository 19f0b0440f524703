"""The decoding round: one function for every mode, run eagerly or compiled by `torch.compile`.

A round is one full-model pass over B slots. Per slot (all positions absolute):
- the full model's cache holds true entries at positions < n; `pending` is x_n, chosen but not yet
  processed; h_t is the full model's post-norm state at position t (it predicts x_{t+1});
- the module's entry at position t reads (h_t, x_{t+1}) and predicts x_{t+2}. The state carries
  the module's head logits and output state at n-1 (`mlogits`, `g`): what its next draft starts
  from.

The round, with static shapes for a given `RoundShape` and B:
1. drafts: a chain of `shape.chain` module drafts (step 1 from the carried logits, step i > 1
   feeds the module its own output state, as EAGLE does), or the host's drafts (prompt lookup),
   chosen per row; row b has `lens[b]` real drafts, the rest is padding;
2. one full pass over [x_n, d_1..d_K] at positions n..n+K;
3. acceptance per row (`sampling.accept`: greedy, speculative sampling, or forced for `recycle`);
4. commit: row b's new tokens are d_1..d_a and the full model's next token (a = accepted);
5. the module's catch-up over the round's true entries (its cache stays exact, rows that accepted
   different counts share one call: entries past a row's count are junk at positions the next
   round overwrites before reading), giving the next round's `mlogits` and `g`.

A *tree round* (`shape.topk` > 0, `decoding.tree`) replaces the chain by a draft tree of
`shape.width` nodes and depth `shape.depth` per row (host drafts ride in it as a chain-shaped tree),
verifies it in one pass with a tree mask, accepts the longest path the full model agrees with,
moves that path's keys and values into place and runs the same catch-up along it.

Every mode is this round with other per-row inputs: `ar` is a row with no drafts (lens 0; a round
of width 0 is the plain one-token step), `recycle` a row with one forced module draft, `verify` a
row with k module or host drafts. So `ar` and `verify` rows share a batch, and so do greedy and
sampled rows (`sampling`: temperature 0 is a one-hot distribution).

Positions never leave the cache: n..n+K are clamped to max_seq_len - 1, the *junk position*. No
true entry lives there (the last token a row can produce sits at max_seq_len - 1 and is never
processed), and no true query reads it, so padding past the context and idle slots (free or
finished: their n is the junk position, lens 0) write there harmlessly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import FullModel
from ..module import RecyclableModule
from .sampling import Settings, accept, logits_to_probs, pick
from .tree import accept_tree, ancestors_of, chain_tree, commit_path, draft_tree, placement, sample_tree


@dataclass(frozen=True)
class RoundShape:
    """What a round's graph is specialised on, besides the batch size."""

    width: int  # K: draft positions in the verify pass (0: the one-token `ar` step); a tree's node budget
    chain: int  # module drafts chained this round (0: none; at most width)
    module: bool  # run the module's catch-up (some row drafts with the module now or later)
    sampled: bool  # some row samples (False: the greedy graph, no probabilities computed)
    depth: int = 0  # a tree round's depth (most drafts one row can accept)
    topk: int = 0  # a tree round's branching (> 0 makes it a tree round; chain is then 0)
    filtered: bool = False  # some sampled row uses top-k or top-p (False: the graph skips their sort over V)

    @property
    def tree(self) -> bool:
        return self.topk > 0

    @property
    def module_passes(self) -> int:
        """Module calls of one round: chain - 1 (or depth - 1) draft steps and the catch-up."""
        return max((self.depth if self.tree else self.chain) - 1, 0) + self.module


class SlotState(NamedTuple):
    """Per-slot decoding state on the device; row b is slot b."""

    pending: Tensor  # [B] long: x_n
    n: Tensor  # [B] long: the position of x_n
    mlogits: Tensor  # [B, V]: the module's head logits at n-1 ([B, 0] without a module)
    g: Tensor  # [B, d]: the module's output state at n-1 ([B, 0] without a module)


class RoundInputs(NamedTuple):
    """What the host decides for one round, per slot."""

    lens: Tensor  # [B] long: real drafts (0..width)
    force: Tensor  # [B] bool: accept the real drafts unverified (`recycle`)
    host: Tensor  # [B] bool: the drafts are host_drafts, not the module's chain
    host_drafts: Tensor  # [B, width] long
    temperature: Tensor  # [B] float (0: greedy)
    top_k: Tensor  # [B] long (0: off)
    top_p: Tensor  # [B] float (1: off)
    draft_noise: Tensor  # [B, width, V] Exp(1): row b's draws for its module drafts (tree: `tree_noise_sizes`)
    accept_noise: Tensor  # [B, width] U(0, 1): for the speculative rule (tree: `tree_noise_sizes`)
    next_noise: Tensor  # [B, V] Exp(1): for the next token (unused by tree rounds)


def sampling_settings(shape: RoundShape, inp: RoundInputs) -> Settings:
    """The rows' (temperature, top_k, top_p); without `shape.filtered`, top-k and top-p as the constants
    that switch them off, so `sampling.logits_to_probs` leaves out the sort they need."""
    if shape.filtered:
        return inp.temperature, inp.top_k, inp.top_p
    return inp.temperature, 0, 1.0


def decode_round(model: FullModel, module: RecyclableModule | None, shape: RoundShape, state: SlotState,
                 inp: RoundInputs) -> tuple[Tensor, SlotState]:
    """One round (see the module docstring). Returns (vals [B, K+2] = accepted count, then row b's
    tokens out[:accepted+1] (junk past them), the next state)."""
    if shape.tree:
        return tree_round(model, module, shape, state, inp)
    K, sampled = shape.width, shape.sampled
    settings = sampling_settings(shape, inp)
    pending, n, mlogits, g = state
    offsets = torch.arange(K + 1, device=n.device)
    pos = (n[:, None] + offsets).clamp(max=model.cfg.max_seq_len - 1)  # [B, K+1]

    drafts, q = inp.host_drafts, None  # [B, K]
    if sampled and K:
        q = F.one_hot(drafts, model.cfg.vocab_size).float()  # a host drafter is deterministic
    if shape.chain:
        chain, q_chain = draft_chain(model, module, shape.chain, mlogits, g, pos, sampled, settings,
                                     inp.draft_noise)
        pad = K - shape.chain
        drafts = torch.where(inp.host[:, None], drafts, F.pad(chain, (0, pad)))
        if q is not None:
            q = torch.where(inp.host[:, None, None], q, F.pad(q_chain, (0, 0, 0, pad)))

    logits, h = model(torch.cat([pending[:, None], drafts], 1), pos)  # [B, K+1, V], [B, K+1, d]
    if K == 0:
        accepted = torch.zeros_like(n)
        nxt, _ = pick(logits[:, 0], sampled, *settings, inp.next_noise)
    else:
        accepted, nxt = accept(logits, drafts, inp.lens, inp.force, sampled, settings, q, inp.accept_noise,
                               inp.next_noise)
    return commit(model, module, shape, state, drafts, h, pos, accepted, nxt)


def commit(model: FullModel, module: RecyclableModule | None, shape: RoundShape, state: SlotState, drafts: Tensor,
           h: Tensor, pos: Tensor, accepted: Tensor, nxt: Tensor) -> tuple[Tensor, SlotState]:
    """Steps 4-5: the new tokens (drafts [B, K] along the accepted path, then the full model's next
    token) and the module's catch-up over the path's states h [B, K+1, d] at positions pos [B, K+1]."""
    _, n, mlogits, g = state
    offsets = torch.arange(drafts.shape[1] + 1, device=n.device)
    out = torch.where(offsets == accepted[:, None], nxt[:, None], torch.cat([drafts, nxt[:, None]], 1))
    n_next = (n + accepted + 1).clamp(max=model.cfg.max_seq_len - 1)
    if shape.module:
        _, gs = module(model, out, h, pos, logits=False)  # entry i reads (h_{n+i}, x_{n+i+1})
        g = gs.gather(1, accepted[:, None, None].expand(-1, 1, gs.shape[-1]))[:, 0]
        mlogits = model.lm_head(g)
    return torch.cat([accepted[:, None], out], 1), SlotState(nxt, n_next, mlogits, g)


def tree_round(model: FullModel, module: RecyclableModule, shape: RoundShape, state: SlotState,
               inp: RoundInputs) -> tuple[Tensor, SlotState]:
    """A tree round (`decoding.tree`): vals [B, D+2] as `decode_round`'s, D = shape.depth. Sampled
    rounds read their noise as `tree_noise_sizes` lays it out."""
    N, D, c, S = shape.width, shape.depth, shape.topk, model.cfg.max_seq_len
    pending, n, mlogits, g = state
    settings = sampling_settings(shape, inp)
    drafting = tree_drafting_draws(shape)
    tree = draft_tree(model, module, D, c, N, mlogits, g, n, settings if shape.sampled else None,
                      inp.draft_noise[:, :drafting] if shape.sampled else None)
    host = chain_tree(inp.host_drafts, tree)
    tree = type(tree)(*(torch.where(inp.host.view(-1, *[1] * (a.dim() - 1)), a, b) if a is not None else None
                        for a, b in zip(host, tree, strict=True)))
    anc = ancestors_of(tree.parents, D)  # [B, N+1, N+1]
    pos = (n[:, None] + tree.depth).clamp(max=S - 1)  # [B, N+1]
    where = placement(n, anc, model.key_pos)
    tokens = torch.cat([pending[:, None], tree.tokens], 1)  # [B, N+1]
    logits, h = model(tokens, pos, tree=where)  # [B, N+1, V], [B, N+1, d]
    valid = (tree.depth <= inp.lens[:, None]) & (where.slots < S - 1)
    if shape.sampled:
        det = (inp.temperature == 0) | inp.host
        path, accepted, nxt = sample_tree(tree, logits_to_probs(logits, *settings), valid, det, inp.accept_noise,
                                          inp.draft_noise[:, drafting:], D, c)
    else:
        targets = logits.float().argmax(-1)  # [B, N+1]
        path, accepted = accept_tree(tree, targets, valid, anc, D)
        nxt = targets.gather(1, path.gather(1, accepted[:, None]))[:, 0]
    commit_path(model, n, path)
    chain_pos = (n[:, None] + torch.arange(D + 1, device=n.device)).clamp(max=S - 1)
    h_path = h.gather(1, path[:, :, None].expand(-1, -1, h.shape[-1]))
    return commit(model, module, shape, state, tokens.gather(1, path)[:, 1:], h_path, chain_pos, accepted, nxt)


def tree_drafting_draws(shape: RoundShape) -> int:
    """Rows of Exp(1) noise a sampled tree round's module draws take: the root, then each expansion's c nodes."""
    return 1 + (shape.depth - 1) * shape.topk


def tree_noise_sizes(shape: RoundShape) -> tuple[int, int]:
    """(draft_noise rows, accept_noise columns) of a sampled tree round: the module's draws
    (`tree_drafting_draws`), then one Exp(1) row per depth 0..D; one uniform per (depth, sibling)."""
    return tree_drafting_draws(shape) + shape.depth + 1, shape.depth * shape.topk


def draft_chain(model: FullModel, module: RecyclableModule, k: int, mlogits: Tensor, g: Tensor, pos: Tensor,
                sampled: bool, settings: Settings, noise: Tensor
                ) -> tuple[Tensor, Tensor | None]:
    """k module drafts in a chain from the carried head output (mlogits, g at position n-1).

    Step i > 1 runs at position n+i-2 = pos[:, i-2] on (g_{i-1}, d_{i-1}); its cache entry is junk
    that the round's catch-up overwrites. Returns drafts [B, k] and, sampled, their q [B, k, V]."""
    d, q = pick(mlogits, sampled, *settings, noise[:, 0])
    drafts, qs = [d], [q]
    for i in range(2, k + 1):
        step_logits, g2 = module(model, d[:, None], g[:, None], pos[:, i - 2:i - 1])
        g = g2[:, 0]
        d, q = pick(step_logits[:, 0], sampled, *settings, noise[:, i - 1])
        drafts.append(d)
        qs.append(q)
    return torch.stack(drafts, 1), (torch.stack(qs, 1) if sampled else None)
