"""Admission prefill: prompts into their slots' cache rows, the first token, the module's first state.

Prompts are grouped by length (`prefill_groups`); each group is one causal pass over the prompts
themselves (not over the whole static cache) that stores every layer's keys and values in the
group's cache rows; other rows are untouched, so slots join a running batch. With the module, the
group's prompt shifted by one, with the first new token at the end, goes through the module the
same way: its entry at t reads (h_t, x_{t+1}), and the entry at the prompt's last position, which
reads the first new token, is what the first draft starts from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..model import FullModel
from ..module import RecyclableModule

# (slots of a group, logits [G, V] at their last prompt token) -> first new token [G]
ChooseFirst = Callable[[list[int], Tensor], Tensor]


def prefill_groups(lens: Sequence[int], slack: float = 1.25) -> list[list[int]]:
    """Row indices grouped by length, a group growing while its padded size (rows x longest) stays
    within `slack` x its real tokens: few passes, little padding."""
    groups: list[list[int]] = []
    real = 0
    for b in sorted(range(len(lens)), key=lambda i: lens[i]):
        if groups and (len(groups[-1]) + 1) * lens[b] <= slack * (real + lens[b]):
            groups[-1].append(b)
            real += lens[b]
        else:
            groups.append([b])
            real = lens[b]
    return groups


def prefill(model: FullModel, module: RecyclableModule | None, prompts: Sequence[Sequence[int]],
            slots: Sequence[int], choose: ChooseFirst) -> tuple[Tensor, Tensor | None, int]:
    """Prefill prompts[i] into cache row slots[i] (positions 0..len-1), for the module too when given.

    Returns (first new token [R], the module's output state [R, d] at each prompt's last position or
    None, the number of passes), rows in the order of `prompts`.
    """
    device = model.tok_embeddings.weight.device
    R = len(prompts)
    first = torch.zeros(R, dtype=torch.long, device=device)
    g_last = None
    passes = 0
    for group in prefill_groups([len(p) for p in prompts]):
        lens = torch.tensor([len(prompts[i]) for i in group], device=device)
        T = int(lens.max())
        idx = torch.zeros(len(group), T, dtype=torch.long, device=device)  # right-padded: junk past a row's
        for j, i in enumerate(group):  # length is masked until decoding overwrites it
            idx[j, :len(prompts[i])] = torch.tensor(prompts[i], dtype=torch.long, device=device)
        rows = torch.tensor([slots[i] for i in group], device=device)
        at = torch.arange(len(group), device=device)
        h = model.prefill(idx, rows)  # [G, T, d]
        tok = choose([slots[i] for i in group], model.lm_head(h[at, lens - 1]))  # [G]
        first[torch.tensor(group, device=device)] = tok
        passes += 1
        if module is not None:
            nxt = torch.cat([idx[:, 1:], idx.new_zeros(len(group), 1)], 1)  # x_{t+1} at index t
            nxt[at, lens - 1] = tok
            g = module.prefill(model, nxt, h, rows)[at, lens - 1]  # [G, d]
            if g_last is None:
                g_last = g.new_zeros(R, g.shape[-1])
            g_last[torch.tensor(group, device=device)] = g
    return first, g_last, passes
