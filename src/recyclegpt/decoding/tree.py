"""Draft trees: several guesses per position, verified in one full-model pass.

A chain drafts one token per position and loses the round at the first wrong one; a tree keeps the
module's runners-up too. Per row and round (static shapes: depth D, top-k c, node budget N):

1. expand (`draft_tree`): level 1 is the module's top c tokens from its carried logits; each
   further level runs the module once over the c most probable nodes of the level before (their
   entries see the module's cache and their own ancestors only) and takes each one's top c
   children. Every candidate's score is the product of the draft probabilities on its path.
2. select: the N best candidates by score, the module's own chain (its top token at every level)
   first: a tree then never holds less than the chain of the same depth, however flat the module's
   probabilities (a flat module would otherwise fill the budget with shallow runners-up). A child
   never ranks above its parent and comes after it in the candidate order, so the N best (ties kept
   in order) always contain a node's parents: the selection is a tree. Nodes are numbered 1..N in
   candidate order (parents first); node 0 is the pending token.
3. verify (`decoding.rounds`): one full pass over the N+1 nodes, each at position n + depth but in
   cache slot n + index (`TreePlacement`), attending to the committed cache and its ancestors.
4. accept (`accept_tree`): the full model's choice at every node (`targets`: argmax, or one draw
   per depth for sampled rows) and the longest path whose every token is the choice at its parent.
   The token after the path is the choice at its last node. Sampling stays exact: along the path
   each token is a draw from the full model's distribution given the tokens before it, with noise
   of its own depth, whatever the tree holds (drafting only decides how many of those draws one
   pass can keep). This is recursive rejection over siblings with deterministic (top-c) drafts:
   a one-hot proposal is accepted with probability p(token), so "draw x ~ p, descend into the child
   holding x, else emit x" is the same rule.
5. commit (`commit_path`): the accepted path's keys and values move from their tree slots to
   slots n+1..n+a, where plain decoding would have put them.

A chain is the tree whose node i has parent i-1; host drafts (prompt lookup) ride in a tree round
that way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..model import FullModel, TreePlacement
from ..module import RecyclableModule

CHAIN = 1e4  # rank bonus of the module's top-1 chain (`draft_tree`); log-probabilities are far above -CHAIN


class Tree(NamedTuple):
    """One round's draft trees; node 0 is the pending token."""

    tokens: Tensor  # [B, N] long: nodes 1..N
    parents: Tensor  # [B, N+1] long: each node's parent (node 0: itself)
    depth: Tensor  # [B, N+1] long: 0 for node 0


def placement(n: Tensor, ancestors: Tensor, key_pos: Tensor, first: int = 0) -> TreePlacement:
    """Slots and mask of tree entries stored from slot n (per row) on.

    ancestors [B, T, R] bool: entry t (in slot n + first + t) sees entry r (in slot n + r) when
    ancestors[b, t, r]; every entry also sees the committed cache, slots < n. Slots past the cache
    clamp to its last (the junk slot, `decoding.rounds`)."""
    B, T, R = ancestors.shape
    S = key_pos.shape[0]
    slots = (n[:, None] + first + torch.arange(T, device=n.device)).clamp(max=S - 1)  # [B, T]
    rel = key_pos[None, :] - n[:, None]  # [B, S]
    seen = ancestors.gather(2, rel.clamp(0, R - 1)[:, None, :].expand(B, T, S))  # [B, T, S]
    inside = ((rel >= 0) & (rel < R))[:, None, :]
    mask = (rel < 0)[:, None, :] | (inside & seen)
    return TreePlacement(slots, mask[:, None])


def ancestors_of(parents: Tensor, depth: int) -> Tensor:
    """parents [B, M] (parents before children, entry 0 its own parent) -> bool [B, M, M]: [b, i, j]
    when j is i or one of its ancestors (at most `depth` levels up)."""
    B, M = parents.shape
    anc = torch.eye(M, dtype=torch.bool, device=parents.device).expand(B, M, M)
    for _ in range(depth):
        anc = anc | anc.gather(1, parents[:, :, None].expand(B, M, M))
    return anc


def draft_tree(model: FullModel, module: RecyclableModule, depth: int, topk: int, nodes: int, mlogits: Tensor,
               g: Tensor, n: Tensor) -> Tree:
    """Expand and select (steps 1-2 of the module docstring) from the module's carried head logits and
    state at n-1 (mlogits [B, V], g [B, d]); the pending token is at position n [B].

    The module's entries for levels 2..D go to its cache slots n .. n+(D-1)c-1 (junk that the round's
    catch-up overwrites, or that stays past what any later query reads)."""
    B, d = g.shape
    c, dev = topk, n.device
    score, tok = mlogits.float().log_softmax(-1).topk(c, -1)  # [B, c]
    first = (torch.arange(c, device=dev) == 0).expand(B, c)  # each parent's top child
    chain = first  # on the module's top-1 chain
    pool_tok, pool_score, pool_chain = [tok], [score], [chain]
    pool_parent = [torch.full((B, c), -1, dtype=torch.long, device=dev)]  # -1: the pending token
    pool_level = [1] * c
    front = torch.arange(c, device=dev).expand(B, c)  # the frontier's candidate indices
    front_tok, front_score, front_chain, front_state = tok, score, chain, g[:, None].expand(B, c, d)
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
        s2, t2 = logits.float().log_softmax(-1).topk(c, -1)  # [B, c, c]: each frontier node's children
        cand_score = (front_score[:, :, None] + s2).flatten(1)  # [B, c*c]
        cand_chain = (front_chain[:, :, None] & first[:, None, :]).flatten(1)
        offset = sum(t.shape[1] for t in pool_tok)
        pool_tok.append(t2.flatten(1))
        pool_score.append(cand_score)
        pool_chain.append(cand_chain)
        pool_parent.append(front[:, :, None].expand(B, c, c).flatten(1))
        pool_level += [level] * (c * c)
        if level < depth:
            pick = (cand_score + CHAIN * cand_chain).topk(c, -1).indices  # [B, c]
            front_score, front_chain = cand_score.gather(1, pick), cand_chain.gather(1, pick)
            front_tok = pool_tok[-1].gather(1, pick)
            front = offset + pick
            owner = pick // c  # the frontier entry each new frontier node was predicted by
            front_state = states.gather(1, owner[:, :, None].expand(B, c, d))
            parent_entry = e0 + owner
    tokens, parent = torch.cat(pool_tok, 1), torch.cat(pool_parent, 1)
    scores = torch.cat(pool_score, 1) + CHAIN * torch.cat(pool_chain, 1)  # the chain ranks first
    chosen = scores.sort(dim=-1, descending=True, stable=True).indices[:, :nodes].sort(-1).values  # [B, N]
    node_of = torch.zeros_like(parent)  # candidate -> node number (0: not chosen)
    node_of.scatter_(1, chosen, torch.arange(1, nodes + 1, device=dev).expand(B, nodes))
    par = parent.gather(1, chosen)
    par = torch.where(par < 0, 0, node_of.gather(1, par.clamp(min=0)))
    level_of = torch.tensor(pool_level, device=dev).expand(B, -1)
    zero = torch.zeros(B, 1, dtype=torch.long, device=dev)
    return Tree(tokens.gather(1, chosen), torch.cat([zero, par], 1), torch.cat([zero, level_of.gather(1, chosen)], 1))


def chain_tree(drafts: Tensor) -> Tree:
    """drafts [B, N] as a chain-shaped tree (node i's parent is node i-1)."""
    B, N = drafts.shape
    idx = torch.arange(N + 1, device=drafts.device).expand(B, N + 1)
    return Tree(drafts, (idx - 1).clamp(min=0), idx)


def accept_tree(tree: Tree, targets: Tensor, valid: Tensor, anc: Tensor, depth: int) -> tuple[Tensor, Tensor]:
    """targets [B, N+1]: the full model's choice at each node; valid [B, N+1] bool (node 0 True);
    anc [B, N+1, N+1] (`ancestors_of`). Returns (the accepted path as node numbers by depth
    [B, D+1] (entries past the accepted count are node 0), the accepted count [B])."""
    tok = torch.cat([targets[:, :1], tree.tokens], 1)  # node 0 always "matches"
    match = valid & (tok == targets.gather(1, tree.parents))  # [B, N+1]
    accepted = ~(anc & ~match[:, None, :]).any(-1)  # every node on the way matches
    leaf = (accepted * (tree.depth + 1)).argmax(-1)  # [B]: the deepest accepted node (a path: siblings differ)
    on_path = anc.gather(1, leaf[:, None, None].expand(-1, 1, anc.shape[2]))[:, 0]  # [B, N+1]
    levels = torch.arange(depth + 1, device=tok.device)
    at = on_path[:, :, None] & (tree.depth[:, :, None] == levels)  # [B, N+1, D+1]
    path = at.long().argmax(1)  # [B, D+1]: the node at each depth (0 past the leaf)
    return path, tree.depth.gather(1, leaf[:, None])[:, 0]


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
