"""Admission prefill: prompts into their slots' cache rows, the first token, the module's first state.

Each prompt is one causal pass over the prompt itself (not over the whole static cache) that stores
every layer's keys and values in its slot's cache rows; other rows are untouched, so slots join a
running batch. Prompts are never padded or grouped with others: in bf16 the kernels' blocking
depends on a pass's length and row count, so a prompt prefilled next to others of other lengths
could round differently from the same prompt alone, and a greedy request would then not be
token-identical to its run alone. With the module, the prompt shifted by one, with the first new
token at the end, goes through the module the same way: its entry at t reads (h_t, x_{t+1}), and the
entry at the prompt's last position, which reads the first new token, is what the first draft
starts from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..model import FullModel
from ..module import RecyclableModule

# (slots, logits [G, V] at their last prompt token) -> first new token [G]
ChooseFirst = Callable[[list[int], Tensor], Tensor]


def prefill(model: FullModel, module: RecyclableModule | None, prompts: Sequence[Sequence[int]],
            slots: Sequence[int], choose: ChooseFirst) -> tuple[Tensor, Tensor | None, int]:
    """Prefill prompts[i] into cache row slots[i] (positions 0..len-1), for the module too when given.

    Returns (first new token [R], the module's output state [R, d] at each prompt's last position or
    None, the number of full-model passes), rows in the order of `prompts`.
    """
    device = model.tok_embeddings.weight.device
    first, states = [], []
    for prompt, slot in zip(prompts, slots, strict=True):
        idx = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # [1, T]
        rows = torch.tensor([slot], device=device)
        h = model.prefill(idx, rows)  # [1, T, d]
        tok = choose([slot], model.lm_head(h[:, -1]))  # [1]
        first.append(tok)
        if module is not None:
            nxt = torch.cat([idx[:, 1:], tok[:, None]], 1)  # x_{t+1} at index t, the first new token last
            states.append(module.prefill(model, nxt, h, rows)[:, -1])  # [1, d]
    return torch.cat(first), (torch.cat(states) if states else None), len(prompts)
