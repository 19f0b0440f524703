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

# (slot, logits [1, V] at its prompt's last token) -> its first new token [1]
ChooseFirst = Callable[[int, Tensor], Tensor]


def prefill(model: FullModel, module: RecyclableModule | None, prompts: Sequence[Sequence[int]],
            slots: Sequence[int], choose: ChooseFirst) -> tuple[Tensor, Tensor | None, Tensor | None, int]:
    """Prefill prompts[i] into cache row slots[i] (positions 0..len-1), for the module too when given.

    Returns (first new token [R], the module's output state [R, d] and its head logits [R, V] at each
    prompt's last position, or None twice without a module, the number of full-model passes), rows in
    the order of `prompts`. The head runs per prompt too, so its rounding never depends on other prompts.
    """
    device = model.tok_embeddings.weight.device
    first, states, heads = [], [], []
    for prompt, slot in zip(prompts, slots, strict=True):
        idx = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # [1, T]
        rows = torch.tensor([slot], device=device)
        h = model.prefill(idx, rows)  # [1, T, d]
        tok = choose(slot, model.lm_head(h[:, -1]))  # [1]
        first.append(tok)
        if module is not None:
            nxt = torch.cat([idx[:, 1:], tok[:, None]], 1)  # x_{t+1} at index t, the first new token last
            states.append(module.prefill(model, nxt, h, rows)[:, -1])  # [1, d]
            heads.append(model.lm_head(states[-1]))  # [1, V]
    if not states:
        return torch.cat(first), None, None, len(prompts)
    return torch.cat(first), torch.cat(states), torch.cat(heads), len(prompts)
