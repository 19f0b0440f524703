"""Draft trees: several guesses per position, verified in one full-model pass.

A chain drafts one token per position and loses the round at the first wrong one; a tree keeps the
module's runners-up too. Per row and round (static shapes: depth D, top-k c, node budget N):

1. expand (`draft_tree`): level 1 is c children of the pending token from the module's carried
   logits; each further level runs the module once over the c best nodes of the level before
   (their entries see the module's cache and their own ancestors only) and takes c children of
   each. Greedy rounds take each node's top c tokens; sampled rounds draw c without replacement
   from the module's distribution. A candidate's score is the product of the draft probabilities
   on its path.
2. select: the N best candidates by score, the module's own chain (its first child at every level)
   first: a tree then never holds less than the chain of the same depth, however flat the module's
   probabilities. A child never ranks above its parent and comes after it in the candidate order,
   so the N best (ties kept in order) always contain a node's parents: the selection is a tree.
   Nodes are numbered 1..N, the chain first (node i at depth i), then the rest in candidate order
   (parents before children); node 0 is the pending token. At most `tree_candidates(D, c)` exist.
3. verify (`decoding.rounds`): one full pass over the N+1 nodes, each at position n + depth but in
   cache slot n + index (`TreePlacement`), attending to the committed cache and its ancestors.
4. accept: greedy rounds (`accept_tree`) keep the longest path whose every token is the full
   model's argmax at its parent, and the argmax at its last node. Sampled rounds (`sample_tree`)
   walk down by recursive rejection over each node's children (each proposed from the module's
   distribution; one-hot for greedy rows and host drafts), so every emitted token is distributed
   as the full model says given the tokens before it.
5. commit (`commit_path`): the accepted path's keys and values move from their tree slots to
   slots n+1..n+a, where plain decoding would have put them.

A chain is the tree whose node i has parent i-1; host drafts (prompt lookup) ride in a tree round
that way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..layers import attention_bias
from ..model import FullModel, TreePlacement
from ..module import RecyclableModule
from .sampling import Settings, logits_to_probs, race

CHAIN = 1e4  # rank bonus of the module's top-1 chain (`draft_tree`); log-probabilities are far above -CHAIN


def tree_candidates(depth: int, topk: int) -> int:
    """How many nodes `draft_tree` can choose from: c at level 1, c*c at each level after."""
    return topk + (depth - 1) * topk ** 2


class Tree(NamedTuple):
    """One round's draft trees; node 0 is the pending token."""

    tokens: Tensor  # [B, N] long: nodes 1..N
    parents: Tensor  # [B, N+1] long: each node's parent (node 0: itself)
    depth: Tensor  # [B, N+1] long: 0 for node 0
    rank: Tensor  # [B, N+1] long: each node's place among its siblings in draw order
    live: Tensor  # [B, N+1] bool: False for a node the module gave probability 0 (a filtered token)
    q: Tensor | None  # [B, N+1, V]: the module's distribution of each node's children (sampled rounds)


def placement(n: Tensor, ancestors: Tensor, key_pos: Tensor, first: int = 0) -> TreePlacement:
    """Slots and attention bias of tree entries stored from slot n (per row) on.

    ancestors [B, T, R] bool: entry t (in slot n + first + t) sees entry r (in slot n + r) when
    ancestors[b, t, r]; every entry also sees the committed cache, slots < n. Slots past the cache
    clamp to its last (the junk slot, `decoding.rounds`): what lands there is never read by a true
    entry (its ancestors all sit in earlier slots)."""
    B, T, R = ancestors.shape
    S = key_pos.shape[0]
    slots = (n[:, None] + first + torch.arange(T, device=n.device)).clamp(max=S - 1)  # [B, T]
    window = (n[:, None] + torch.arange(R, device=n.device)).clamp(max=S - 1)  # [B, R]
    committed = attention_bias(key_pos[None, :] < n[:, None])[:, None, :].expand(B, T, S)  # [B, T, S]
    # A scatter, not a gather per key: the compiled graph then stores the bias once, where a gather
    # expression would be recomputed inside every layer's softmax.
    bias = committed.scatter(2, window[:, None, :].expand(B, T, R), attention_bias(ancestors))  # [B, T, S]
    return TreePlacement(slots, bias[:, None])


def ancestors_of(parents: Tensor, depth: int) -> Tensor:
    """parents [B, M] (parents before children, entry 0 its own parent) -> bool [B, M, M]: [b, i, j]
    when j is i or one of its ancestors (at most `depth` levels up)."""
    B, M = parents.shape
    anc = torch.eye(M, dtype=torch.bool, device=parents.device).expand(B, M, M)
    for _ in range(depth):
        anc = anc | anc.gather(1, parents[:, :, None].expand(B, M, M))
    return anc


def _children(logits: Tensor, expo: Tensor | None, c: int, settings: Settings | None
              ) -> tuple[Tensor, Tensor, Tensor | None]:
    """A node's c children: logits [B, m, V] -> (scores [B, m, c], tokens [B, m, c], q [B, m, V] | None).
    Greedy (settings None): the top c; sampled: the first c of the Gumbel race with noise `expo`."""
    if settings is None:
        score, tok = logits.float().log_softmax(-1).topk(c, -1)
        return score, tok, None
    temperature, top_k, top_p = settings
    q = logits_to_probs(logits, torch.where(temperature > 0, temperature, 1.0), top_k, top_p)
    expo = torch.where((temperature > 0).view(-1, 1, 1), expo, 1.0)  # greedy rows: the top c
    tok = (q / expo.clamp_min(1e-20)).topk(c, -1).indices  # the race's first c: draws w/o replacement
    return q.gather(-1, tok).log().cummin(-1).values, tok, q


def draft_tree(model: FullModel, module: RecyclableModule, depth: int, topk: int, nodes: int, mlogits: Tensor,
               g: Tensor, n: Tensor, settings: Settings | None = None,
               noise: Tensor | None = None) -> Tree:
    """Expand and select (steps 1-2 of the module docstring) from the module's carried head logits and
    state at n-1 (mlogits [B, V], g [B, d]); the pending token is at position n [B].

    Greedy rounds (settings None) take each node's top-c tokens. Sampled rounds draw them: the first
    c of the Gumbel race over the module's distribution q (temperature, top-k, top-p of the row;
    temperature 1 for its greedy rows), i.e. c draws without replacement, with the Exp(1) noise
    [B, 1 + (D-1)c, V] (root, then each expansion's nodes). A child's score uses the smallest q among
    its earlier siblings too, so the selection keeps a prefix of every node's draws (what the
    acceptance rule needs).

    The module's entries for levels 2..D go to its cache slots n .. n+(D-1)c-1 (junk that the round's
    catch-up overwrites, or that stays past what any later query reads)."""
    B, d = g.shape
    c, dev = topk, n.device
    s1, t1, q1 = _children(mlogits[:, None], None if noise is None else noise[:, :1], c, settings)
    score, tok = s1[:, 0], t1[:, 0]  # [B, c]
    first = (torch.arange(c, device=dev) == 0).expand(B, c)  # each parent's first child
    pool_tok, pool_score, pool_chain = [tok], [score], [first]  # chain: the module's own chain
    pool_parent = [torch.full((B, c), -1, dtype=torch.long, device=dev)]  # -1: the pending token
    pool_level, pool_rank = [1] * c, list(range(c))
    qs = [q1] if q1 is not None else []  # the children's distribution at the root, then at each entry
    entry_pool = []  # the candidate each module entry expands
    front = torch.arange(c, device=dev).expand(B, c)  # the frontier's candidate indices
    front_tok, front_score, front_chain, front_state = tok, score, first, g[:, None].expand(B, c, d)
    E = (depth - 1) * c  # module entries of the expansion
    entry_anc = torch.zeros(B, max(E, 1), max(E, 1), dtype=torch.bool, device=dev)
    parent_entry = torch.full((B, c), -1, dtype=torch.long, device=dev)
    eye = torch.eye(max(E, 1), dtype=torch.bool, device=dev)
    for level in range(2, depth + 1):
        e0 = (level - 2) * c
        own = eye[e0:e0 + c].expand(B, c, -1)  # [B, c, E]
        inherited = entry_anc.gather(1, parent_entry.clamp(min=0)[:, :, None].expand(B, c, entry_anc.shape[2]))
        rows = own | (inherited & (parent_entry >= 0)[:, :, None])
        entry_anc = torch.cat([entry_anc[:, :e0], rows, entry_anc[:, e0 + c:]], 1)
        pos = (n + level - 2).clamp(max=model.cfg.max_seq_len - 1)[:, None].expand(B, c)
        where = placement(n, rows, model.key_pos, first=e0)
        logits, states = module(model, front_tok, front_state, pos, tree=where)  # [B, c, V], [B, c, d]
        s2, t2, q2 = _children(logits, None if noise is None else noise[:, 1 + e0:1 + e0 + c], c, settings)
        if q2 is not None:
            qs.append(q2)
        entry_pool.append(front)
        cand_score = (front_score[:, :, None] + s2).flatten(1)  # [B, c*c]
        cand_chain = (front_chain[:, :, None] & first[:, None, :]).flatten(1)
        offset = sum(t.shape[1] for t in pool_tok)
        pool_tok.append(t2.flatten(1))
        pool_score.append(cand_score)
        pool_chain.append(cand_chain)
        pool_parent.append(front[:, :, None].expand(B, c, c).flatten(1))
        pool_level += [level] * (c * c)
        pool_rank += list(range(c)) * c
        if level < depth:
            pick = (cand_score + CHAIN * cand_chain).topk(c, -1).indices  # [B, c]
            front_score, front_chain = cand_score.gather(1, pick), cand_chain.gather(1, pick)
            front_tok = pool_tok[-1].gather(1, pick)
            front = offset + pick
            owner = pick // c  # the frontier entry each new frontier node was predicted by
            front_state = states.gather(1, owner[:, :, None].expand(B, c, d))
            parent_entry = e0 + owner
    tokens, parent, score = torch.cat(pool_tok, 1), torch.cat(pool_parent, 1), torch.cat(pool_score, 1)
    on_chain = torch.cat(pool_chain, 1)
    ranked = score + CHAIN * on_chain  # the chain ranks first
    chosen = ranked.sort(dim=-1, descending=True, stable=True).indices[:, :nodes]  # [B, N]
    # Node order: the chain first (node i at depth i sits in slot n+i, where `ar` keeps that position: along
    # the chain the pass computes exactly what `ar` does), then the rest in candidate order (parents first).
    P = tokens.shape[1]
    chosen = chosen.gather(1, (chosen + P * ~on_chain.gather(1, chosen)).sort(-1).indices)
    node_of = torch.zeros_like(parent)  # candidate -> node number (0: not chosen)
    node_of.scatter_(1, chosen, torch.arange(1, nodes + 1, device=dev).expand(B, nodes))
    par = parent.gather(1, chosen)
    par = torch.where(par < 0, 0, node_of.gather(1, par.clamp(min=0)))
    zero = torch.zeros(B, 1, dtype=torch.long, device=dev)

    def per_node(values: list[int]) -> Tensor:
        return torch.cat([zero, torch.tensor(values, device=dev).expand(B, -1).gather(1, chosen)], 1)

    live = torch.cat([torch.ones_like(zero, dtype=torch.bool), score.gather(1, chosen).isfinite()], 1)
    q = None
    if qs:  # node -> the entry that expanded it (+1; 0: the root's, also for nodes never expanded)
        entry_of = torch.zeros_like(parent)
        if entry_pool:
            cands = torch.cat(entry_pool, 1)  # [B, E]
            entry_of.scatter_(1, cands, torch.arange(1, cands.shape[1] + 1, device=dev).expand(B, -1))
        q_all = torch.cat(qs, 1)  # [B, 1+E, V]
        which = torch.cat([zero, entry_of.gather(1, chosen)], 1)  # [B, N+1]
        q = q_all.gather(1, which[:, :, None].expand(-1, -1, q_all.shape[-1]))
    return Tree(tokens.gather(1, chosen), torch.cat([zero, par], 1), per_node(pool_level), per_node(pool_rank),
                live, q)


def chain_tree(drafts: Tensor, like: Tree) -> Tree:
    """drafts [B, N] as a chain-shaped tree (node i's parent is node i-1), with `like`'s q (unused:
    host drafts are deterministic)."""
    B, N = drafts.shape
    idx = torch.arange(N + 1, device=drafts.device).expand(B, N + 1)
    return Tree(drafts, (idx - 1).clamp(min=0), idx, torch.zeros_like(idx), torch.ones_like(idx, dtype=torch.bool),
                like.q)


def accept_tree(tree: Tree, targets: Tensor, valid: Tensor, anc: Tensor, depth: int) -> tuple[Tensor, Tensor]:
    """Greedy rounds. targets [B, N+1]: the full model's argmax at each node; valid [B, N+1] bool (node
    0 True); anc [B, N+1, N+1] (`ancestors_of`). Returns (the accepted path as node numbers by depth
    [B, D+1] (entries past the accepted count are node 0), the accepted count [B]); the next token is
    the target at the path's last node."""
    tok = torch.cat([targets[:, :1], tree.tokens], 1)  # node 0 always "matches"
    match = valid & tree.live & (tok == targets.gather(1, tree.parents))  # [B, N+1]
    accepted = ~(anc & ~match[:, None, :]).any(-1)  # every node on the way matches
    leaf = (accepted * (tree.depth + 1)).argmax(-1)  # [B]: the deepest accepted node (a path: siblings differ)
    on_path = anc.gather(1, leaf[:, None, None].expand(-1, 1, anc.shape[2]))[:, 0]  # [B, N+1]
    levels = torch.arange(depth + 1, device=tok.device)
    at = on_path[:, :, None] & (tree.depth[:, :, None] == levels)  # [B, N+1, D+1]
    path = at.long().argmax(1)  # [B, D+1]: the node at each depth (0 past the leaf)
    return path, tree.depth.gather(1, leaf[:, None])[:, 0]


def sample_tree(tree: Tree, p: Tensor, valid: Tensor, det: Tensor, uniform: Tensor, expo: Tensor, depth: int,
                topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sampled rounds: recursive rejection over siblings, depth by depth from the pending token.

    p [B, N+1, V]: the full model's distribution at each node (one-hot for greedy rows); valid [B, N+1];
    det [B] bool: rows whose drafts are deterministic (greedy rows, host drafts: each sibling's proposal
    is one-hot); uniform [B, D*c] U(0,1); expo [B, D+1, V] Exp(1), one per depth.

    At the current node with target r = p: sibling j (token x, proposal q_j = the node's q without the
    siblings drawn before it, renormalised; one-hot for det rows) is accepted with probability
    min(1, r(x) / q_j(x)); on rejection r becomes norm(max(0, r - q_j)). The first accepted sibling
    becomes the current node; when none is, the next token is drawn from r and the round ends. Each step
    is a speculative-sampling step with target r and proposal q_j, so the token at every depth is
    distributed as p given the path before it. Returns (path [B, D+1], accepted [B], next token [B])."""
    B, M, V = p.shape
    c, dev = topk, p.device
    tok = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), tree.tokens], 1)  # [B, N+1]
    kids = torch.zeros(B, M * c, dtype=torch.long, device=dev)  # [b, node*c + j]: node's j-th child (0: none)
    ok = valid & tree.live
    slot = torch.where(ok[:, 1:], tree.parents[:, 1:] * c + tree.rank[:, 1:], M * c)  # invalid -> dropped
    kids = torch.cat([kids, kids[:, :1]], 1).scatter(1, slot, torch.arange(1, M, device=dev).expand(B, -1))[:, :-1]
    kids = kids.view(B, M, c)
    q_nodes = tree.q if tree.q is not None else p  # only det rows when there is no q: never read then
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    going = torch.ones(B, dtype=torch.bool, device=dev)
    path = torch.zeros(B, depth + 1, dtype=torch.long, device=dev)
    nxt = torch.zeros(B, dtype=torch.long, device=dev)
    accepted = torch.zeros(B, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)
    for d in range(depth + 1):
        r = p[rows, cur]  # [B, V]
        moved = torch.zeros_like(going)
        if d < depth:
            q = q_nodes[rows, cur].float()
            taken = torch.zeros(B, V, dtype=torch.bool, device=dev)
            for j in range(c):
                child = kids[rows, cur, j]  # [B]
                try_j = going & ~moved & (child > 0)
                x = tok[rows, child]
                onehot = torch.nn.functional.one_hot(x, V).to(r.dtype)
                qj = q.masked_fill(taken, 0.0)
                qj = torch.where(det[:, None], onehot, qj / qj.sum(-1, keepdim=True).clamp_min(1e-30))
                rx, qx = r.gather(1, x[:, None])[:, 0], qj.gather(1, x[:, None])[:, 0]
                acc = try_j & (uniform[:, d * c + j] * qx < rx)
                rej = try_j & ~acc
                residual = (r - qj).clamp_min(0)
                mass = residual.sum(-1, keepdim=True)
                residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), r)  # mass 0: rounding only
                r = torch.where(rej[:, None], residual, r)
                taken = taken | (rej[:, None] & onehot.bool())
                cur = torch.where(acc, child, cur)
                moved = moved | acc
            path[:, d + 1] = torch.where(moved, cur, 0)
            accepted = accepted + moved.long()
        stop = going & ~moved
        nxt = torch.where(stop, race(r, expo[:, d]), nxt)
        going = going & moved
    return path, accepted, nxt


def commit_path(model: FullModel, n: Tensor, path: Tensor) -> None:
    """Move the path's keys and values from their tree slots (n + node) to n+1..n+D in every layer of
    the full model's cache, where plain decoding keeps them; slots past the accepted count receive
    junk that the next round overwrites before reading."""
    S = model.cfg.max_seq_len
    D = path.shape[1] - 1
    src = (n[:, None] + path[:, 1:]).clamp(max=S - 1)  # [B, D]
    dst = (n[:, None] + 1 + torch.arange(D, device=n.device)).clamp(max=S - 1)
    for cache in model.caches:
        cache.copy_slots(src, dst)
