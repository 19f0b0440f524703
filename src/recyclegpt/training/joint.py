"""Joint objective of RecycleGPT: loss = CE(full) + lambda * sum_s decay^(s-1) * CE(module step s).

Alignment (the classic off-by-one): for x_0..x_{T-1} the full model at t predicts x_{t+1}; the
module step 1 at t reads (h_t, x_{t+1}) and is scored on x_{t+2}; step s>1 reads its own step
s-1 output state with x_{t+s} and is scored on x_{t+s+1} (chain drafting, as at decode time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import FullModel
from ..module import RecyclableModule


class JointModel(nn.Module):
    """Full model + recyclable module as one nn.Module, so DDP/FSDP see all parameters."""

    def __init__(self, model: FullModel, module: RecyclableModule, recycle_weight: float = 0.3,
                 unroll_steps: int = 2, unroll_decay: float = 0.5, train_full: bool = True):
        super().__init__()
        self.model, self.module = model, module
        self.recycle_weight, self.unroll_steps, self.unroll_decay = recycle_weight, unroll_steps, unroll_decay
        self.train_full = train_full

    def forward(self, idx: Tensor, targets: Tensor | None = None, h: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """idx: [B, T] tokens. With train_full=False (module-only training on a frozen model),
        `targets` may replace the corpus as labels (self-distillation): token ids [B, T], or
        distributions [B, T, V] (soft targets); and `h` [B, T, dim], the frozen model's states for
        idx when the caller already ran it, saves that pass."""
        labels = idx if targets is None else targets
        if self.train_full:
            logits, h = self.model(idx)
            ce_full = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(0, 1))
        else:
            if h is None:
                with torch.no_grad():
                    _, h = self.model(idx, logits=False)
            ce_full = torch.zeros((), device=idx.device)
        step_logits = self.module.forward_unrolled(self.model, idx, h, self.unroll_steps)
        loss = ce_full
        metrics: dict[str, Tensor] = {"ce_full": ce_full.detach()}
        for s, lg in enumerate(step_logits, 1):
            ce = F.cross_entropy(lg.flatten(0, 1).float(), labels[:, s + 1:].flatten(0, 1))
            loss = loss + self.recycle_weight * self.unroll_decay ** (s - 1) * ce
            metrics[f"ce_module_{s}"] = ce.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics


@torch.no_grad()
def agreement(model: FullModel, module: RecyclableModule, idx: Tensor, steps: int = 2) -> dict[str, float]:
    """Teacher-forced top-1 agreement of each module step with the full model's own prediction
    at that position (what verify accepts), and with the corpus."""
    logits, h = model(idx)
    full_top = logits.argmax(-1)  # [B, T]: full model's guess for x_{t+1}
    out: dict[str, float] = {}
    for s, lg in enumerate(module.forward_unrolled(model, idx, h, steps), 1):
        pred = lg.argmax(-1)  # [B, T-s-1]: guesses for x_{t+s+1}
        # The full model's guess for x_{t+s+1}, given the true prefix, sits at index t+s.
        out[f"agree_full_{s}"] = (pred == full_top[:, s:-1]).float().mean().item()
        out[f"acc_module_{s}"] = (pred == idx[:, s + 1:]).float().mean().item()
    out["acc_full"] = (full_top[:, :-1] == idx[:, 1:]).float().mean().item()
    return out
